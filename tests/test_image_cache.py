"""The persistent image-embedding cache: entries verified on read, LRU cap, atomic writes, concurrent
processes, an unwritable folder; and on both backends, a cached answer equal to the uncached one."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edgevlm.runtime.inputs.embed_cache import EmbedCache, entry_key


def _arrays(seed: int = 0, n: int = 3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(n)]


def test_round_trip_with_meta(tmp_path):
    c = EmbedCache(tmp_path)
    k = entry_key("enc", "pix", "low")
    assert c.get(k) is None and not c.has(k)
    assert c.put(k, _arrays(), {"parts": [["t", [1, 2]], ["e", 64]]}) is None
    arrays, meta = c.get(k)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, _arrays()))
    assert meta == {"parts": [["t", [1, 2]], ["e", 64]]}
    assert c.stats()["entries"] == 1
    assert entry_key("enc", "pix", "high") != k and entry_key("enc2", "pix", "low") != k


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign"])
def test_damaged_entries_are_ignored_and_removed(tmp_path, damage):
    c = EmbedCache(tmp_path)
    k = entry_key("enc", "pix", "s")
    c.put(k, _arrays())
    p = c._path(k)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    elif damage == "empty":
        p.write_bytes(b"")
    else:                                   # another key's (valid) entry under this name
        other = entry_key("enc", "pix", "other")
        c.put(other, _arrays(1))
        p.write_bytes(c._path(other).read_bytes())
    assert c.get(k) is None
    assert not p.exists()                   # the next write replaces it
    assert c.put(k, _arrays()) is None and c.get(k) is not None


def test_lru_cap(tmp_path):
    one = sum(a.nbytes for a in _arrays()) + 300
    c = EmbedCache(tmp_path, max_bytes=int(one * 2.5))
    keys = [entry_key("e", str(i), "s") for i in range(4)]
    for i, k in enumerate(keys[:2]):
        c.put(k, _arrays(i))
        os.utime(c._path(k), (time.time() - 100 + i, time.time() - 100 + i))
    assert c.get(keys[0]) is not None       # a use: keys[1] is now the least recently used
    c.put(keys[2], _arrays(2))
    assert c.has(keys[0]) and not c.has(keys[1]) and c.has(keys[2])
    assert c.stats()["bytes"] <= c.max_bytes


def test_unwritable_cache_gives_a_reason_not_an_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "embeddings").write_text("a file where the folder should be")
    c = EmbedCache(ro)
    why = c.put(entry_key("e", "p", "s"), _arrays())
    assert why and isinstance(why, str)
    assert c.get(entry_key("e", "p", "s")) is None


_WRITER = """
import sys, numpy as np
from edgevlm.runtime.inputs.embed_cache import EmbedCache, entry_key
c = EmbedCache(sys.argv[1], max_bytes=200_000)
rng = np.random.default_rng(int(sys.argv[2]))
for i in range(40):
    k = entry_key("e", str(i % 7), "s")
    c.put(k, [np.full((64, 32), i % 7, np.float32)])
    got = c.get(entry_key("e", str(rng.integers(7)), "s"))
    if got is not None:
        a = got[0][0]
        assert (a == a.flat[0]).all(), "torn entry"
print("ok")
"""


def test_concurrent_processes(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip() == "ok"
    assert EmbedCache(tmp_path, max_bytes=200_000).stats()["bytes"] <= 200_000 + 9_000
