"""``moepager serve`` as a real process: flags, background loading, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def moepager(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_bad_flag_names_flag_and_choices():
    proc = moepager("serve", "--cache-policy", "nope")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "--cache-policy" in out and "lru" in out


@pytest.mark.slow
def _wait_healthy(proc, base: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server never became healthy"
        time.sleep(0.1)


def test_serve_loads_then_drains_on_sigterm(server_model_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = moepager("serve", str(server_model_dir), "--device", "cpu", "--port", str(port),
                    "--expert-slots", "4", "--served-model-name", "tiny", "--log-level", "warning")
    try:
        _wait_healthy(proc, base)
        assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == "tiny"

        result = {}

        def long_request() -> None:
            body = {"model": "tiny", "prompt": "drain", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
            result["r"] = httpx.post(base + "/v1/completions", json=body, timeout=60)

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(50):
            try:
                refused = httpx.post(base + "/v1/completions", json={"prompt": "x"}, timeout=5)
                break
            except httpx.HTTPError:  # already finished draining and closed the socket
                break
        worker.join(60)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["usage"]["completion_tokens"] == 40
        if refused is not None:
            assert refused.status_code == 503
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_without_model_answers_chat_with_the_embedded_model():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = moepager("serve", "--device", "cpu", "--port", str(port), "--log-level", "warning")
    try:
        _wait_healthy(proc, base)
        model_id = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        assert model_id == "moepager-default"
        body = {"model": model_id, "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "How do I open a file in Python?"}]}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text.strip(), r.json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_help_shows_defaults_and_hides_the_key(monkeypatch, capsys):
    from server.cli import main

    monkeypatch.setenv("MOEPAGER_API_KEY", "do-not-print")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "do-not-print" not in out
    for default in ("--dtype", "--expert-cache-gb", "--kv-cache-gb"):
        assert default in out
    assert out.count("(default: auto)") >= 3 and "(default: 127.0.0.1)" in out and "(default: 16)" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "a", "--model", "b"], "give the model once"),
    (["serve", "--chat-template", "/no/such/template.jinja"], "--chat-template"),
    (["serve", "--kv-cache-gb", "-1"], None),
])
def test_serve_flag_errors_are_one_line(argv, message, capsys):
    from server.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects the value itself
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    if message:
        assert message in err


def test_dtype_auto_is_the_checkpoints(server_model_dir):
    from server.flags import checkpoint_dtype

    assert checkpoint_dtype(None) == "bfloat16"  # the embedded model's config.json
    assert checkpoint_dtype(str(server_model_dir)) == "float32"
