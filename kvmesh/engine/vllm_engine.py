"""VllmEngine: vLLM's v1 async engine (AsyncLLM) behind what a kvmesh worker needs.

A worker with model.engine = "vllm" runs this instead of kvmesh's Engine. AsyncLLM
lives in the worker's event loop (its EngineCore runs in a child process, as in `vllm
serve`); a request's outputs come back as kvmesh Deltas, step by step:

    Generate ──► sampling_params(): kvmesh SamplingParams -> vllm.SamplingParams (DELTA)
             ──► AsyncLLM.generate({"prompt_token_ids", "cache_salt"}) ──► Delta per output

What the router weighs comes from vLLM's own scheduler stats (a stat logger, fed after
every step): running, waiting, KV usage. KV events come from vLLM's ZeroMQ publisher
at `events_endpoint`, one per worker (kvmesh.engine.vllm_events translates them).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from kvmesh.params import SamplingParams
from kvmesh.protocol import Delta, WorkerLoad

log = structlog.get_logger(__name__)

CPU_KVCACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE unless set: vLLM-CPU's pool, per worker


@dataclass(frozen=True)
class VllmSettings:
    """What VllmEngine builds AsyncLLM from: the cluster's keys and [model.vllm]."""

    model_path: str
    dtype: str
    block_size: int
    max_model_len: int  # 0: the model's
    max_num_seqs: int
    max_num_batched_tokens: int
    events_endpoint: str  # vLLM's KV event publisher binds here
    device: str = "cpu"
    threads: int | None = None
    extra: dict = field(default_factory=dict)  # [model.vllm]


@dataclass
class SchedulerLoad:
    """vLLM's scheduler after its last step, as its stat logger saw it."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0


def sampling_params(params: SamplingParams, max_tokens: int | None = None):
    """kvmesh's sampling parameters as vLLM's (output as deltas: new tokens only)."""
    import vllm
    from vllm.sampling_params import RequestOutputKind

    return vllm.SamplingParams(
        n=1,
        max_tokens=params.max_tokens if max_tokens is None else max_tokens,
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        seed=params.seed,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens,
        output_kind=RequestOutputKind.DELTA,
    )


class VllmEngine:
    """One AsyncLLM with kvmesh's request interface: generate() yields Deltas."""

    def __init__(self, llm, num_blocks: int, load: SchedulerLoad) -> None:
        self.llm = llm
        self.num_blocks = num_blocks
        self.scheduler = load  # updated in place by the stat logger

    @classmethod
    def build(cls, s: VllmSettings) -> VllmEngine:
        """Start vLLM (blocking: tens of seconds; call from a thread). ImportError names
        the package to install."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if s.threads:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("OMP_NUM_THREADS", str(s.threads))
        from vllm.config import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        load = SchedulerLoad()
        # the model runs in the EngineCore process, not a third one (vLLM's default on
        # GPU; on CPU only with VLLM_ENABLE_V1_MULTIPROCESSING=0, which AsyncLLM ignores)
        # scheduling_policy: SamplingParams.priority orders admission, as on kvmesh's engine
        args = (
            dict(
                disable_log_stats=True,
                distributed_executor_backend="uni",
                scheduling_policy="priority",
            )
            | s.extra
        )
        if args["distributed_executor_backend"] == "uni":
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        args |= dict(
            model=s.model_path,
            dtype=s.dtype,
            block_size=s.block_size,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            enable_prefix_caching=True,
            kv_events_config=KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=s.events_endpoint
            ),
        )
        if s.max_model_len:
            args["max_model_len"] = s.max_model_len
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[_logger_of(load)])
        num_blocks = llm.vllm_config.cache_config.num_gpu_blocks or 0
        log.info("vllm_started", model=s.model_path, num_blocks=num_blocks)
        return cls(llm, num_blocks, load)

    @property
    def max_model_len(self) -> int:
        return self.llm.model_config.max_model_len

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: list[int] = (),
    ) -> AsyncIterator[Delta]:
        """The request's Deltas, the last one with its finish reason. A migrated request
        (output_token_ids: what its last worker generated) resumes right after them:
        the prompt is prompt + outputs, and max_tokens what is left. ValueError for a
        request vLLM refuses, before anything is yielded."""
        done = len(output_token_ids)
        prompt = {"prompt_token_ids": list(prompt_token_ids) + list(output_token_ids)}
        if params.cache_salt is not None:
            prompt["cache_salt"] = params.cache_salt
        vllm_params = sampling_params(params, params.max_tokens - done)
        stream = self.llm.generate(prompt, vllm_params, request_id, priority=params.priority)
        async for out in stream:
            completion = out.outputs[0]
            logprobs = None
            if completion.logprobs is not None:
                logprobs = [
                    {token: lp.logprob for token, lp in step.items()}
                    for step in completion.logprobs
                ]
            yield Delta(
                request_id=request_id,
                new_token_ids=list(completion.token_ids),
                new_text=completion.text,
                new_logprobs=logprobs,
                finish_reason=completion.finish_reason,
                num_prompt_tokens=len(prompt_token_ids),
                num_cached_tokens=min(out.num_cached_tokens or 0, len(prompt_token_ids)),
            )

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    def load(self) -> WorkerLoad:
        return WorkerLoad(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=self.scheduler.kv_usage,
        )

    def has_unfinished(self) -> bool:
        return self.scheduler.num_running + self.scheduler.num_waiting > 0

    def shutdown(self) -> None:
        self.llm.shutdown()


def _logger_of(load: SchedulerLoad):
    """A vLLM stat-logger factory that writes each step's scheduler stats into `load`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerLoadLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                load.num_running = scheduler_stats.num_running_reqs
                load.num_waiting = scheduler_stats.num_waiting_reqs
                load.kv_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerLoadLogger
