"""Live servers for the server tests: started once per configuration, shared.

Each start costs tens of seconds on 2 cores (engine start, torch.compile,
calibration), so a configuration's server lives for the whole session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from smoothsmoe_server.default_model import DEFAULT_MODEL_NAME, ensure_default_model

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on loopback; `url` is its base URL."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        self.started_in = self._wait_healthy()

    def _wait_healthy(self) -> float:
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not healthy after {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("SMOOTHSMOE_CACHE") or tmp_path_factory.mktemp("smoothsmoe-cache"))
    ensure_default_model(cache)  # built once; every server below finds it there
    return cache


@pytest.fixture(scope="session")
def server_env(model_cache) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SMOOTHSMOE_OPTIONS"}
    env.update(SMOOTHSMOE_CACHE=str(model_cache), VLLM_CPU_KVCACHE_SPACE="1",
               # The compile cache would not see plugin changes between runs (vLLM keys it on its own code).
               VLLM_DISABLE_COMPILE_CACHE="1")
    return env


def _server(request, tmp_path_factory, name, argv, env):
    server = Server(name, argv, env, tmp_path_factory.mktemp("logs"))
    request.addfinalizer(server.stop)
    return server


SMOOTHSMOE = [sys.executable, "-m", "smoothsmoe_server", "serve"]


@pytest.fixture(scope="session")
def smooth_server(request, tmp_path_factory, server_env) -> Server:
    """The default model, smoothing on at the defaults (eps auto, budget 0.5), with an API key."""
    return _server(request, tmp_path_factory, "smooth", [*SMOOTHSMOE, "--api-key", API_KEY], server_env)


@pytest.fixture(scope="session")
def nosmooth_server(request, tmp_path_factory, server_env) -> Server:
    return _server(request, tmp_path_factory, "nosmooth", [*SMOOTHSMOE, "--no-smoothing"], server_env)


@pytest.fixture(scope="session")
def stock_server(request, tmp_path_factory, server_env, model_cache) -> Server:
    """Stock vLLM, no plugin at all, on the same checkpoint and settings as smoothsmoe's default."""
    env = {**server_env, "VLLM_PLUGINS": ""}
    path = ensure_default_model(model_cache)
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(path),
            "--served-model-name", DEFAULT_MODEL_NAME, "--max-model-len", "2048"]
    return _server(request, tmp_path_factory, "stock", argv, env)
