"""Helpers shared by the engine tests."""

import random


def make_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """length random token ids, above the special ones."""
    rng = random.Random(seed)
    return [rng.randrange(16, vocab_size) for _ in range(length)]
