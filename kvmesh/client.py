"""Python SDK for a kvmesh server (or any OpenAI-compatible one): Client and AsyncClient.

    client = Client("http://127.0.0.1:8000")
    client.complete("Once upon a time", max_tokens=32, temperature=0).text
    for delta in client.chat([{"role": "user", "content": "Hi"}], stream=True):
        print(delta.text, end="")

Keyword parameters go into the request body as they are (max_tokens, temperature,
top_p, top_k, seed, stop, n, logprobs, ignore_eos, ...). `model` defaults to the first
model the server lists. Every failure raises APIError(status, message, param) with the
server's own message; status is None when the server could not be reached.
Torch-free: httpx only.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


class APIError(Exception):
    """The server refused or failed a request (or could not be reached: status None)."""

    def __init__(
        self,
        status: int | None,
        message: str,
        param: str | None = None,
        type: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status,
            message,
            param,
            type,
            code,
        )

    def __str__(self) -> str:
        param = f" (param: {self.param})" if self.param else ""
        return f"{self.status or 'no response'}: {self.message}{param}"


@dataclass(frozen=True)
class Choice:
    """One finished choice; logprobs as the server sent them (OpenAI shape) or None."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: dict | None = None


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice gained in one stream chunk; finish_reason on its last one."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: dict | None = None


@dataclass(frozen=True)
class Result:
    """A finished completion or chat completion; `raw` is the response JSON."""

    id: str
    model: str
    choices: list[Choice]
    usage: dict
    raw: dict

    @property
    def text(self) -> str:
        return self.choices[0].text


class Client:
    """Blocking client. `with Client(url) as client:` closes its connections."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        timeout: float = 600.0,
        api_key: str | None = None,
        model: str | None = None,
    ) -> None:
        self.base_url = root_url(base_url)
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers(api_key))
        self.model = model

    def complete(self, prompt, *, stream: bool = False, model: str | None = None, **params):
        """Text completion of `prompt` (text, texts, token ids or lists of them): a Result,
        or with stream=True an iterator of ChoiceDeltas."""
        return self._create(COMPLETIONS, {"prompt": prompt}, stream, model, params)

    def chat(
        self, messages: list[dict], *, stream: bool = False, model: str | None = None, **params
    ):
        """Chat completion of `messages`: a Result, or with stream=True ChoiceDeltas."""
        return self._create(CHAT, {"messages": messages}, stream, model, params)

    def models(self) -> list[str]:
        return [card["id"] for card in self._send("GET", "/v1/models").json()["data"]]

    def health(self) -> bool:
        """True when the server answers and is ready to serve."""
        try:
            return self.http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self, path, fields, stream, model, params):
        body = request_body(model or self.model or self.models()[0], fields, stream, params)
        if not stream:
            return parse_result(path, self._send("POST", path, json=body).json())
        request = self.http.build_request("POST", path, json=body)
        with reaching(self.base_url):
            response = self.http.send(request, stream=True)
        if response.is_error:
            response.read()
            response.close()
            raise error_of(response)
        return self._deltas(path, response)

    def _deltas(self, path: str, response: httpx.Response) -> Iterator[ChoiceDelta]:
        try:
            with reaching(self.base_url):
                for line in response.iter_lines():
                    data = event_data(line)
                    if data is DONE:
                        return
                    if data is not None:
                        yield from chunk_deltas(path, data)
        finally:
            response.close()

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        with reaching(self.base_url):
            response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise error_of(response)
        return response


class AsyncClient:
    """The same as Client, for asyncio: `await client.complete(...)`; with stream=True
    the awaited value is an async iterator of ChoiceDeltas."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        timeout: float = 600.0,
        api_key: str | None = None,
        model: str | None = None,
    ) -> None:
        self.base_url = root_url(base_url)
        self.http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=headers(api_key)
        )
        self.model = model

    async def complete(self, prompt, *, stream: bool = False, model: str | None = None, **params):
        return await self._create(COMPLETIONS, {"prompt": prompt}, stream, model, params)

    async def chat(
        self, messages: list[dict], *, stream: bool = False, model: str | None = None, **params
    ):
        return await self._create(CHAT, {"messages": messages}, stream, model, params)

    async def models(self) -> list[str]:
        return [card["id"] for card in (await self._send("GET", "/v1/models")).json()["data"]]

    async def health(self) -> bool:
        try:
            return (await self.http.get("/health")).status_code == 200
        except httpx.TransportError:
            return False

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _create(self, path, fields, stream, model, params):
        model = model or self.model or (await self.models())[0]
        body = request_body(model, fields, stream, params)
        if not stream:
            return parse_result(path, (await self._send("POST", path, json=body)).json())
        request = self.http.build_request("POST", path, json=body)
        with reaching(self.base_url):
            response = await self.http.send(request, stream=True)
        if response.is_error:
            await response.aread()
            await response.aclose()
            raise error_of(response)
        return self._deltas(path, response)

    async def _deltas(self, path: str, response: httpx.Response) -> AsyncIterator[ChoiceDelta]:
        try:
            with reaching(self.base_url):
                async for line in response.aiter_lines():
                    data = event_data(line)
                    if data is DONE:
                        return
                    if data is not None:
                        for delta in chunk_deltas(path, data):
                            yield delta
        finally:
            await response.aclose()

    async def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        with reaching(self.base_url):
            response = await self.http.request(method, path, **kwargs)
        if response.is_error:
            raise error_of(response)
        return response


# --- wire format, shared by both clients ---

DONE = object()


@contextlib.contextmanager
def reaching(base_url: str):
    """An httpx transport failure (refused, reset, timed out) as APIError(None, ...)."""
    try:
        yield
    except httpx.TransportError as error:
        raise APIError(None, f"cannot reach {base_url}: {error!r}") from error


def root_url(base_url: str) -> str:
    """The server's root: "http://host:8000/v1/" and "http://host:8000" are the same."""
    return base_url.rstrip("/").removesuffix("/v1")


def headers(api_key: str | None) -> dict[str, str]:
    """The API key given, else $KVMESH_API_KEY, as a bearer token (none: no header)."""
    api_key = api_key or os.environ.get("KVMESH_API_KEY")
    return {} if not api_key else {"Authorization": f"Bearer {api_key}"}


def request_body(model: str, fields: dict, stream: bool, params: dict) -> dict:
    return {"model": model, **fields, **params, **({"stream": True} if stream else {})}


def error_of(response: httpx.Response) -> APIError:
    """The server's OpenAI-shaped error, or the raw body when it sent something else."""
    try:
        error = response.json()["error"]
        return APIError(
            response.status_code,
            error["message"],
            error.get("param"),
            error.get("type"),
            error.get("code"),
        )
    except (ValueError, KeyError, TypeError):
        return APIError(response.status_code, response.text or response.reason_phrase)


def parse_result(path: str, raw: dict) -> Result:
    choices = [
        Choice(c["index"], choice_text(path, c), c.get("finish_reason"), c.get("logprobs"))
        for c in raw["choices"]
    ]
    return Result(raw["id"], raw["model"], choices, raw.get("usage") or {}, raw)


def choice_text(path: str, choice: dict) -> str:
    if path == CHAT:
        return (choice.get("message") or choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def event_data(line: str):
    """One SSE line: its JSON data, DONE at the end, None for blank lines and comments."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return DONE
    return json.loads(data)


def chunk_deltas(path: str, chunk: dict) -> list[ChoiceDelta]:
    if "error" in chunk:  # the stream failed after it began
        error = chunk["error"]
        raise APIError(
            None,
            error.get("message", str(error)),
            error.get("param"),
            error.get("type"),
            error.get("code"),
        )
    return [
        ChoiceDelta(c["index"], choice_text(path, c), c.get("finish_reason"), c.get("logprobs"))
        for c in chunk.get("choices", [])
    ]
