"""The Dockerfile's cpu image builds and serves, as a non-root user.

Built with buildah (Debian's package, no daemon: `bud --isolation chroot`, in a storage folder
of this module's own), the way a user without Docker would. No image registry is
reachable here, so the Dockerfile's FROM image is stood in for by Debian bookworm made with
debootstrap (minbase with python3 and venv, the apt caches emptied as in the slim image) and
committed under that name. torch comes from a PEP 503 index on loopback, as through a mirror
(--build-arg SMOOTHSMOE_TORCH_INDEX), the rest from PyPI through this machine's CA bundle (--secret
id=ca): nothing of this machine's pip settings. The image then runs with the host's network
(buildah run, its entry point and user): /health, a chat completion through the openai client,
the routing counters on /metrics, a server uid that is not 0.

Runs where buildah can run (root, buildah and debootstrap installed: .ci/run installs them);
skipped with the reason elsewhere, except under CI=true, where that fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from loadtests.metrics_scrape import metric_samples
from loadtests.server_process import ServerProcess
from tests.deploy.conftest import REPO, ca_bundle
from tests.deploy.wheel_index import WheelIndex

DOCKERFILE = REPO / "Dockerfile"
IMAGE = "localhost/smoothsmoe-serve:cpu"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT_S = 1800


def why_buildah_cannot_run() -> str | None:
    for tool in ("buildah", "debootstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (Debian: apt-get install buildah debootstrap, as .ci/run does)"
    if os.geteuid() != 0:
        return "debootstrap and buildah's chroot isolation need root"
    return None


REASON = why_buildah_cannot_run()
pytestmark = pytest.mark.skipif(REASON is not None and os.environ.get("CI") != "true",
                                reason=f"buildah cannot run here: {REASON}")


class Buildah:
    """buildah on a storage folder of its own, so that the test neither sees nor leaves other images.

    The kernel's overlay driver (root needs no fuse-overlayfs): it writes each layer once, where
    vfs copies the whole tree for every layer and container (measured here on this 4 GB image:
    14 s for each `buildah from`, 84 s to delete the storage; with overlay, under a second).
    """

    def __init__(self, store: Path):
        self.store = store
        self.prefix = ["buildah", "--root", str(store / "root"), "--runroot", str(store / "run"),
                       "--storage-driver", "overlay"]

    def __call__(self, *args: str, cwd: Path | None = None) -> str:
        p = subprocess.run([*self.prefix, *args], cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                           check=False)
        assert p.returncode == 0, f"buildah {' '.join(args[:3])} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        return p.stdout

    def remove_everything(self) -> None:
        for args in (["rm", "--all"], ["rmi", "--all", "--force"]):
            subprocess.run([*self.prefix, *args], capture_output=True, timeout=600, check=False)
        shutil.rmtree(self.store, ignore_errors=True)


class ContainerServer(ServerProcess):
    """`buildah run` of the server: started in a session of its own (setsid), stopped as a process
    group, because buildah answers SIGTERM by killing its child outright and leaves the engine's
    processes behind; SIGTERM to all of them lets vLLM shut down as it would in a container."""

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the group, then SIGKILL to what is left of it after `timeout` s."""
        deadline = time.monotonic() + timeout
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            while time.monotonic() < deadline:
                self.proc.poll()  # reaps buildah, so that a zombie does not keep the group alive
                os.killpg(self.proc.pid, 0)  # raises once no process of the group is left
                time.sleep(0.5)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return super().stop()


def from_image() -> str:
    """The base stage's FROM, as a builder resolves a short name (docker.io/library/...)."""
    (name,) = re.findall(r"^FROM (\S+) AS base$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return name if "/" in name else f"docker.io/library/{name}"


@pytest.fixture(scope="module")
def buildah(tmp_path_factory):
    if REASON:
        pytest.fail(f"CI=true, and buildah cannot run: {REASON}")
    tool = Buildah(tmp_path_factory.mktemp("containers"))
    yield tool
    tool.remove_everything()


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    return {}


@pytest.fixture(scope="module")
def base_image(buildah, tmp_path_factory, timings) -> str:
    """Debian bookworm by debootstrap, committed as the FROM image (the rootfs is kept for the session)."""
    rootfs = tmp_path_factory.getbasetemp() / "debootstrap-bookworm"
    if not (rootfs / "etc" / "debian_version").exists():
        start = time.monotonic()
        packages = "python3,python3-venv,python3-pip,ca-certificates"
        p = subprocess.run(["debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs),
                            DEBIAN_MIRROR], capture_output=True, text=True, timeout=900, check=False)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):  # empty in the slim image
            for f in (rootfs / cache).glob("*"):
                if f.is_file():
                    f.unlink()
        timings["debootstrap s"] = time.monotonic() - start
    ctr = buildah("from", "scratch").strip()
    buildah("add", ctr, str(rootfs), "/")
    buildah("commit", "--quiet", "--rm", ctr, from_image())
    return from_image()


@pytest.fixture(scope="module")
def image(buildah, base_image, tmp_path_factory, torch_cpu_wheel, timings) -> dict:
    """The cpu target, built; returns its OCI config and the torch index's URL, which must have served torch."""
    secrets = ["--secret", f"id=ca,src={ca_bundle()}"] if ca_bundle() else []
    with WheelIndex(tmp_path_factory.mktemp("torch-index"), {"torch": [torch_cpu_wheel]}) as index:
        start = time.monotonic()
        buildah("bud", "--isolation", "chroot", "--network", "host", "--pull-never", "--target", "cpu", *secrets,
                "--build-arg", f"SMOOTHSMOE_TORCH_INDEX={index.url}", "-t", IMAGE, "-f", str(DOCKERFILE), str(REPO))
        timings["build s"] = time.monotonic() - start
    assert f"/torch/{torch_cpu_wheel.name}" in index.requested, index.requested
    return {**json.loads(buildah("inspect", "--type", "image", IMAGE))["OCIv1"]["config"], "torch index": index.url}


@pytest.fixture(scope="module")
def container(buildah, image) -> str:
    return buildah("from", "--pull-never", IMAGE).strip()


@pytest.fixture(scope="module")
def rootfs(buildah, container) -> Path:
    """The image's files, as a working container of it has them (mounted)."""
    return Path(buildah("mount", container).strip())


@pytest.fixture(scope="module")
def server(buildah, image, container, tmp_path_factory, timings):
    """The image's entry point, as its user, with the host's network; on loopback at a free port."""
    argv = ["setsid", *buildah.prefix, "run", "--isolation", "chroot", "--network", "host", container, "--",
            *image["Entrypoint"]]
    server = ContainerServer("image", argv, dict(os.environ), tmp_path_factory.mktemp("logs"))
    timings["serve s"] = server.started_in
    yield server
    server.stop()


def routed_by_layer(url: str) -> dict[str, float]:
    return {s.labels["layer"]: s.value for s in metric_samples(url) if s.name == "smoothsmoe_tokens_routed_total"}


def listening_pid(port: int) -> int:
    (pid,) = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN}
    return pid


def test_build_settings_leave_nothing_in_the_image(image, rootfs):
    """The CA bundle and the index were the build's only: not in the config, not in the files
    (read before the server runs in the same container)."""
    assert not [e for e in image["Env"] if re.match(r"(PIP_|SSL_CERT|REQUESTS_CA|SMOOTHSMOE_TORCH_INDEX)", e)]
    secrets = rootfs / "run" / "secrets"
    assert not secrets.exists() or not any(secrets.iterdir())
    home = rootfs / "home" / "smoothsmoe"
    for leftover in ("etc/pip.conf", "home/smoothsmoe/.config/pip", "home/smoothsmoe/.cache/pip",
                     "opt/smoothsmoe/.venv/pip-torch.log"):
        assert not (rootfs / leftover).exists(), leftover
    # pip records an install's source URL only for direct URLs; the torch index must appear nowhere.
    index = image["torch index"].encode()
    for f in [*(rootfs / "opt" / "smoothsmoe" / ".venv").glob("lib/python3*/site-packages/*.dist-info/*"),
              *home.rglob("*")]:
        if f.is_file() and f.stat().st_size < 1 << 20:
            assert index not in f.read_bytes(), f


def test_image_serves_as_a_non_root_user(server, image, rootfs, buildah, timings, capsys):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    model = client.models.list().data[0].id
    before = routed_by_layer(server.url)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    # No wait: a scrape reads the workers' counters after it arrives (middleware.MetricsRefresh).
    after = routed_by_layer(server.url)
    assert after and after.keys() == before.keys()
    # Every layer routed each token the model computed: the prompt's, and each generated one but the last.
    computed = r.usage.prompt_tokens + r.usage.completion_tokens - 1
    assert {layer: after[layer] - before[layer] for layer in after} == {layer: computed for layer in after}
    pid = listening_pid(server.port)
    assert os.getpgid(pid) == server.proc.pid  # the server this test started, not another on the machine
    user = image["User"]
    uid = next(int(line.split(":")[2]) for line in (rootfs / "etc" / "passwd").read_text().splitlines()
               if line.split(":")[0] == user)
    assert psutil.Process(pid).uids().real == uid != 0
    sizes = dict(line.split("|") for line in buildah("images", "--format", "{{.Name}}:{{.Tag}}|{{.Size}}").splitlines())
    with capsys.disabled():
        print(f"\nimage sizes (buildah images): {sizes}; " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
