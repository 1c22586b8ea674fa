"""Helpers shared by the frontend and SDK tests: a real uvicorn server on a thread, and a
Backend without a model that plays a script."""

import asyncio
import contextlib
import threading
import time

import msgspec
import uvicorn

from kvmesh.frontend.metrics import BackendMetrics, WorkerMetrics
from kvmesh.protocol import Delta, WorkerLoad
from kvmesh.tokenizer import Tokenizer


@contextlib.contextmanager
def running_server(app):
    """Serve `app` on 127.0.0.1 at an ephemeral port; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class StubBackend:
    """A Backend without a model that plays `script`: texts (one token each), Deltas,
    exceptions, or pauses (float seconds)."""

    model_name = "stub"
    max_model_len = 64
    default_priority = 0

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.script: list = ["done"]
        self.is_ready = True
        self.aborted: list[str] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def ready(self) -> bool:
        return self.is_ready

    async def generate(self, request_id, prompt_token_ids, params):
        for i, item in enumerate(self.script):
            if isinstance(item, Exception):
                raise item
            if isinstance(item, float):  # a pause, as a slow worker's
                await asyncio.sleep(item)
                continue
            if isinstance(item, Delta):
                yield msgspec.structs.replace(item, request_id=request_id)
                continue
            last = i == len(self.script) - 1
            yield Delta(
                request_id=request_id,
                new_token_ids=[7],
                new_text=item,
                new_logprobs=None,
                finish_reason="stop" if last else None,
                num_prompt_tokens=len(prompt_token_ids),
                num_cached_tokens=0,
            )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def metrics(self) -> BackendMetrics:
        return BackendMetrics(
            remote_prefill_total=3,
            kv_transfer_bytes_total=4096,
            workers=[WorkerMetrics("d0", "decode", WorkerLoad(num_running=2))],
        )
