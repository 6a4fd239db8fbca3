"""Builders: Hugging Face checkpoint -> GGUF (+ mmproj) -> quantized GGUF; HF -> ONNX -> int8/int4."""
