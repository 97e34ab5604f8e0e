"""A dense float64 oracle of the FP8 block-quantized experts, written as plainly as possible.

Test code only. It takes the quantization steps of fp8_blocks (vLLM's
per_token_group_quant_fp8) one token and one slot at a time: the scale and the
quotient in float32 as vLLM computes them, the rounding to float8 e4m3 by
looking the value up among all 256 codes (nearest, ties to the even code), not
by torch's conversion. Every GEMM and the SiLU run in float64 on the
dequantized values, so the only float32 roundings are the ones the format
prescribes (and h's and each pair's output rounding to x's dtype).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

F32 = np.float32
E4M3_CODES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
_FINITE = np.isfinite(E4M3_CODES)
GRID = np.unique(E4M3_CODES[_FINITE])  # the 253 finite values, sorted (+0 and -0 compare equal)


def round_to_e4m3(v: np.ndarray) -> np.ndarray:
    """Each float32 value (|v| <= 448) to the nearest e4m3 value; a tie goes to the code with mantissa lsb 0."""
    v = np.asarray(v, dtype=np.float64)
    hi = np.clip(np.searchsorted(GRID, v), 1, len(GRID) - 1)
    below, above = GRID[hi - 1], GRID[hi]
    pick_above = (above - v) < (v - below)
    tie = (above - v) == (v - below)
    even_above = _lsb_is_zero(above)
    out = np.where(pick_above | (tie & even_above), above, below)
    return np.where(v == 0, v, out).astype(np.float32)  # keep the sign of a zero


def _lsb_is_zero(values: np.ndarray) -> np.ndarray:
    codes = torch.from_numpy(values.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return (codes & 1) == 0


def quantize_group(v: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """One group of float32 values -> (its e4m3 values as float32, its float32 scale)."""
    v = v.astype(np.float32)
    amax = F32(np.max(np.abs(v))) if v.size else F32(0)
    scale = F32(max(amax, F32(1e-10)) * F32(1.0 / 448.0))
    return round_to_e4m3(np.clip(v / scale, F32(-448), F32(448))), scale


def quantize_dequantize_row(row: np.ndarray, group: int) -> np.ndarray:
    """A row quantized per group of `group` columns (the last may be partial), dequantized in float64."""
    out = np.empty(row.shape, dtype=np.float64)
    for g0 in range(0, row.size, group):
        q, s = quantize_group(row[g0 : g0 + group])
        out[g0 : g0 + group] = q.astype(np.float64) * float(s)
    return out


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block_shape) -> np.ndarray:
    """[N, K] float8 weights of one expert times their block's scale, float64, element by element."""
    bn, bk = block_shape
    w = q.float().double().numpy().copy()
    s = scale.double().numpy()
    for n in range(w.shape[0]):
        for k0 in range(0, w.shape[1], bk):
            w[n, k0 : k0 + bk] *= s[n // bn, k0 // bk]
    return w


def fp8_dense_oracle(x, w13, w13_scale, w2, w2_scale, ids, weights, block_shape) -> torch.Tensor:
    """y [T, H] float64: every active slot of every token, one at a time."""
    bk = block_shape[1]
    E = w13.shape[0]
    W13 = [dequantize_blocks(w13[e], w13_scale[e], block_shape) for e in range(E)]
    W2 = [dequantize_blocks(w2[e], w2_scale[e], block_shape) for e in range(E)]
    y = np.zeros(x.shape, dtype=np.float64)
    for t in range(x.shape[0]):
        xd = quantize_dequantize_row(x[t].float().numpy(), bk)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gate, up = np.split(W13[e] @ xd, 2)
            h = F.silu(torch.from_numpy(gate)) * torch.from_numpy(up)  # float64
            h = h.to(x.dtype).float().numpy()  # rounded to x's dtype, then quantized
            out = W2[e] @ quantize_dequantize_row(h, bk) * float(weights[t, j])
            y[t] += torch.from_numpy(out).to(x.dtype).double().numpy()  # each pair's output in x's dtype
    return torch.from_numpy(y)


def assert_close_but_rare_flips(y: torch.Tensor, ref: torch.Tensor, tol: float, max_rows: int = 1) -> None:
    """y [T, H] within tol of ref, relative to each token row's largest |ref|, in all but at most
    max_rows rows; in those, row norms within 15 %. (Relative to the row: an output element is a
    sum of products that cancel, so its own size says nothing about its rounding error.)

    Why rows may differ: two implementations that sum a GEMM in another order (float32 here,
    float64 there; or another tile order) get h one ulp apart, and about once in 1e5 to 1e6
    elements that ulp moves h / scale across a float8 rounding boundary: one h element then
    differs by one e4m3 step (1/16 to 1/8 of its value) and its token's output row by about as
    much of that element's share. A wrong scale, block index or pair would move most rows.
    """
    assert y.shape == ref.shape
    y, ref = y.double(), ref.double()
    ok = ((y - ref).abs() <= tol * ref.abs().amax(dim=-1, keepdim=True)).all(dim=-1)
    bad = (~ok).nonzero().flatten().tolist()
    assert len(bad) <= max_rows, f"{len(bad)} rows of {y.shape[0]} off: {bad[:8]}"
    for t in bad:
        err = float((y[t] - ref[t]).norm() / ref[t].norm().clamp(min=1e-30))
        assert err < 0.15, f"row {t}: relative error {err:.2e}, more than one float8 step of h explains"
