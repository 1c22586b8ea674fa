"""Serving: one OpenAI completion request, from validated body to response, over a Backend.

ChatServing and CompletionServing differ in how the prompt is made (chat template vs.
text or token ids), which fields carry the limits, and the response's shape; the flow
is shared:

    body ─► prompt ids, checked against vocabulary and context ─► SamplingParams per choice
         ─► ChoiceStreams.start(): errors before the first token become HTTP errors
         ─► stream: SSE `data: {chunk}` ... `data: [DONE]`   |   else one JSON response

A client that disconnects cancels its choices on the backend, streaming or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable

import anyio
import structlog
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from kvmesh.frontend.backend import Backend, BackendUnavailable, OverloadedError
from kvmesh.frontend.choices import Choice, ChoiceStreams
from kvmesh.frontend.limits import HTTPLimits, bearer_key
from kvmesh.frontend.metrics import Metrics
from kvmesh.frontend.schemas import (
    MAX_SEED,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    PromptTokensDetails,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
    now,
)
from kvmesh.params import SamplingParams
from kvmesh.protocol import Delta

log = structlog.get_logger(__name__)

MIN_LOGPROB = -9999.0  # JSON has no -inf


class RequestError(Exception):
    """A request the frontend refuses, as an OpenAI error: status, message, param."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
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


def model_not_found(model: str, served, param: str) -> RequestError:
    """The 404 for a model this server does not serve, naming those it does."""
    return RequestError(
        404,
        f"model {model!r} does not exist; this server serves {', '.join(map(repr, served))}",
        param,
        code="model_not_found",
    )


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


def describe_error(error: Exception) -> tuple[int, ErrorBody, dict[str, str]]:
    """HTTP status, OpenAI error body and headers for an error a request ended with."""
    if isinstance(error, RequestError):
        return (
            error.status,
            ErrorBody(message=error.message, type=error.type, param=error.param, code=error.code),
            {},
        )
    if isinstance(error, OverloadedError):
        body = ErrorBody(message=str(error), type="rate_limit_error", code="overloaded")
        return 429, body, {"Retry-After": retry_after(error.retry_after)}
    if isinstance(error, BackendUnavailable):
        body = ErrorBody(message=str(error), type="service_unavailable", code="unavailable")
        if error.retry_after is None:
            return 503, body, {}
        return 503, body, {"Retry-After": retry_after(error.retry_after)}
    log.error("request_failed", error=repr(error), exc_info=error)
    return 500, ErrorBody(message=f"internal error: {error!r}", type="internal_error"), {}


def retry_after(seconds: float) -> str:
    return str(max(1, int(-(-seconds // 1))))  # whole seconds, rounded up


def sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


class SSEResponse(StreamingResponse):
    """An event stream whose choices are closed however it ends: done, client gone
    (starlette then cancels the send loop mid-iteration), or server shutdown."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.on_close()


async def until_disconnect(request: Request, work: Awaitable):
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait((task,))
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Serving:
    """The flow both endpoints share; subclasses make prompts and shape responses."""

    id_prefix = ""
    prompt_param = ""

    def __init__(self, backend: Backend, metrics: Metrics, limits: HTTPLimits) -> None:
        self.backend = backend
        self.metrics = metrics
        self.limits = limits
        self.tokenizer = backend.tokenizer

    async def __call__(self, request: Request, body: SamplingRequest) -> Response:
        n = body.n or 1
        self.check_choices(body, n)
        # tokenizing and templating a large body takes a while: off the event loop, which
        # also carries the actor's heartbeats and every other stream
        prompts = await asyncio.to_thread(self.prompt_ids, body)
        cache_salt = self.cache_salt(request, body)
        params = [
            self.sampling_params(body, len(ids), j, cache_salt) for ids in prompts for j in range(n)
        ]
        response_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        run = ChoiceStreams(
            self.backend,
            self.metrics,
            response_id,
            [ids for ids in prompts for _ in range(n)],
            params,
        )
        try:
            await self.backend_call(body, until_disconnect(request, run.start()))
            if not body.stream:
                await self.backend_call(body, until_disconnect(request, run.collect()))
        except BaseException:
            await run.close()
            raise
        if body.stream:  # the response closes `run` when it ends, however it ends
            return SSEResponse(self.events(run, body, response_id), on_close=run.close)
        await run.close()
        response = self.response(run, body, response_id)
        return Response(response.model_dump_json(), media_type="application/json")

    async def backend_call(self, body: SamplingRequest, work: Awaitable):
        """`work`, with the backend's ValueError (a prompt it cannot take) as a 400."""
        try:
            return await work
        except ValueError as error:
            raise RequestError(400, str(error), self.param_named(str(error), body)) from error

    def param_named(self, message: str, body: SamplingRequest) -> str | None:
        """The request field an engine error message starts with, if any."""
        field = message.split(" ", 1)[0]
        if field == "prompt":
            return self.prompt_param
        return field if field in type(body).model_fields else None

    async def events(self, run: ChoiceStreams, body, response_id: str) -> AsyncIterator[str]:
        created = now()
        try:
            for chunk in self.opening_chunks(run, body, response_id, created):
                yield sse(chunk)
            async for choice, delta in run.deltas():
                chunk = self.chunk(choice, delta, body, response_id, created)
                if chunk is not None:
                    yield sse(chunk)
            if body.include_usage:
                yield sse(self.make_chunk(body, response_id, created, [], self.usage(run, body)))
        except Exception as error:  # noqa: BLE001 - the status is sent: report it in-band
            yield sse(ErrorResponse(error=describe_error(error)[1]))
        yield "data: [DONE]\n\n"

    # --- shared pieces ---

    def check_choices(self, body, n: int) -> None:
        num_prompts = self.num_prompts(body)
        if num_prompts * n > self.limits.max_choices:
            raise RequestError(
                400,
                f"{num_prompts} prompts x n={n} ask for {num_prompts * n} choices; at "
                f"most {self.limits.max_choices} (frontend.max_choices)",
                "n" if num_prompts == 1 else self.prompt_param,
            )

    def num_prompts(self, body) -> int:
        return 1

    def check_prompt(self, ids: list[int], index: int) -> list[int]:
        param = self.prompt_param
        if not ids:
            raise RequestError(400, f"{param} must not be empty", param)
        bad = next((t for t in ids if t >= self.backend.vocab_size), None)
        if bad is not None:
            raise RequestError(
                400,
                f"{param}[{index}] has token id {bad}, outside the vocabulary "
                f"[0, {self.backend.vocab_size})",
                param,
            )
        if len(ids) >= self.backend.max_model_len:
            raise RequestError(
                400,
                f"{param} has {len(ids)} tokens; the model's context is "
                f"{self.backend.max_model_len} tokens, prompt and completion together",
                param,
            )
        return ids

    def cache_salt(self, request: Request, body) -> str | None:
        """The request's cache_salt; with frontend.salt_by_api_key, prefixed by its API
        key's digest, so tenants never share cached blocks whatever they send."""
        if not self.limits.salt_by_api_key:
            return body.cache_salt
        key = bearer_key(request.headers.get("authorization", ""))
        if key is None:
            return body.cache_salt
        tenant = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"key:{tenant}:{body.cache_salt or ''}"

    def sampling_params(
        self, body, num_prompt_tokens: int, index: int, cache_salt: str | None = None
    ) -> SamplingParams:
        """Index counts the choices of one prompt: a seeded request's choices differ."""
        max_tokens, param = self.max_tokens(body)
        room = self.backend.max_model_len - num_prompt_tokens
        if max_tokens is None:
            max_tokens = self.default_max_tokens(room)
        elif max_tokens > room:
            raise RequestError(
                400,
                f"{param} is {max_tokens}, but the prompt has {num_prompt_tokens} tokens "
                f"and the model's context is {self.backend.max_model_len}: at most {room} "
                "can be generated",
                param,
            )
        seed = None if body.seed is None else (body.seed + index) % (MAX_SEED + 1)
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0,
                seed=seed,
                stop=body.stop,
                ignore_eos=bool(body.ignore_eos),
                logprobs=self.num_logprobs(body),
                priority=self.backend.default_priority if body.priority is None else body.priority,
                cache_salt=cache_salt,
            )
        except ValueError as error:
            raise RequestError(400, str(error), self.param_named(str(error), body)) from error

    def usage(self, run: ChoiceStreams, body) -> Usage:
        """Prompt tokens count once per prompt (its first choice), not once per choice."""
        firsts = run.choices[:: body.n or 1]
        prompt = sum(c.num_prompt_tokens for c in firsts)
        completion = sum(len(c.token_ids) for c in run.choices)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(c.num_cached_tokens for c in firsts)
            ),
        )

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def top(self, entry: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda item: item[1], reverse=True)[:k]

    # --- per endpoint ---

    def prompt_ids(self, body) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize text from the request; text the tokenizer refuses is the client's 400."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except ValueError as error:
            raise RequestError(400, f"{param}: {error}", param) from error

    def max_tokens(self, body) -> tuple[int | None, str]:
        raise NotImplementedError

    def default_max_tokens(self, room: int) -> int:
        raise NotImplementedError

    def num_logprobs(self, body) -> int | None:
        raise NotImplementedError

    def opening_chunks(self, run, body, response_id: str, created: int) -> list:
        return []

    def chunk(self, choice: Choice, delta: Delta, body, response_id: str, created: int):
        raise NotImplementedError

    def make_chunk(self, body, response_id: str, created: int, choices: list, usage=None):
        raise NotImplementedError

    def response(self, run: ChoiceStreams, body, response_id: str):
        raise NotImplementedError


class ChatServing(Serving):
    """POST /v1/chat/completions: the chat template renders the messages."""

    id_prefix = "chatcmpl"
    prompt_param = "messages"

    def prompt_ids(self, body: ChatCompletionRequest) -> list[list[int]]:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as error:
            raise RequestError(400, str(error), "messages") from error
        # The template writes <s> itself.
        return [self.check_prompt(self.encode(text, "messages", add_special_tokens=False), 0)]

    def max_tokens(self, body: ChatCompletionRequest) -> tuple[int | None, str]:
        if body.max_completion_tokens is not None:
            return body.max_completion_tokens, "max_completion_tokens"
        return body.max_tokens, "max_tokens"

    def default_max_tokens(self, room: int) -> int:
        # OpenAI chat runs until the model stops or the context is full; a bound keeps one
        # request that names no max_tokens from holding a worker for the whole context
        return min(room, self.limits.default_max_tokens)

    def num_logprobs(self, body: ChatCompletionRequest) -> int | None:
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None

    def logprobs(self, ids: list[int], entries, k: int | None) -> ChatLogprobs | None:
        """Entries may be None with no ids: a finish that sampled nothing (a sequence that
        outgrew the pool) carries no logprobs."""
        if k is None:
            return None
        return ChatLogprobs(
            content=[
                TokenLogprob(
                    **self.top_logprob(token_id, entry[token_id]).model_dump(),
                    top_logprobs=[self.top_logprob(t, lp) for t, lp in self.top(entry, k)],
                )
                for token_id, entry in zip(ids, entries or (), strict=True)
            ]
        )

    def top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.token_text(token_id)
        return TopLogprob(token=text, logprob=max(logprob, MIN_LOGPROB), bytes=list(text.encode()))

    def opening_chunks(self, run, body, response_id: str, created: int) -> list:
        return [
            self.make_chunk(
                body,
                response_id,
                created,
                [ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))],
            )
            for c in run.choices
        ]

    def chunk(self, choice, delta, body, response_id, created):
        k = self.num_logprobs(body)
        if not (delta.new_text or delta.finish_reason or (k is not None and delta.new_token_ids)):
            return None
        logprobs = self.logprobs(delta.new_token_ids, delta.new_logprobs, k)
        return self.make_chunk(
            body,
            response_id,
            created,
            [
                ChatChunkChoice(
                    index=choice.index,
                    delta=ChatDelta(content=delta.new_text or None),
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                )
            ],
        )

    def make_chunk(self, body, response_id, created, choices, usage=None):
        return ChatCompletionChunk(
            id=response_id, created=created, model=body.model, choices=choices, usage=usage
        )

    def response(self, run, body, response_id) -> ChatCompletion:
        k = self.num_logprobs(body)
        return ChatCompletion(
            id=response_id,
            model=body.model,
            usage=self.usage(run, body),
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=self.logprobs(c.token_ids, c.logprobs, k),
                    finish_reason=c.finish_reason,
                )
                for c in run.choices
            ],
        )


class CompletionServing(Serving):
    """POST /v1/completions: each prompt is text (tokenized here) or token ids."""

    id_prefix = "cmpl"
    prompt_param = "prompt"

    def num_prompts(self, body: CompletionRequest) -> int:
        return len(body.prompt)

    def prompt_ids(self, body: CompletionRequest) -> list[list[int]]:
        prompts = []
        for index, prompt in enumerate(body.prompt):
            if isinstance(prompt, str):
                if not prompt:
                    raise RequestError(400, "prompt must not be empty", "prompt")
                prompt = self.encode(prompt, "prompt")
            prompts.append(self.check_prompt(prompt, index))
        return prompts

    def max_tokens(self, body: CompletionRequest) -> tuple[int | None, str]:
        return body.max_tokens, "max_tokens"

    def default_max_tokens(self, room: int) -> int:
        return min(16, room)  # OpenAI's default for completions

    def num_logprobs(self, body: CompletionRequest) -> int | None:
        return body.logprobs

    def logprobs(self, ids, entries, k: int | None, offset: int) -> CompletionLogprobs | None:
        if k is None:
            return None
        result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, entry in zip(ids, entries or (), strict=True):
            text = self.token_text(token_id)
            result.tokens.append(text)
            result.token_logprobs.append(max(entry[token_id], MIN_LOGPROB))
            result.top_logprobs.append(
                {self.token_text(t): max(lp, MIN_LOGPROB) for t, lp in self.top(entry, k)}
            )
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def chunk(self, choice, delta, body, response_id, created):
        k = body.logprobs
        if not (delta.new_text or delta.finish_reason or (k is not None and delta.new_token_ids)):
            return None
        offset = len(choice.text) - len(delta.new_text)
        return self.make_chunk(
            body,
            response_id,
            created,
            [
                CompletionChoice(
                    index=choice.index,
                    text=delta.new_text,
                    logprobs=self.logprobs(delta.new_token_ids, delta.new_logprobs, k, offset),
                    finish_reason=delta.finish_reason,
                )
            ],
        )

    def make_chunk(self, body, response_id, created, choices, usage=None):
        return Completion(
            id=response_id, created=created, model=body.model, choices=choices, usage=usage
        )

    def response(self, run, body, response_id) -> Completion:
        return Completion(
            id=response_id,
            model=body.model,
            usage=self.usage(run, body),
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    logprobs=self.logprobs(c.token_ids, c.logprobs, body.logprobs, 0),
                    finish_reason=c.finish_reason,
                )
                for c in run.choices
            ],
        )
