"""Fuzzing the OpenAI HTTP API: create_app(LocalBackend) on a real uvicorn (127.0.0.1),
the tiny model behind it with a 128-token context so that valid requests end quickly.

Hypothesis sends bodies built from the request schemas the app publishes at
/openapi.json (every field: fitting and boundary values, values of the wrong type,
missing, plus unknown fields), arbitrary JSON documents (NaN and Infinity included),
arbitrary and spliced bytes, deep nesting and huge numbers, under assorted Content-Types,
and junk methods and paths. Whatever arrives, the server answers below 500 — an
OpenAI-shaped error {"error": {"message", "type", "param", "code"}} for a 4xx, a whole
completion or an event stream ending in [DONE] for a 200 — and stays healthy; after the
run it serves a valid request.

The bugs it found have regression tests at the end (a top_k past int64 killed the
engine, a lone surrogate gave a 500, a subnormal temperature sampled NaNs); a new bug
found here gets a test like them.
"""

from __future__ import annotations

import contextlib
import json
import string

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmesh.frontend.app import create_app
from kvmesh.frontend.backend import LocalBackend
from kvmesh.gpu.tiny import VOCAB_SIZE
from tests.frontend import running_server

MODEL = "tiny"
CONTEXT = 128  # tokens, prompt and completion together
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}
QUICK = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
HEAVY = settings(
    max_examples=3000,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
PROFILES = [
    pytest.param(QUICK, id="quick"),
    pytest.param(HEAVY, id="heavy", marks=pytest.mark.slow),
]


# --- strategies ---

TRICKY = [
    "\ud800",
    "\udfff",
    "\x00",
    "\ufeff",
    "\u202e",
    "\U0001f600",
    "<s>",
    "</s>",
    "<|im_end|>",
    "{{",
    "{%",
    "\\",
    '"',
    "\r\n",
]
TEXT = st.lists(st.characters(exclude_categories=()) | st.sampled_from(TRICKY), max_size=20).map(
    "".join
)  # lone surrogates too
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT  # NaN, ±Infinity
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
TOKEN_ID = st.integers(0, VOCAB_SIZE - 1) | st.sampled_from(
    [-1, VOCAB_SIZE, 2**31, 2**63, 2**64, True, 1.0]
)
CONTENT_TYPES = (
    st.just("application/json")
    | st.just("application/json")
    | st.sampled_from(
        [
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "APPLICATION/JSON",
            "application/vnd.api+json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/xml",
            "",
            None,
        ]
    )
)
VALID = [  # what the splicer cuts into
    json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3}).encode(),
    json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
        }
    ).encode(),
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
PATHS = [
    COMPLETIONS,
    CHAT,
    "/v1/models",
    "/health",
    "/metrics",
    "/openapi.json",
    "/v1",
    "/v1/completions/",
    "/v1/models/tiny",
]


def resolve(schema: dict, spec: dict) -> dict:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def fitting(schema: dict, spec: dict) -> st.SearchStrategy:
    """Values of the schema's type, at and across its bounds."""
    schema = resolve(schema, spec)
    if "anyOf" in schema:
        return st.one_of([fitting(s, spec) for s in schema["anyOf"]])
    kind = schema.get("type")
    low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
    edges = [bound + delta for bound in (low, high) if bound is not None for delta in (-1, 0, 1)]
    if kind == "integer":
        edge = st.sampled_from(
            [int(e) for e in edges] + [0, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]
        )
        return edge | edge | st.integers(-2, 40) | st.integers()
    if kind == "number":
        edge = st.sampled_from(edges + [0, 5e-324, 1e-300, 1e-6, 1e308])
        return edge | edge | st.integers(-1, 3) | st.floats(-1, 3) | st.floats()
    if kind == "string":
        return TEXT
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(fitting(schema.get("items", {}), spec), max_size=4)
    if "properties" in schema:
        return objects(schema, spec)
    return JSON  # untyped: the extensions refused by name


def objects(schema: dict, spec: dict) -> st.SearchStrategy:
    """Objects of the schema (a nested one: stream_options, a message): every field fitting
    or junk, optional ones present or not."""
    required = set(schema.get("required", ()))
    values = {name: fitting(prop, spec) | JSON for name, prop in schema["properties"].items()}
    return st.fixed_dictionaries(
        {k: v for k, v in values.items() if k in required},
        optional={k: v for k, v in values.items() if k not in required},
    )


def valid_bodies(path: str) -> st.SearchStrategy:
    """Requests the server serves (unless a unicode prompt overflows the 128 tokens)."""
    words = st.text(string.ascii_letters + " ,.!?", min_size=1, max_size=60) | st.text(
        st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20
    )
    if path == COMPLETIONS:
        prompt = {
            "prompt": words
            | st.lists(words, min_size=1, max_size=2)
            | st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=40)
        }
        logprobs = st.integers(0, 5)
    else:
        message = st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": words}
        )
        prompt = {"messages": st.lists(message, min_size=1, max_size=3)}
        logprobs = st.booleans()
    return st.fixed_dictionaries(
        {"model": st.just(MODEL), "max_tokens": st.integers(1, 8)} | prompt,
        optional={
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.01, 1),
            "top_k": st.integers(-1, 50),
            "seed": st.integers(0, 2**63 - 1),
            "n": st.integers(1, 3),
            "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "stop": st.lists(words, max_size=2),
            "ignore_eos": st.booleans(),
            "logprobs": logprobs,
            "frequency_penalty": st.just(0),
            "user": words,
        },
    )


def request_bodies(spec: dict, path: str) -> st.SearchStrategy:
    """A valid request with a few of its fields (any the schema names, or unknown ones)
    set to fitting, boundary or junk values, and maybe one left out."""
    schema = resolve(
        spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"], spec
    )
    part = st.fixed_dictionaries({"type": st.just("text") | JSON, "text": TEXT | JSON})
    message = st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["system", "user", "assistant"]) | TEXT | JSON,
            "content": TEXT | st.lists(part, max_size=3) | JSON,
            "name": TEXT,
        },
    )
    special = {
        "model": TEXT | JSON,
        "prompt": (
            TEXT
            | st.lists(TEXT, max_size=3)
            | st.lists(TOKEN_ID, max_size=40)
            | st.lists(TOKEN_ID, min_size=CONTEXT - 8, max_size=CONTEXT + 8)
            | st.lists(st.lists(TOKEN_ID, max_size=12), max_size=3)
            | JSON
        ),
        "messages": st.lists(message, max_size=4) | JSON,
        "stop": TEXT | st.lists(TEXT, max_size=4) | JSON,
    }
    field = st.sampled_from(sorted(schema["properties"])).flatmap(
        lambda name: st.tuples(
            st.just(name), special.get(name, fitting(schema["properties"][name], spec) | JSON)
        )
    )
    changes = st.lists(field | st.tuples(TEXT, JSON), min_size=1, max_size=3)
    dropped = st.sampled_from([None] * 6 + sorted(schema["properties"]))
    return st.tuples(valid_bodies(path), changes, dropped).map(
        lambda p: {k: v for k, v in (p[0] | dict(p[1])).items() if k != p[2]}
    )


def encoded(body, utf8: bool) -> bytes:
    """JSON text of `body`: ASCII-escaped, or raw UTF-8 (lone surrogates left as bytes)."""
    return json.dumps(body, ensure_ascii=not utf8).encode("utf-8", "surrogatepass")


def raw_bodies() -> st.SearchStrategy:
    spliced = st.tuples(
        st.sampled_from(VALID), st.integers(0, 120), st.integers(0, 8), st.binary(max_size=6)
    ).map(lambda p: p[0][: p[1]] + p[3] + p[0][p[1] + p[2] :])
    deep = st.tuples(st.integers(1, 50_000), st.sampled_from([b"[", b'{"a":'])).map(
        lambda p: p[1] * p[0]
    )
    big_number = st.integers(4000, 20_000).map(
        lambda n: b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * n + b"}"
    )
    return st.binary(max_size=200) | spliced | deep | big_number


def cases(spec: dict) -> st.SearchStrategy:
    """(path, body as sent, body as Python or None, Content-Type)."""
    path = st.sampled_from([COMPLETIONS, CHAT])
    body = {
        p: valid_bodies(p) | request_bodies(spec, p) | request_bodies(spec, p) | JSON
        for p in (COMPLETIONS, CHAT)
    }
    structured = path.flatmap(
        lambda p: st.tuples(st.just(p), body[p], st.booleans(), CONTENT_TYPES)
    )
    raw = st.tuples(path, raw_bodies(), CONTENT_TYPES)
    return structured.map(lambda c: (c[0], encoded(c[1], c[2]), c[1], c[3])) | raw.map(
        lambda c: (c[0], c[1], None, c[2])
    )


# --- what every answer must be ---


def assert_openai_error(response: httpx.Response) -> None:
    assert response.headers.get("content-type", "").startswith("application/json")
    reply = response.json()
    assert set(reply) == {"error"}, reply
    error = reply["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error


def assert_completion(path: str, response: httpx.Response) -> None:
    """A whole completion, or an event stream of chunks that ends in [DONE]."""
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [
            line[len("data: ") :]
            for line in response.text.splitlines()
            if line.startswith("data: ")
        ]
        assert events and events[-1] == "[DONE]", response.text[-500:]
        chunks = [json.loads(event) for event in events[:-1]]
        kind = "chat.completion.chunk" if path == CHAT else "text_completion"
        assert all(chunk.get("object") == kind for chunk in chunks), chunks  # no error event
        reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"]]
        assert {r for r in reasons if r is not None} <= {"stop", "length"}, reasons
        return
    reply = response.json()
    assert reply["object"] == ("chat.completion" if path == CHAT else "text_completion"), reply
    assert reply["choices"] and reply["usage"]["completion_tokens"] >= 0, reply
    assert {c["finish_reason"] for c in reply["choices"]} <= {"stop", "length"}, reply


def assert_answered(http: httpx.Client, method: str, path: str, **request) -> httpx.Response:
    """Send; the answer is below 500 and, for a 4xx, an OpenAI error; the server is still
    healthy afterwards (else the test stops at once: a dead engine fails every later case)."""
    with http.stream(method, path, **request) as response:
        response.read()
    assert response.status_code < 500, (response.status_code, response.text[:2000])
    if response.status_code >= 400:
        assert_openai_error(response)
    health = http.get("/health")
    if health.status_code != 200:
        pytest.fail(
            f"the server is unhealthy ({health.text}) after {method} {path} {request!r:.3000}"
        )
    return response


def assert_serves_a_valid_request(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}
    reply = http.post(COMPLETIONS, json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4


# --- fixtures ---


@pytest.fixture(scope="module")
def short_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 128-token context (the weights are links to the session's)."""
    path = tmp_path_factory.mktemp("tiny-short")
    for item in tiny_model_dir.iterdir():
        if item.name != "config.json":
            (path / item.name).symlink_to(item)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": CONTEXT}))
    return path


@contextlib.contextmanager
def serving(model_dir):
    backend = LocalBackend.from_pretrained(model_dir, num_blocks=256, model_name=MODEL)
    with (
        running_server(create_app(backend)) as url,
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        yield http


@pytest.fixture(scope="module")
def http(short_model_dir):
    with serving(short_model_dir) as client:
        yield client


@pytest.fixture(scope="module")
def spec(http):
    return http.get("/openapi.json").json()


# --- fuzzing ---


@pytest.mark.parametrize("profile", PROFILES)
def test_any_body_gets_a_completion_or_an_openai_error(http, spec, profile):
    @profile
    @given(cases(spec))
    def fuzz(case):
        path, content, body, content_type = case
        headers = {} if content_type is None else {"content-type": content_type}
        response = assert_answered(http, "POST", path, content=content, headers=headers)
        event(f"{response.status_code} {response.headers['content-type'].split(';')[0]}")
        if response.status_code == 200:
            assert_completion(path, response)
        else:
            assert 400 <= response.status_code < 500, response.status_code

    fuzz()
    assert_serves_a_valid_request(http)


@pytest.mark.parametrize("profile", PROFILES)
def test_any_method_and_path_gets_an_answer_or_an_openai_error(http, profile):
    segment = st.text(string.ascii_letters + string.digits + "-_.~%", max_size=12)

    @profile
    @given(st.sampled_from(METHODS), st.sampled_from(PATHS) | segment.map("/v1/".__add__), JSON)
    def fuzz(method, path, query):
        response = assert_answered(http, method, path, params={"q": json.dumps(query)})
        event(str(response.status_code))

    fuzz()
    assert_serves_a_valid_request(http)


# --- bugs the fuzzer found, fixed: regressions ---


def test_top_k_beyond_int64_is_refused(short_model_dir):
    with serving(short_model_dir) as client:  # its own engine: this one dies
        reply = client.post(
            COMPLETIONS, json={"model": MODEL, "prompt": "x", "max_tokens": 2, "top_k": 2**63}
        )
        assert client.get("/health").status_code == 200
        assert (reply.status_code, reply.json()["error"]["param"]) == (400, "top_k")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, {"prompt": "x\ud800"}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "x\ud800"}]}, "messages"),
    ],
    ids=["prompt", "chat-content"],
)
def test_lone_surrogate_in_text_is_refused(http, path, body, param):
    reply = http.post(
        path,
        content=json.dumps({"model": MODEL, "max_tokens": 2, **body}),
        headers={"content-type": "application/json"},
    )
    assert (reply.status_code, reply.json()["error"]["param"]) == (400, param)


@pytest.mark.parametrize(
    "params", [{"temperature": 1e-300}, {"top_p": 5e-324}], ids=["temperature", "top_p"]
)
def test_subnormal_temperature_or_top_p_decodes_greedily(http, params):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}
    greedy = http.post(COMPLETIONS, json=body | {"temperature": 0}).json()["choices"][0]
    reply = http.post(COMPLETIONS, json=body | params)
    if reply.status_code != 400:  # refusing is fine too
        assert reply.json()["choices"][0]["text"] == greedy["text"]
