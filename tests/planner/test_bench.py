"""`kvmesh bench planner`'s trace and attainment (the cluster runs are the command's)."""

from __future__ import annotations

import pytest

from kvmesh.bench.planner import attainment, planner_decisions, shifting_trace
from kvmesh.bench.trace import StreamRecord


def make_record(sent: float, chunks: list[tuple[float, int]]) -> StreamRecord:
    return StreamRecord(sent=sent, chunks=chunks)


def test_trace_shifts_long_chat_long():
    trace = shifting_trace(1000, 10.0, 2.0, 4.0, (400, 800), 4, (16, 64), 48, seed=3)
    phases = [[r for r in trace if k * 10 <= r.arrival_s < (k + 1) * 10] for k in range(3)]
    assert all(phases)  # none empty
    assert sum(len(p) for p in phases) == len(trace)
    assert all(400 <= len(r.prompt_token_ids) <= 800 and r.max_tokens == 4 for r in phases[0])
    assert all(16 <= len(r.prompt_token_ids) <= 64 and r.max_tokens == 48 for r in phases[1])
    assert all(400 <= len(r.prompt_token_ids) <= 800 and r.max_tokens == 4 for r in phases[2])
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    assert trace == shifting_trace(1000, 10.0, 2.0, 4.0, (400, 800), 4, (16, 64), 48, seed=3)


def test_attainment_counts_each_target():
    records = [
        make_record(0.0, [(0.1, 1), (0.2, 1), (0.3, 1)]),  # TTFT 0.1, ITL 0.1: both
        make_record(0.0, [(0.9, 1), (1.0, 1)]),  # TTFT 0.9 (miss), ITL 0.1
        make_record(0.0, [(0.2, 1), (0.8, 2)]),  # TTFT 0.2, ITL 0.3 (miss)
        make_record(0.0, [(0.3, 4)]),  # one chunk: no gaps, ITL 0
    ]
    result = attainment(records, ttft_target=0.5, itl_target=0.2)
    assert result["ttft_attainment"] == 0.75
    assert result["itl_attainment"] == 0.75
    assert result["both_attainment"] == 0.5
    assert result["ttft_max_s"] == pytest.approx(0.9)


def test_decisions_are_read_from_the_planner_metrics():
    text = (
        "# TYPE kvmesh_planner_decisions_total counter\n"
        'kvmesh_planner_decisions_total{action="hold",outcome="held"} 7.0\n'
        'kvmesh_planner_decisions_total{action="to_decode",outcome="switched"} 1.0\n'
        'kvmesh_planner_decisions_created{action="hold",outcome="held"} 1.7e9\n'
    )
    assert planner_decisions(text) == {"hold/held": 7.0, "to_decode/switched": 1.0}
