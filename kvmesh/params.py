"""SamplingParams: how one request is sampled and when it stops. Torch-free and a
msgspec Struct, so the same object travels on the wire between actors."""

from __future__ import annotations

import msgspec

MAX_LOGPROBS = 20
MAX_TOP_K = 2**31 - 1  # top_k beyond the vocabulary keeps everything; beyond this is an error
# Temperatures this small are greedy: dividing float32 logits by them overflows (or the
# value itself rounds to 0), which would turn the distribution into NaNs.
GREEDY_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-8  # below this only the most likely token is kept anyway
# Priority levels name classes of traffic (Triton numbers its levels 1..N; vLLM users
# pass small ints). A bound this loose fits any such scheme and still catches a value
# that is no level at all, such as a timestamp or a deadline in milliseconds.
MAX_PRIORITY = 1000
MAX_CACHE_SALT = 256  # characters


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Sampling and stopping for one request.

    temperature 0 is greedy. top_k 0 (or -1) and top_p 1.0 disable those filters.
    `seed` makes one request's samples reproducible whatever else is in the batch.
    `logprobs`: None for none; k >= 0 for the sampled token's logprob plus the top k.
    `priority`: admission order, lower first (vLLM's convention), in
    [-MAX_PRIORITY, MAX_PRIORITY]; equal priorities are first come first served.
    `cache_salt`: requests share cached KV blocks only when their salts are equal (one
    tenant's, say): it enters every block hash, so another tenant's prefix is never hit
    and cached_tokens tells nothing of what others sent.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    priority: int = 0
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p must be in (0, 1], got 0")
        _check_int("top_k", self.top_k, low=-1, high=MAX_TOP_K)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list):
            raise ValueError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, low=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        _check_int("priority", self.priority, low=-MAX_PRIORITY, high=MAX_PRIORITY)
        if self.cache_salt is not None and (
            not isinstance(self.cache_salt, str) or not 0 < len(self.cache_salt) <= MAX_CACHE_SALT
        ):
            raise ValueError(
                f"cache_salt must be a string of 1 to {MAX_CACHE_SALT} "
                f"characters, got {self.cache_salt!r}"
            )

    def salted(self, salt: bytes) -> bytes:
        """The block-hash salt of this request: the model's, plus its cache_salt."""
        if self.cache_salt is None:
            return salt
        return salt + b"\0cache_salt:" + self.cache_salt.encode("utf-8", "surrogatepass")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _check_int(field: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer, got {value!r}")
    _check_range(field, value, low, high)


def _check_number(field: str, value, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{field} must be a number, got {value!r}")
    _check_range(field, value, low, high)


def _check_range(field, value, low, high) -> None:
    if low is not None and value < low:
        raise ValueError(f"{field} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{field} must be <= {high}, got {value!r}")


def first_token_params(params: SamplingParams) -> SamplingParams:
    """What a prefill worker samples with: only the request's first token, with its
    settings (seed included); stopping is the decode worker's business."""
    fields = {name: getattr(params, name) for name in params.__struct_fields__}
    return SamplingParams(**(fields | {"max_tokens": 1, "ignore_eos": True, "stop": []}))
