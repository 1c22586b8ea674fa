"""Reuse-heavy chat traffic: many multi-turn sessions with growing history, shared
system prompts and think times, synthesized from a seed, and its closed-loop replay.

A session starts at a random time in the first `ramp_s` seconds with one of
`num_system_prompts` system prompts and a question of its own; each later turn's prompt
is the previous prompt, its reply and a new question, sent `think_s` (exponential,
mean think_mean_s) after the reply ended. Replies are known in advance (`reply`, e.g. a
mock engine's kvmesh.engine.mock.mock_reply), so every prompt is fixed at synthesis and
each reply is checked against it at replay.

What routing can win here: a turn's prompt is all cached on the worker that served
the session's previous turn (unless evicted), and its system prompt on any worker
that served that system prompt; the rest must be computed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmesh.bench.trace import StreamRecord, http_client, stream_completion


@dataclass(frozen=True)
class SessionSpec:
    """The shape of the traffic; see the module docstring."""

    num_sessions: int = 32
    num_turns: int = 4
    num_system_prompts: int = 4
    system_tokens: int = 512
    question_tokens: tuple[int, int] = (64, 192)
    reply_tokens: int = 16
    think_mean_s: float = 2.0
    ramp_s: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_sessions", "num_turns", "num_system_prompts", "reply_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        low, high = self.question_tokens
        if not 1 <= low <= high:
            raise ValueError(f"question_tokens must be (low, high), 1 <= low <= high: {low, high}")
        for name in ("system_tokens", "think_mean_s", "ramp_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Turn:
    prompt: list[int]
    max_tokens: int
    think_s: float  # wait after this turn's reply before the next turn


@dataclass(frozen=True)
class Session:
    start_s: float
    turns: list[Turn]


@dataclass
class TurnRecord:
    session: int
    turn: int
    num_prompt_tokens: int
    record: StreamRecord = field(default_factory=StreamRecord)

    @property
    def ttft_s(self) -> float:
        return self.record.chunks[0][0] - self.record.sent


def synthesize(
    spec: SessionSpec, token_ids: list[int], reply: Callable[[list[int], int], list[int]]
) -> list[Session]:
    """The sessions of `spec`, prompts fixed, drawn from `token_ids`."""
    rng = random.Random(spec.seed)

    def tokens(n: int) -> list[int]:
        return [rng.choice(token_ids) for _ in range(n)]

    systems = [tokens(spec.system_tokens) for _ in range(spec.num_system_prompts)]
    sessions = []
    for _ in range(spec.num_sessions):
        start = rng.uniform(0, spec.ramp_s)
        history = rng.choice(systems) + tokens(rng.randint(*spec.question_tokens))
        turns = []
        for _ in range(spec.num_turns):
            think = rng.expovariate(1 / spec.think_mean_s) if spec.think_mean_s else 0.0
            turns.append(Turn(list(history), spec.reply_tokens, think))
            history += reply(history, spec.reply_tokens) + tokens(
                rng.randint(*spec.question_tokens)
            )
        sessions.append(Session(start, turns))
    return sessions


async def replay(
    url: str,
    model: str,
    sessions: list[Session],
    check: Callable[[StreamRecord, list[int], int], None],
    on_done: Callable[[], None] | None = None,
) -> list[TurnRecord]:
    """Every session closed loop (a turn waits for the one before and its think time),
    all sessions at once; `check(record, prompt, max_tokens)` raises for a bad reply."""
    records: list[TurnRecord] = []
    async with http_client(url) as http:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def run(index: int, session: Session) -> None:
            await asyncio.sleep(max(0.0, t0 + session.start_s - loop.time()))
            for k, turn in enumerate(session.turns):
                done = TurnRecord(index, k, len(turn.prompt))
                await stream_completion(
                    http, model, turn.prompt, turn.max_tokens, record=done.record
                )
                check(done.record, turn.prompt, turn.max_tokens)
                records.append(done)
                if on_done is not None:
                    on_done()
                await asyncio.sleep(turn.think_s)

        await asyncio.gather(*(run(i, s) for i, s in enumerate(sessions)))
    return records
