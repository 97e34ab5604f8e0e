"""SmoothWorkerExtension: methods vLLM mixes into its worker (--worker-extension-cls).

The API server calls them through the engine's collective_rpc: to calibrate
eps at start-up, to reset the counters after warm-up, and to read the counters
when Prometheus scrapes /metrics (one device-to-host copy per layer per
scrape, never per step).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from smoothsmoe_kernels import calibrate_gaps
from smoothsmoe_server.engine.layer_plan import PLAN_ATTRIBUTE
from smoothsmoe_server.engine.probe import ProbeRefused, probe_layer
from smoothsmoe_server.engine.router import CountedRouter, SmoothRouter
from smoothsmoe_server.engine.snapshot import Snapshot, UncountedLayer


class SmoothWorkerExtension:
    def _smoothsmoe_routers(self) -> list[CountedRouter]:
        return counted_routers(self.model_runner.get_model().modules())

    def smoothsmoe_start_recording(self) -> int:
        routers = [r for r in self._smoothsmoe_routers() if isinstance(r, SmoothRouter)]
        for r in routers:
            r.counters.recorder.start()
        return len(routers)

    def smoothsmoe_calibrate(self, budget: float) -> dict[int, dict]:
        """Stop recording; set each smoothed layer's eps to reach `budget`. Returns the per-layer results."""
        out = {}
        for r in self._smoothsmoe_routers():
            if not isinstance(r, SmoothRouter):
                continue
            gaps = r.counters.recorder.stop()
            if gaps.gaps.shape[0] == 0:
                raise RuntimeError(f"calibration saw no tokens in {r.layer_name}")
            cal = calibrate_gaps(gaps, r.config.max_extra, budget)
            r.eps.fill_(cal.eps)
            if r.controller is not None:
                r.controller.arm()  # online: from the calibrated eps on
            out[r.layer_index] = {"eps": cal.eps, "mean_extras": cal.mean_extras, "tokens": gaps.gaps.shape[0],
                                  "reached": cal.reached}
        return out

    def smoothsmoe_fit_eps(self, budgets: list[float]) -> dict[float, dict[int, float]]:
        """Stop recording; each smoothed layer's eps for every budget, from one recording (set none).

        `smoothsmoe eval` sets them one budget after another with smoothsmoe_set_eps.
        """
        out: dict[float, dict[int, float]] = {b: {} for b in budgets}
        for r in self._smoothsmoe_routers():
            if isinstance(r, SmoothRouter):
                gaps = r.counters.recorder.stop()
                if gaps.gaps.shape[0] == 0:
                    raise RuntimeError(f"calibration saw no tokens in {r.layer_name}")
                for b in budgets:
                    out[b][r.layer_index] = 0.0 if b == 0 else calibrate_gaps(gaps, r.config.max_extra, b).eps
        return out

    def smoothsmoe_embed(self, token_ids: list[list[int]]) -> list:
        """The model's input embeddings of each token-id list ([len, hidden] tensors on the CPU; first rank
        only): what `smoothsmoe eval` perturbs and feeds back as prompt embeddings."""
        if getattr(self, "rank", 0) != 0:
            return []
        import torch

        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        with torch.no_grad():
            return [model.embed_input_ids(torch.tensor(ids, device=device)).cpu() for ids in token_ids]

    def smoothsmoe_set_eps(self, eps: dict[int, float]) -> None:
        eps = {int(k): float(v) for k, v in eps.items()}  # keys may arrive as strings from the RPC encoding
        for r in self._smoothsmoe_routers():
            if isinstance(r, SmoothRouter) and r.layer_index in eps:
                r.eps.fill_(eps[r.layer_index])
                if r.controller is not None:
                    r.controller.arm()  # online: the range is around the eps set here

    def smoothsmoe_eps(self) -> dict[int, float]:
        """Every smoothed layer's eps on this rank (all ranks answer: they must agree)."""
        return {r.layer_index: float(r.eps) for r in self._smoothsmoe_routers() if isinstance(r, SmoothRouter)}

    def smoothsmoe_reset(self) -> None:
        """Zero the counters (after warm-up and calibration, which must not be counted)."""
        for r in self._smoothsmoe_routers():
            r.counters.reset()

    def smoothsmoe_snapshot(self) -> dict | None:
        """Every MoE layer's counters and settings, and the server's options, in Snapshot.to_wire's
        form; None on ranks other than the first (with tensor parallelism every rank routes the
        same tokens)."""
        if getattr(self, "rank", 0) != 0:
            return None
        return model_snapshot(self.model_runner.get_model().modules()).to_wire()

    def smoothsmoe_probe_layer(self, layer_index: int, rel_steps: list[float], seed: int = 0) -> dict | None:
        """probe.probe_layer on the smoothed layer `layer_index` (None on ranks other than the first).

        A layer that cannot be probed answers {"refused": why} (the API server's 400); any other
        failure raises, and reaches the API server as an error of the call.
        """
        if getattr(self, "rank", 0) != 0:
            return None
        for m in self.model_runner.get_model().modules():
            router = getattr(m, "router", None)
            if isinstance(router, CountedRouter) and router.layer_index == layer_index:
                if not isinstance(router, SmoothRouter):
                    return {"refused": f"layer {layer_index} is not smoothed: {router.plan.reason}"}
                try:
                    return probe_layer(m, router, rel_steps, seed)
                except ProbeRefused as e:
                    return {"refused": str(e)}
        return {"refused": f"no counted MoE layer {layer_index}"}


def counted_routers(modules: Iterable[nn.Module]) -> list[CountedRouter]:
    """The routers of this project among `modules` (a model's .modules()), in model order."""
    return [r for r in (getattr(m, "router", None) for m in modules) if isinstance(r, CountedRouter)]


def model_snapshot(modules: Iterable[nn.Module]) -> Snapshot:
    """The Snapshot of every MoE layer this project's factory built among `modules` (a model's .modules())."""
    modules = list(modules)
    routers = counted_routers(modules)
    # Layers with neither router: stock routing vLLM's way, not counted (no family to count by).
    uncounted = sorted((plan.layer_index, plan.reason) for m in modules
                       if (plan := getattr(m, PLAN_ATTRIBUTE, None)) is not None
                       and not isinstance(getattr(m, "router", None), CountedRouter))
    return Snapshot(options=routers[0].options if routers else None, layers=tuple(r.snapshot() for r in routers),
                    uncounted=tuple(UncountedLayer(layer, reason) for layer, reason in uncounted))
