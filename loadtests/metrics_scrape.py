"""One read of a server's /metrics, parsed: the samples every load test and check picks its counters from."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def metric_samples(url: str, headers: dict | None = None) -> list[Sample]:
    """Every sample (name, labels, value) that GET {url}/metrics exports now."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]
