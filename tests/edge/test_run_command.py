"""proto.errors.run_command, the one error-to-exit-code mapping of kestrel-edge, kestrel-hub and kestrel-train
(Python 3.8 too): every failure is one line on stderr and an exit code."""

from __future__ import annotations

import errno
import os

import pytest

from edge.cli import update as updatecmd
from edge.errors import BrokerError
from proto.errors import (
    DEBUG_ENV,
    EXIT_ARTIFACT,
    EXIT_INTERRUPTED,
    EXIT_OTHER,
    EXIT_TRANSPORT,
    ConfigError,
    run_command,
)


def _raise(exc: BaseException):  # noqa: ANN202
    def body() -> int:
        raise exc
    return body


@pytest.mark.parametrize("exc, code, line", [
    (ConfigError("bad value"), EXIT_ARTIFACT, "cmd: error: bad value"),
    (BrokerError("broker down"), EXIT_TRANSPORT, "cmd: error: broker down"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/var/x"), EXIT_ARTIFACT,
     f"cmd: error: cannot access /var/x: {os.strerror(errno.ENOSPC)}; check the path, its permissions and free space"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "cmd: interrupted"),
])
def test_errors_are_one_line_and_an_exit_code(exc, code, line, capsys):
    assert run_command("cmd", _raise(exc)) == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_a_bug_is_one_line_unless_debug(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_command("cmd", _raise(ValueError("x" * 400 + "\nmore"))) == EXIT_OTHER
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("cmd: error: unexpected ValueError: " + "x" * 300 + " (a bug")
    with pytest.raises(ValueError):
        run_command("cmd", _raise(ValueError("y")), debug=True)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError):
        run_command("cmd", _raise(ValueError("y")))
    assert run_command("cmd", lambda: None) == 0 and run_command("cmd", lambda: 4) == 4


def test_edge_update_commands_take_debug(monkeypatch):
    bug = _raise(RuntimeError("bug"))
    monkeypatch.setattr(updatecmd, "run_status", lambda _args: bug())
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(RuntimeError, match="bug"):
        updatecmd.main(["status", "--debug"])
