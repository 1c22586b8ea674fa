"""The default cluster's topology for the machine it starts on.

cluster.toml's default node (schema.DEFAULT_NODE, what `python -m kvmesh.config` prints)
runs 1 prefill and 2 decode workers: on a machine with a few cores those three engine
processes and their threads fight over the same cores, and serving gets slower than one
process. So `kvmesh up` (and every command that reads the same cluster) without a
cluster.toml, on a machine with fewer than SMALL_MACHINE_CPUS usable CPUs, starts one
aggregated worker (no prefill worker, one decode worker that prefills too), keeping the
frontend, router and cache actor: these overrides come first, so any --set of the user
(nodes.0.actors.2.count=1, nodes.0.actors.3.count=2) asks for more and wins.
"""

from __future__ import annotations

import os

SMALL_MACHINE_CPUS = 8
# the default node's entries: frontend, router, prefill, decode, cache
ONE_WORKER = ("nodes.0.actors.2.count=0", "nodes.0.actors.3.count=1")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which taskset and cgroups narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_overrides(cpus: int | None = None) -> list[str]:
    """The overrides that fit the default cluster to a machine with `cpus` usable CPUs
    (default: this one's): one aggregated worker below SMALL_MACHINE_CPUS, else none."""
    cpus = usable_cpus() if cpus is None else cpus
    return list(ONE_WORKER) if cpus < SMALL_MACHINE_CPUS else []


def engine_threads(engines: int = 1, cpus: int | None = None) -> int | None:
    """Torch threads for each of `engines` CPU engines serving on this machine: below
    SMALL_MACHINE_CPUS, (cpus - 1) // engines, at least 1, so one core stays for the HTTP
    server and the actors' event loops (a compute thread that shares its cores with them
    waits on them at every parallel region; vLLM's CPU server likewise reserves one core
    for its API server); None (torch's choice) on a bigger machine, or when the user set
    OMP_NUM_THREADS."""
    cpus = usable_cpus() if cpus is None else cpus
    if cpus >= SMALL_MACHINE_CPUS or os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (cpus - 1) // max(1, engines))
