"""The load tests speak to a server the way a user does: HTTP, /metrics and the `smoothsmoe` command.

So nothing under loadtests/ may import this project's server or kernels. Read from the source (every
import statement, top level or inside a function), so a lazy import inside a command counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"
FORBIDDEN = ("smoothsmoe_server", "smoothsmoe_kernels")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file; `from . import x` resolves to loadtests."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "loadtests" if node.level else node.module or ""))
    return out


def test_the_walk_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from smoothsmoe_server.models import default_model\n")
    assert (4, "smoothsmoe_server.models") in imported_modules(probe)


def test_loadtests_import_neither_the_server_nor_the_kernels():
    files = sorted(LOADTESTS.rglob("*.py"))
    assert len(files) >= 8, files  # the walk found the package
    bad = [f"{path.relative_to(LOADTESTS.parent)}:{line}: {module}" for path in files
           for line, module in imported_modules(path) if module.split(".")[0] in FORBIDDEN]
    assert not bad, "loadtests/ must reach the server over HTTP and the smoothsmoe command:\n" + "\n".join(bad)
