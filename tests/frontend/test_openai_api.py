"""The OpenAI-compatible server on a real uvicorn, over the real LocalBackend (tiny model),
checked against Engine.generate; plus a stub Backend for the overload/outage paths."""

import json
import time

import httpx
import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.frontend.app import create_app
from kvmesh.frontend.backend import BackendUnavailable, LocalBackend, OverloadedError
from kvmesh.protocol import Delta
from kvmesh.tokenizer import Tokenizer
from tests.frontend import StubBackend, running_server
from tests.prompts import random_prompt

MODEL = "tiny"
TEXTS = ["Once upon a time", "The capital of France is"]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me a story"},
]


def completion(prompt, **params) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, **params}


def chat(messages=MESSAGES, **params) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0, **params}


def greedy(max_tokens: int = 24, **params) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)


def sse_events(response: httpx.Response) -> list:
    """The JSON of every `data:` event, and "[DONE]" as itself."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_choices(events: list, text_key) -> dict[int, tuple[str, str]]:
    """index -> (joined text, finish_reason) of a stream's chunks."""
    texts, reasons = {}, {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (text_key(choice) or "")
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    return {i: (texts[i], reasons[i]) for i in texts}


def num_in_engine(backend: LocalBackend) -> int:
    return sum(w.load.num_running + w.load.num_waiting for w in backend.metrics().workers)


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir, num_blocks=512)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return LocalBackend.from_pretrained(tiny_model_dir, num_blocks=512, model_name=MODEL)


@pytest.fixture(scope="module")
def url(backend):
    with running_server(create_app(backend)) as base_url:
        yield base_url


@pytest.fixture
def http(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


# --- outputs equal the engine's ---


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["text", "token_ids"])
def test_greedy_completions_equal_engine(http, engine, kind, stream):
    prompts = TEXTS if kind == "text" else [random_prompt(40, 1), random_prompt(7, 2)]
    expected = engine.generate(prompts, greedy())
    body = completion(prompts, stream=stream, stream_options={"include_usage": True})
    if stream:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        got = streamed_choices(events, lambda c: c["text"])
        usage = events[-2]["usage"]
    else:
        response = http.post("/v1/completions", json=body).json()
        got = {c["index"]: (c["text"], c["finish_reason"]) for c in response["choices"]}
        usage = response["usage"]
    assert got == {i: (out.text, out.finish_reason) for i, out in enumerate(expected)}
    assert usage["completion_tokens"] == sum(len(out.token_ids) for out in expected)
    assert usage["prompt_tokens"] == sum(len(out.prompt_token_ids) for out in expected)


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_chat_equals_engine_through_template(http, engine, stream):
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    [expected] = engine.generate([ids], greedy())
    if stream:
        with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response:
            events = sse_events(response)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        got = streamed_choices(events, lambda c: c["delta"].get("content"))[0]
    else:
        response = http.post("/v1/chat/completions", json=chat()).json()
        assert response["object"] == "chat.completion"
        assert response["usage"]["prompt_tokens"] == len(ids)
        choice = response["choices"][0]
        assert choice["message"]["role"] == "assistant"
        got = (choice["message"]["content"], choice["finish_reason"])
    assert got == (expected.text, expected.finish_reason)


def test_official_openai_client(url, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    [chat_expected, text_expected] = engine.generate([ids, TEXTS[0]], greedy(16))

    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=16, temperature=0
    )
    assert reply.choices[0].message.content == chat_expected.text
    assert reply.usage.completion_tokens == len(chat_expected.token_ids)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_expected.text
    assert chunks[-1].usage.completion_tokens == len(chat_expected.token_ids)

    done = client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=16, temperature=0)
    assert done.choices[0].text == text_expected.text
    stream = client.completions.create(
        model=MODEL, prompt=TEXTS[0], max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == text_expected.text

    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x")
    assert missing.value.param == "model"


def test_repeated_long_prompt_is_served_from_prefix_cache(http):
    body = completion(random_prompt(300, seed=3), max_tokens=2)
    first = http.post("/v1/completions", json=body).json()["usage"]
    second = http.post("/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == 288  # 18 full blocks of 16


def test_n_with_seed_gives_one_seeded_choice_each(http, engine):
    body = completion(TEXTS[0], n=2, seed=7, temperature=1.0, max_tokens=12)
    response = http.post("/v1/completions", json=body).json()
    expected = engine.generate(
        [TEXTS[0]] * 2,
        [SamplingParams(max_tokens=12, temperature=1.0, seed=seed) for seed in (7, 8)],
    )
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert [c["text"] for c in response["choices"]] == [out.text for out in expected]
    assert response["usage"]["prompt_tokens"] == len(expected[0].prompt_token_ids)


def test_logprobs_shapes(http):
    done = http.post("/v1/completions", json=completion(TEXTS[1], logprobs=3, max_tokens=6)).json()
    logprobs = done["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 6
    assert [len(top) for top in logprobs["top_logprobs"]] == [3] * 6
    # Greedy: each sampled token is its step's most likely one.
    pairs = zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)
    assert all(lp == pytest.approx(max(top.values())) for lp, top in pairs)
    assert "".join(logprobs["tokens"]) == done["choices"][0]["text"]

    reply = http.post(
        "/v1/chat/completions", json=chat(logprobs=True, top_logprobs=2, max_tokens=5)
    ).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] == 5
    assert all(len(entry["top_logprobs"]) == 2 and entry["logprob"] <= 0 for entry in content)
    assert all(entry["top_logprobs"][0]["token"] == entry["token"] for entry in content)

    plain = http.post("/v1/chat/completions", json=chat(max_tokens=3)).json()
    assert plain["choices"][0]["logprobs"] is None


# --- bad requests: exact status and param, and the server keeps serving ---


BAD_REQUESTS = [
    ("max_tokens as string", "completions", completion("x", max_tokens="5"), 400, "max_tokens"),
    ("max_tokens as bool", "completions", completion("x", max_tokens=True), 400, "max_tokens"),
    ("temperature as string", "chat", chat(temperature="hot"), 400, "temperature"),
    ("prompt as number", "completions", completion(5), 400, "prompt"),
    ("messages as string", "chat", chat(messages="hi"), 400, "messages"),
    ("message without role", "chat", chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    ("unknown role", "chat", chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages"),
    ("max_tokens 0", "completions", completion("x", max_tokens=0), 400, "max_tokens"),
    ("max_tokens huge", "completions", completion("x", max_tokens=10**9), 400, "max_tokens"),
    (
        "max_completion_tokens huge",
        "chat",
        chat(max_completion_tokens=4096),
        400,
        "max_completion_tokens",
    ),
    ("temperature -1", "completions", completion("x", temperature=-1), 400, "temperature"),
    ("top_p 2", "chat", chat(top_p=2), 400, "top_p"),
    ("top_p 0", "chat", chat(top_p=0), 400, "top_p"),
    ("top_k -2", "completions", completion("x", top_k=-2), 400, "top_k"),
    ("n 0", "completions", completion("x", n=0), 400, "n"),
    ("seed -1", "completions", completion("x", seed=-1), 400, "seed"),
    ("stop empty", "completions", completion("x", stop=[""]), 400, "stop"),
    ("logprobs 21", "completions", completion("x", logprobs=21), 400, "logprobs"),
    ("top_logprobs 21", "chat", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs alone", "chat", chat(top_logprobs=2), 400, "top_logprobs"),
    ("penalty unsupported", "chat", chat(presence_penalty=0.5), 400, "presence_penalty"),
    ("prompt over context", "completions", completion([7] * 4096), 400, "prompt"),
    (
        "chat over context",
        "chat",
        chat(messages=[{"role": "user", "content": "hi " * 5000}]),
        400,
        "messages",
    ),
    ("token id 999999", "completions", completion([5, 999999]), 400, "prompt"),
    ("token id -1", "completions", completion([5, -1]), 400, "prompt"),
    ("empty prompt", "completions", completion(""), 400, "prompt"),
    ("missing messages", "chat", {"model": MODEL}, 400, "messages"),
    ("missing model", "completions", {"prompt": "x"}, 400, "model"),
    ("unknown model", "chat", chat() | {"model": "gpt-4"}, 404, "model"),
    ("malformed JSON", "completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("JSON array", "completions", b"[1, 2]", 400, None),
]
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@pytest.mark.parametrize(
    ("case", "endpoint", "body", "status", "param"),
    BAD_REQUESTS,
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_names_param_and_server_keeps_serving(
    http, case, endpoint, body, status, param
):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(
        PATHS[endpoint], content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert error["message"]
    good = http.post("/v1/completions", json=completion(TEXTS[0], max_tokens=2))
    assert good.status_code == 200
    assert good.json()["usage"]["completion_tokens"] == 2


def test_unknown_route_and_method_are_openai_errors(http):
    missing = http.get("/v1/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    wrong_method = http.get("/v1/completions")
    assert wrong_method.status_code == 405
    assert "Method Not Allowed" in wrong_method.json()["error"]["message"]


# --- cancellation ---


def test_client_disconnect_mid_stream_aborts_the_request(http, backend):
    body = completion(TEXTS[0], max_tokens=4000, ignore_eos=True, stream=True)
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(lines)
        assert num_in_engine(backend) == 1  # 4000 tokens take ~10 s: still running
    assert wait_until(lambda: num_in_engine(backend) == 0, timeout=5)
    assert "kvmesh_requests_running 0.0" in http.get("/metrics").text


def test_client_disconnect_before_a_plain_response_aborts(http, backend):
    def count_499() -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith('kvmesh_requests_total{endpoint="/v1/completions",status="499"}'):
                return float(line.split()[-1])
        return 0.0

    before = count_499()
    with pytest.raises(httpx.ReadTimeout):
        http.post(
            "/v1/completions",
            json=completion(TEXTS[0], max_tokens=4000, ignore_eos=True),
            timeout=0.5,
        )
    assert wait_until(lambda: num_in_engine(backend) == 0, timeout=5)
    assert wait_until(lambda: count_499() == before + 1, timeout=5)


# --- health, models, metrics ---


def test_health_models_and_metrics(http):
    assert http.get("/health").json() == {"status": "ok"}
    models = http.get("/v1/models").json()
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [
        (MODEL, "model", 4096)
    ]
    http.post("/v1/completions", json=completion(TEXTS[0], max_tokens=3))
    text = http.get("/metrics").text
    for line in (
        'kvmesh_requests_total{endpoint="/v1/completions",status="200"}',
        "kvmesh_time_to_first_token_seconds_bucket",
        "kvmesh_inter_token_latency_seconds_bucket",
        "kvmesh_cached_tokens_total",
        "kvmesh_remote_prefill_total 0.0",
        "kvmesh_kv_transfer_bytes_total 0.0",
        'kvmesh_worker_num_running{role="local",worker="local"} 0.0',
        'kvmesh_worker_kv_usage{role="local",worker="local"}',
        "# TYPE kvmesh_worker_preemptions_total counter",
        'kvmesh_worker_preemptions_total{role="local",worker="local"} 0.0',
    ):
        assert line in text, line
    assert "untyped" not in text  # every field of the engine's stats is described


# --- a stub Backend: overload, outage, errors mid-stream ---


@pytest.fixture(scope="module")
def stub(tiny_model_dir):
    return StubBackend(Tokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def stub_http(stub):
    with running_server(create_app(stub)) as base_url, httpx.Client(base_url=base_url) as client:
        yield client


def stub_request(**params) -> dict:
    return {"model": "stub", "prompt": [5, 6], "max_tokens": 4, **params}


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (OverloadedError("42 requests queued", retry_after=1.5), 429, "2"),
        (BackendUnavailable("no decode workers", retry_after=5), 503, "5"),
        (BackendUnavailable("engine stopped"), 503, None),
        (ValueError("prompt is longer than the KV pool"), 400, None),
    ],
)
def test_backend_errors_map_to_status_and_retry_after(stub, stub_http, error, status, retry_after):
    stub.script = [error]
    response = stub_http.post("/v1/completions", json=stub_request())
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert response.json()["error"]["message"] == str(error)
    stub.script = ["fine"]
    after = stub_http.post("/v1/completions", json=stub_request())
    assert after.json()["choices"][0]["text"] == "fine"


def test_error_after_the_stream_began_is_sent_in_band(stub, stub_http):
    stub.script = ["a", "b", BackendUnavailable("decode worker d0 died")]
    with stub_http.stream("POST", "/v1/completions", json=stub_request(stream=True)) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["a", "b"]
    assert events[2]["error"]["message"] == "decode worker d0 died"
    assert events[3] == "[DONE]"
    assert stub.aborted[-1].endswith("-0")


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"logprobs": 1}),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 1}),
    ],
)
@pytest.mark.parametrize("stream", [True, False])
def test_a_finish_without_a_new_token_has_no_logprobs_to_show(stub, stub_http, path, body, stream):
    """A worker may end a request without sampling (a sequence that outgrew the pool):
    that delta has no tokens and no logprobs; it was a 500 when logprobs were asked for."""

    def delta(ids, logprobs, finish):
        return Delta(
            request_id="",
            new_token_ids=ids,
            new_text="x" * len(ids),
            new_logprobs=logprobs,
            finish_reason=finish,
            num_prompt_tokens=3,
            num_cached_tokens=0,
        )

    stub.script = [delta([7], [{7: -0.5, 9: -1.5}], None), delta([], None, "length")]
    request = {"model": "stub", "max_tokens": 4, "stream": stream, **body} | (
        {"prompt": "hi"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    response = stub_http.post(path, json=request)
    assert response.status_code == 200, response.text
    if stream:
        events = sse_events(response)
        assert not [e for e in events if "error" in e]
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    else:
        assert response.json()["choices"][0]["finish_reason"] == "length"
        assert response.json()["usage"]["completion_tokens"] == 1


def test_health_follows_ready_and_metrics_come_from_the_backend(stub, stub_http):
    stub.is_ready = False
    assert stub_http.get("/health").status_code == 503
    stub.is_ready = True
    assert stub_http.get("/health").status_code == 200
    text = stub_http.get("/metrics").text
    assert "kvmesh_remote_prefill_total 3.0" in text
    assert "kvmesh_kv_transfer_bytes_total 4096.0" in text
    assert 'kvmesh_worker_num_running{role="decode",worker="d0"} 2.0' in text
