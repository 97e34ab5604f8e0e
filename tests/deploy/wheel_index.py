"""A package index on loopback, laid out like PyTorch's wheel index, for the install tests.

PEP 503 "simple" layout, as https://download.pytorch.org/whl/cpu serves it: `<url>/` lists the
projects, `<url>/<project>/` links each wheel with its sha256. Served by Python's http.server
from a temporary folder (the wheels symlinked into it) in a background thread.
"""

from __future__ import annotations

import hashlib
import html
import socket
import threading
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self


def _page(links: dict[str, str]) -> str:
    anchors = "\n".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a><br/>' for text, href in links.items())
    return f"<!DOCTYPE html>\n<html><body>\n{anchors}\n</body></html>\n"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class WheelIndex:
    """Serves `{project: [wheel paths]}` on 127.0.0.1; a project with no wheels gets an empty page.

    `url` is the index URL (what SMOOTHSMOE_TORCH_INDEX or pip's --index-url take); `requested`
    lists the paths asked for, in order. Use as a context manager.
    """

    def __init__(self, root: Path, projects: dict[str, list[Path]]):
        root.mkdir(parents=True, exist_ok=True)
        for project, wheels in projects.items():
            folder = root / project
            folder.mkdir(exist_ok=True)
            for wheel in wheels:
                (folder / wheel.name).symlink_to(wheel.resolve())
            # '+' in a local version label must be quoted in the link, as PyTorch's index does.
            links = {w.name: f"{urllib.parse.quote(w.name)}#sha256={sha256(w)}" for w in wheels}
            (folder / "index.html").write_text(_page(links))
        (root / "index.html").write_text(_page({p: f"{p}/" for p in projects}))
        self.requested: list[str] = []
        index = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format, *args):  # http.server's signature
                index.requested.append(urllib.parse.unquote(self.path))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class SilentPort:
    """A TCP port on 127.0.0.1 that accepts connections and never answers: an index behind a
    firewall or a hung proxy, which costs a client its whole timeout (a closed port fails at once)."""

    def __init__(self):
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)  # the kernel completes the handshakes; nothing ever reads or replies
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._socket.close()
