"""The `priority` extension field over HTTP: reaches SamplingParams on both endpoints,
bad values are a 400 naming it; the official openai client sends it in extra_body."""

import httpx
import pytest

from kvmesh.frontend.app import create_app
from kvmesh.params import MAX_PRIORITY
from kvmesh.tokenizer import Tokenizer
from tests.frontend import running_server
from tests.frontend.test_openai_api import StubBackend

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class RecordingBackend(StubBackend):
    """The stub backend, keeping the SamplingParams of every choice it was given."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.params = []

    def generate(self, request_id, prompt_token_ids, params):
        self.params.append(params)
        return super().generate(request_id, prompt_token_ids, params)


def make_body(endpoint: str, **fields) -> dict:
    if endpoint == "chat":
        return {"model": "stub", "messages": [{"role": "user", "content": "hi"}], **fields}
    return {"model": "stub", "prompt": [5, 6], **fields}


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return RecordingBackend(Tokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def url(backend):
    with running_server(create_app(backend)) as base_url:
        yield base_url


@pytest.fixture
def http(url, backend):
    backend.params.clear()
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize(
    ("fields", "priority"),
    [
        ({"priority": 1}, 1),
        ({"priority": -MAX_PRIORITY}, -MAX_PRIORITY),
        ({"priority": None}, 0),
        ({}, 0),
    ],
)
def test_priority_reaches_every_choice(http, backend, endpoint, fields, priority):
    response = http.post(PATHS[endpoint], json=make_body(endpoint, n=2, **fields))
    assert response.status_code == 200, response.text
    assert [p.priority for p in backend.params] == [priority, priority]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("value", ["1", 1.5, True, MAX_PRIORITY + 1, -MAX_PRIORITY - 1])
def test_bad_priority_is_a_400_naming_it(http, backend, endpoint, value):
    response = http.post(PATHS[endpoint], json=make_body(endpoint, priority=value))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == ("priority", "invalid_request_error")
    assert backend.params == []


def test_official_openai_client_sends_priority_in_extra_body(url, backend):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    backend.params.clear()
    client.completions.create(model="stub", prompt=[5, 6], extra_body={"priority": 1})
    client.chat.completions.create(
        model="stub", messages=[{"role": "user", "content": "hi"}], extra_body={"priority": -2}
    )
    assert [p.priority for p in backend.params] == [1, -2]
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="stub", prompt=[5, 6], extra_body={"priority": "high"})
    assert bad.value.param == "priority"
