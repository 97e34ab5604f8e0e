"""Record the torch ops of a forward and name those a CUDA graph could not capture.

Without a GPU, the CUDA code path (the Triton kernels, under TRITON_INTERPRET=1)
runs on CPU tensors, where nothing syncs; so the ops themselves are checked:
an op that on CUDA reads a device value back to the host, or builds a tensor
from host data (a host-to-device copy on CUDA), or returns a shape that depends
on the data, breaks capture, and this recorder names it. The Triton
interpreter's own tensor handling (it emulates the GPU with numpy) is not part
of the code path and is left out.
"""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read device data on the host (or whose output size is data).
SYNCING_OPS = {
    "_local_scalar_dense", "item", "nonzero", "nonzero_static", "bincount", "unique", "_unique", "_unique2",
    "unique_consecutive", "unique_dim", "masked_select", "repeat_interleave", "equal", "is_nonzero",
    "_assert_async", "histc", "allclose",
}
# aten ops that make a tensor of host data: torch.tensor(...) / as_tensor(a number) on a device is a copy.
# (Not scalar_tensor: a Python number in torch.where(c, x, 0) is a wrapped CPU scalar that CUDA
# kernels take as an argument, no copy; vLLM's captured forwards are full of them.)
HOST_DATA_OPS = {"lift_fresh", "lift_fresh_copy"}
# Python-level tensor methods that read values on the host without an aten op.
HOST_READS = {"tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__"}


def _in_interpreter() -> bool:
    """True when called from inside Triton's interpreter (its GPU emulation, not our code)."""
    frame = sys._getframe(2)
    while frame is not None:
        if "triton" in frame.f_code.co_filename and "interpreter" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class OpRecorder(TorchDispatchMode):
    """Every aten op of the code path, with its output shapes; and the forbidden ones."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []
        self.forbidden: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _in_interpreter():
            return out
        name = func.__name__.split(".")[0]  # "nonzero.default" -> "nonzero"
        shapes = tuple(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                       if isinstance(t, torch.Tensor))
        self.ops.append((name, shapes))
        if name in SYNCING_OPS:
            self.forbidden.append(f"{name} (host sync on CUDA)")
        if name in HOST_DATA_OPS:
            self.forbidden.append(f"{name} (a tensor built from host data: a host-to-device copy on CUDA)")
        return out


class HostReadRecorder(TorchFunctionMode):
    """Tensor methods that hand values to Python (.tolist(), .item(), bool(t), ...)."""

    def __init__(self):
        super().__init__()
        self.forbidden: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and not _in_interpreter():
            self.forbidden.append(f"Tensor.{name} (host read)")
        return func(*args, **(kwargs or {}))


def record(fn, *args):
    """Run fn(*args); return (its output, the ops [(name, output shapes)], the forbidden ones)."""
    ops, reads = OpRecorder(), HostReadRecorder()
    with reads, ops:
        out = fn(*args)
    return out, ops.ops, ops.forbidden + reads.forbidden
