import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU):
# slow, so the kernel tests keep their shapes small. The variable must be set
# before the kernels' modules are imported, and this conftest runs first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
