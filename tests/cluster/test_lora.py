"""LoRA adapters in a cluster: `model: "<model>:<adapter>"` through the official openai
client on a disaggregated cluster (1 prefill + 2 decode workers: the prefill worker
computes the prompt through the adapter and writes its KV into the decode worker); every
answer equals the in-process Engine's through the same adapter, cached KV never crosses
adapters, and new prompts of an adapter go to the decode worker that has it loaded."""

from __future__ import annotations

import httpx
import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.bench.cluster import DISAGGREGATED, start_cluster
from kvmesh.gpu.lora import write_random_lora
from kvmesh.gpu.model_config import ModelConfig
from tests.polling import wait_until
from tests.prompts import random_prompt

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    config = ModelConfig.from_pretrained(tiny_model_dir)
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": write_random_lora(root / "a", config, rank=8, alpha=16.0, seed=1),
        "b": write_random_lora(root / "b", config, rank=4, alpha=8.0, targets=("v_proj",), seed=2),
        "c": write_random_lora(root / "c", config, rank=4, alpha=8.0, seed=3),
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, adapters):
    c = start_cluster(
        tmp_path_factory.mktemp("lora"),
        tiny_model_dir,
        *DISAGGREGATED,
        "router.disagg_min_tokens=0",
        *(f"model.adapters.{name}={path}" for name, path in adapters.items()),
    )
    yield c
    assert c.stop() == 0, c.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(cluster):
    import openai

    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def base(client) -> str:
    return client.models.list().data[0].id


def complete(client, model: str, prompt: str, max_tokens: int = 10):
    return client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )


def test_models_lists_each_adapter(client, base):
    assert [m.id for m in client.models.list().data] == [base, *(f"{base}:{a}" for a in "abc")]


def test_each_adapter_answers_as_the_engine_through_it(client, base, tiny_model_dir, adapters):
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=256, adapters=adapters)
    prompts = [random_prompt(n, seed=300 + n) for n in (24, 90)]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = {
        adapter: [o.text for o in engine.generate(prompts, greedy, adapters=adapter)]
        for adapter in (None, "a", "b")
    }
    assert len({tuple(texts) for texts in expected.values()}) == 3  # the adapters matter
    for k, prompt in enumerate(prompts):
        for adapter in ("a", None, "b", "a"):
            model = base + (f":{adapter}" if adapter else "")
            assert complete(client, model, prompt).choices[0].text == expected[adapter][k], (
                adapter,
                k,
            )


def test_cached_kv_never_crosses_adapters(client, base):
    prompt = random_prompt(160, seed=411)
    complete(client, f"{base}:a", prompt, 2)
    again = complete(client, f"{base}:a", prompt, 2)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    for other in (f"{base}:b", base):
        reply = complete(client, other, prompt, 2)
        assert (reply.usage.prompt_tokens_details.cached_tokens or 0) == 0, other


def test_an_unknown_adapter_is_a_404(cluster, base):
    response = httpx.post(
        f"{cluster.url}/v1/completions",
        json={"model": f"{base}:zz", "prompt": "hi", "max_tokens": 2},
    )
    assert response.status_code == 404
    assert response.json()["error"]["message"] == (
        f"model '{base}:zz' does not exist; this server serves '{base}', '{base}:a', "
        f"'{base}:b', '{base}:c'"
    )


def test_an_adapters_new_prompts_go_to_the_worker_that_has_it_loaded(cluster, client, base):
    """Adapter c is loaded on decode-1 only (decode-0 is busy with a long stream when c's
    first request comes); then, with both idle, fresh prompts through c (no cached
    prefix anywhere) go to decode-1, one after another: without the adapter's credit
    every one would go to decode-0 (equal costs, lower id)."""
    busy = client.completions.create(
        model=base,
        prompt=random_prompt(20, seed=419),
        max_tokens=1500,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(busy)
    next(chunks)
    decoders = ("decode-0", "decode-1")
    try:
        wait_until(lambda: cluster.status()["decode-0"]["running"] == 1, "decode-0 busy")
        complete(client, f"{base}:c", random_prompt(40, seed=420), 2)
    finally:
        busy.close()

    def ready():
        rows = cluster.status()
        idle = all(rows[w]["running"] == 0 for w in decoders)
        return rows if idle and [w for w in decoders if "c" in rows[w]["adapters"]] else None

    rows = wait_until(ready, "both decode workers idle, and one reports adapter c loaded")
    assert [w for w in decoders if "c" in rows[w]["adapters"]] == ["decode-1"]
    before = {w: rows[w]["prompt_tokens_total"] for w in decoders}
    prompts = [random_prompt(30 + 10 * k, seed=430 + k) for k in range(4)]
    lengths = [complete(client, f"{base}:c", p, 2).usage.prompt_tokens for p in prompts]

    def settled():
        rows = cluster.status()
        grown = {w: rows[w]["prompt_tokens_total"] - before[w] for w in decoders}
        return grown if sum(grown.values()) == sum(lengths) else None

    grown = wait_until(settled, "the decode workers' prompt tokens count the four requests")
    assert grown == {"decode-0": 0, "decode-1": sum(lengths)}
