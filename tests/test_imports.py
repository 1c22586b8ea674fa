"""Imports point down: the processes that run no model (launcher, router, frontend, cache
actor) never load torch or numba, and the plain-data modules import nothing above them.
Each check imports in a fresh interpreter, so what another test loaded cannot hide it."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "numba")
TORCH_FREE = [
    "kvmesh.launcher",
    "kvmesh.protocol",
    "kvmesh.params",
    "kvmesh.kv.block_hash",
    "kvmesh.kv.segment",
    "kvmesh.gpu.block_pool",
    "kvmesh.gpu.model_config",
    "kvmesh.config",
    "kvmesh.client",
    "kvmesh.models.resolve",  # the CLI resolves --model before anything loads torch
    "kvmesh.models.gguf",  # torch only as an import writes its safetensors
    "kvmesh.router.kv_index",
    "kvmesh.router.policy",
    "kvmesh.frontend.app",
    "kvmesh.frontend.backend",
    "kvmesh.frontend.choices",
    "kvmesh.frontend.limits",
    "kvmesh.frontend.metrics",
    "kvmesh.frontend.schemas",
    "kvmesh.frontend.serving",
    "kvmesh.actors.router",
    "kvmesh.actors.frontend",
    "kvmesh.actors.planner",
    "kvmesh.planner.policy",
    "kvmesh.planner.window",
    "kvmesh.actors.cache",
]
# Plain data and torch-free foundations: the kvmesh modules each may load, itself aside.
FOUNDATIONS = {
    "kvmesh.protocol": {"kvmesh", "kvmesh.params"},
    "kvmesh.params": {"kvmesh"},
    "kvmesh.kv.block_hash": {"kvmesh", "kvmesh.kv"},
    "kvmesh.kv.segment": {"kvmesh", "kvmesh.kv"},
}


def loaded_after(code: str) -> set[str]:
    """The module names sys.modules holds after running `code` in a fresh interpreter."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_loads_no_torch_or_numba(module):
    assert loaded_after(f"import {module}") & set(HEAVY) == set()


def test_the_launcher_releases_a_dead_actors_segments_without_torch():
    """Cleaning up after a killed actor is the one thing the launcher does with shared
    memory: it must not pull in the data plane's torch and numba to do it."""
    code = "from kvmesh import launcher\nlauncher._release_segments(999999999)"
    assert loaded_after(code) & set(HEAVY) == set()


@pytest.mark.parametrize("module", sorted(FOUNDATIONS))
def test_foundations_import_nothing_above_them(module):
    kvmesh_modules = {
        name for name in loaded_after(f"import {module}") if name.startswith("kvmesh")
    }
    assert kvmesh_modules - {module} <= FOUNDATIONS[module]


OPTIONAL = ("cupy", "ucxx", "vllm", "obstore", "gguf", "moto")  # extras a module may need

EVERY_MODULE = """
import importlib, json, pkgutil, sys
import kvmesh
optional = set(sys.argv[1].split(","))
broken = {}
for info in pkgutil.walk_packages(kvmesh.__path__, "kvmesh."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in optional:
            broken[info.name] = repr(exc)
    except Exception as exc:
        broken[info.name] = repr(exc)
print(json.dumps(broken))
"""


def test_every_module_imports():
    """Each kvmesh module imports here (a module that needs an extra not installed may
    fail only for that extra): a definition error in a module only some role or extra
    runs (a vLLM worker's) shows in the default run, not first on a user's cluster."""
    out = subprocess.run(
        [sys.executable, "-c", EVERY_MODULE, ",".join(OPTIONAL)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out.splitlines()[-1]) == {}
