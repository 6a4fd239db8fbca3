#!/usr/bin/env bash
# Proves edgevlm on aarch64 Linux (Raspberry Pi 5, Jetson CPU) under emulation, on an x86-64 Linux host:
#     sudo bash scripts/test-aarch64.sh            # build (first run) or reuse (later runs), then test
#     sudo bash scripts/test-aarch64.sh -k schema  # extra pytest arguments pass through
# It builds a Debian bookworm arm64 root with debootstrap, runs it through qemu-user-static and
# binfmt_misc, installs edgevlm there by the README's own Raspberry Pi install line (llama-cpp-python
# built from source for armv8.2-a+dotprod, onnxruntime from its aarch64 wheel), and runs the part of
# the test suite that matters on a board. Emulation proves installs and code paths, not speeds.
# Not part of .ci/run: the first run compiles llama.cpp under emulation (README: how long it takes).
#
# Needs root (debootstrap, chroot, mounts) and Debian's mirror + PyPI. Caches, so a second run is quick:
#   $VLM_AARCH64_CACHE (default ~/.cache/edgevlm-aarch64): rootfs/ (the arm64 root, with a venv in
#   /opt/vlm), wheels/llama-<version>-<hash of CMAKE_ARGS>/ (the built llama-cpp-python wheel: pip caches
#   built wheels by version, not by build flags, so the key carries the flags), pip/ (pip's cache).
# Test models: the host-built fixtures in $VLM_TEST_CACHE (default ~/.cache/edgevlm-tests; build them
# once with `bash scripts/test.sh`) are platform-independent files; they are mounted into the root
# through an overlay, so the host copy is never written and the root needs no torch/transformers.
# The whole script is one block, read before it runs: editing it mid-run cannot change a running copy.
{
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

CACHE=${VLM_AARCH64_CACHE:-$HOME/.cache/edgevlm-aarch64}
FIXTURES=${VLM_TEST_CACHE:-$HOME/.cache/edgevlm-tests}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$CACHE/rootfs
LLAMA_VERSION=0.3.36
# The README's own Raspberry Pi 5 line, read from the README so the two cannot drift apart.
PI_LINE=$(grep -A3 '^# Raspberry Pi 5' README.md | grep 'CMAKE_ARGS=' | head -1)
ARM_CMAKE_ARGS=$(sed -n 's/^CMAKE_ARGS="\([^"]*\)".*/\1/p' <<<"$PI_LINE")
[ -n "$ARM_CMAKE_ARGS" ] || { echo "README.md has no '# Raspberry Pi 5' install line with CMAKE_ARGS" >&2; exit 2; }
WHEEL_KEY="llama-$LLAMA_VERSION-$(echo "$ARM_CMAKE_ARGS" | sha256sum | cut -c1-12)"
# The board-relevant tests, one or two per area (Python runs 10-50x slower emulated, so not whole files):
# GGUF text answers (real SmolLM2), GGUF vision, images, caption, --schema on GGUF and ONNX vision, the
# ONNX backend (text and the vision fixture), doctor, bench's report, and the ARM detection. Any pytest
# arguments given to this script replace the selection (e.g. whole files: tests/test_media.py).
DEFAULT_TESTS=(
  tests/test_arm.py
  tests/test_cli_text.py::test_raw_completion_paris_smollm2 tests/test_cli_text.py::test_json_output_parses
  tests/test_vision.py::test_image_is_encoded_and_answered
  tests/test_media.py::test_every_format_round_trips tests/test_media.py::test_exif_orientation_6_rotates_upright
  tests/test_media.py::test_cmyk_jpeg_converts_to_rgb tests/test_media.py::test_16bit_png_gradient_maps_to_full_8bit_range
  tests/test_media.py::test_truncated_file_is_an_error_not_half_grey
  tests/test_batch_video.py::test_caption_only_good_images_exit_zero_and_stdout
  tests/test_schema_backends.py::test_cli_schema_on_both_backends
  tests/test_onnx_backend.py::test_quantized_complete_paris
  tests/test_onnx_vision.py::test_quantized_variants_load_and_generate
  tests/test_bench_doctor.py::test_doctor_json tests/test_bench_doctor.py::test_bench_table_on_stdout
)

t0=$(date +%s)
say() { printf '[aarch64 %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot and mounts need it)" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] || { echo "x86-64 or aarch64 host only" >&2; exit 2; }
[ -d "$FIXTURES/fixtures" ] || { echo "no test fixtures in $FIXTURES: run 'bash scripts/test.sh' once first" >&2; exit 2; }
mkdir -p "$CACHE/wheels/$WHEEL_KEY" "$CACHE/pip" "$CACHE/fixtures-upper" "$CACHE/fixtures-work"

# 1. Host tools and the aarch64 interpreter (binfmt_misc with the F flag: the kernel keeps qemu open,
#    so the root needs no copy of it).
if [ "$(uname -m)" != aarch64 ]; then
  if ! command -v debootstrap >/dev/null || [ ! -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] \
       && ! command -v qemu-aarch64-static >/dev/null; then
    say "installing debootstrap, qemu-user-static, binfmt-support"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap qemu-user-static binfmt-support
  fi
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
  grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || { echo "binfmt_misc's qemu-aarch64 entry lacks the F flag; re-register it with update-binfmts" >&2; exit 2; }
else
  command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
fi

# Mounts are undone on any exit, in reverse order; a busy one is detached lazily.
MOUNTS=()
cleanup() {
  local i
  for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || echo "could not unmount ${MOUNTS[i]}" >&2
  done
  MOUNTS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM
bind() { mkdir -p "$2"; mount --bind "$1" "$2"; MOUNTS+=("$2"); }
mount_all() {
  mount -t proc proc "$ROOT/proc"; MOUNTS+=("$ROOT/proc")
  # qemu-user passes the host's x86 /proc/cpuinfo through, and onnxruntime's cpuinfo library dies with
  # SIGSEGV on import reading it (as aarch64). A board's own text (a Raspberry Pi 5's, one entry per host
  # core) is what an aarch64 process expects there; it is also what `vlm doctor` reads in the root.
  if [ "$(uname -m)" != aarch64 ]; then
    for (( i=0; i<$(nproc); i++ )); do
      printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' \
        "$i" "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
    done >"$CACHE/cpuinfo"
    printf 'Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n' >>"$CACHE/cpuinfo"
    mount --bind "$CACHE/cpuinfo" "$ROOT/proc/cpuinfo"; MOUNTS+=("$ROOT/proc/cpuinfo")
  fi
  bind /sys "$ROOT/sys"; bind /dev "$ROOT/dev"; bind /dev/pts "$ROOT/dev/pts"
  bind "$CACHE/pip" "$ROOT/root/.cache/pip"
  bind "$CACHE/wheels" "$ROOT/wheels"
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
  # the host's trusted CAs (a TLS-inspecting proxy's among them) for pip inside
  cp -L "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/ssl/certs/host-ca-certificates.crt"
}
CA=/etc/ssl/certs/host-ca-certificates.crt
in_root() {
  chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/vlm/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    PIP_CERT=$CA SSL_CERT_FILE=$CA REQUESTS_CA_BUNDLE=$CA PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 "$@"
}

# 2. The arm64 Debian root (cached: built in a temporary folder, renamed when complete).
if [ ! -e "$ROOT/.complete" ]; then
  rm -rf "$ROOT.partial"
  say "debootstrap bookworm arm64 into $ROOT (emulated second stage: several minutes)"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-dev,build-essential,cmake,ninja-build,ca-certificates \
    bookworm "$ROOT.partial" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$ROOT"; mv "$ROOT.partial" "$ROOT"
  touch "$ROOT/.complete"
  say "root ready"
fi
mount_all
say "$(in_root uname -m) $(in_root python3 --version)"
[ -x "$ROOT/opt/vlm/bin/python" ] || in_root python3 -m venv /opt/vlm
in_root python -m pip install -q --upgrade pip

# 3. llama-cpp-python, built once per version + flags by the README's line, then installed from the cache.
#    Everything runs in the arm64 root (pip, scikit-build, CMake, its feature checks), but on an x86-64 host
#    the compiler itself is Debian's x86-64 -> aarch64 cross gcc (the same gcc 12.2 as the root's own,
#    building against the same glibc 2.36): an emulated cc1plus compiles llama.cpp 20-50x slower
#    (measured: 4 of 193 build steps in 5 minutes on this shared 2-core machine; about 4 hours in all).
#    VLM_AARCH64_CROSS=0 compiles with the root's emulated gcc instead.
CROSS_ENV=()
if [ "$(uname -m)" = x86_64 ] && [ "${VLM_AARCH64_CROSS:-1}" != 0 ]; then
  if [ ! -x /usr/bin/aarch64-linux-gnu-g++-12 ]; then
    say "installing the aarch64 cross compiler (g++-aarch64-linux-gnu) on the host"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++-12-aarch64-linux-gnu >/dev/null
  fi
  mkdir -p "$CACHE/xtools/bin" "$ROOT/lib64" "$ROOT/usr/lib/x86_64-linux-gnu" "$ROOT/usr/lib/gcc-cross" "$ROOT/usr/aarch64-linux-gnu"
  cp -L /usr/aarch64-linux-gnu/bin/* "$CACHE/xtools/bin/"       # x86-64 binutils (symlinks there point to /usr/bin)
  cp /usr/bin/aarch64-linux-gnu-gcc-12 "$ROOT/usr/bin/x86-aarch64-linux-gnu-gcc"
  cp /usr/bin/aarch64-linux-gnu-g++-12 "$ROOT/usr/bin/x86-aarch64-linux-gnu-g++"
fi
mount_cross() {      # x86-64 loader + libraries (paths an arm64 root does not use), gcc's cross files
  bind /lib64 "$ROOT/lib64"; bind /usr/lib/x86_64-linux-gnu "$ROOT/usr/lib/x86_64-linux-gnu"
  bind /usr/lib/gcc-cross "$ROOT/usr/lib/gcc-cross"; bind /usr/aarch64-linux-gnu "$ROOT/usr/aarch64-linux-gnu"
  bind "$CACHE/xtools/bin" "$ROOT/usr/aarch64-linux-gnu/bin"
  CROSS_ENV=(CC=/usr/bin/x86-aarch64-linux-gnu-gcc CXX=/usr/bin/x86-aarch64-linux-gnu-g++)
}
if ! ls "$CACHE/wheels/$WHEEL_KEY"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  [ -x "$ROOT/usr/bin/x86-aarch64-linux-gnu-g++" ] && [ "${VLM_AARCH64_CROSS:-1}" != 0 ] && mount_cross
  say "building llama-cpp-python $LLAMA_VERSION for aarch64: CMAKE_ARGS=\"$ARM_CMAKE_ARGS\" ${CROSS_ENV[*]:-(emulated gcc)} (log: $CACHE/llama-build.log)"
  b0=$(date +%s)
  in_root /usr/bin/env "${CROSS_ENV[@]}" CMAKE_ARGS="$ARM_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python -m pip wheel -v --no-deps --no-cache-dir "llama-cpp-python==$LLAMA_VERSION" -w "/wheels/$WHEEL_KEY.partial" \
    >"$CACHE/llama-build.log" 2>&1 || { tail -30 "$CACHE/llama-build.log" >&2; exit 1; }
  mv "$CACHE/wheels/$WHEEL_KEY.partial"/llama_cpp_python-*.whl "$CACHE/wheels/$WHEEL_KEY/"
  rmdir "$CACHE/wheels/$WHEEL_KEY.partial" 2>/dev/null || true
  say "llama-cpp-python built in $(( $(date +%s) - b0 ))s"
fi


# 4. edgevlm itself, by the README's Raspberry Pi line (plus the extras the tests need). The working tree
#    (tracked and untracked, not ignored files) is copied in fresh; pip finds the cached wheel above
#    through --find-links, so nothing is compiled again.
say "installing edgevlm: CMAKE_ARGS=\"$ARM_CMAKE_ARGS\" pip install --no-cache-dir '.[onnx,test]'"
rm -rf "$ROOT/src/edgevlm"; mkdir -p "$ROOT/src/edgevlm"
git ls-files -z -co --exclude-standard | tar --null -T - -cf - 2>/dev/null | tar -xf - -C "$ROOT/src/edgevlm"
in_root /bin/sh -c "cd /src/edgevlm && CMAKE_ARGS='$ARM_CMAKE_ARGS' pip install -q --no-cache-dir \
    --find-links /wheels/$WHEEL_KEY '.[onnx,test]'" >"$CACHE/install.log" 2>&1 || { tail -30 "$CACHE/install.log" >&2; exit 1; }
in_root python -c "import llama_cpp, onnxruntime, platform; print(platform.machine(), 'llama-cpp-python', llama_cpp.__version__, 'onnxruntime', onnxruntime.__version__)" | sed 's/^/    /' >&2

# 5. The host's test fixtures, through an overlay at the same path (the tests' caches key files by path):
#    reads come from the host's files, writes (locks, hash caches) go to the cache's upper layer.
mkdir -p "$ROOT$FIXTURES"
mount -t overlay overlay -o "lowerdir=$FIXTURES,upperdir=$CACHE/fixtures-upper,workdir=$CACHE/fixtures-work" "$ROOT$FIXTURES"
MOUNTS+=("$ROOT$FIXTURES")
# The vision fixture's cache key includes the versions of the packages that build it (torch,
# transformers, ...), which this root does not have: point the key computed here at the host's newest
# complete build (the files themselves are platform-independent).
KEY_PY="import sys; sys.path.insert(0, 'tests')
from conftest import CACHE, _pull
from fixtures import fixture_key
print(fixture_key(_pull('smollm2-135m'), CACHE / 'fixtures'))"
vision=$( [ -x .venv/bin/python ] && VLM_TEST_CACHE="$FIXTURES" .venv/bin/python -c "$KEY_PY" 2>/dev/null || true)
if [ -z "$vision" ] || [ ! -s "$FIXTURES/fixtures/$vision/manifest.json" ]; then   # no host venv: the newest build
  vision=$(ls -td "$FIXTURES"/fixtures/*/ 2>/dev/null | while read -r d; do
    grep -qs '"name": "tiny-idefics3"' "$d/manifest.json" && { basename "$d"; break; }; done || true)
fi
if [ -n "$vision" ]; then
  key=$(in_root /usr/bin/env VLM_TEST_CACHE="$FIXTURES" /bin/sh -c 'cd /src/edgevlm && exec python -c "$1"' sh "$KEY_PY")
  [ "$key" = "$vision" ] || [ -e "$ROOT$FIXTURES/fixtures/$key" ] || ln -s "$vision" "$ROOT$FIXTURES/fixtures/$key"
else
  say "no vision fixture in $FIXTURES/fixtures: the vision tests will try to build it and fail here; run bash scripts/test.sh first"
fi

# The SmolLM2 ONNX exports are keyed by the exporter's source: when the working tree's differs from the
# one the host's exports were built with, the newest host export stands in (the root cannot export).
ONNX_PY="import sys, hashlib; sys.path.insert(0, 'tests')
from pathlib import Path
import edgevlm.quantize.onnx as builder
from test_onnx_backend import ONNX_RECIPE
from conftest import CACHE
from fixtures.smollm2_hf import RECIPE, file_sha256
from conftest import _pull
hf = 'smollm2-135m-hf-' + hashlib.sha256(f'{RECIPE}:{file_sha256(_pull(\"smollm2-135m\"))}'.encode()).hexdigest()[:16]
for name, method, variants in (('smollm2-135m-onnx', 'auto', ('int8', 'int4')), ('smollm2-135m-onnx-optimum', 'optimum', ('int4',))):
    h = hashlib.sha256(f'{ONNX_RECIPE}:{method}:{variants}:{hf}'.encode()); h.update(Path(builder.__file__).read_bytes())
    print(f'{name} {h.hexdigest()[:16]}')"
in_root /usr/bin/env VLM_TEST_CACHE="$FIXTURES" /bin/sh -c 'cd /src/edgevlm && exec python -c "$1"' sh "$ONNX_PY" 2>/dev/null |
while read -r name key; do
  [ -e "$ROOT$FIXTURES/fixtures/$name-$key/model.onnx" ] && continue
  newest=$(ls -td "$FIXTURES/fixtures/$name"-*/ 2>/dev/null | while read -r d; do
    n=$(basename "$d"); [ "${n%-*}" = "$name" ] && [ -f "$d/model.onnx" ] && { echo "$n"; break; }; done || true)
  [ -n "$newest" ] && ln -sfn "$newest" "$ROOT$FIXTURES/fixtures/$name-$key" && say "ONNX fixture $name-$key -> $newest (host's newest)"
done

# 6. The board-relevant tests, on aarch64.
[ $# -gt 0 ] || set -- "${DEFAULT_TESTS[@]}"
say "pytest $*"
set +e
in_root /usr/bin/env VLM_TEST_CACHE="$FIXTURES" NO_COLOR=1 /bin/sh -c 'cd /src/edgevlm && exec python -m pytest -q -rfEs -p no:cacheprovider "$@"' pytest "$@"
rc=$?
set -e
say "done: pytest exit $rc (aarch64 $(in_root python -c 'import platform; print(platform.machine())'), llama.cpp build: $ARM_CMAKE_ARGS)"
exit $rc
exit
}
