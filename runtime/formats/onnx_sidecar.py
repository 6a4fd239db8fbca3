"""The JSON and tokenizer files beside an ONNX model (Hugging Face's layout): config.json,
generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json, the chat
template (``chat_template.jinja``, ``chat_template.json`` or tokenizer_config.json's entry) and
genai_config.json. Read without onnxruntime: what the text around the graph says.

They are looked up beside the model file, then in the folder the user named, then one folder up (as in
onnx-community's ``onnx/`` subfolder).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import BadModelFile, first_line, missing_extra
from .model_json import read_json_object

# Special tokens that end a turn in common chat formats (llama.cpp treats these as end-of-generation too).
EOG_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
             "<|return|>", "<|eom_id|>", "</s>", "<|END_OF_TURN_TOKEN|>", "<end_of_utterance>")


def _token_content(v) -> Optional[str]:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _ids(v) -> list[int]:
    if isinstance(v, int):
        return [v]
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if isinstance(x, int)]
    return []


@dataclass
class Sidecar:
    """What the files beside an ONNX model say."""

    dirs: list
    config: dict = field(default_factory=dict)          # config.json, a multimodal text_config merged in
    raw_config: dict = field(default_factory=dict)      # config.json as written
    gen_config: dict = field(default_factory=dict)      # generation_config.json
    tokenizer: object = None                            # tokenizers.Tokenizer
    bos_token: str = ""
    eos_token: str = ""
    eos_ids: set = field(default_factory=set)
    chat_template: Optional[str] = None

    def find(self, name: str) -> Optional[Path]:
        for d in self.dirs:
            if (d / name).is_file():
                return d / name
        return None

    def shares_kv_buffer(self) -> bool:
        """onnxruntime-genai's builder says past and present may share one buffer (genai_config.json)."""
        gp = self.find("genai_config.json")
        if gp is None:
            return False
        try:
            return bool(read_json_object(gp).get("search", {}).get("past_present_share_buffer"))
        except (BadModelFile, AttributeError):
            return False


def sidecar_dirs(model_file: Path, given: Path) -> list[Path]:
    dirs = [model_file.parent, model_file.parent.parent]
    if given.is_dir() and given not in dirs:
        dirs.insert(1, given)
    return dirs


def read_sidecar(model_file: Path, given: Path) -> Sidecar:
    """Config, tokenizer, special tokens and chat template of ``model_file`` (``given``: what the user named)."""
    sc = Sidecar(sidecar_dirs(model_file, given))
    p = sc.find("config.json")
    cfg = read_json_object(p) if p else {}
    sc.raw_config = cfg
    text = cfg.get("text_config")
    sc.config = {**cfg, **text} if isinstance(text, dict) else cfg   # multimodal configs nest the decoder's
    gp = sc.find("generation_config.json")
    sc.gen_config = read_json_object(gp) if gp else {}
    sc.tokenizer = _load_tokenizer(sc, model_file)
    _load_tokens_and_template(sc)
    return sc


def _load_tokenizer(sc: Sidecar, model_file: Path):
    p = sc.find("tokenizer.json")
    if p is None:
        raise BadModelFile(
            f"No tokenizer.json next to {model_file.name}.",
            hint="Copy the model's tokenizer.json (from its Hugging Face repository) into "
                 f"{model_file.parent}.",
        )
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise missing_extra("tokenizers", extra="onnx") from e
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise BadModelFile(f"{p.name} in {p.parent} is not a tokenizer the `tokenizers` library can read: "
                           f"{first_line(e)[:200]}",
                           hint="Fetch the model's tokenizer.json again.") from e


def _load_tokens_and_template(sc: Sidecar) -> None:
    tp = sc.find("tokenizer_config.json")
    tcfg = read_json_object(tp) if tp else {}
    tok = sc.tokenizer
    sc.bos_token = _token_content(tcfg.get("bos_token")) or ""
    sc.eos_token = _token_content(tcfg.get("eos_token")) or ""
    sm = sc.find("special_tokens_map.json")
    if sm and (not sc.bos_token or not sc.eos_token):
        smap = read_json_object(sm)
        sc.bos_token = sc.bos_token or _token_content(smap.get("bos_token")) or ""
        sc.eos_token = sc.eos_token or _token_content(smap.get("eos_token")) or ""
    if not sc.bos_token and isinstance(sc.config.get("bos_token_id"), int):
        sc.bos_token = tok.id_to_token(sc.config["bos_token_id"]) or ""
    eos = set(_ids(sc.gen_config.get("eos_token_id"))) | set(_ids(sc.config.get("eos_token_id")))
    if sc.eos_token and tok.token_to_id(sc.eos_token) is not None:
        eos.add(tok.token_to_id(sc.eos_token))
    if not sc.eos_token and eos:
        sc.eos_token = tok.id_to_token(min(eos)) or ""
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for name in EOG_NAMES:
        if name in specials:
            eos.add(tok.token_to_id(name))
    sc.eos_ids = {i for i in eos if i is not None and i >= 0}

    jp = sc.find("chat_template.jinja")
    if jp is not None:
        tmpl = jp.read_text(encoding="utf-8")
    else:
        cj = sc.find("chat_template.json")
        tmpl = read_json_object(cj).get("chat_template") if cj else tcfg.get("chat_template")
    if isinstance(tmpl, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    sc.chat_template = tmpl if isinstance(tmpl, str) and tmpl.strip() else None


__all__ = ["Sidecar", "read_sidecar", "sidecar_dirs", "EOG_NAMES"]
