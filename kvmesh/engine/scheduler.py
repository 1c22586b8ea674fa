"""Scheduler: continuous batching with chunked prefill, priority levels and preemption
by recompute.

Each step has a token budget (`max_num_batched_tokens`) and a cap on running
sequences (`max_num_seqs`). Every sequence has a priority (`SamplingParams.priority`,
lower is served sooner, as in vLLM); both queues are kept in (priority, arrival) order,
arrival being when the sequence joined that queue. Policy, in order:

1. Running sequences, in that order, get what they need: one token if decoding,
   the next chunk of their prompt if prefilling, cut to the budget left.
   When the pool has no block for one, the last running sequence not yet scheduled
   this step (the lowest priority, newest of its level) is preempted: its blocks are
   freed and it goes back to the *front of its priority level* in the waiting queue,
   to be recomputed later (its cached prefix usually survives in the prefix cache).
2. Then waiting sequences, in (priority, arrival) order, are admitted while the budget,
   the sequence cap and the pool allow; each starts from its longest cached prefix.
   Admission stops at the first sequence that does not fit, so a large request is
   never starved by smaller ones behind it, of its priority or lower; none are admitted
   in a step that preempted, so a sequence just preempted is not readmitted in the same
   breath. Priority is strict, as in Triton's priority levels: a level waits while a
   higher one has work waiting, and admission never preempts a running sequence for a
   waiting one of higher priority (it waits for room, so nothing is recomputed for it).
   With a KV connector, the blocks after the cached prefix that the connector holds
   (host DRAM, disk) are admitted as computed too, cut to what the pool has room for
   (a sequence that fits without them is never held back by them; they cost no token
   budget). The batch lists them (`onboards`); the engine loads them before the step
   runs and reports back through `finish_onboard`; what failed to load is computed.

With every priority equal (the default 0) this is first come first served.

A sequence too large for the whole pool is refused at add time; a running sequence
that outgrows the whole pool is finished with reason "length". One that merely finds
the pool full of blocks it may not take (sequences already served this step, prompts
parked for a remote prefill, finished prompts held for a transfer) is preempted like
any other and waits for room: those blocks are freed in time, and a "length" finish
there would cut a reply short of max_tokens.

Disaggregation: a waiting sequence marked `remote_prefill` is admitted like any
other (same queue, same prefix reuse) but gets blocks for its whole prompt at once
and no compute: it parks (`is_parked`) while a prefill worker writes its KV into
those blocks, then `resume_remote` makes it a running decode. Parked sequences are
never preempted, since a peer may be writing into their blocks.

The scheduler owns its queues and the blocks' bookkeeping; the engine drives it:

    schedule()          -> ScheduledBatch (items, finished, onboards)
    finish_onboard()    per onboarding, once the connector loaded what it could
    update(batch)       after the model ran: tokens computed, full blocks cached
    finish(seq, reason) a stop condition the engine found (or abort(seq))
    take_new_remote(), resume_remote(), compute_locally(), release(): disaggregation
    stats()             counts, a frozen SchedulerStats, for load reports
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmesh.engine.block_manager import BlockManager
from kvmesh.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from kvmesh.engine.kv_connector import Onboard


@dataclass
class Onboarding:
    """Blocks admitted as computed that the connector must load before the step runs."""

    seq: Sequence
    hits: list[Onboard]  # the connector's blocks, in chain order
    block_ids: list[int]  # where each of them goes
    reported: bool  # seq.num_cached_tokens counts them (it was admitted the first time)


@dataclass
class ScheduledBatch:
    """This step's work: (sequence, number of its tokens to compute), decodes first."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler itself
    onboards: list[Onboarding] = field(default_factory=list)  # to load before running

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


def priority(seq: Sequence) -> int:
    return seq.params.priority


class WaitingQueue:
    """Sequences waiting for admission, in (priority, arrival) order, with a deque's
    interface: one FIFO per priority level present, the levels kept sorted.

    append (a new arrival) and appendleft (a preempted sequence: before the others of its
    level) are O(1), as is taking the head, plus a bisect over the levels present when a
    level appears or empties; remove (an abort) is linear in its level, as a deque's is.
    """

    def __init__(self) -> None:
        self.levels: dict[int, deque[Sequence]] = {}
        self.priorities: list[int] = []  # the keys of `levels`, ascending
        self.num_seqs = 0

    def __len__(self) -> int:
        return self.num_seqs

    def __iter__(self) -> Iterator[Sequence]:
        for level in self.priorities:
            yield from self.levels[level]

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self.levels.get(priority(seq), ())

    def __getitem__(self, index: int) -> Sequence:
        """The index-th sequence in admission order; [0], the next one, is O(1)."""
        if not 0 <= index < self.num_seqs:
            raise IndexError(f"waiting queue index {index} out of range [0, {self.num_seqs})")
        return next(itertools.islice(self, index, None))

    def append(self, seq: Sequence) -> None:
        self._level(seq).append(seq)
        self.num_seqs += 1

    def appendleft(self, seq: Sequence) -> None:
        self._level(seq).appendleft(seq)
        self.num_seqs += 1

    def popleft(self) -> Sequence:
        seq = self.levels[self.priorities[0]].popleft()
        self._taken(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        self.levels[priority(seq)].remove(seq)
        self._taken(seq)

    def _level(self, seq: Sequence) -> deque[Sequence]:
        level = priority(seq)
        if level not in self.levels:
            bisect.insort(self.priorities, level)
            self.levels[level] = deque()
        return self.levels[level]

    def _taken(self, seq: Sequence) -> None:
        self.num_seqs -= 1
        level = priority(seq)
        if not self.levels[level]:
            del self.levels[level]
            self.priorities.pop(bisect.bisect_left(self.priorities, level))


@dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's counts at one moment, for load reports and the engine's stats."""

    num_running: int
    num_waiting: int
    num_remote: int  # parked for a remote prefill
    queued_prefill_tokens: int  # tokens the waiting sequences have yet to compute
    num_preemptions: int  # since the scheduler started


class Scheduler:
    """Decides each step's batch: which sequences run, how many tokens each computes, which
    are admitted and which preempted (the policy is in the module docstring). It owns its
    queues: the engine reports back through update/finish/finish_onboard and reads counts
    from stats()."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._block_manager = block_manager
        self._waiting = WaitingQueue()
        self._running: list[Sequence] = []  # in (priority, arrival) order: see _run
        self._remote: dict[str, Sequence] = {}  # parked for a remote prefill
        self._new_remote: list[Sequence] = []  # admitted since the engine last took them
        self._num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self._waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._remote)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_remote=len(self._remote),
            queued_prefill_tokens=sum(s.num_tokens - s.num_computed_tokens for s in self._waiting),
            num_preemptions=self._num_preemptions,
        )

    def waiting_ids(self) -> list[str]:
        """The waiting sequences' request ids, in admission order."""
        return [seq.request_id for seq in self._waiting]

    def is_parked(self, request_id: str) -> bool:
        """Whether the request waits for a remote prefill to fill its blocks."""
        return request_id in self._remote

    def take_new_remote(self) -> list[Sequence]:
        """The sequences parked for a remote prefill since the last call."""
        seqs, self._new_remote = self._new_remote, []
        return seqs

    def abort(self, seq: Sequence) -> None:
        if seq in self._waiting:
            self._waiting.remove(seq)
        self._remote.pop(seq.request_id, None)
        if seq in self._new_remote:
            self._new_remote.remove(seq)
        self.finish(seq, "abort")

    def finish(self, seq: Sequence, reason: str) -> None:
        """seq ends: out of the running set, its blocks freed unless held for a transfer
        (release() frees those)."""
        if seq in self._running:
            self._running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if not seq.hold_blocks or reason == "abort":
            self._block_manager.free(seq)

    def release(self, seq: Sequence) -> None:
        """Free the blocks a finished hold_blocks sequence kept."""
        assert seq.is_finished, f"{seq.request_id} is not finished"
        self._block_manager.free(seq)

    def update(self, batch: ScheduledBatch) -> None:
        """The model ran `batch`: its tokens are computed, and its newly full blocks
        enter the prefix cache. (Sampling, and finishing, are the engine's.)"""
        for seq, num_new in batch.items:
            seq.num_computed_tokens += num_new
            self._block_manager.cache_computed(seq)

    def resume_remote(self, seq: Sequence) -> None:
        """The prompt's KV has landed in seq's blocks: it decodes from here."""
        del self._remote[seq.request_id]
        seq.remote_prefill = False  # if preempted later, it is recomputed here
        seq.num_computed_tokens = seq.num_tokens
        self._block_manager.cache_computed(seq)
        self._run(seq)

    def compute_locally(self, seq: Sequence) -> None:
        """The remote prefill failed: compute the prompt here, keeping the blocks it has."""
        del self._remote[seq.request_id]
        seq.remote_prefill = False
        self._run(seq)

    def finish_onboard(self, onboarding: Onboarding, num_loaded: int) -> None:
        """The connector loaded the first `num_loaded` blocks of `onboarding`: publish
        them; the tokens of the rest are no longer computed (nor cached) and get computed
        in their blocks, this step's chunk now starting that much earlier."""
        seq = onboarding.seq
        num_unloaded = (len(onboarding.block_ids) - num_loaded) * self._block_manager.block_size
        seq.num_computed_tokens -= num_unloaded
        if onboarding.reported:
            seq.num_cached_tokens -= num_unloaded
        self._block_manager.cache_computed(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = self._schedule_running(batch, budget)
        budget -= batch.num_tokens
        if not preempted:
            self._schedule_waiting(batch, budget)
        # single-token rows (decodes) first, as paged attention expects; the sort is stable
        batch.items.sort(key=lambda item: item[1] != 1)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> bool:
        preempted = False
        scheduled: list[Sequence] = []
        queue = list(self._running)
        while queue and budget > 0:
            seq = queue.pop(0)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._block_manager.can_append(seq, num_new):
                victim = queue.pop() if queue else seq
                if victim is seq and not self._block_manager.can_ever_hold(seq, num_new):
                    self._finish_alone(seq, batch)
                    break
                preempted = True
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self._block_manager.append(seq, num_new)
                batch.items.append((seq, num_new))
                scheduled.append(seq)
                budget -= num_new
        return preempted

    def _finish_alone(self, seq: Sequence, batch: ScheduledBatch) -> None:
        # The pool cannot hold this sequence even with every other block free. (Short of
        # that, blocks held by parked remote prefills or by sequences served this step
        # are only held for a while: seq is preempted and waits for them instead.)
        self.finish(seq, "length")
        batch.finished.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self._block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self._num_preemptions += 1
        self._waiting.appendleft(seq)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while (
            self._waiting
            and budget > 0
            and len(self._running) + len(self._remote) < self.max_num_seqs
        ):
            seq = self._waiting[0]
            hits = self._block_manager.find_prefix(seq)
            if not self._block_manager.can_admit(seq, hits, self._num_new(seq, len(hits), budget)):
                break
            onboard = self._fit_onboard(seq, hits, budget)
            num_new = self._num_new(seq, len(hits) + len(onboard), budget)
            self._waiting.popleft()
            onboard_ids = self._block_manager.admit(seq, hits, len(onboard))
            if onboard:
                batch.onboards.append(
                    Onboarding(seq, onboard, onboard_ids, seq.num_cached_tokens is None)
                )
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            self._block_manager.append(seq, num_new)
            if seq.remote_prefill:
                seq.status = SequenceStatus.REMOTE_PREFILL
                self._remote[seq.request_id] = seq
                self._new_remote.append(seq)
                continue
            self._run(seq)
            batch.items.append((seq, num_new))
            budget -= num_new

    def _run(self, seq: Sequence) -> None:
        """Join the running set after the others of seq's priority and before lower ones,
        so _schedule_running serves in (priority, arrival) order and its victim, the last
        one not yet served, is the lowest priority and the newest of its level."""
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self._running, seq, key=priority)

    def _num_new(self, seq: Sequence, num_cached_blocks: int, budget: int) -> int:
        """Tokens seq computes in its first step, admitted with num_cached_blocks in place.
        A remote prefill gets all its blocks at once and costs no budget."""
        num_new = seq.num_tokens - num_cached_blocks * self._block_manager.block_size
        return num_new if seq.remote_prefill else min(num_new, budget)

    def _fit_onboard(self, seq: Sequence, hits: list[int], budget: int) -> list[Onboard]:
        """The connector's blocks after `hits`, cut to what the pool has room for. Each one
        dropped needs no more blocks than it took, so seq (known to fit without any) fits."""
        onboard = self._block_manager.find_onboard(seq, len(hits))
        while onboard and not self._block_manager.can_admit(
            seq, hits, self._num_new(seq, len(hits) + len(onboard), budget), len(onboard)
        ):
            onboard.pop()
        return onboard
