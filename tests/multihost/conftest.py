"""Hosts in network namespaces (tests/multihost/netns.py), made once per module and
removed after it, also when it fails; the reference Engine outputs are compared with."""

from __future__ import annotations

import os

import pytest

from kvmesh import Engine
from tests.multihost.netns import NetnsError, NetnsHosts
from tests.tools import require_tools


@pytest.fixture(scope="module")
def hosts(request):
    """Three hosts a, b, c; skips (fails under KVMESH_REQUIRE_TOOLS=1) naming what is
    missing when namespaces cannot be made here."""
    require_tools("ip", "tc", "unshare")
    why = None
    if os.geteuid() != 0:
        why = "network namespaces need root"
    else:
        made = NetnsHosts(3)
        request.addfinalizer(made.close)
        try:
            made.create()
        except NetnsError as exc:
            why = f"network namespaces cannot be made here: {exc}"
    if why is not None:
        if os.environ.get("KVMESH_REQUIRE_TOOLS") == "1":
            pytest.fail(f"KVMESH_REQUIRE_TOOLS=1 and {why}")
        pytest.skip(why)
    return made


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The single-process reference."""
    return Engine.from_pretrained(tiny_model_dir, num_blocks=512)
