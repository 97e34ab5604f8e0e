"""ServerProcess: a server started as a subprocess on loopback, ready when /health answers."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts `argv --host 127.0.0.1 --port <free>` and waits for GET /health = 200.

    `url` is the base URL; `started_in` the seconds it took; the output goes to `log_path`.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None):
        self.name = name
        self.port = free_port()
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
