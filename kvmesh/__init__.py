"""kvmesh: a distributed LLM inference runtime.

Heavy names (Engine pulls in torch) are imported on first use, so a router or
frontend process that imports only kvmesh.protocol starts in well under a second.
"""

__version__ = "0.1.0"

_LAZY = {
    "AsyncClient": "kvmesh.client",
    "Client": "kvmesh.client",
    "Engine": "kvmesh.engine.engine",
    "RequestOutput": "kvmesh.engine.engine",
    "SamplingParams": "kvmesh.engine.params",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmesh' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
