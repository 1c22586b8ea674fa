"""The `kvmesh` command line, in process (click's CliRunner): log options before or after
the subcommand, the quick start, and `kvmesh chat`'s quitting."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmesh.cli import cli


@pytest.fixture
def configured(monkeypatch) -> list[tuple]:
    """The arguments of every kvmesh.log.configure call."""
    calls: list[tuple] = []
    monkeypatch.setattr("kvmesh.log.configure", lambda *args: calls.append(args))
    return calls


class FakeClient:
    """Stands in for kvmesh.client.Client: streams `pieces`, then raises `then`."""

    pieces = ["Hel", "lo"]
    then: BaseException | None = None

    def __init__(self, url, api_key=None) -> None:
        self.url = url

    def chat(self, messages, **params):
        for text in self.pieces:
            yield type("Piece", (), {"text": text})
        if self.then is not None:
            raise self.then


LOG_ARGS = [  # the command line, and what logging is configured with
    (["chat"], ("warning", False, None, "info")),
    (["--log-level", "debug", "chat"], ("debug", False, None, "info")),
    (["chat", "--log-level", "debug"], ("debug", False, None, "info")),
    (["--log-level", "error", "chat", "--log-level", "info"], ("info", False, None, "info")),
    (["-v", "chat"], ("info", False, None, "info")),
    (["chat", "-vv"], ("debug", False, None, "info")),
    (["-v", "chat", "-v"], ("debug", False, None, "info")),
    (
        ["chat", "--log-json", "--log-file", "x.log", "--log-file-level", "debug"],
        ("warning", True, Path("x.log"), "debug"),
    ),
]


@pytest.mark.parametrize(("args", "settings"), LOG_ARGS, ids=[" ".join(a) for a, _ in LOG_ARGS])
def test_log_options_go_before_or_after_the_subcommand(configured, args, settings):
    result = CliRunner().invoke(cli, args, input="")
    assert (result.exit_code, configured) == (0, [settings]), result.output


@pytest.mark.parametrize("args", [["--log-level", "warning"], ["-v"], ["--log-json"]])
def test_up_accepts_the_log_options_after_the_subcommand(args):
    result = CliRunner().invoke(cli, ["up", *args, "--help"])
    assert result.exit_code == 0, result.output


def test_the_quick_start_begins_with_kvmesh_up():
    result = CliRunner().invoke(cli, ["--help"])
    quick_start = result.output.split("Quick start")[1].splitlines()[1]
    assert quick_start.split("(")[0].strip() == 'kvmesh up --ask "Hello"'


def test_chat_says_how_to_quit_and_an_empty_line_quits(configured, monkeypatch):
    monkeypatch.setattr("kvmesh.client.Client", FakeClient)
    result = CliRunner().invoke(cli, ["chat", "--url", "http://127.0.0.1:1"], input="hi\n\n")
    assert (result.exit_code, result.stdout, result.stderr) == (
        0,
        "you> kvmesh> Hello\nyou> ",
        "chatting with http://127.0.0.1:1; an empty line, Ctrl-D or Ctrl-C quits\n",
    )


def test_ctrl_c_at_the_prompt_quits_without_aborted(configured, monkeypatch):
    def interrupted(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    result = CliRunner().invoke(cli, ["chat"])
    assert (result.exit_code, result.stdout) == (0, "\n")
    assert "Aborted" not in result.output


def test_ctrl_c_during_an_answer_stops_that_answer_only(configured, monkeypatch):
    monkeypatch.setattr("kvmesh.client.Client", FakeClient)
    monkeypatch.setattr(FakeClient, "then", KeyboardInterrupt())
    result = CliRunner().invoke(cli, ["chat"], input="hi\n\n")
    assert (result.exit_code, result.stdout) == (0, "you> kvmesh> Hello [stopped]\nyou> ")
