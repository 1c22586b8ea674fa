"""`kvmesh up` end to end: real processes on 127.0.0.1, the official openai client, and
the single-process Engine as the reference for every output."""

import json
import os
import time

import httpx
import pytest
import zmq

from kvmesh import SamplingParams
from tests.polling import wait_until
from tests.prompts import random_prompt

pytestmark = pytest.mark.cluster


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def openai_client(cluster):
    import openai

    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def metric(cluster, name: str) -> float:
    for line in httpx.get(f"{cluster.url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_equal_engine(openai_client, model_name, engine, stream):
    prompts = [random_prompt(n, seed=n) for n in (40, 180, 300)]
    expected = [o.text for o in engine.generate(prompts, greedy(16))]
    for prompt, want in zip(prompts, expected, strict=True):
        kwargs = dict(
            model=model_name,
            prompt=prompt,
            max_tokens=16,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        if stream:
            text = "".join(
                chunk.choices[0].text
                for chunk in openai_client.completions.create(stream=True, **kwargs)
                if chunk.choices
            )
        else:
            text = openai_client.completions.create(**kwargs).choices[0].text
        assert text == want


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_equals_engine(openai_client, model_name, engine, stream):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three rivers and a number " * 6},
    ]
    ids = engine.tokenizer.encode(
        engine.tokenizer.apply_chat_template(messages), add_special_tokens=False
    )
    want = engine.generate([ids], SamplingParams(max_tokens=20, temperature=0.0))[0]
    kwargs = dict(model=model_name, messages=messages, max_tokens=20, temperature=0.0)
    if stream:
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in openai_client.chat.completions.create(stream=True, **kwargs)
            if chunk.choices
        )
    else:
        reply = openai_client.chat.completions.create(**kwargs)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == want.finish_reason
        assert reply.usage.prompt_tokens == len(ids)
    assert text == want.text


def test_prompts_were_prefilled_remotely(cluster, openai_client, model_name):
    openai_client.completions.create(model=model_name, prompt=random_prompt(200, 1), max_tokens=2)
    assert metric(cluster, "kvmesh_remote_prefill_total") >= 1
    assert metric(cluster, "kvmesh_kv_transfer_bytes_total") > 0


def decode_totals(cluster, key: str = "cached_tokens_total") -> dict[str, int]:
    """A counter of each decode worker, as its last load report to the router says."""
    rows = json.loads(cluster.kvmesh("status", "--json").stdout)
    return {r["actor"]: r[key] for r in rows if r["role"] == "decode"}


def test_shared_prefix_is_cached_and_lands_on_its_holder(cluster, openai_client, model_name):
    base = random_prompt(256, seed=77)
    prompted = sum(decode_totals(cluster, "prompt_tokens_total").values())
    openai_client.completions.create(model=model_name, prompt=base + [20, 21], max_tokens=2)
    # The holder counts a prompt when it finishes, in the load report it publishes after
    # that prompt's KV events: once the router has it, it has the events too.
    wait_until(
        lambda: sum(decode_totals(cluster, "prompt_tokens_total").values()) >= prompted + 258,
        "the holder's load report with the first prompt reaching the router",
    )
    before = decode_totals(cluster)
    for tail in ([30, 31, 32], [40, 41], [50]):  # the holder wins every time, not by luck
        reply = openai_client.completions.create(model=model_name, prompt=base + tail, max_tokens=2)
        assert reply.usage.prompt_tokens_details.cached_tokens == 256
    after = wait_until(
        lambda: (
            (now := decode_totals(cluster))
            and sum(now.values()) - sum(before.values()) >= 3 * 256
            and now
        ),
        "the load reports counting the three cached prompts",
    )
    gains = sorted(after[w] - before[w] for w in before)
    assert gains == [0, 3 * 256], (before, after)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": [1, 999999]}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": list(range(16, 16 + 4100))}, 400, "prompt"),
    ],
)
def test_bad_requests_get_400_and_the_cluster_keeps_serving(
    cluster, model_name, body, status, param
):
    reply = httpx.post(f"{cluster.url}/v1/completions", json={"model": model_name, **body})
    assert reply.status_code == status
    assert reply.json()["error"]["param"] == param
    ok = httpx.post(
        f"{cluster.url}/v1/completions",
        json={"model": model_name, "prompt": "hello", "max_tokens": 3},
    )
    assert ok.status_code == 200


def test_unknown_model_is_404(cluster):
    reply = httpx.post(f"{cluster.url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert reply.status_code == 404


def test_status_lists_every_actor(cluster):
    proc = cluster.kvmesh("status", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert sorted(r["role"] for r in rows) == [
        "cache",
        "decode",
        "decode",
        "frontend",
        "prefill",
        "router",
    ]
    assert all(r["health"] == "alive" for r in rows)
    assert all(r["pid"] > 0 for r in rows)  # every actor says its pid in its Hello
    cache = next(r for r in rows if r["role"] == "cache")
    assert cache["tiers"]["capacity_host"] > 0  # 0.5 GiB of 32 KiB blocks


GARBAGE = [
    [os.urandom(64)],
    [b""],
    [b"\x81\xa4type\xa4Nope"],  # msgpack of an unknown tag
    [b"\x93\x01\x02\x03"],  # msgpack of the wrong shape
    [os.urandom(8), os.urandom(8), os.urandom(8)],  # wrong frame count
]


def test_garbage_on_every_actor_endpoint_crashes_nothing(cluster, openai_client, model_name):
    rows = json.loads(cluster.kvmesh("status", "--json").stdout)
    endpoints = [e for r in rows for name, e in r["endpoints"].items() if e.startswith("tcp://")]
    # the ROUTERs of router, cache actor and three workers; the PUBs of all but the router
    assert len(endpoints) == 9
    ctx = zmq.Context()
    for endpoint in endpoints:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for frames in GARBAGE:
            sock.send_multipart(frames)
        sock.close()
    ctx.term()
    time.sleep(1.0)  # time to crash, were garbage to crash an actor: nothing to poll for
    reply = openai_client.completions.create(
        model=model_name, prompt=random_prompt(150, 3), max_tokens=4
    )
    assert reply.usage.completion_tokens == 4
    after = json.loads(cluster.kvmesh("status", "--json").stdout)
    assert sorted(r["actor"] for r in after) == sorted(r["actor"] for r in rows)


def test_client_disconnect_cancels_the_request_on_its_worker(cluster, model_name):
    body = {
        "model": model_name,
        "prompt": random_prompt(50, 9),
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as reply:
        for n, _ in enumerate(reply.iter_lines()):
            if n > 5:
                break  # leave mid-stream
    wait_until(
        lambda: all(running == 0 for running in decode_totals(cluster, "running").values()),
        "the request stopping on its worker after the client left",
        timeout=30,
    )
