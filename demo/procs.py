"""The demo's processes: start a child with its log, stop it (SIGTERM, then SIGKILL), run a tool to the
end, wait on a condition, and a stop signal that unwinds like Ctrl-C.

SIGTERM stops a run as Ctrl-C does (``install_stop_handlers``): the signal raises :class:`Stopped` (a
KeyboardInterrupt) in the main thread, so every ``with``/``finally`` on the way out runs; starting a
process and recording it (demo.loop.Loop's processes, run_tool's child) happens ``uninterrupted``, so no
process is started that the way out does not know about. Standard library only (tests share it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, TypeVar

REPO = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 20.0

T = TypeVar("T")


class LoopError(RuntimeError):
    """A step of the loop failed; the message says which and why (with the tail of the process log)."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived (``install_stop_handlers``); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_hold = {"depth": 0, "pending": 0}  # uninterrupted() sections open, and a signal that arrived in one


def _on_stop_signal(signum: int, frame: Optional[FrameType]) -> None:
    del frame
    for sig in (signal.SIGTERM, signal.SIGINT):  # once: a second signal must not cut the way out short
        signal.signal(sig, signal.SIG_IGN)
    if _hold["depth"]:
        _hold["pending"] = signum  # raised when the section ends
        return
    raise Stopped(signum)


def install_stop_handlers() -> None:
    """SIGTERM and SIGINT raise Stopped in the main thread (once; later ones are ignored)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_stop_signal)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A stop signal arriving inside waits until the section is over (start a process and record it)."""
    _hold["depth"] += 1
    try:
        yield
    finally:
        _hold["depth"] -= 1
        signum = _hold["pending"]
        if not _hold["depth"] and signum:
            _hold["pending"] = 0
            raise Stopped(signum)


def wait_for(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: Optional[str] = None) -> T:
    """Poll ``cond`` until it returns something truthy; return it. AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last: T = cond()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)
        last = cond()
    return last


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return False


def child_env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1", PYTHONUNBUFFERED="1")


class Proc:
    """A child process with its log file; ``stop()`` = SIGTERM, wait, SIGKILL as a last resort."""

    def __init__(self, name: str, argv: List[str], log: Path, env: Optional[Mapping[str, str]] = None) -> None:
        self.name, self.argv, self.log = name, argv, log
        self._fh = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(argv, cwd=str(REPO), env=dict(child_env(), **(env or {})), stdout=self._fh,
                                      stderr=subprocess.STDOUT)
        self.killed = False

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def running(self) -> bool:
        return self.popen.poll() is None

    def check_running(self) -> None:
        if not self.running():
            text = tail(self.log)
            last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "(empty log)")
            raise LoopError(f"{self.name} exited with code {self.popen.returncode}: {last.strip()} (log {self.log})"
                            f"\n{text}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.popen.kill()
                self.popen.wait(5)
        self._fh.close()
        return int(self.popen.returncode)


def run_tool(argv: Sequence[str], log: Path, timeout: float = 900.0,
             secret: bool = False) -> subprocess.CompletedProcess:
    """Run one of our commands to completion (``python -m trainer ...``), appending its output to ``log``
    (``secret``: its output holds a secret, e.g. a new token, and stays out of the log).

    A non-zero exit raises LoopError with the command's last line (its one-line error)."""
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(argv) + "\n").encode())
        fh.flush()
        proc: Optional[subprocess.Popen] = None
        try:
            with uninterrupted():
                proc = subprocess.Popen(list(argv), cwd=str(REPO), env=child_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
            out, _ = proc.communicate(timeout=timeout)
        except BaseException:  # a stop signal, a timeout: the tool goes with us
            if proc is not None:
                proc.kill()
                proc.communicate()
            raise
        r = subprocess.CompletedProcess(list(argv), int(proc.returncode), out, None)
        fh.write(b"(output not logged: it holds a secret)\n" if secret and r.returncode == 0 else r.stdout)
    if r.returncode != 0:
        text = r.stdout.decode(errors="replace")
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "(no output)")
        raise LoopError(f"`{' '.join(argv[2:4])}` exited {r.returncode}: {last.strip()} (log {log})")
    return r
