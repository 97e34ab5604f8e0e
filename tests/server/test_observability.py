"""A real Prometheus scrapes two live replicas of the default model while requests flow
(data parallelism: two servers of one model, the second with --smooth-eps online); every
recording rule and every dashboard panel query must return data through its HTTP API, and
the model-wide totals must be the sum of the two servers' counters.
Also renders the dashboard preview (deploy/grafana/preview.png) from the same queries.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL

from loadtests.server_process import ServerProcess, free_port
from loadtests.soak import scrape
from tests.dashboard_module import load_dashboard
from tests.server.conftest import API_KEY, REPO, SMOOTHSMOE

RULES = REPO / "deploy" / "prometheus" / "rules" / "smoothsmoe.rules.yml"
TRAFFIC_S = 25
READY_S = 60  # Prometheus starts in a second or two; a minute means it will not
DPI = 70  # the preview's resolution


dashboard = load_dashboard


def substitute(expr: str) -> str:
    """The dashboard's variables as Grafana fills them with 'All' selected."""
    return expr.replace("$model", MODEL).replace("$layer", ".*")


async def traffic(url: str, seconds: float) -> int:
    """Completions and chats, streamed and not, 4 at a time, for `seconds`."""
    done = 0
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:
        async def worker(i: int):
            nonlocal done
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if i % 2:
                    stream = await client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"Tell me about {done}"}], max_tokens=16,
                        stream=True)
                    async for _ in stream:
                        pass
                else:
                    await client.completions.create(model=MODEL, prompt=f"Count to {done}:", max_tokens=16)
                done += 1

        await asyncio.gather(*(worker(i) for i in range(4)))
    return done


@pytest.fixture(scope="module")
def replica(request, tmp_path_factory, server_env) -> ServerProcess:
    """A second server of the same model, as a data-parallel replica (its eps online: bounds on /metrics)."""
    server = ServerProcess("replica", [*SMOOTHSMOE, "--api-key", API_KEY, "--smooth-eps", "online"], server_env,
                           tmp_path_factory.mktemp("logs"))
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="module")
def prometheus(smooth_server, replica, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is not installed (deploy/install.sh installs Debian's prometheus package)"
    d = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "smoothsmoe", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{smooth_server.port}",
                                                            f"127.0.0.1:{replica.port}"]}]}],
    }
    (d / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = open(d / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_S
        while not ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"Prometheus was not ready within {READY_S} s (exit code {proc.poll()}):\n"
                            + (d / "prometheus.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        start = time.time()

        async def both():
            return await asyncio.gather(traffic(smooth_server.url, TRAFFIC_S), traffic(replica.url, TRAFFIC_S))

        assert all(n > 4 for n in asyncio.run(both()))
        time.sleep(3)  # a few more scrapes and rule evaluations after the last request
        yield url, start, time.time()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:  # not listening yet
        return False


def query(url: str, expr: str) -> list:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert r["status"] == "success", (expr, r)
    return r["data"]["result"]


def test_targets_are_scraped(prometheus):
    url, _, _ = prometheus
    up = query(url, 'up{job="smoothsmoe"}')
    assert len(up) == 2 and all(u["value"][1] == "1" for u in up)


def test_model_totals_are_the_sum_of_the_replicas(prometheus, smooth_server, replica):
    url, _, _ = prometheus
    servers = [scrape(s.url) for s in (smooth_server, replica)]  # traffic is over: the counters rest
    routed = sum(sum(s["routed"].values()) for s in servers)
    total = query(url, "sum by (model) (smoothsmoe_tokens_routed_total * on (instance, job) group_left (model) "
                       "smoothsmoe:model_info)")
    assert len(total) == 1 and total[0]["metric"] == {"model": MODEL}
    assert float(total[0]["value"][1]) == routed > 0
    for rule in ("smoothsmoe:tokens_routed:rate5m_model", "smoothsmoe:extra_experts_per_token:ratio5m_model"):
        labels = [{k: v for k, v in r["metric"].items() if k != "__name__"} for r in query(url, rule)]
        assert labels == [{"model": MODEL}]  # one series a model, not one a replica
    per_instance = query(url, "smoothsmoe:extra_experts_per_token:ratio5m_all")
    assert len(per_instance) == 2  # and still one a replica where it is asked for


def test_every_recording_rule_returns_data(prometheus):
    url, _, _ = prometheus
    groups = yaml.safe_load(RULES.read_text())["groups"]
    records = [r["record"] for g in groups for r in g["rules"] if "record" in r]
    assert len(records) >= 15
    empty = [name for name in records if not query(url, name)]
    assert not empty, f"recording rules without data: {empty}"


def test_every_dashboard_panel_query_returns_data(prometheus):
    url, _, _ = prometheus
    empty = [(p.title, expr) for p in dashboard().PANELS for expr, _ in p.targets if not query(url, substitute(expr))]
    assert not empty, f"panel queries without data: {empty}"


def test_alerting_rules_are_loaded_and_healthy(prometheus):
    url, _, _ = prometheus
    rules = httpx.get(f"{url}/api/v1/rules", timeout=30).json()["data"]["groups"]
    alerts = {r["name"]: r for g in rules for r in g["rules"] if r["type"] == "alerting"}
    assert set(alerts) == {"SmoothSMoEOverheadAboveBudget", "SmoothSMoEBoundaryHitRateJump", "SmoothSMoEServerDown",
                           "SmoothSMoETTFTSLOBurn", "SmoothSMoEEpsAtBound"}
    assert all(a["health"] == "ok" for a in alerts.values())
    assert all(a["state"] == "inactive" for a in alerts.values())  # a healthy server at its budget


def drawn_inside(image, ax, frame_px: int = 3) -> bool:
    """Whether the image holds more than one colour inside the axes' frame (its spines left out)."""
    box = ax.get_window_extent()  # display pixels at the figure's dpi, origin at the bottom left
    top, bottom = image.shape[0] - int(box.y1) + frame_px, image.shape[0] - int(box.y0) - frame_px
    inside = image[top:bottom, int(box.x0) + frame_px: int(box.x1) - frame_px]
    return inside.size > 0 and bool((inside != inside[0, 0]).any())


def test_render_dashboard_preview(prometheus, tmp_path):
    """Draws every panel from its Prometheus queries, laid out as in Grafana."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    url, start, end = prometheus
    module = dashboard()
    rows = max(p.y + p.h for p in module.PANELS)
    fig = plt.figure(figsize=(24, rows * 0.42), dpi=DPI)  # the saved image's pixels are the figure's
    for title, y in module.ROWS:
        fig.text(0.005, 1 - (y + 0.6) / rows, title, fontsize=13, weight="bold")
    drawn = [0] * len(module.PANELS)  # series drawn, per panel
    axes = []
    for i, p in enumerate(module.PANELS):
        ax = fig.add_axes([p.x / 24 + 0.022, 1 - (p.y + p.h) / rows + 0.012, p.w / 24 - 0.03, p.h / rows - 0.045])
        axes.append(ax)
        ax.set_title(p.title, fontsize=10, loc="left")
        ax.tick_params(labelsize=7)
        for expr, legend in p.targets:
            r = httpx.get(f"{url}/api/v1/query_range", params={"query": substitute(expr), "start": start,
                                                                "end": end, "step": 1}, timeout=30).json()
            result = r["data"]["result"]
            if p.kind == "heatmap":  # one row per expert, colour = tokens/s
                result.sort(key=lambda s: int(s["metric"].get("expert", 0)))
                width = max(len(s["values"]) for s in result)
                grid = [[float(v[1]) for v in s["values"]] + [0.0] * (width - len(s["values"])) for s in result]
                ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
                ax.set_ylabel("expert", fontsize=7)
                drawn[i] += len(result)
                continue
            for series in result[:16]:
                t = [float(v[0]) - start for v in series["values"]]
                v = [float(v[1]) for v in series["values"]]
                label = legend
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                if p.kind == "stat":
                    ax.text(0.5, 0.45, f"{v[-1] * (100 if p.unit == 'percentunit' else 1):.2f}"
                            f"{' %' if p.unit == 'percentunit' else ''}", ha="center", va="center", fontsize=26,
                            transform=ax.transAxes)
                    ax.set_xticks([])
                    ax.set_yticks([])
                else:
                    ax.plot(t, v, label=label, linewidth=1)
                drawn[i] += 1
        if p.kind != "stat" and ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    out = tmp_path / "preview.png"
    fig.savefig(out, dpi=DPI)
    assert [p.title for p, n in zip(module.PANELS, drawn) if n == 0] == [], "panels without a series"
    # The PNG, read back: the figure's size, and inside every panel's frame something other than the
    # background (a line, a heatmap, a number); a panel drawn empty or off the image fails.
    image = plt.imread(out)[:, :, :3]  # [rows, columns, RGB] floats in 0..1, row 0 at the top
    assert image.shape[1::-1] == tuple(round(v) for v in fig.get_size_inches() * DPI)
    blank = [p.title for p, ax in zip(module.PANELS, axes) if not drawn_inside(image, ax)]
    assert blank == [], f"panels with nothing drawn in the image: {blank}"
    if os.environ.get("SMOOTHSMOE_PREVIEW_OUT"):
        Path(os.environ["SMOOTHSMOE_PREVIEW_OUT"]).write_bytes(out.read_bytes())
