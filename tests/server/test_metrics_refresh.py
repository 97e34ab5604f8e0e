"""MetricsRefresh on its own: each scrape shows counters read after it arrived, and scrapes that
arrive together share reads. The engine is a stand-in that counts its reads (the live server's
scrapes, right after requests and with no wait, are in test_metrics.py and test_tensor_parallel.py)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY
from smoothsmoe_server.api.middleware import MetricsRefresh

READ_S = 0.05  # how long the stand-in takes to answer a read


class CountingEngine:
    """The one call MetricsRefresh makes on vLLM's engine client, slow and counted."""

    def __init__(self):
        self.read_starts: list[float] = []

    async def collective_rpc(self, method: str):
        assert method == "smoothsmoe_snapshot"
        self.read_starts.append(time.monotonic())
        await asyncio.sleep(READ_S)
        return [None]  # a rank with nothing to report: the metrics keep what they had


def test_a_scrape_reads_after_it_arrives_and_a_burst_shares_reads():
    refresh = MetricsRefresh(app=None)
    engine = CountingEngine()

    async def scrape() -> tuple[float, float]:
        arrived = time.monotonic()
        await refresh.refresh(engine)
        return arrived, refresh.read_started

    async def run():
        one_after_another = [await scrape() for _ in range(3)]
        burst = await asyncio.gather(*(scrape() for _ in range(20)))
        return one_after_another, burst

    try:
        one_after_another, burst = asyncio.run(run())
    finally:
        REGISTRY.unregister(refresh.metrics)
    # Back to back, each scrape gets its own read: none is answered from the one before.
    # A burst of 20: the first reads; the rest arrive during that read, wait, and share the next one.
    assert len(engine.read_starts) == 3 + 2
    for arrived, read_started in one_after_another + burst:
        assert read_started >= arrived  # the counters shown were read after the scrape arrived
