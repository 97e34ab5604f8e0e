"""The OpenMP thread binding of vLLM's CPU workers when one machine runs several of them.

vLLM's CPU build binds each worker (each tensor- or pipeline-parallel rank) to
one NUMA node of its own ("auto"), and refuses to start when the machine has
fewer NUMA nodes than ranks: "Not enough allowed NUMA nodes". A one-socket
machine has one. Unless the user has chosen a binding (VLLM_CPU_OMP_THREADS_BIND),
`smoothsmoe serve` then splits the CPUs this process may run on into one
contiguous group per rank, which is what the user would otherwise have to
write by hand (e.g. "0|1" for two ranks on two CPUs).
"""

from __future__ import annotations

ENV_VAR = "VLLM_CPU_OMP_THREADS_BIND"


def split_cpus(cpus: list[int], ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` workers over `cpus`: contiguous groups, '|' between ranks.

    >>> split_cpus([0, 1, 2, 3, 4], 2)
    '0,1,2|3,4'
    """
    if len(cpus) < ranks:
        raise ValueError(f"{ranks} CPU workers need at least {ranks} CPUs, this process may use {len(cpus)} "
                         f"({cpus}); lower --tensor-parallel-size / --pipeline-parallel-size, or set {ENV_VAR}")
    cpus = sorted(cpus)
    size, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for r in range(ranks):
        end = start + size + (1 if r < extra else 0)
        groups.append(",".join(map(str, cpus[start:end])))
        start = end
    return "|".join(groups)


def default_binding(ranks: int) -> str | None:
    """The binding to use for `ranks` local CPU workers, or None where vLLM's own choice works
    (one rank, or at least as many NUMA nodes as ranks)."""
    if ranks <= 1:
        return None
    import vllm.utils.cpu_resource_utils as cr_utils

    if len(cr_utils.get_visible_memory_node()) >= ranks:
        return None
    return split_cpus([c.id for c in cr_utils.get_allowed_cpu_list()], ranks)
