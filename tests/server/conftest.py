"""Live servers for the server tests: started once per configuration, shared.

Each start costs tens of seconds on 2 cores (engine start, torch.compile,
calibration), so a configuration's server lives for the whole session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME, ensure_default_model

from loadtests.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"


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
    server = ServerProcess(name, argv, env, tmp_path_factory.mktemp("logs"), cwd=REPO)
    request.addfinalizer(server.stop)
    return server


SMOOTHSMOE = [sys.executable, "-m", "smoothsmoe_server", "serve"]


@pytest.fixture(scope="session")
def smooth_server(request, tmp_path_factory, server_env) -> ServerProcess:
    """The default model, smoothing on at the defaults (eps auto, budget 0.5), with an API key."""
    return _server(request, tmp_path_factory, "smooth", [*SMOOTHSMOE, "--api-key", API_KEY], server_env)


@pytest.fixture(scope="session")
def nosmooth_server(request, tmp_path_factory, server_env) -> ServerProcess:
    """--no-smoothing; also given a vLLM option that only vLLM's own launcher acts on
    (--reasoning-parser-plugin: a file it imports at start-up), for test_server_startup."""
    plugin_dir = tmp_path_factory.mktemp("reasoning-plugin")
    marker = plugin_dir / "imported"
    plugin = plugin_dir / "reasoning_plugin.py"
    plugin.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported by the API server')\n")
    server = _server(request, tmp_path_factory, "nosmooth",
                     [*SMOOTHSMOE, "--no-smoothing", "--reasoning-parser-plugin", str(plugin)], server_env)
    server.plugin_marker = marker
    return server


@pytest.fixture(scope="session")
def stock_server(request, tmp_path_factory, server_env, model_cache) -> ServerProcess:
    """Stock vLLM, no plugin at all, on the same checkpoint and settings as smoothsmoe's default."""
    env = {**server_env, "VLLM_PLUGINS": ""}
    path = ensure_default_model(model_cache)
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(path),
            "--served-model-name", DEFAULT_MODEL_NAME, "--max-model-len", "2048"]
    return _server(request, tmp_path_factory, "stock", argv, env)
