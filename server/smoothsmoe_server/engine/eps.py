"""Per-layer eps: a number for all layers, a JSON file of per-layer values, auto, or online.

With auto, layers start at eps 0 (stock routing at full width) and are
calibrated once the engine is up: the built-in prompts run through the engine
while every router records its band gaps, then each layer's eps is bisected
to the budget (smoothsmoe_kernels.calibrate_gaps) and fixed. Online starts
the same way, then each layer's controller (smoothsmoe_kernels.eps_control)
moves its eps to hold the budget on the traffic it sees.

An eps log (--smooth-eps-log) is JSON lines, one per second: every layer's eps
and counts. Its last line has the shape of an eps file, so `--smooth-eps LOG`
replays the final state of an online run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from smoothsmoe_server.engine.snapshot import Snapshot


@dataclass(frozen=True)
class EpsPlan:
    """Where each layer's eps comes from."""

    auto: bool = False
    online: bool = False  # auto's calibration, then the controller
    value: float | None = None  # one number for every layer
    per_layer: dict[int, float] = field(default_factory=dict)  # from a file
    source: str = ""

    @classmethod
    def parse(cls, spec: str) -> EpsPlan:
        """'auto', 'online', a number, or the path of a JSON file (`smoothsmoe calibrate`, or an eps log)."""
        if spec in ("auto", "online"):
            return cls(auto=True, online=spec == "online", source=spec)
        try:
            value = float(spec)
        except ValueError:
            path = Path(spec)
            if not path.is_file():
                raise ValueError(f"--smooth-eps must be 'auto', 'online', a number or a JSON file; {spec!r} is none"
                                 ) from None
            return cls(per_layer=load_eps_file(path), source=str(path))
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--smooth-eps must be finite and >= 0, got {spec}")
        return cls(value=value, source=spec)

    def initial(self, layer_index: int) -> float:
        """The eps a layer starts with (0 until calibrated, with auto)."""
        if self.auto:
            return 0.0
        if self.value is not None:
            return self.value
        if layer_index not in self.per_layer:
            raise ValueError(f"eps file {self.source} has no value for MoE layer {layer_index}")
        return self.per_layer[layer_index]


def load_eps_file(path: Path) -> dict[int, float]:
    """{layer index: eps} from a file of the form {"layers": {"0": 0.12, ...}, ...}, or from
    the last line of an eps log (JSON lines of that form)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        lines = text.strip().splitlines()
        try:
            data = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: neither a JSON file nor JSON lines ({e})") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path}: expected a JSON object with a non-empty 'layers' mapping")
    out = {}
    for key, value in layers.items():
        eps = value["eps"] if isinstance(value, dict) else value
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"{path}: layer {key}: eps must be a finite number >= 0, got {eps!r}")
        out[int(key)] = float(eps)
    return out


def save_eps_file(path: Path, layers: dict[int, dict], meta: dict) -> None:
    """Write per-layer calibration results (each with at least 'eps') as load_eps_file reads them."""
    body = {**meta, "layers": {str(k): layers[k] for k in sorted(layers)}}
    Path(path).write_text(json.dumps(body, indent=2) + "\n")


def eps_log_line(snapshot: Snapshot, now: float) -> str:
    """One line of an eps log from a worker snapshot: time (s), then each smoothed layer's eps and counts."""
    layers = {}
    for s in snapshot.layers:
        if s.smoothed:
            counts = s.counts()
            layers[str(s.layer)] = {"eps": s.eps, "tokens": counts.tokens, "extras": counts.extras}
    return json.dumps({"time": round(now, 3), "layers": layers}) + "\n"
