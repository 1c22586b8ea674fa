"""Two models in one cluster ([[models]]): real processes, the official openai client, and
each model's own in-process Engine as the reference. Model "alpha" is the tiny model
(seed 0) on one aggregated decode worker; model "beta" is the tiny model with other
weights (seed 1) on a prefill and a decode worker; each has its node's cache actor.
alpha admits one request at a time and queues two more."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.bench.cluster import start_cluster
from kvmesh.gpu.tiny import init_tiny
from tests.polling import wait_until
from tests.prompts import random_prompt

pytestmark = pytest.mark.cluster

CONFIG = """
[router]
disagg_min_tokens = 0

[[models]]
name = "alpha"
path = "{alpha}"
max_inflight = 1
max_queue = 2

[[models]]
name = "beta"
path = "{beta}"

[[nodes]]
name = "local"
address = "127.0.0.1"

[[nodes.actors]]
role = "frontend"

[[nodes.actors]]
role = "router"

[[nodes.actors]]
role = "decode"
model = "alpha"

[[nodes.actors]]
role = "cache"
model = "alpha"

[[nodes.actors]]
role = "prefill"
model = "beta"

[[nodes.actors]]
role = "decode"
model = "beta"

[[nodes.actors]]
role = "cache"
model = "beta"
"""


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_dir):
    beta = init_tiny(tmp_path_factory.mktemp("beta") / "tiny-beta", seed=1)
    return {"alpha": tiny_model_dir, "beta": beta}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_dirs):
    tmp = tmp_path_factory.mktemp("models")
    config = tmp / "cluster.toml"
    config.write_text(CONFIG.format(**model_dirs))
    c = start_cluster(tmp, None, config=config)
    yield c
    assert c.stop() == 0, c.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def engines(model_dirs):
    return {name: Engine.from_pretrained(path, num_blocks=256) for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def client(cluster):
    import openai

    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def complete(client, model: str, prompt: str, max_tokens: int = 12):
    return client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )


def test_models_lists_both(client):
    assert [m.id for m in client.models.list().data] == ["alpha", "beta"]


def test_each_request_is_served_by_its_own_model(client, engines):
    """The same prompts to both models, interleaved: each answer equals its own
    model's Engine, and the two models disagree (other weights), so neither was served
    by the other's workers or KV."""
    prompts = [random_prompt(n, seed=500 + n) for n in (40, 150)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = {name: [o.text for o in e.generate(prompts, greedy)] for name, e in engines.items()}
    assert expected["alpha"] != expected["beta"]
    for prompt_index, prompt in enumerate(prompts):
        for name in ("alpha", "beta", "alpha", "beta"):  # the second round hits the caches
            reply = complete(client, name, prompt)
            assert reply.model == name
            assert reply.choices[0].text == expected[name][prompt_index], (name, prompt_index)


def test_kv_of_one_model_never_serves_the_other(client):
    """A long prompt twice on alpha is a prefix hit there; the same prompt on beta then
    reuses nothing (its block hashes are salted by its own weights)."""
    prompt = random_prompt(200, seed=901)
    complete(client, "alpha", prompt, max_tokens=2)
    again = complete(client, "alpha", prompt, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    other = complete(client, "beta", prompt, max_tokens=2)
    assert (other.usage.prompt_tokens_details.cached_tokens or 0) == 0


def test_an_unknown_model_is_a_404_naming_the_served_ones(cluster):
    response = httpx.post(
        f"{cluster.url}/v1/completions", json={"model": "gamma", "prompt": "hi", "max_tokens": 2}
    )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["message"] == "model 'gamma' does not exist; this server serves 'alpha', 'beta'"
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_status_names_each_actors_model(cluster):
    rows = cluster.status()
    assert {actor: row["model"] for actor, row in rows.items() if row["model"]} == {
        "decode-0": "alpha",
        "cache-0": "alpha",
        "prefill-0": "beta",
        "decode-1": "beta",
        "cache-1": "beta",
    }
    table = cluster.kvmesh("status")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:4] == ["actor", "role", "node", "model"]


def metric(cluster, name: str) -> float:
    for line in httpx.get(f"{cluster.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_one_models_full_queue_never_delays_the_others(cluster, client, engines):
    """alpha's one slot is held by a long stream and its queue of two is full: a third
    alpha request is refused at once (429, Retry-After) while beta's requests are served,
    equal to beta's Engine; the queued alpha requests then run once the slot frees."""
    import threading

    import openai

    holder = client.completions.create(
        model="alpha",
        prompt=random_prompt(20, seed=600),
        max_tokens=1500,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(holder)
    next(chunks)  # alpha's slot is held from here
    queued_prompts = [random_prompt(30, seed=601 + k) for k in range(2)]
    queued_answers: dict[int, str] = {}

    def queued(k: int) -> None:
        queued_answers[k] = complete(client, "alpha", queued_prompts[k]).choices[0].text

    waiters = [threading.Thread(target=queued, args=(k,)) for k in range(2)]
    try:
        for thread in waiters:
            thread.start()
        wait_until(
            lambda: metric(cluster, 'kvmesh_admission_queued{model="alpha"}') == 2,
            "two alpha requests queued",
        )
        with pytest.raises(openai.RateLimitError) as refused:
            complete(client, "alpha", "one too many")
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        assert "model 'alpha' is full" in refused.value.message
        assert (
            metric(cluster, 'kvmesh_admission_refused_total{code="queue_full",model="alpha"}') == 1
        )

        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        prompts = [random_prompt(50, seed=610 + k) for k in range(3)]
        expected = [o.text for o in engines["beta"].generate(prompts, greedy)]
        assert [complete(client, "beta", p).choices[0].text for p in prompts] == expected
        assert metric(cluster, 'kvmesh_admission_queued{model="alpha"}') == 2  # still held
    finally:
        holder.close()  # the client goes away: the slot passes to the queue
        for thread in waiters:
            thread.join(timeout=120)
    alpha = engines["alpha"].generate(
        queued_prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )
    assert queued_answers == {k: alpha[k].text for k in range(2)}


def admin(cluster, method: str, path: str = "") -> httpx.Response:
    return httpx.request(method, f"{cluster.url}/v1/admin/models{path}", timeout=30)


def state_of(cluster, model: str) -> dict:
    return next(m for m in admin(cluster, "GET").json()["data"] if m["id"] == model)


def test_unload_drains_and_load_restores_while_the_other_model_serves(cluster, client, engines):
    """beta is unloaded with a stream in flight (it ends whole) while alpha takes
    requests throughout (none fails); beta then refuses with 503 until it is loaded
    again (by the CLI), and serves as before."""
    import threading

    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alpha_prompts = [random_prompt(30 + 7 * k, seed=700 + k) for k in range(6)]
    alpha_expected = [o.text for o in engines["alpha"].generate(alpha_prompts, greedy)]
    long_prompt = random_prompt(60, seed=801)
    long_params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    long_expected = engines["beta"].generate([long_prompt], long_params)[0].text

    alpha_answers: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def alpha_traffic():
        k = 0
        try:
            while not stop.is_set():
                alpha_answers.append(
                    complete(client, "alpha", alpha_prompts[k % 6], 10).choices[0].text
                )
                k += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    traffic = threading.Thread(target=alpha_traffic)
    traffic.start()
    try:
        stream = client.completions.create(
            model="beta",
            prompt=long_prompt,
            max_tokens=150,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        unloaded = admin(cluster, "POST", "/beta/unload")
        assert unloaded.status_code == 200, unloaded.text
        assert state_of(cluster, "beta")["state"] in ("unloading", "unloaded")
        text += "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == long_expected  # drained, not cut

        wait = [state_of(cluster, "beta")]
        while wait[-1]["state"] != "unloaded" and len(wait) < 120:
            time.sleep(0.5)
            wait.append(state_of(cluster, "beta"))
        assert wait[-1] == {
            "id": "beta",
            "object": "model",
            "state": "unloaded",
            "workers": [],
            "unloaded_workers": ["decode-1", "prefill-0"],
        }
        refused = httpx.post(
            f"{cluster.url}/v1/completions",
            json={"model": "beta", "prompt": "hi", "max_tokens": 2},
            timeout=30,
        )
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "2"
        assert "model 'beta' is unloaded" in refused.json()["error"]["message"]
        assert httpx.get(f"{cluster.url}/health").status_code == 200  # alpha serves

        listed = cluster.kvmesh("models", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [(m["id"], m["state"]) for m in json.loads(listed.stdout)] == [
            ("alpha", "loaded"),
            ("beta", "unloaded"),
        ]
        loaded = cluster.kvmesh("models", "load", "beta")
        assert loaded.returncode == 0, loaded.stderr
        both = ["decode-1", "prefill-0"]  # "loaded" comes with the decode worker, maybe first
        wait = [state_of(cluster, "beta")]
        while wait[-1]["workers"] != both and len(wait) < 240:
            time.sleep(0.5)
            wait.append(state_of(cluster, "beta"))
        assert (wait[-1]["state"], wait[-1]["workers"]) == ("loaded", both), wait[-1]
        prompt = random_prompt(80, seed=802)
        assert complete(client, "beta", prompt).choices[0].text == (
            engines["beta"]
            .generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
            .text
        )
    finally:
        stop.set()
        traffic.join(timeout=120)
    assert errors == []
    assert len(alpha_answers) >= 6
    assert alpha_answers == [alpha_expected[k % 6] for k in range(len(alpha_answers))]


def test_admin_names_an_unknown_model(cluster):
    response = admin(cluster, "POST", "/gamma/unload")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == (
        "model 'gamma' does not exist; this server serves 'alpha', 'beta'"
    )
