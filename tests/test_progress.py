"""kvmesh.progress: drawn only on a terminal outside CI (or when forced), `\\r`-rewritten
lines on the stream, silent everywhere else."""

import io

import pytest

from kvmesh.progress import Progress, progress_enabled


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("CI", "KVMESH_PROGRESS", "TERM"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "stream, env, expected",
    [
        (io.StringIO(), {}, False),  # redirected: a file or a pipe
        (FakeTerminal(), {}, True),
        (FakeTerminal(), {"CI": "true"}, False),
        (FakeTerminal(), {"TERM": "dumb"}, False),
        (FakeTerminal(), {"KVMESH_PROGRESS": "0"}, False),
        (io.StringIO(), {"KVMESH_PROGRESS": "1"}, True),
        (io.StringIO(), {"KVMESH_PROGRESS": "1", "CI": "true"}, True),
    ],
)
def test_progress_enabled(clean_env, stream, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert progress_enabled(stream) is expected


def test_silent_when_not_a_terminal(clean_env):
    stream = io.StringIO()
    with Progress("loading weights", total=3, stream=stream) as progress:
        for _ in progress.track(range(3)):
            pass
    assert stream.getvalue() == ""


def test_silent_in_ci_even_on_a_terminal(clean_env):
    clean_env.setenv("CI", "1")
    stream = FakeTerminal()
    with Progress("warming up", stream=stream) as progress:
        progress.advance()
    assert stream.getvalue() == ""


def test_forced_draws_rewritten_lines_and_ends_the_last(clean_env):
    stream = io.StringIO()
    progress = Progress("loading weights", total=4, stream=stream, enabled=True)
    assert stream.getvalue() == "\rloading weights  0/4  0%  0.0s"
    items = list(progress.track(["a", "b", "c", "d"]))
    progress.close()
    progress.close()  # a second close draws nothing more
    out = stream.getvalue()
    assert items == ["a", "b", "c", "d"]
    assert progress.count == 4
    assert out.startswith("\r") and out.endswith("\n") and out.count("\n") == 1
    assert out.rsplit("\r", 1)[1].startswith("loading weights  4/4  100%  ")


@pytest.mark.parametrize(
    "total, advanced, line",
    [
        (None, 0, "starting a cluster"),  # no count: the label, then its seconds
        (None, 7, "starting a cluster  7  "),
        (10, 3, "starting a cluster  3/10  30%  "),
    ],
)
def test_final_line(total, advanced, line):
    stream = io.StringIO()
    with Progress("starting a cluster", total=total, stream=stream, enabled=True) as progress:
        progress.advance(advanced)
    final = stream.getvalue().rsplit("\r", 1)[1]
    assert final.startswith(line)
    assert final.rstrip("\n").endswith("s")
