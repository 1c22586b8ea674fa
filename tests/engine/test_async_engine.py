"""AsyncEngine: concurrent asyncio streams equal the synchronous Engine's output."""

import asyncio

import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.engine.async_engine import AsyncEngine, EngineDeadError
from tests.prompts import random_prompts


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


async def collect(engine: AsyncEngine, prompt, params, request_id: str):
    ids, text, last = [], "", None
    async for out in engine.generate(prompt, params, request_id):
        ids += out.new_token_ids
        text += out.new_text
        last = out
    return ids, text, last


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=256)
    return [
        o.token_ids for o in engine.generate(random_prompts([(4, 120)] * 6, seed=11), greedy(12))
    ]


def test_concurrent_streams_equal_engine(tiny_model_dir, expected):
    async def main():
        engine = AsyncEngine(Engine.from_pretrained(tiny_model_dir, num_blocks=256))
        engine.start()
        prompts = random_prompts([(4, 120)] * 6, seed=11)
        results = await asyncio.gather(
            *(collect(engine, p, greedy(12), f"r{i}") for i, p in enumerate(prompts))
        )
        await engine.close()
        return results

    results = asyncio.run(main())
    assert [ids for ids, _, _ in results] == expected
    assert all(last.finished and last.text == text for _, text, last in results)


def test_bad_input_raises_and_leaving_early_aborts(tiny_model_dir):
    async def main():
        engine = AsyncEngine(Engine.from_pretrained(tiny_model_dir, num_blocks=64))
        engine.start()
        with pytest.raises(ValueError, match="prompt must not be empty"):
            await collect(engine, [], greedy(4), "bad")
        stream = engine.generate(random_prompts([(4, 120)], seed=3)[0], greedy(500), "long")
        await anext(stream)
        await stream.aclose()  # the client went away
        for _ in range(200):
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        free = engine.engine.pool.num_free_blocks
        await engine.close()
        with pytest.raises(EngineDeadError):
            await collect(engine, [5, 6], greedy(2), "late")
        return free

    assert asyncio.run(main()) == 64


@pytest.mark.parametrize("threads", [1, 3])
def test_the_engine_thread_computes_with_the_threads_asked_for(tiny_model_dir, threads):
    import torch

    async def main():
        engine = AsyncEngine(Engine.from_pretrained(tiny_model_dir, num_blocks=64), threads=threads)
        engine.start()
        inside = await engine.call(lambda e: torch.get_num_threads())
        ids, _, _ = await collect(engine, [5, 6, 7], greedy(3), "r")
        await engine.close()
        return inside, len(ids)

    assert asyncio.run(main()) == (threads, 3)
