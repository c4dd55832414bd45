"""`modelport serve --start` / `--stop`, as `torchserve --start` / `--stop`: --start returns once
the server answers and leaves it running in the background, a second --start refuses, --stop
ends it in order, a failed start says why and leaves no pid file. Every test has a pid file
of its own (MODELPORT_PID_FILE), so a real user's server is never touched."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers.server_proc import descendants, free_port
from modelport.entrypoints.cli import build_parser
from modelport.entrypoints.torchserve import start_stop

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("startstop")
    ts_archives.echo_archive(root / "model_store", root / "w")
    return root / "model_store"


class _Env:
    def __init__(self, tmp_path: Path, store: Path) -> None:
        self.cwd = tmp_path
        self.pid_file = tmp_path / "serve.pid"
        self.env = dict(
            os.environ,
            MODELPORT_PID_FILE=str(self.pid_file),
            LOG_LOCATION=str(tmp_path / "logs"),
            PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
            ),
        )
        self.ports = {"port": free_port(), "management": free_port()}
        self.args = [
            "--model-store", str(store), "--models", "echo=echo.mar", "--ncs",
            "--disable-token-auth", "--disable-grpc", "--port", str(self.ports["port"]),
            "--management-port", str(self.ports["management"]),
            "--ts-workers", "1",  # not one per CPU, TorchServe's default
        ]  # fmt: skip
        self.url = f"http://127.0.0.1:{self.ports['port']}"

    def modelport(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "modelport", "serve", *argv],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def leftover(self) -> None:
        """Kill whatever a failed test left running (the pid file's server and its group)."""
        pid = start_stop._read_pid(self.pid_file)
        if pid is not None and start_stop._alive(pid):
            with_group = os.getpgid(pid) == pid
            os.killpg(pid, signal.SIGKILL) if with_group else os.kill(pid, signal.SIGKILL)


@pytest.fixture
def env(tmp_path, store):
    e = _Env(tmp_path, store)
    try:
        yield e
    finally:
        e.leftover()


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while start_stop._alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not start_stop._alive(pid)


def test_start_waits_for_the_openai_model_to_load(env):
    """The OpenAI server binds before its model loads (/health 503 meanwhile): --start
    returns only once it is ready, so the first request is answered, not a 503."""
    port = free_port()
    r = env.modelport("--start", "--port", str(port), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    body = {
        "model": "SmolLM2-135M-Instruct",
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    c = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
    assert c.status_code == 200, c.text
    assert c.json()["usage"]["completion_tokens"] == 4
    r = env.modelport("--stop")
    assert r.returncode == 0 and "has stopped" in r.stdout, r.stdout + r.stderr


def test_start_serves_in_the_background_and_stop_ends_it(env):
    t0 = time.monotonic()
    r = env.modelport("--start", *env.args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    log = env.cwd / "logs" / "modelport_serve.log"
    assert f"logs in {log}" in r.stdout and "has started" in r.stdout, r.stdout
    pid = int(env.pid_file.read_text())
    assert start_stop._alive(pid)
    # the server answers after --start returned: ping, a prediction, the management API
    assert httpx.get(f"{env.url}/ping").json() == {"status": "Healthy"}
    p = httpx.post(f"{env.url}/predictions/echo", content=b"hi", timeout=30)
    assert p.status_code == 200 and p.json()["echo"] == "hi", p.text
    mgmt = f"http://127.0.0.1:{env.ports['management']}/models"
    assert httpx.get(mgmt).json()["models"][0]["modelName"] == "echo"
    assert "serving on" in log.read_text()
    workers = descendants(pid)
    assert workers  # the model's worker process

    again = env.modelport("--start", *env.args)  # one server at a time, as TorchServe
    assert again.returncode == 1 and f"already running (pid {pid})" in again.stderr
    assert int(env.pid_file.read_text()) == pid and start_stop._alive(pid)

    stopped = env.modelport("--stop")
    assert stopped.returncode == 0 and "has stopped" in stopped.stdout, stopped
    assert _gone(pid, 0) and not env.pid_file.exists()
    assert all(_gone(w) for w in workers)  # its workers went with it
    for port in env.ports.values():
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/ping")
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]

    none = env.modelport("--stop")
    assert none.returncode == 0 and "not currently running" in none.stdout


def test_failed_start_reports_and_leaves_no_pid_file(env, tmp_path):
    # an archive that does not load: as TorchServe's startup, a warning, and the rest serve
    r = env.modelport("--start", *env.args[:2], "--models", "nothing=missing.mar",
                      "echo=echo.mar", *env.args[4:])  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        p = httpx.post(f"{env.url}/predictions/echo", content=b"hi", timeout=30)
        assert p.status_code == 200 and p.json()["echo"] == "hi", p.text
        mgmt = f"http://127.0.0.1:{env.ports['management']}/models"
        assert [m["modelName"] for m in httpx.get(mgmt).json()["models"]] == ["echo"]
        # SageMaker's /invocations without ?model_name=: the only model there is
        p = httpx.post(f"{env.url}/invocations", content=b"sm", timeout=30)
        assert p.status_code == 200 and p.json()["echo"] == "sm", p.text
        log = (env.cwd / "logs" / "modelport_serve.log").read_text()
        assert "Failed to load model: missing.mar" in log, log[-2000:]
    finally:
        stopped = env.modelport("--stop")
    assert stopped.returncode == 0 and not env.pid_file.exists(), stopped
    # a busy port: the server cannot bind it
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = [a if a != str(env.ports["port"]) else str(port) for a in env.args]
        r = env.modelport("--start", *args)
    assert r.returncode == 1 and "failed to start" in r.stderr, r.stdout + r.stderr
    assert str(port) in r.stderr
    assert not env.pid_file.exists()


def test_orphan_pid_file_is_removed(env):
    env.pid_file.write_text("999999999\n")  # no such process
    r = env.modelport("--stop")
    assert r.returncode == 0 and "Removing orphan pid file." in r.stdout
    assert "not currently running" in r.stdout and not env.pid_file.exists()
    # a pid that is alive but no modelport server (a pid reused by another program)
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            env.pid_file.write_text(f"{other.pid}\n")
            r = env.modelport("--stop")
            assert "Removing orphan pid file." in r.stdout and other.poll() is None
        finally:
            other.kill()


def test_start_foreground_writes_the_pid_file_and_stop_ends_it(env):
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelport", "serve", "--start", "--foreground", *env.args],
        cwd=env.cwd, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                if httpx.get(f"{env.url}/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert int(env.pid_file.read_text()) == proc.pid  # attached: the pid is this one
        r = env.modelport("--stop")
        assert r.returncode == 0 and "has stopped" in r.stdout
        assert proc.wait(10) is not None and not env.pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--log-config=log4j2.xml", "log4j2"),
        ("--cpp-log-config=x.conf", "C++ backend"),
        ("--plugins-path=plugins", "Java plugin"),
        ("--ppath=plugins", "Java plugin"),
    ],
)
def test_torchserve_only_flags_are_refused_clearly(env, flag, words):
    r = env.modelport("--start", *env.args, flag)
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert not env.pid_file.exists()


def _parse(argv: list[str]) -> argparse.Namespace:
    args, extra = build_parser().parse_known_args(["serve", *argv])
    assert not extra
    return args


def test_flags_parse():
    a = _parse(["--start", "--model-store", "s", "--models", "llm=llm.mar", "--ncs",
                "--foreground", "--enable-model-api", "--workflow-store", "w"])  # fmt: skip
    assert a.ts_start and a.ts_foreground and a.ts_enable_model_api and not a.ts_stop
    assert _parse(["--stop"]).ts_stop
    with pytest.raises(SystemExit):
        _parse(["--start", "--stop"])
    argv = ["serve", "--start", "--model-store", "s", "--sta", "--", "--start"]
    assert start_stop._child_argv(argv) == ["serve", "--model-store", "s", "--", "--start"]


def test_enable_model_api_overrides_the_config(tmp_path):
    import asyncio

    from fastapi import FastAPI

    from modelport.entrypoints.torchserve import frontend

    cfg = tmp_path / "config.properties"
    cfg.write_text("enable_model_api=false\n")
    for extra, allowed in (([], False), (["--enable-model-api"], True)):
        args = _parse(["--ts-config", str(cfg), "--disable-token-auth", "--ncs", *extra])
        service = asyncio.run(frontend.build(args, FastAPI()))
        assert service.state.model_api is allowed
