"""register(): the vllm.general_plugins entry point.

vLLM runs it in every process it starts (API server, engine core, workers),
before the model is built, and possibly more than once per process.
"""

from __future__ import annotations

import logging

from smoothsmoe_server.options import SmoothingOptions

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format


def register() -> None:
    """Install smoothed routing if `smoothsmoe serve` (or calibrate) asked for it.

    Without the options variable (plain `vllm serve`, or another program in
    the same environment) vLLM stays stock.
    """
    options = SmoothingOptions.from_env()
    if options is None:
        return
    # Imported here: the vLLM modules below must not load before vLLM's own
    # plugin machinery has set the platform up.
    from smoothsmoe_server.engine import router  # noqa: F401  (registers the smoothsmoe:: custom ops)
    from smoothsmoe_server.engine.eps import EpsPlan
    from smoothsmoe_server.engine.moe_patch import install

    install(options, EpsPlan.parse(options.eps))
