"""The official openai client, run on a host of the namespace harness (a subprocess under
`ip netns exec`): reads {"url", "model", "requests": [{"prompt", "max_tokens", "stream"}]}
as JSON on stdin, sends the requests one after another (or all at once with "parallel"),
and prints one JSON line per request: {"text"} or {"error": "<type>: <message>"}, with
"chunks" (text pieces received) and "ttft" (seconds to the first) for streams."""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai

PRINTING = threading.Lock()  # print() writes the line and its newline apart: threads interleave


def say(line: dict) -> None:
    with PRINTING:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


def send(client: openai.OpenAI, model: str, request: dict) -> dict:
    pieces: list[str] = []
    try:
        args = dict(
            model=model,
            prompt=request["prompt"],
            max_tokens=request["max_tokens"],
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        if request.get("stream"):
            start = time.perf_counter()
            ttft = None
            for chunk in client.completions.create(stream=True, **args):
                if chunk.choices:
                    pieces.append(chunk.choices[0].text)
                    if len(pieces) == 1:
                        ttft = time.perf_counter() - start
                        say({"started": request.get("id")})
            return {"text": "".join(pieces), "chunks": len(pieces), "ttft": ttft}
        return {"text": client.completions.create(**args).choices[0].text}
    except Exception as exc:  # reported to the test, which asserts on it
        return {"error": f"{type(exc).__name__}: {exc}", "chunks": len(pieces)}


def main() -> None:
    job = json.load(sys.stdin)
    client = openai.OpenAI(
        base_url=job["url"], api_key="unused", max_retries=0, timeout=job.get("timeout", 120)
    )
    requests = job["requests"]
    if job.get("parallel"):
        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(lambda r: send(client, job["model"], r), requests))
    else:
        results = [send(client, job["model"], r) for r in requests]
    for request, result in zip(requests, results, strict=True):
        say({"id": request.get("id"), **result})


if __name__ == "__main__":
    main()
