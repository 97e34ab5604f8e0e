"""What the install and image tests share: deploy/install.sh's pins, pip isolated from this
machine's settings, and the torch wheel they serve from a loopback index."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_SH = REPO / "deploy" / "install.sh"
# What `pip install -e .` needs of the repository (the Dockerfile copies the same).
PROJECT_FILES = ["pyproject.toml", "README.md", "smoothsmoe_kernels", "server", "deploy/install.sh"]


def install_pins(target: str) -> list[str]:
    """The torch pins deploy/install.sh installs for `target` (cpu or cuda), read from the script."""
    match = re.search(rf"^\s*{target}\) torch_pins=\(([^)]*)\)", INSTALL_SH.read_text(), flags=re.MULTILINE)
    assert match, f"no torch_pins for {target} in {INSTALL_SH}"
    return match.group(1).split()


def ca_bundle() -> str | None:
    """The CA bundle this machine's network access needs (its HTTPS goes through TLS inspection), if any."""
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return os.environ[var]
    return None


def isolated_pip_env(**extra: str) -> dict[str, str]:
    """The environment of a machine without this one's pip settings: no PIP_* variables, no
    pip.conf read (PIP_CONFIG_FILE=/dev/null skips every config file, constraints included), so no
    find-links to a local torch wheel and no local indexes; only the CA bundle is kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHON=sys.executable)
    if ca_bundle():
        env["PIP_CERT"] = ca_bundle()
    env.update(extra)
    return env


def copy_project(dest: Path, files: list[str] = PROJECT_FILES) -> Path:
    """A checkout of just `files` at `dest`, so that install.sh makes its .venv there, not here."""
    for name in files:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="session")
def torch_cpu_wheel(tmp_path_factory) -> Path:
    """torch 2.13.0+cpu's wheel as this machine's pip finds it (its local copy, or PyTorch's CPU index)."""
    dest = tmp_path_factory.mktemp("wheels")
    pin = install_pins("cpu")[0]
    p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), pin],
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, f"this machine's pip has no {pin} to serve: {p.stderr[-2000:]}"
    (wheel,) = dest.glob("torch-*.whl")
    return wheel
