"""Sampler: next tokens (and logprobs) from a batch of logits, one row per sequence.

Greedy rows take the argmax. Other rows divide by temperature, keep the top_k
logits and the smallest set of tokens whose probability reaches top_p, then draw
with the exponential race (argmax of p / E, E ~ Exp(1)), which is a draw from p.
A row with a seed draws its E from its own generator, so its samples do not depend
on what else shares the batch. Logprobs are of the model's raw distribution.
"""

from __future__ import annotations

import torch

from kvmesh.engine.sequence import Sequence
from kvmesh.params import MIN_TOP_P


class Sampler:
    def __init__(self, device: str, seed: int = 0) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Sample one token per row; fills each seq's `logprobs` when it asked for them."""
        params = [seq.params for seq in seqs]
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, seqs)
        if any(p.logprobs is not None for p in params):
            self._record_logprobs(logits, tokens, seqs)
        return tokens.tolist()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [seq.params for seq in seqs]
        temperature = torch.tensor(
            [1.0 if p.greedy else p.temperature for p in params], device=logits.device
        )
        scaled = logits / temperature.unsqueeze(1)
        top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
        if any(top_k):
            scaled = _apply_top_k(scaled, top_k)
        top_p = [max(p.top_p, MIN_TOP_P) for p in params]
        if any(p < 1.0 for p in top_p):
            scaled = _apply_top_p(scaled, torch.tensor(top_p, device=logits.device))
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for row, seq in enumerate(seqs):
            noise[row].exponential_(generator=self._generator_for(seq))
        sampled = (probs / noise).argmax(dim=-1)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def skip_draw(self, seq: Sequence, vocab_size: int) -> None:
        """Consume the draw a seeded sequence's first token took on another worker, so
        its later samples equal a single-process run."""
        if seq.params.seed is not None and not seq.params.greedy:
            torch.empty(vocab_size, device=self.device).exponential_(
                generator=self._generator_for(seq)
            )

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return seq.generator

    def _record_logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
    ) -> None:
        logprobs = logits.log_softmax(dim=-1)
        k = max(seq.params.logprobs or 0 for seq in seqs)
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        token_list = tokens.tolist()
        for row, seq in enumerate(seqs):
            if seq.logprobs is None:
                continue
            entry = {token_list[row]: chosen[row]}
            n = seq.params.logprobs
            if n:
                entry.update(
                    zip(top_ids[row, :n].tolist(), top_values[row, :n].tolist(), strict=True)
                )
            seq.logprobs.append(entry)


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    k = torch.tensor([k or logits.shape[-1] for k in top_k], device=logits.device)
    k = k.clamp(max=logits.shape[-1])
    sorted_logits = logits.sort(dim=-1, descending=True).values
    threshold = sorted_logits.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < threshold, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens ranked above it already reach top_p
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p.unsqueeze(1)
    drop_sorted[:, 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
