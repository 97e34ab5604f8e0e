"""A load test's report: per load level, latency percentiles, throughput, errors, goodput and
the routing figures read off /metrics; printed as a table, saved as JSON and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.metrics_scrape import metric_samples

LATENCIES = ("ttft", "itl", "tpot", "e2el")
PERCENTILES = (50, 90, 99)


def routing_counters(url: str, headers: dict | None = None) -> dict[str, float]:
    """The smoothsmoe counters summed over layers (tokens, active, extras, hits)."""
    names = {"smoothsmoe_tokens_routed_total": "tokens", "smoothsmoe_active_experts_total": "active",
             "smoothsmoe_extra_experts_total": "extras", "smoothsmoe_boundary_hits_total": "hits"}
    out = dict.fromkeys(names.values(), 0.0)
    for s in metric_samples(url, headers):
        if s.name in names:
            out[names[s.name]] += s.value
    return out


def routing_figures(before: dict, after: dict) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in before}
    tokens = d["tokens"] or float("nan")
    base = d["active"] - d["extras"]
    return {
        "tokens_routed": d["tokens"],
        "mean_active_experts": d["active"] / tokens,
        "extras_per_token": d["extras"] / tokens,
        "extra_overhead": d["extras"] / base if base else float("nan"),
        "boundary_hit_rate": d["hits"] / tokens,
    }


def level_row(load: str, bench: dict, routing: dict) -> dict:
    total = bench["completed"] + bench.get("failed", 0)
    row = {"load": load, "completed": bench["completed"], "failed": bench.get("failed", 0),
           "error_rate": bench.get("failed", 0) / total if total else 0.0,
           "request_throughput": bench["request_throughput"], "output_throughput": bench["output_throughput"],
           "goodput": bench.get("request_goodput"), **routing}
    for m in LATENCIES:
        for q in PERCENTILES:
            row[f"{m}_p{q}_ms"] = bench[f"p{q}_{m}_ms"]
    return row


def print_table(rows: list[dict], title: str) -> None:
    print(f"# {title}")
    head = (f"{'load':>8} {'ok':>5} {'err%':>5} {'req/s':>6} {'tok/s':>7} {'goodput':>7} "
            + " ".join(f"{m + ' p50/p90/p99 ms':>22}" for m in LATENCIES)
            + f" {'active':>7} {'ovhd%':>6} {'hit%':>6}")
    print(head)
    for r in rows:
        lat = " ".join(f"{r[f'{m}_p50_ms']:6.1f}/{r[f'{m}_p90_ms']:6.1f}/{r[f'{m}_p99_ms']:7.1f}" for m in LATENCIES)
        goodput = f"{r['goodput']:7.2f}" if r["goodput"] is not None else f"{'-':>7}"
        print(f"{r['load']:>8} {r['completed']:>5} {100 * r['error_rate']:5.1f} {r['request_throughput']:6.2f} "
              f"{r['output_throughput']:7.1f} {goodput} {lat} {r['mean_active_experts']:7.3f} "
              f"{100 * r['extra_overhead']:6.2f} {100 * r['boundary_hit_rate']:6.2f}")


def save(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps({**meta, "levels": rows}, indent=2) + "\n")
    png_path = out_dir / f"{stem}.png"
    plot(rows, meta, png_path)
    return json_path, png_path


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Latency percentiles against the load level, one panel per latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(4.2 * len(LATENCIES), 3.4))
    loads = [r["load"] for r in rows]
    for ax, m in zip(axes, LATENCIES):
        for q in PERCENTILES:
            ax.plot(loads, [r[f"{m}_p{q}_ms"] for r in rows], marker="o", label=f"p{q}")
        ax.set_title(m.upper())
        ax.set_xlabel(meta.get("load_kind", "load"))
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta.get('profile')} on {meta.get('url')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
