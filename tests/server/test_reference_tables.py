"""The README's flag, metric and endpoint tables are what the server accepts, exports and serves.

Each table has one source: the flags table is rendered from SmoothingOptions (cli.flags_table) and
must equal the README's byte for byte; the metrics and endpoints tables are written by hand, and
their first column must name exactly what a live server exports and routes. Like test_model_table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from smoothsmoe_server.commands.cli import METRICS_KEY_FLAG, flag_name, flags_table, smoothing_fields

from loadtests import eps_online
from smoothsmoe_kernels.eps_control import SETTLE_WINDOWS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def readme_table(header: str) -> list[str]:
    """The rows (after the separator) of the README table whose header line is `header`."""
    lines = README[README.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def first_cells(header: str) -> set[str]:
    return {row.split("|")[1].strip().strip("`") for row in readme_table(header)}


def test_readme_flags_table_is_rendered_from_the_options():
    start = README.index("| flag | default | meaning |")
    table = "\n".join(README[start:].splitlines()[:2] + readme_table("| flag | default | meaning |")) + "\n"
    assert table == flags_table(), "regenerate the README's flags table from cli.flags_table():\n" + flags_table()


def test_help_smoothing_lists_every_flag_with_the_stated_settling_time():
    help_text = subprocess.run([sys.executable, "-m", "smoothsmoe_server", "serve", "--help=Smoothing"],
                               capture_output=True, text=True, timeout=300).stdout
    flags = [flag_name(f.name) for f in smoothing_fields()] + [METRICS_KEY_FLAG]
    assert all(flag in help_text for flag in flags), help_text
    assert f"settles within {SETTLE_WINDOWS} windows" in " ".join(help_text.split())
    assert eps_online.SETTLE_WINDOWS == SETTLE_WINDOWS  # the load test checks the same settling time


def test_readme_metrics_table_is_what_the_server_exports(smooth_server):
    text = httpx.get(f"{smooth_server.url}/metrics", timeout=30).text
    exported: dict[str, set[str] | None] = {}  # name: label names (None: no sample here to read them from)
    for family in text_string_to_metric_families(text):
        if family.name.startswith("smoothsmoe_"):
            name = family.name + ("_total" if family.type == "counter" else "")
            exported[name] = ({k for s in family.samples for k in s.labels} - {"le"}) if family.samples else None
    documented = {}
    for cell in first_cells("| metric | type | how to read it |"):
        name, _, labels = cell.partition("{")
        documented[name] = set(labels.rstrip("}").split(",")) - {""}
    assert set(documented) == set(exported), (set(documented) - set(exported), set(exported) - set(documented))
    # smoothsmoe_epsilon_bound has samples only under --smooth-eps online (this server: auto).
    assert {n: v for n, v in exported.items() if v is not None} == \
        {n: documented[n] for n, v in exported.items() if v is not None}


def test_readme_endpoints_table_is_what_the_server_routes(smooth_server):
    paths = httpx.get(f"{smooth_server.url}/openapi.json", timeout=30).json()["paths"]
    ours = {f"GET {path}" for path, ops in paths.items() if path.startswith("/smoothsmoe/") for _ in ops}
    assert first_cells("| endpoint | API key | what it answers |") == ours | {"GET /metrics"}
    # The README's rule: with --api-key alone they stay open (the smooth server has a key).
    for endpoint in ours | {"GET /metrics"}:
        path = endpoint.split()[1]
        if path != "/smoothsmoe/probe":  # the probe runs a sweep: open means "not 401", checked cheaply below
            assert httpx.get(f"{smooth_server.url}{path}", timeout=60).status_code == 200, path
    assert httpx.get(f"{smooth_server.url}/smoothsmoe/probe?layer=999", timeout=60).status_code != 401
