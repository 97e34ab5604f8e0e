"""SmoothWorkerExtension: methods vLLM mixes into its worker (--worker-extension-cls).

The API server calls them through the engine's collective_rpc: to calibrate
eps at start-up, to reset the counters after warm-up, and to read the counters
when Prometheus scrapes /metrics (one device-to-host copy per layer per
scrape, never per step).
"""

from __future__ import annotations

import dataclasses

from smoothsmoe_kernels import calibrate_gaps
from smoothsmoe_server.engine.probe import probe_layer
from smoothsmoe_server.engine.router import CountingRouter, SmoothRouter


class SmoothWorkerExtension:
    def _smoothsmoe_routers(self) -> list[SmoothRouter | CountingRouter]:
        model = self.model_runner.get_model()
        routers = [getattr(m, "router", None) for m in model.modules()]
        return [r for r in routers if isinstance(r, SmoothRouter | CountingRouter)]

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
        """Every layer's counters and settings, and the server's options; None
        on ranks other than the first (with tensor parallelism every rank
        routes the same tokens)."""
        if getattr(self, "rank", 0) != 0:
            return None
        routers = self._smoothsmoe_routers()
        return {
            "options": dataclasses.asdict(routers[0].options) if routers else None,
            "layers": [
                {
                    "layer": r.layer_index,
                    "smoothed": isinstance(r, SmoothRouter),
                    "experts": r.experts,
                    "top_k": r.config.top_k,
                    "max_extra": r.config.max_extra,
                    "num_experts": r.counters.layout.num_experts,
                    "eps": float(r.eps),
                    "eps_bounds": _eps_bounds(r),
                    "margin_edges": list(r.counters.layout.margin_edges),
                    "stats": r.counters.stats.tolist(),
                }
                for r in routers
            ],
            # Layers with neither router: stock routing vLLM's way, not counted (no family to count by).
            "uncounted": [
                {"layer": layer, "reason": reason}
                for layer, reason in sorted(getattr(m, "smoothsmoe_stock_layer") for m in
                                            self.model_runner.get_model().modules()
                                            if hasattr(m, "smoothsmoe_stock_layer"))
            ],
        }

    def smoothsmoe_probe_layer(self, layer_index: int, rel_steps: list[float], seed: int = 0) -> dict | None:
        """probe.probe_layer on the smoothed layer `layer_index` (None on ranks other than the first)."""
        if getattr(self, "rank", 0) != 0:
            return None
        model = self.model_runner.get_model()
        for m in model.modules():
            if isinstance(getattr(m, "router", None), SmoothRouter) and m.router.layer_index == layer_index:
                return probe_layer(m, m.router, rel_steps, seed)
        raise ValueError(f"no smoothed MoE layer {layer_index}")


def _eps_bounds(router) -> list[float] | None:
    """[min, max] of an online layer's eps, None where eps does not move."""
    c = getattr(router, "controller", None)
    return None if c is None else [float(c.lo), float(c.hi)]
