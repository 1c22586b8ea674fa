"""The hybrid stack ([[pools]]): short requests to an aggregated pool (one decode worker
that prefills itself), long ones to a disaggregated pool (a prefill and a decode worker).
Real processes, the official openai client, the in-process Engine as the reference; the
router's decision is read from /metrics."""

from __future__ import annotations

import httpx
import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.bench.cluster import start_cluster
from tests.polling import wait_until
from tests.prompts import random_prompt

pytestmark = pytest.mark.cluster

LONG = 200  # prompt tokens from which a request is long

CONFIG = f"""
[router]
disagg_min_tokens = 0

[model]
path = "{{model}}"

[[pools]]
name = "short"

[[pools]]
name = "long"
min_prompt_tokens = {LONG}

[[nodes]]
name = "local"
address = "127.0.0.1"
[[nodes.actors]]
role = "frontend"
[[nodes.actors]]
role = "router"
[[nodes.actors]]
role = "decode"
pool = "short"
[[nodes.actors]]
role = "prefill"
pool = "long"
[[nodes.actors]]
role = "decode"
pool = "long"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("pools")
    config = tmp / "cluster.toml"
    config.write_text(CONFIG.format(model=tiny_model_dir))
    c = start_cluster(tmp, None, config=config)
    yield c
    assert c.stop() == 0, c.log.read_text()[-3000:]


def metrics(cluster) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{cluster.url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_requests_go_to_the_pool_their_length_chooses(cluster, tiny_model_dir):
    import openai

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=256)
    short = [random_prompt(n, seed=n) for n in (20, 60, 120)]
    long = [random_prompt(n, seed=n) for n in (LONG + 40, LONG + 150)]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [o.text for o in engine.generate(short + long, greedy)]
    model = client.models.list().data[0].id
    answers = [
        client.completions.create(
            model=model, prompt=p, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
        )
        for p in short + long
    ]
    assert [a.choices[0].text for a in answers] == expected
    lengths = [a.usage.prompt_tokens for a in answers]
    assert all(n < LONG for n in lengths[:3]) and all(n >= LONG for n in lengths[3:])

    def settled():
        m = metrics(cluster)
        prompt = 'kvmesh_worker_prompt_tokens_total{role="decode",worker="%s"}'
        seen = (m.get(prompt % "decode-0"), m.get(prompt % "decode-1"))
        return m if seen == (sum(lengths[:3]), sum(lengths[3:])) else None

    m = wait_until(settled, "each decode worker's prompt tokens are its pool's requests'")
    assert m['kvmesh_router_pool_routed_total{pool="short"}'] == 3
    assert m['kvmesh_router_pool_routed_total{pool="long"}'] == 2
    assert m["kvmesh_router_pool_fallbacks_total"] == 0
    assert m["kvmesh_router_remote_prefills_total"] == 2  # the long ones, on prefill-0
