"""ServedModels: what the router knows of the models it serves ([[models]], [[pools]]).

Per model: its block size, its workers' block-hash salt (the first registered one's; a
worker or frontend with another is refused), its pools (the hybrid stack's rule: a
request goes to the pool with the largest min_prompt_tokens its prompt reaches), and
whether an operator unloaded it (protocol.ModelControl). Per worker and cache actor: the
model it serves, and a worker's pool. The router actor asks; nothing here does I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from kvmesh.protocol import ModelState, ModelStates, RegisterWorker
from kvmesh.router.policy import WorkerState

SALT_MISMATCH = (
    "{who} block hashes are salted {salt}, the workers' {cluster}: their model files, "
    "dtype, block size or hash key (security.key_dir's cluster.hash_key, or the per-user "
    "one without keys) differ, so no prefix would ever be found"
)


class ServedModels:
    """The served models' facts, and which model (and pool) each member serves."""

    def __init__(
        self,
        block_sizes: Mapping[str, int],
        pools: Mapping[str, tuple[tuple[int, str], ...]] | None = None,
    ) -> None:
        self.block_sizes = dict(block_sizes)  # served name -> block size, the default first
        self.default = next(iter(self.block_sizes))
        self.pools = dict(pools or {})  # model -> (min_prompt_tokens, pool), largest first
        self.model_of: dict[str, str] = {}  # worker or cache actor -> its model
        self.pool_of: dict[str, str] = {}  # worker -> its pool ("" = none)
        self.salt_ids: dict[str, str] = {}  # model -> its workers' block-hash salt id
        self.unloaded: dict[str, set[str]] = {}  # model -> the workers told to exit
        self.pool_routed: Counter[str] = Counter()  # pool -> requests placed there
        self.pool_fallbacks = 0  # requests placed beyond their pool (no decode alive there)
        # (model, LoRA adapter) -> the workers that have it loaded (their load reports say)
        self.adapter_holders: dict[tuple[str, str], set[str]] = {}
        self.adapters_of: dict[str, frozenset[str]] = {}  # worker -> its loaded adapters

    @property
    def many(self) -> bool:
        return len(self.block_sizes) > 1

    def unknown(self, model: str) -> str | None:
        """Why `model` cannot be asked for here, or None when it is served."""
        if model in self.block_sizes:
            return None
        served = ", ".join(map(repr, self.block_sizes))
        return f"model {model!r} is not served here; the cluster serves {served}"

    def registration_problem(self, msg: RegisterWorker) -> str | None:
        """Why a worker of `msg.model` cannot join, or None."""
        problem = self.unknown(msg.model)
        if problem is not None:
            return problem
        block_size = self.block_sizes[msg.model]
        if msg.block_size != block_size:
            return (
                f"block_size {msg.block_size} differs from the cluster's {block_size} for "
                f"{msg.model!r}: its KV hashes would never match"
            )
        return self.salt_mismatch(msg.model, msg.salt_id, "its")

    def salt_mismatch(self, model: str, salt_id: str, who: str) -> str | None:
        """Why block hashes salted `salt_id` cannot be `model`'s, or None."""
        ours = self.salt_ids.get(model)
        if salt_id and ours and salt_id != ours:
            return SALT_MISMATCH.format(who=who, salt=salt_id, cluster=ours)
        return None

    def add_worker(self, worker_id: str, msg: RegisterWorker) -> None:
        if msg.salt_id:
            self.salt_ids.setdefault(msg.model, msg.salt_id)
        self.model_of[worker_id] = msg.model
        self.pool_of[worker_id] = msg.pool

    def remove(self, actor_id: str) -> None:
        self.set_adapters(actor_id, ())
        self.model_of.pop(actor_id, None)
        self.pool_of.pop(actor_id, None)

    def set_adapters(self, worker_id: str, adapters) -> None:
        """The LoRA adapters a worker's last load report says it has loaded."""
        new, old = frozenset(adapters), self.adapters_of.get(worker_id, frozenset())
        if new == old:
            return
        model = self.model_of.get(worker_id, "")
        for adapter in old - new:
            holders = self.adapter_holders.get((model, adapter), set())
            holders.discard(worker_id)
            if not holders:
                self.adapter_holders.pop((model, adapter), None)
        for adapter in new - old:
            self.adapter_holders.setdefault((model, adapter), set()).add(worker_id)
        if new:
            self.adapters_of[worker_id] = new
        else:
            self.adapters_of.pop(worker_id, None)

    def adapter_credits(self, model: str, adapter: str, weight: float) -> dict[str, float]:
        """Router.choose's credits for a request through `adapter`: `weight` prompt
        tokens for each worker that has it loaded."""
        if not adapter or not weight:
            return {}
        return dict.fromkeys(self.adapter_holders.get((model, adapter), ()), weight)

    def pool_for(self, model: str, num_prompt_tokens: int) -> str:
        """The pool of `model` a prompt this long goes to: the one with the largest
        minimum it reaches ("" when the model has no pools)."""
        for minimum, pool in self.pools.get(model, ()):
            if num_prompt_tokens >= minimum:
                return pool
        return ""

    def unloaded_message(self, model: str) -> str:
        return (
            f"model {model!r} is unloaded; load it with POST /v1/admin/models/{model}/load "
            f"(or `kvmesh models load {model}`)"
        )

    # --- states, for ModelQuery, ModelControl and ClusterStatus ---

    def workers_of(self, model: str, workers: Mapping[str, WorkerState]) -> list[str]:
        return sorted(w for w in workers if self.model_of.get(w) == model)

    def state(self, model: str, workers: Mapping[str, WorkerState]) -> str:
        """loaded (a decode worker registered), loading (none yet), unloading (an
        operator unloaded it; workers still registered), unloaded."""
        own = self.workers_of(model, workers)
        if model in self.unloaded:
            return "unloading" if own else "unloaded"
        return "loaded" if any(workers[w].role == "decode" for w in own) else "loading"

    def states(self, workers: Mapping[str, WorkerState]) -> ModelStates:
        return ModelStates(
            models=[
                ModelState(
                    name=model,
                    state=self.state(model, workers),
                    workers=self.workers_of(model, workers),
                    unloaded_workers=sorted(self.unloaded.get(model, ())),
                )
                for model in self.block_sizes
            ]
        )
