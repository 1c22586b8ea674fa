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
