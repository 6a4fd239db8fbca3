"""A model spread over `vlm worker` processes with llama.cpp's RPC backend, on loopback only.

Workers are processes these tests start and stop, each bounded in time; the main host is `vlm ask`.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_clean_error, vlm

pytestmark = [pytest.mark.model, pytest.mark.slow]

VLM = str(Path(sys.executable).with_name("vlm"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(port: int, env=None) -> subprocess.Popen:
    p = subprocess.Popen([VLM, "worker", "--port", str(port), "--threads", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return p
        except OSError:
            if p.poll() is not None:
                pytest.fail(f"worker exited: {p.stderr.read()}")
            time.sleep(0.2)
    p.kill()
    pytest.fail("worker did not start listening within 30 s")


def _stop(p: subprocess.Popen) -> tuple[int, str]:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return p.returncode, err


@pytest.fixture(scope="module")
def rpc_available():
    from edgevlm.runtime.backends import ggml_rpc

    if not ggml_rpc.available():
        pytest.skip("this llama-cpp-python build has no RPC (scripts/test.sh builds it with -DGGML_RPC=ON)")


@pytest.fixture(scope="module")
def workers(rpc_available):
    ports = [_free_port(), _free_port()]
    procs = [_start_worker(p) for p in ports]
    yield [f"127.0.0.1:{p}" for p in ports]
    for p in procs:
        _stop(p)


def _ask(model_args, rpc=None, *extra, n="12"):
    args = ["ask", *model_args, "-t", "0", "-n", n, *extra]
    if rpc:
        args += ["--rpc", ",".join(rpc)]
    return vlm(*args)


@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_greedy_output_identical_to_local(request, workers, which):
    if which == "smollm2":
        args = ["-m", str(request.getfixturevalue("smollm2_gguf")), "--raw", "The capital of France is"]
    else:
        args = ["-m", str(request.getfixturevalue("gemma_gguf")), "--raw",
                "Question: What is the capital of France?\nAnswer:"]
    local = _ask(args)
    assert local.returncode == 0, local.stderr
    spread = _ask(args, workers)
    assert spread.returncode == 0, spread.stderr
    assert spread.stdout == local.stdout
    # and with most layers on one worker, none here
    skewed = _ask(args, workers, "--tensor-split", "0,3,1")
    assert skewed.returncode == 0, skewed.stderr
    assert skewed.stdout == local.stdout


def test_vision_fixture_over_workers(vision_model, workers, tmp_path):
    from PIL import Image

    img = tmp_path / "red.png"
    Image.new("RGB", (96, 64), (220, 30, 30)).save(img)
    args = ["-m", str(vision_model["gguf"]), "--mmproj", str(vision_model["mmproj"]), str(img), "What is this?"]
    local = _ask(args, n="6")
    spread = _ask(args, workers, n="6")
    assert local.returncode == 0 and spread.returncode == 0, spread.stderr
    assert spread.stdout == local.stdout


def test_worker_not_listening_fails_before_loading(rpc_available, smollm2_gguf):
    port = _free_port()
    r = _ask(["-m", str(smollm2_gguf), "Hi"], [f"127.0.0.1:{port}"])
    assert_clean_error(r, 10, f"127.0.0.1:{port} is not reachable", "vlm worker")


def test_worker_killed_mid_answer_is_one_clean_error(rpc_available, smollm2_gguf):
    port = _free_port()
    w = _start_worker(port)
    try:
        p = subprocess.Popen([VLM, "ask", "-m", str(smollm2_gguf), "--rpc", f"127.0.0.1:{port}", "-t", "0",
                              "-n", "4000", "--ctx", "4096", "--raw", "Once upon a time"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = p.stdout.read(1)                       # the answer has started streaming
        assert first, p.stderr.read()
        w.kill()
        w.wait(timeout=10)
        try:
            _, err = p.communicate(timeout=30)         # no hang
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("the main host hung after its worker died")
        err = err.decode()
        assert p.returncode == 10, err
        assert err.count("Error:") == 1 and "Traceback" not in err and "worker" in err.lower()
    finally:
        if w.poll() is None:
            w.kill()


def test_memory_limit_here_with_room_on_workers(workers, smollm2_gguf):
    """A model too big for this host alone runs when its layers go to workers with room."""
    args = ["-m", str(smollm2_gguf), "--raw", "The capital of France is"]
    tight = {"VLM_MEMORY_LIMIT": "200M"}   # below the whole model, above this host's runtime alone
    alone = vlm("ask", *args, "-t", "0", "-n", "4", env=tight)
    assert_clean_error(alone, 7, "needs about")
    spread = vlm("ask", *args, "-t", "0", "-n", "4", "--rpc", ",".join(workers), "--tensor-split", "0,1,1", env=tight)
    assert spread.returncode == 0, spread.stderr
    # and a split that leaves too much here is refused with a per-device breakdown
    bad = vlm("ask", *args, "-t", "0", "-n", "4", "--rpc", ",".join(workers), "--tensor-split", "8,1,1", env=tight)
    assert_clean_error(bad, 7, "this host:", workers[0])


def test_worker_cli(rpc_available, tmp_path):
    port = _free_port()
    w = _start_worker(port)
    code, err = _stop(w)
    assert code == 0, err
    assert f"127.0.0.1:{port}" in err and "Ctrl-C" in err and "WARNING" not in err
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        r = vlm("worker", "--port", str(busy.getsockname()[1]))
        assert_clean_error(r, 2, "Cannot listen")
    finally:
        busy.close()


def test_non_loopback_bind_warns(rpc_available):
    port = _free_port()
    p = subprocess.Popen([VLM, "worker", "--host", "0.0.0.0", "--port", str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    code, err = _stop(p)
    assert "WARNING" in err and "authentication" in err and code == 0


def test_bad_rpc_arguments(smollm2_gguf):
    r = vlm("ask", "-m", str(smollm2_gguf), "--rpc", "nohostport:x", "Hi")
    assert_clean_error(r, 2, "HOST:PORT")
    r = vlm("ask", "-m", str(smollm2_gguf), "--tensor-split", "1,1", "Hi")
    assert_clean_error(r, 2, "--tensor-split needs --rpc")


def test_doctor_reports_rpc(workers):
    import json

    r = vlm("doctor", "--json", "--rpc", ",".join(workers))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["rpc"]["available"] is True
    assert [w["endpoint"] for w in doc["rpc"]["workers"]] == workers
    assert all(w["reachable"] and w["free"] > 0 for w in doc["rpc"]["workers"])

