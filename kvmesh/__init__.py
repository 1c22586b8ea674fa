"""kvmesh: a distributed LLM inference runtime.

Heavy names (Engine pulls in torch) are imported on first use, so a router or
frontend process that imports only kvmesh.protocol starts in well under a second.
"""

import os

__version__ = "0.1.0"

# MKL may use fewer threads when the machine is busy (MKL_DYNAMIC), which changes the
# summation order of a matmul and so the last bits of its result: the same request would
# then decode differently under load. Fixed thread use keeps outputs reproducible. Set
# here, before anything imports torch; a user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

_LAZY = {
    "AsyncClient": "kvmesh.client",
    "Client": "kvmesh.client",
    "Engine": "kvmesh.engine.engine",
    "RequestOutput": "kvmesh.engine.engine",
    "SamplingParams": "kvmesh.params",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmesh' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
