"""A real cluster for the serving tests: `kvmesh up` in a subprocess on 127.0.0.1,
every actor its own process, started once per module that asks for it (a module may
define its own `cluster`; model_name asks whichever the module has), and the reference
Engine its outputs are compared with."""

from __future__ import annotations

import httpx
import pytest

from kvmesh import Engine
from kvmesh.bench.cluster import DISAGGREGATED, start_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    """Frontend + router + 1 prefill + 2 decode; every prompt is prefilled remotely
    (disagg_min_tokens=0) so the disaggregated path is what gets tested."""
    c = start_cluster(
        tmp_path_factory.mktemp("cluster"),
        tiny_model_dir,
        *DISAGGREGATED,
        "router.disagg_min_tokens=0",
    )
    yield c
    assert c.stop() == 0, c.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The single-process reference."""
    return Engine.from_pretrained(tiny_model_dir, num_blocks=512)


@pytest.fixture(scope="module")
def model_name(cluster):
    return httpx.get(f"{cluster.url}/v1/models").json()["data"][0]["id"]
