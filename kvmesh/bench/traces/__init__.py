"""The trace the benchmarks replay by default, shipped in the package so a fresh clone
runs every `kvmesh bench` command; `--trace PATH` takes any other Mooncake JSONL trace.

`mooncake_like.jsonl` is made here, by `make_trace()` (`python -m kvmesh.bench.traces`
writes it again, byte for byte): no request of a real trace is in it. It has the format
of the Mooncake FAST'25 traces (kvcache-ai/Mooncake, FAST25-release/traces/: one request
a line, `timestamp` ms, `input_length`, `output_length`, `hash_ids` one chained id per
512-token block) and their shape, measured on synthetic_trace.jsonl of that release:

  arrivals   Poisson, 3.9 requests/s
  fresh      55% of requests share no block with any earlier one; of those, 60% are
             1-3 blocks long, the rest log-normal around 35 blocks (capped at 374)
  follow-up  the rest continue a request of the last `SESSION_WINDOW` (any alike 60% of
             the time, else a long one more likely): its ids, all of them (85%) or a
             leading 70-100%, then 0-3 new blocks (mostly 1), as a conversation's next
             turn resends the history with one more message
  outputs    log-normal, median 69 tokens (mean ~150), within 1..893

With the defaults (600 requests, seed 0) that makes 31 blocks a request on average
(real: 30.5) and an upper bound on the prefix-cache hit rate, with an infinite cache, of
0.65 of blocks (real: 0.64). Only `Random.random()` draws are used: its sequence for a
seed is the one stream Python promises not to change between versions.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
from pathlib import Path

DEFAULT_TRACE = Path(__file__).with_name("mooncake_like.jsonl")
NUM_REQUESTS = 600
SEED = 0
BLOCK_TOKENS = 512
RATE_PER_S = 3.9
FOLLOW_UP = 0.45
SESSION_WINDOW = 300
UNIFORM_PICK = 0.6
MAX_BLOCKS = 374
MAX_OUTPUT = 893
NEW_BLOCKS = ((0.12, 0), (0.77, 1), (0.94, 2), (1.0, 3))  # cumulative: (p, new blocks)


def make_trace(num_requests: int = NUM_REQUESTS, seed: int = SEED) -> list[dict]:
    """The trace's requests, in order; see the module for the shape."""
    rng = random.Random(seed)
    requests: list[dict] = []
    next_id = 0
    timestamp_s = 0.0
    for i in range(num_requests):
        if i:
            timestamp_s += -math.log(1.0 - rng.random()) / RATE_PER_S
        if i and rng.random() < FOLLOW_UP:
            earlier = _pick_earlier(rng, requests[max(0, i - SESSION_WINDOW) :])
            keep = len(earlier)
            if rng.random() >= 0.85:
                keep = max(1, math.ceil(keep * (0.7 + 0.3 * rng.random())))
            u = rng.random()
            new = next(n for p, n in NEW_BLOCKS if u < p)
            ids = earlier[:keep]
        else:
            ids = []
            if rng.random() < 0.6:
                new = 1 + int(rng.random() * 3)
            else:
                new = round(math.exp(math.log(35) + 0.6 * _normal(rng)))
        new = max(0 if ids else 1, min(new, MAX_BLOCKS - len(ids)))
        ids = ids + list(range(next_id, next_id + new))
        next_id += new
        output = round(math.exp(math.log(69) + 1.24 * _normal(rng)))
        requests.append(
            {
                "timestamp": round(timestamp_s * 1000),
                "input_length": len(ids) * BLOCK_TOKENS - int(rng.random() * BLOCK_TOKENS),
                "output_length": min(max(output, 1), MAX_OUTPUT),
                "hash_ids": ids,
            }
        )
    return requests


def _pick_earlier(rng: random.Random, window: list[dict]) -> list[int]:
    """The ids of a request of `window`: any one alike (`UNIFORM_PICK`), else with odds
    in proportion to its length, since long contexts (documents, long conversations)
    are the ones that come back."""
    if rng.random() < UNIFORM_PICK:
        return window[int(rng.random() * len(window))]["hash_ids"]
    ends = list(itertools.accumulate(len(r["hash_ids"]) for r in window))
    return window[bisect.bisect_right(ends, rng.random() * ends[-1])]["hash_ids"]


def trace_text(requests: list[dict]) -> str:
    return "".join(json.dumps(r, separators=(", ", ": ")) + "\n" for r in requests)


def _normal(rng: random.Random) -> float:
    """A standard normal draw from two random() draws (Box-Muller)."""
    u1, u2 = rng.random(), rng.random()
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)
