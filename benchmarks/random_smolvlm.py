"""Build a random-weight Hugging Face checkpoint with SmolVLM-256M-Instruct's shapes, for timing.

This machine cannot reach the Hugging Face Hub, and the test fixture (tests/fixtures/tiny_idefics3.py)
is far too small for its timings to mean anything: its image encode takes under a millisecond. Same
recipe, real sizes: SmolLM2-135M text model (576 hidden, 30 layers, 9 heads / 3 KV heads), SigLIP
base vision tower (768 hidden, 12 layers, 16-px patches, 512-px tiles), pixel shuffle 4 (64 tokens a
tile), images resized to a 2048-px longest edge and cut into up to 4 x 4 tiles plus a global one.
Answers are gibberish; speeds and memory are those of the real architecture.

    python benchmarks/random_smolvlm.py /tmp/sv/hf --smollm2-gguf SmolLM2-135M-Instruct.Q4_1.gguf
    vlm quantize /tmp/sv/hf --to gguf:q8_0 --out /tmp/sv/out --name smolvlm-256m-random
    vlm bench /tmp/sv/out/smolvlm-256m-random-Q8_0.gguf --image photo.jpg
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures import tiny_idefics3 as t  # noqa: E402

t.TEXT = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0)
t.PATCH, t.TILE, t.PREPROC_LONGEST_EDGE, t.SCALE_FACTOR = 16, 512, 2048, 4
t.IMAGE_SEQ_LEN = (t.TILE // t.PATCH) ** 2 // t.SCALE_FACTOR ** 2
t.VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                patch_size=t.PATCH, image_size=t.TILE, num_channels=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--smollm2-gguf", type=Path, required=True, help="SmolLM2-135M GGUF (its tokenizer)")
    a = ap.parse_args()
    print(t.build_checkpoint(a.out, a.smollm2_gguf))


if __name__ == "__main__":
    main()
