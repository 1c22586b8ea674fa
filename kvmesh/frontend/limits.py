"""HTTPLimits and the Gate: what the HTTP server refuses before any request is parsed.

The Gate is plain ASGI middleware in front of the whole app, checked in this order:

    Host header      not in `allowed_hosts` (when set)             -> 400 (DNS rebinding)
    API key          no `Authorization: Bearer <key>` from the key  -> 401 (when keys are
                     file, on every path but /health (and /metrics        configured)
                     unless `metrics_auth`)
    Content-Type     a POST with a body that is not application/json -> 415
                     (a bodiless POST, as the admin API's, needs none)
    body size        Content-Length over `max_body_bytes`           -> 413 at once;
                     a chunked body is counted as it arrives         -> 413 at the cap
    body time        a body not complete within `body_timeout` s    -> 408

so a 60 MB body costs the server nothing but its headers, a slow sender holds one
connection for body_timeout at most, and no JSON is parsed before these pass. Every
refusal is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path

OPEN_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class HTTPLimits:
    """The [frontend] keys the HTTP server enforces (defaults = cluster.toml's)."""

    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0
    max_choices: int = 128  # prompts x n of one request
    default_max_tokens: int = 1024  # chat, when the request names none
    api_keys: frozenset[str] = field(default_factory=frozenset)
    metrics_auth: bool = False  # /metrics needs a key too (when keys are configured)
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)  # empty: any
    salt_by_api_key: bool = False  # each API key's requests share cached blocks only


def read_api_keys(path: str | Path) -> frozenset[str]:
    """One key per line ('#' starts a comment); a file that holds none is an error, since
    it would leave the server open while its operator believes it closed."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(
            f"frontend.api_key_file {str(path)!r} cannot be read: {exc.strerror}"
        ) from None
    keys = frozenset(k for line in text.splitlines() if (k := line.split("#", 1)[0].strip()))
    if not keys:
        raise ValueError(f"frontend.api_key_file {str(path)!r} holds no key")
    return keys


def bearer_key(authorization: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header value; None for any other."""
    scheme, _, key = authorization.partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


def parse_hosts(text: str) -> frozenset[str]:
    """ "api.example.com, localhost" -> the set of host names (no ports), lower case."""
    return frozenset(h.strip().lower() for h in text.split(",") if h.strip())


class BodyRefused(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Gate:
    """ASGI middleware enforcing HTTPLimits (the order is in the module docstring)."""

    def __init__(self, app, limits: HTTPLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is None and scope["method"] == "POST":
            try:  # the whole body, bounded, before the app sees any of it
                body = await self.read_body(receive)
            except BodyRefused as refused:
                refusal = (refused.status, refused.message, "invalid_request_error", refused.code)
            else:
                if body is None:
                    return  # the client went away
                receive = replay(body, receive)
        if refusal is not None:
            await respond(send, *refusal)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> tuple[int, str, str, str] | None:
        """(status, message, type, code) of a request refused on its headers alone."""
        limits = self.limits
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if limits.allowed_hosts:
            host = headers.get("host", "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in limits.allowed_hosts:
                return (
                    400,
                    f"Host {host!r} is not served here (frontend.allowed_hosts)",
                    "invalid_request_error",
                    "host_not_allowed",
                )
        path = scope["path"]
        if (
            limits.api_keys
            and path not in OPEN_PATHS
            and (path != "/metrics" or limits.metrics_auth)
        ):
            key = bearer_key(headers.get("authorization", ""))
            if key is None or not any(
                hmac.compare_digest(key.encode(), k.encode()) for k in limits.api_keys
            ):
                return (
                    401,
                    "a valid API key is required: send 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    "invalid_api_key",
                )
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            empty = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers
            if media != "application/json" and not (empty and not media):
                return (
                    415,
                    f"Content-Type must be application/json, got {media or 'none'}",
                    "invalid_request_error",
                    "unsupported_media_type",
                )
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
                return (
                    413,
                    f"the request body is {length} bytes; the limit is "
                    f"{limits.max_body_bytes} (frontend.max_body_bytes)",
                    "invalid_request_error",
                    "body_too_large",
                )
        return None

    async def read_body(self, receive) -> bytes | None:
        """The request body, counted as it arrives and each wait for it timed; None
        when the client disconnects first."""
        limits, parts, received = self.limits, [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), limits.body_timeout)
            except TimeoutError:
                raise BodyRefused(
                    408,
                    f"the request body did not arrive within "
                    f"{limits.body_timeout:g} s (frontend.body_timeout)",
                    "body_timeout",
                ) from None
            if message["type"] == "http.disconnect":
                return None
            parts.append(message.get("body", b""))
            received += len(parts[-1])
            if received > limits.max_body_bytes:
                raise BodyRefused(
                    413,
                    f"the request body is over {limits.max_body_bytes} "
                    "bytes (frontend.max_body_bytes)",
                    "body_too_large",
                )
            if not message.get("more_body", False):
                return b"".join(parts)


def replay(body: bytes, receive):
    """A receive that hands the app the body read already, then the client's own
    (which reports the disconnect a streaming response watches for)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def respond(send, status: int, message: str, type_: str, code: str) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
