"""Random token-id prompts, the one helper every test that needs them uses: reproducible
from a seed, ids in [FIRST_ID, vocab_size) so none is a special token."""

import random
from collections.abc import Iterable

from kvmesh.gpu.tiny import VOCAB_SIZE

FIRST_ID = 16  # the tiny tokenizer numbers its special tokens first, all below this


def random_prompt(length: int, seed: int, vocab_size: int = VOCAB_SIZE) -> list[int]:
    """`length` random token ids."""
    return random_prompts([length], seed, vocab_size)[0]


def random_prompts(
    lengths: Iterable[int | tuple[int, int]], seed: int, vocab_size: int = VOCAB_SIZE
) -> list[list[int]]:
    """One prompt per entry of `lengths`, all from one seeded RNG, in order. An entry is a
    length, or a (min, max) range the same RNG draws the prompt's length from (inclusive):
    random_prompts([(4, 120)] * 6, seed=11) is six prompts of 4 to 120 tokens."""
    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        if isinstance(length, tuple):
            length = rng.randint(*length)
        prompts.append([rng.randrange(FIRST_ID, vocab_size) for _ in range(length)])
    return prompts
