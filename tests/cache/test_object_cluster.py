"""The object tier on real clusters (`kvmesh up`, the tiny model) over a moto S3 server
process: blocks a decode worker evicts go through the host tier into the bucket and come
back with the Engine's output; a second cluster on the same bucket finds them at start
(the cache actor lists the bucket and announces them) and serves them as cached tokens;
a killed object server costs hits, never a request.

One decode worker with 24 device blocks, a host tier of 20 slots and no disk: a 300-token
prompt (18 full blocks) is pushed out of the device by the next prompt and out of the
host by the one after, into the bucket (kv.object_write "demoted")."""

import httpx
import obstore
import pytest
from obstore.store import S3Store

from kvmesh import Engine
from kvmesh.bench.cluster import start_cluster
from kvmesh.cache.host_tier import pool_bytes
from tests.cache.s3server import CREDENTIALS, MotoServer
from tests.polling import wait_until
from tests.prompts import random_prompt

pytestmark = pytest.mark.cluster

PROMPT_TOKENS = 300
FULL_BLOCKS = PROMPT_TOKENS // 16  # 18
HOST_SLOTS = 20
RECORD_BYTES = 32768  # one block of the tiny model, float32
BUCKET = "kv-clusters"


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as env:  # what `kvmesh up` and its actors inherit
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        server = MotoServer()
        server.create_bucket(BUCKET)
        yield server
        server.kill()


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir, num_blocks=512)


def start(tmp_path_factory, tiny_model_dir, s3, name: str):
    return start_cluster(
        tmp_path_factory.mktemp(name),
        tiny_model_dir,
        "kv.device_blocks=24",
        f"kv.host_gb={pool_bytes(HOST_SLOTS, RECORD_BYTES) / 2**30}",
        f"kv.object_url=s3://{BUCKET}/tests",
        f"kv.object_endpoint={s3.endpoint}",
        "nodes.0.actors.2.count=0",
        "nodes.0.actors.3.count=1",
    )


def complete(cluster, prompt: list[int]) -> dict:
    model = httpx.get(f"{cluster.url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0}
    body["ignore_eos"] = True
    response = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def expected_text(engine, prompt: list[int]) -> str:
    from kvmesh import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return engine.generate([prompt], params)[0].text


def cached_tokens(result: dict) -> int:
    return result["usage"]["prompt_tokens_details"]["cached_tokens"]


def onboarded_from_objects(cluster) -> float:
    for line in httpx.get(f"{cluster.url}/metrics", timeout=10).text.splitlines():
        if line.startswith('kvmesh_kv_onboard_blocks_total{tier="object"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def objects_in_bucket(s3) -> int:
    store = S3Store(BUCKET, endpoint=s3.endpoint, client_options={"allow_http": True})
    return sum(len(batch) for batch in obstore.list(store, "tests/"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir, s3, engine) -> dict:
    """Cluster A: three prompts push the first one's blocks into the bucket, then a
    request with its prefix is served; its reply, the prompt and its expected text."""
    first, *others = (random_prompt(PROMPT_TOKENS, seed) for seed in (7, 8, 9))
    prompt = first + [40]  # a new request with the first prompt's prefix
    cluster = start(tmp_path_factory, tiny_model_dir, s3, "objects-a")
    try:
        texts = [complete(cluster, p)["choices"][0]["text"] for p in (first, *others)]
        wait_until(lambda: objects_in_bucket(s3) > 0, "blocks demoted into the bucket")
        again = complete(cluster, prompt)
        onboarded = wait_until(lambda: onboarded_from_objects(cluster), "onboards from the bucket")
    finally:
        assert cluster.stop() == 0, cluster.log.read_text()[-3000:]
    return {
        "texts": texts,
        "expected": [expected_text(engine, p) for p in (first, *others)],
        "prompt": prompt,
        "again": again,
        "onboarded": onboarded,
    }


def test_evicted_blocks_come_back_from_the_bucket(first_run, engine):
    assert first_run["texts"] == first_run["expected"]
    again = first_run["again"]
    assert cached_tokens(again) == FULL_BLOCKS * 16
    assert again["choices"][0]["text"] == expected_text(engine, first_run["prompt"])
    assert 0 < first_run["onboarded"] < FULL_BLOCKS  # the rest: from device and host


@pytest.mark.slow
def test_a_second_cluster_finds_the_blocks_in_the_bucket(
    first_run, tmp_path_factory, tiny_model_dir, s3, engine
):
    in_bucket = objects_in_bucket(s3)
    prompt = first_run["prompt"]
    restarted = start(tmp_path_factory, tiny_model_dir, s3, "objects-b")
    try:  # nothing on device, host or disk: whatever is cached came from the bucket
        result = complete(restarted, prompt)
        assert 0 < cached_tokens(result) <= min(in_bucket, FULL_BLOCKS) * 16
        assert result["choices"][0]["text"] == expected_text(engine, prompt)
        onboarded = wait_until(lambda: onboarded_from_objects(restarted), "onboards")
        assert onboarded * 16 == cached_tokens(result)
    finally:
        assert restarted.stop() == 0, restarted.log.read_text()[-3000:]


@pytest.mark.slow
def test_a_killed_object_server_costs_hits_not_requests(
    tmp_path_factory,
    tiny_model_dir,
    s3,  # the AWS environment; this test kills a server of its own
    engine,
):
    server = MotoServer()
    server.create_bucket(BUCKET)
    cluster = start(tmp_path_factory, tiny_model_dir, server, "objects-killed")
    try:
        first, *others = (random_prompt(PROMPT_TOKENS, seed) for seed in (17, 18, 19))
        for p in (first, *others):
            complete(cluster, p)
        wait_until(lambda: objects_in_bucket(server) > 0, "blocks demoted into the bucket")
        server.kill()
        for p in (first + [40], random_prompt(PROMPT_TOKENS, 20), others[0] + [41]):
            result = complete(cluster, p)  # misses where the bucket was: recomputed
            assert result["choices"][0]["text"] == expected_text(engine, p)
    finally:
        server.kill()
        assert cluster.stop() == 0, cluster.log.read_text()[-3000:]
