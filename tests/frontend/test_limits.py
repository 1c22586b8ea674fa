"""What the HTTP server refuses before it parses a request (kvmesh.frontend.limits): body
size and time, Content-Type, API keys, Host; and what it bounds once parsed: stop
strings, choices, chat's default max_tokens, tokenizing off the event loop. A real
uvicorn over the stub Backend; every refusal is OpenAI-shaped and the server serves on."""

import json
import socket
import threading

import httpx
import pytest

from kvmesh.frontend.app import create_app
from kvmesh.frontend.limits import HTTPLimits, parse_hosts, read_api_keys
from kvmesh.tokenizer import Tokenizer
from tests.frontend import StubBackend, running_server

KEY = "sk-kvmesh-test"
LIMITS = HTTPLimits(
    max_body_bytes=64 * 1024,
    body_timeout=1.0,
    max_choices=8,
    default_max_tokens=5,
    api_keys=frozenset({KEY, "sk-other"}),
    allowed_hosts=frozenset({"127.0.0.1", "localhost"}),
)
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def stub(tiny_model_dir):
    return StubBackend(Tokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def url(stub):
    with running_server(create_app(stub, LIMITS)) as url:
        yield url


@pytest.fixture
def http(url, stub):
    stub.script = ["done"]
    with httpx.Client(base_url=url, timeout=30, headers=AUTH) as client:
        yield client


def completion(**fields) -> dict:
    return {"model": "stub", "prompt": [5, 6], "max_tokens": 4, **fields}


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_a_body_over_the_cap_is_refused_by_its_length_before_it_is_read(http):
    response = http.post(
        "/v1/completions",
        content=b"x" * (LIMITS.max_body_bytes + 1),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"
    assert "frontend.max_body_bytes" in error_of(response)["message"]
    assert http.post("/v1/completions", json=completion()).status_code == 200


def test_a_chunked_body_is_counted_as_it_arrives(http):
    def chunks():
        for _ in range(100):
            yield b" " * 4096  # no Content-Length: 400 KiB in pieces

    response = http.post(
        "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"


def read_response(conn: socket.socket) -> str:
    """Headers and the whole body of one HTTP/1.1 response (they may come apart)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536) or b"\0"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_body_that_does_not_arrive_in_time_is_408(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
            f"Bearer {KEY}\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"model"'.encode()
        )
        reply = read_response(conn)  # the server answers once body_timeout passes
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "frontend.body_timeout" in reply


def test_a_stream_may_outlast_the_body_timeout(http, stub):
    stub.script = ["a", 1.5, "b"]  # longer than body_timeout between two tokens
    with http.stream("POST", "/v1/completions", json=completion(stream=True)) as response:
        assert response.status_code == 200
        body = response.read().decode()
    texts = [
        json.loads(line[6:])["choices"][0]["text"]
        for line in body.splitlines()
        if line.startswith("data: {")
    ]
    assert texts == ["a", "b"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_post_that_is_not_json_is_415(http, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = http.post(
        "/v1/completions", content=json.dumps(completion()).encode(), headers=headers
    )
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


def test_a_bodiless_post_needs_no_content_type_and_is_named_missing(http):
    response = http.post("/v1/completions")
    assert response.status_code == 400
    assert error_of(response)["message"] == "the request body is missing: send a JSON object"


def test_json_with_a_charset_is_json(http):
    response = http.post(
        "/v1/completions",
        content=json.dumps(completion()).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", "Bearer"])
def test_without_a_valid_key_every_api_path_is_401(url, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in (
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ):
        response = httpx.request(
            method, f"{url}{path}", headers=headers, json=completion() if method == "POST" else None
        )
        assert response.status_code == 401, path
        assert error_of(response)["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_health_and_metrics_stay_open_and_every_key_works(url):
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    for key in LIMITS.api_keys:
        response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200


def test_metrics_need_a_key_when_asked(stub):
    limits = HTTPLimits(api_keys=frozenset({KEY}), metrics_auth=True)
    with running_server(create_app(stub, limits)) as url:
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers=AUTH).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_host_not_allowed_is_refused(url):
    response = httpx.get(f"{url}/v1/models", headers={**AUTH, "Host": "attacker.example"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "host_not_allowed"
    port = url.rsplit(":", 1)[1]
    assert (
        httpx.get(f"{url}/v1/models", headers={**AUTH, "Host": f"localhost:{port}"}).status_code
        == 200
    )


def test_the_sdk_and_the_openai_client_pass_the_key(url, stub, monkeypatch):
    import openai

    from kvmesh.client import APIError, Client

    stub.script = ["fine"]
    assert Client(url, api_key=KEY).complete([5, 6], model="stub", max_tokens=4).text == "fine"
    monkeypatch.setenv("KVMESH_API_KEY", KEY)
    assert Client(url).complete([5, 6], model="stub", max_tokens=4).text == "fine"
    monkeypatch.delenv("KVMESH_API_KEY")
    with pytest.raises(APIError) as refused:
        Client(url).complete([5, 6], model="stub", max_tokens=4)
    assert refused.value.status == 401
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert (
        client.completions.create(model="stub", prompt=[5, 6], max_tokens=4).choices[0].text
        == "fine"
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope").models.list()


# --- bounds on a parsed request ---


@pytest.mark.parametrize(
    "stop, message",
    [
        (["a", "b", "c", "d", "e"], "stop has 5 strings; at most 4"),
        (["x" * 257], "stop has a string of 257 characters; at most 256"),
    ],
)
def test_stop_strings_are_bounded(http, stop, message):
    response = http.post("/v1/completions", json=completion(stop=stop))
    assert response.status_code == 400
    assert message in error_of(response)["message"]
    assert error_of(response)["param"] == "stop"


def test_prompts_times_n_is_bounded(http):
    response = http.post("/v1/completions", json=completion(prompt=[[5]] * 3, n=3))
    assert response.status_code == 400
    assert "3 prompts x n=3 ask for 9 choices; at most 8" in error_of(response)["message"]
    assert http.post("/v1/completions", json=completion(prompt=[[5]] * 4, n=2)).status_code == 200


def test_chat_without_max_tokens_is_bounded_by_default_max_tokens(http, stub):
    seen = []
    generate = stub.generate

    def spy(request_id, prompt_token_ids, params):
        seen.append(params.max_tokens)
        return generate(request_id, prompt_token_ids, params)

    stub.generate = spy
    try:
        response = http.post(
            "/v1/chat/completions",
            json={"model": "stub", "messages": [{"role": "user", "content": "hi"}]},
        )
    finally:
        del stub.generate
    assert response.status_code == 200
    assert seen == [LIMITS.default_max_tokens]  # not the whole context left


def test_tokenizing_runs_off_the_event_loop(http, stub):
    threads = []
    encode = stub.tokenizer.encode

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    stub.tokenizer.encode = spy
    try:
        assert http.post("/v1/completions", json=completion(prompt="hello")).status_code == 200
    finally:
        del stub.tokenizer.encode
    assert threads and "uvicorn" not in threads  # the loop runs on the server's thread


def test_refusals_leave_the_server_serving(http):
    for _ in range(3):
        http.post(
            "/v1/completions", content=b"x" * 100_000, headers={"content-type": "application/json"}
        )
    assert http.post("/v1/completions", json=completion()).status_code == 200


# --- reading the settings ---


def test_the_key_file_is_read_and_an_empty_one_refused(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# operators\nsk-one\n\n  sk-two  # ci\n")
    assert read_api_keys(keys) == {"sk-one", "sk-two"}
    keys.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_api_keys(keys)
    with pytest.raises(ValueError, match="cannot be read"):
        read_api_keys(tmp_path / "missing")
    assert parse_hosts(" API.example.com, localhost,") == {"api.example.com", "localhost"}
