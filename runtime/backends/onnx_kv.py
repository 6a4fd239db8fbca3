"""The ONNX backend's two ways to hold a decoder's KV cache, chosen at load from what the graph supports.

* ``ConcatKV`` (any optimum / onnx-community export): the graph concatenates past and new keys into
  ``present``. The presents stay ORT values (allocated by ORT, never copied to numpy) and are bound as the
  next step's past.
* ``SharedKV`` (graphs built on GroupQueryAttention that declare it: our fused builder writes
  ``edgevlm.kv_cache = shared``, onnxruntime-genai's ``past_present_share_buffer``): each layer's past and
  present are bound to one preallocated buffer of ``capacity`` positions; the operator appends the new keys
  in place, so a step copies nothing and all bindings but the three small inputs stay fixed. The buffer grows
  by doubling (rarely: log2 of the context).

Both answer the same calls; the backend keeps which token each position holds (``ONNXBackend._keys``), so
``n`` below is always its length.
"""
from __future__ import annotations


class _KV:
    shared = False

    def __init__(self, np, ort, io, past_names: list, present_names: list, kv_heads: int, head_dim: int,
                 dtype: str, n_ctx: int) -> None:
        self.np, self.ort, self.io = np, ort, io
        self.past_names, self.present_names = past_names, present_names
        self.kv_heads, self.head_dim, self.dtype, self.n_ctx = kv_heads, head_dim, dtype, n_ctx
        self.past: list = []          # OrtValues bound as past_key_values.*
        self.keep: list = []          # the numpy arrays behind them (kept alive)

    def state_size(self, n: int) -> int:
        """Bytes of a copy of the first ``n`` positions (the prompt cache's view)."""
        return len(self.past_names) * self.kv_heads * n * self.head_dim * self.np.dtype(self.dtype).itemsize


class ConcatKV(_KV):
    def reset(self) -> None:
        empty = self.np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        self.keep = [empty]
        self.past = [self.ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions (once a turn: the past is sliced down to the common prefix)."""
        np, ort = self.np, self.ort
        self.keep = [np.ascontiguousarray(v.numpy()[:, :, :n, :]) for v in self.past]
        self.past = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.keep]

    def state_get(self, n: int) -> list:
        return [v.numpy()[:, :, :n, :].copy() for v in self.past]

    def state_set(self, data: list) -> None:
        self.keep = list(data)     # moved in: the cache no longer holds them
        self.past = [self.ort.OrtValue.ortvalue_from_numpy(a) for a in data]

    def before_run(self, total: int, n: int) -> None:
        pass

    def bind(self) -> None:
        """Bind the past and the present outputs (after the logits output: ``after_run`` reads outputs in
        binding order)."""
        io = self.io
        for name, value in zip(self.past_names, self.past):
            io.bind_ortvalue_input(name, value)
        for name in self.present_names:
            io.bind_output(name, "cpu")

    def after_run(self):
        """Take the presents as the next past; returns the logits output (an OrtValue)."""
        outs = self.io.get_outputs()
        self.past = outs[1:]
        self.keep = []
        self.io.clear_binding_outputs()
        return outs[0]


class SharedKV(_KV):
    shared = True

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.capacity = 0             # positions the buffers hold

    def reset(self) -> None:
        pass            # positions past the backend's keys are ignored and overwritten

    def truncate(self, n: int) -> None:
        pass

    def state_get(self, n: int) -> list:
        return [b[:, :, :n].copy() for b in self.keep]

    def state_set(self, data: list) -> None:
        n = data[0].shape[2] if data else 0
        self.ensure_capacity(n, 0)        # nothing of the old state is worth copying into bigger buffers
        for b, a in zip(self.keep, data):
            b[:, :, :n] = a

    def before_run(self, total: int, n: int) -> None:
        self.ensure_capacity(total, n)

    def bind(self) -> None:
        pass          # bound once per capacity (ensure_capacity)

    def after_run(self):
        return None

    def ensure_capacity(self, total: int, n: int) -> None:
        """Make the per-layer buffers hold ``total`` positions (keeping the first ``n``), bound as past and
        present."""
        if total <= self.capacity:
            return
        np, ort, io = self.np, self.ort, self.io
        cap = min(self.n_ctx, max(total, 2 * self.capacity, 256))
        bufs = []
        for old in self.keep or [None] * len(self.past_names):
            b = np.zeros((1, self.kv_heads, cap, self.head_dim), dtype=self.dtype)
            if old is not None and n:
                b[:, :, :n] = old[:, :, :n]
            bufs.append(b)
        self.keep = bufs
        self.past = [ort.OrtValue.ortvalue_from_numpy(b) for b in bufs]   # views of the numpy memory
        for past, present, value in zip(self.past_names, self.present_names, self.past):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        self.capacity = cap


__all__ = ["ConcatKV", "SharedKV"]
