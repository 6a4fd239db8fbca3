"""The llama.cpp context a GGUF model runs in: its parameters (sequences and their KV streams, batch, threads,
the KV cache's type, the logits rows it reserves), each with the measurement that chose it, and what a failed
``llama_decode`` in it means."""
from __future__ import annotations

from ..errors import BackendError, ContextOverflow, UsageError
from ..formats.gguf_file import GGUFInfo


def context_params(llama_cpp, n_ctx: int, n_seq: int, n_batch: int, n_threads: int, kv_type: str, info: GGUFInfo,
                   name: str, rows: int = 1):
    """``llama_context_params`` for ``n_seq`` sequences of ``n_ctx`` positions each (``name``: the model file,
    for messages), reserving logits for ``rows`` positions of one batch (a draft's verification)."""
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx * n_seq       # n_ctx positions for each sequence (gguf_slots enforces it)
    cparams.n_seq_max = n_seq
    if n_seq > 1:
        # One KV stream per sequence (llama-server's default for -np N): a token attends to its own
        # sequence's cells only, where one unified buffer makes each attend over all N sequences'
        # (masked). SmolLM2-135M, 2 threads, `vlm serve --parallel 4`, 4 streaming clients: 115-134
        # tok/s split vs 100-111 unified in the same 4 rounds (llama-server 113-126). A step whose
        # sequence ids are not consecutive is split into one ubatch per run of them ([1, 3]: 16.3
        # vs 14.4 ms unified), so the server hands out the lowest free slot when nothing else decides.
        cparams.kv_unified = False
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_threads = n_threads
    cparams.n_threads_batch = n_threads
    cparams.no_perf = True
    if kv_type != "f16":
        _quantized_kv(llama_cpp, cparams, kv_type, info, name)
    if any(field == "n_outputs_max" for field, _ in cparams._fields_):
        # We read one logits row per batch (the last token's); left at 0 (= n_batch), llama.cpp
        # reserves its compute buffer for n_batch rows of logits: 98 MiB instead of 16 MiB on a
        # SmolVLM-256M-shaped model. On CPU the untouched pages never become RSS, but the
        # allocation is real on GPU backends and where overcommit is off.
        # Slots read one row each per shared decode step; a draft's verification one per drafted token
        # (llama.cpp asserts when a batch asks for more rows than reserved): 3 rows of Gemma 3's 262k
        # vocabulary are 3 MiB.
        cparams.n_outputs_max = max(n_seq, rows)
    return cparams


def _quantized_kv(llama_cpp, cparams, kv_type: str, info: GGUFInfo, name: str) -> None:
    """--kv-type q8_0|q4_0: K and V in that ggml type. llama.cpp reads a quantized V cache only inside its
    flash-attention kernel (llama_init_from_model refuses one without it; left on AUTO it would switch
    flash attention on itself), so it is asked for explicitly; and every head's K and V must be whole
    32-element blocks, which is checked here so the refusal is one line, not llama.cpp's log."""
    from ..device.memory import KV_BLOCK

    a = info.architecture
    dims = [info.get(f"{a}.attention.key_length"), info.get(f"{a}.attention.value_length")]
    if info.kv_shape:
        dims.append(info.kv_shape[2])
    bad = sorted({int(d) for d in dims if isinstance(d, int) and d % KV_BLOCK})
    if bad:
        raise UsageError(f"--kv-type {kv_type} cannot store {name}'s attention heads of {bad[0]} values "
                         f"(a {kv_type} block holds {KV_BLOCK}).", hint="Use --kv-type f16 for this model.")
    ggml = {"q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}[kv_type]
    cparams.type_k = ggml
    cparams.type_v = ggml
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED


def decode_error(rc: int, what: str) -> Exception:
    """llama_decode's failure as our error: 1 is "no KV slot for the batch", a full context."""
    if rc == 1:
        return ContextOverflow(f"The context ran out of room while evaluating {what}.",
                               hint="Shorten the input, or raise --ctx (up to the model's trained context).")
    return BackendError(f"llama.cpp failed to evaluate {what} (llama_decode returned {rc}).",
                        hint="Run again with VLM_DEBUG=1 to see llama.cpp's log.")


__all__ = ["context_params", "decode_error"]
