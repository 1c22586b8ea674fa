"""Shared-memory segments: what a supervisor cleans up for a dead actor."""

import pytest

from kvmesh.kv.segment import SHM_DIR, available, unlink_segments_of

pytestmark = pytest.mark.skipif(not available(), reason="no /dev/shm")


def test_a_supervisor_unlinks_the_segments_of_a_dead_pid():
    mine = SHM_DIR / "kvmesh-a-999999999-0bad"
    other = SHM_DIR / "kvmesh-a-9999999990-0bad"  # another pid that starts alike
    mine.touch()
    other.touch()
    try:
        assert unlink_segments_of(999999999) == [mine.name]
        assert not mine.exists() and other.exists()
    finally:
        mine.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
