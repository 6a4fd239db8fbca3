"""The licences of registry models that are not a plain open-source licence, said where a user meets the
model: `vlm pull` and the download a first `vlm ask` / `chat` / `caption` makes print one line on stderr
with the licence's name, what it allows in a few words, and where to read it (README states the default
vision model's).

Apache-2.0 and MIT models print nothing. A licence tag this table does not know is named as it is, with the
model's homepage.
"""
from __future__ import annotations

from typing import Optional

OPEN = {"apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause"}

# tag -> (name, terms in a few words, where to read it)
KNOWN = {
    "lfm1.0": ("LFM Open License v1.0", "Apache 2.0 with a threshold: free commercial use only below USD 10M "
               "annual revenue; not an OSI licence", "https://www.liquid.ai/lfm-license"),
    "llama3.2": ("Llama 3.2 Community License", "acceptable-use policy; a licence from Meta above 700M monthly users",
                 "https://www.llama.com/llama3_2/license/"),
    "llama2": ("Llama 2 Community License", "acceptable-use policy; a licence from Meta above 700M monthly users",
               "https://ai.meta.com/llama/license/"),
    "gemma": ("Gemma Terms of Use", "prohibited-use policy passed on to users", "https://ai.google.dev/gemma/terms"),
    "qwen-research": ("Qwen Research License", "non-commercial research use only", None),
}


def licence_notice(alias: str, tag: Optional[str], homepage: Optional[str]) -> Optional[str]:
    """One line about ``alias``'s licence, or None for an open-source one."""
    t = (tag or "").strip().lower()
    if t in OPEN:
        return None
    if not t:
        return f"{alias}: no licence is recorded in the registry; read the model's terms at {homepage or 'its model page'}."
    name, terms, url = KNOWN.get(t, (tag, None, None))
    url = url or (f"{homepage.rstrip('/')}/blob/main/LICENSE" if homepage and "huggingface.co" in homepage else homepage)
    return f"{alias} is under the {name}" + (f" ({terms})" if terms else "") + (f": {url}" if url else ".")


__all__ = ["licence_notice", "KNOWN", "OPEN"]
