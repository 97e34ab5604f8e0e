"""deploy/grafana/dashboard.py, loaded by path (deploy/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DASHBOARD_PY = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboard.py"


def load_dashboard():
    if "smoothsmoe_dashboard" not in sys.modules:
        spec = importlib.util.spec_from_file_location("smoothsmoe_dashboard", DASHBOARD_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["smoothsmoe_dashboard"]
