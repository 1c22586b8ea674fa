"""The SDK (Client, AsyncClient) against `kvmesh serve` running in its own process."""

import asyncio
import re
import subprocess
import sys
import time

import pytest

import kvmesh
from kvmesh import Engine, SamplingParams
from kvmesh.client import APIError, AsyncClient, ChoiceDelta, Client

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


def greedy(max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


@pytest.fixture(scope="module")
def url(tiny_model_dir, tmp_path_factory):
    """`kvmesh serve` on an ephemeral port; the port is read from uvicorn's log line."""
    log_file = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_file, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvmesh",
                "serve",
                "--model",
                str(tiny_model_dir),
                "--port",
                "0",
                "--num-blocks",
                "256",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        address = re.compile(r"running on (http://127\.0\.0\.1:\d+)")
        while not (found := address.search(log_file.read_text())):
            assert server.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, "kvmesh serve did not start"
            time.sleep(0.05)
        yield found.group(1)
    finally:
        server.terminate()
        assert server.wait(timeout=30) in (0, -15), log_file.read_text()


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    """Greedy outputs of the engine in this process: the completion, then the chat."""
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    tokenizer = engine.tokenizer
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    return engine.generate([PROMPT, chat_ids], greedy())


def test_client_complete_chat_and_stream(url, expected, tiny_model_dir):
    completion, chat = expected
    with Client(url) as client:  # model: the server's first, asked on first use
        assert client.health()
        assert client.models() == [tiny_model_dir.name]
        result = client.complete(PROMPT, max_tokens=16, temperature=0)
        assert (result.text, result.choices[0].finish_reason) == (
            completion.text,
            completion.finish_reason,
        )
        assert result.usage["completion_tokens"] == len(completion.token_ids)
        deltas = list(client.complete(PROMPT, max_tokens=16, temperature=0, stream=True))
        assert all(isinstance(d, ChoiceDelta) and d.index == 0 for d in deltas)
        assert "".join(d.text for d in deltas) == completion.text
        assert deltas[-1].finish_reason == completion.finish_reason

        assert client.chat(MESSAGES, max_tokens=16, temperature=0).text == chat.text
        streamed = client.chat(MESSAGES, max_tokens=16, temperature=0, stream=True)
        assert "".join(d.text for d in streamed) == chat.text

        two = client.complete(PROMPT, max_tokens=4, n=2, seed=1)
        assert [c.index for c in two.choices] == [0, 1]


def test_async_client_complete_chat_and_stream(url, expected, tiny_model_dir):
    completion, chat = expected

    async def main():
        async with AsyncClient(f"{url}/v1/", model=tiny_model_dir.name) as client:
            assert await client.health()
            done = await client.complete(PROMPT, max_tokens=16, temperature=0)
            stream = await client.complete(PROMPT, max_tokens=16, temperature=0, stream=True)
            streamed = "".join([d.text async for d in stream])
            chat = await client.chat(MESSAGES, max_tokens=16, temperature=0)
            chat_stream = await client.chat(MESSAGES, max_tokens=16, temperature=0, stream=True)
            chat_streamed = "".join([d.text async for d in chat_stream])
            with pytest.raises(APIError) as bad:
                await client.chat(MESSAGES, top_p=2, stream=True)
            return done.text, streamed, chat.text, chat_streamed, bad.value

    done, streamed, chat_done, chat_streamed, error = asyncio.run(main())
    assert (done, streamed) == (completion.text, completion.text)
    assert (chat_done, chat_streamed) == (chat.text, chat.text)
    assert (error.status, error.param) == (400, "top_p")


@pytest.mark.parametrize(
    ("call", "status", "param", "words"),
    [
        (
            lambda c: c.complete(PROMPT, temperature=-1),
            400,
            "temperature",
            "greater than or equal to 0",
        ),
        (lambda c: c.complete([5, 999999]), 400, "prompt", "outside the vocabulary"),
        (lambda c: c.chat(MESSAGES, max_tokens=10**6), 400, "max_tokens", "at most"),
        (lambda c: c.complete(PROMPT, model="gpt-4"), 404, "model", "does not exist"),
        (
            lambda c: c.complete(PROMPT, max_tokens=0, stream=True),
            400,
            "max_tokens",
            "greater than or equal to 1",
        ),
    ],
)
def test_api_error_carries_the_server_message_and_param(url, call, status, param, words):
    with Client(url, api_key="secret") as client:
        with pytest.raises(APIError) as error:
            call(client)
        assert (error.value.status, error.value.param) == (status, param)
        assert words in error.value.message
        assert str(error.value).startswith(f"{status}: ")
        assert client.complete(PROMPT, max_tokens=1).usage["completion_tokens"] == 1


def test_unreachable_server_is_an_api_error_without_status():
    with Client("http://127.0.0.1:9", timeout=2, model="m") as client:
        assert client.health() is False
        with pytest.raises(APIError) as error:
            client.complete("x")
    assert error.value.status is None
    assert "cannot reach http://127.0.0.1:9" in error.value.message


def test_sdk_is_exported_lazily_and_imports_no_torch():
    assert kvmesh.Client is Client and kvmesh.AsyncClient is AsyncClient
    code = (
        "import sys, kvmesh.client, kvmesh.frontend.app, kvmesh.frontend.backend; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
