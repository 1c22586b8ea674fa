"""Waiting on a running cluster: poll for the condition, never sleep a fixed time for it.

What a test waits for (a report reaching the router, an actor restarted) takes as long as
the machine's load makes it: a fixed sleep is either too short on a busy machine or too
long on an idle one. wait_until asks again every `interval` until the condition holds,
and fails naming what never happened."""

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(
    check: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.25
) -> T:
    """check()'s first truthy value, asked every `interval` seconds; after `timeout`
    seconds without one, the test fails saying `what` never happened and check()'s last
    answer."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s (last: {value!r:.2000})")
        time.sleep(interval)
    return value
