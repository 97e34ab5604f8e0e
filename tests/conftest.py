import os

import torch
from hypothesis import settings

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU):
# slow, so the kernel tests keep their shapes small. The variable must be set
# before the kernels' modules are imported, and this conftest runs first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests draw the same examples on every run and machine (derandomize), so that CI
# cannot pass or fail by chance and a failure replays as it was seen. `pytest
# --hypothesis-profile explore` draws new examples each run, for a search beyond CI's.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile("deterministic")
