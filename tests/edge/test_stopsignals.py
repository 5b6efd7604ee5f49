"""edge.stopsignals: the daemon's SIGTERM/SIGINT handler takes no lock; the work runs on a thread of its own.

The bug it replaces: the handler called Daemon.request_stop directly, i.e. Event.set() (and logging) in
the main thread between two bytecodes, possibly while that thread held the same Event's lock inside
Event.wait (wait_for_first_model waits on stop_requested): the daemon then hung for good. Here the main
thread holds a lock the work needs while a real signal arrives; a handler doing the work itself could
not get it."""

from __future__ import annotations

import os
import signal
import threading
from typing import List, Tuple

from edge.stopsignals import StopSignals
from tests.helpers.wait import wait_for

LOCK_WAIT_S = 2.0


def test_a_signal_arriving_while_the_main_thread_holds_a_lock_is_handled_once_it_is_released() -> None:
    held = threading.Lock()  # stands for Event's condition lock: not reentrant
    got: List[Tuple[str, str, bool]] = []

    def on_signal(name: str) -> None:
        took = held.acquire(timeout=LOCK_WAIT_S)  # in the handler itself this could never succeed
        if took:
            held.release()
        got.append((name, threading.current_thread().name, took))

    stops = StopSignals(on_signal).install()
    try:
        with held:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs in this thread, while it holds the lock
            for _ in range(1000):  # bytecodes enough for the handler to have run
                pass
        wait_for(lambda: got, 10, what="SIGTERM handled")
        os.kill(os.getpid(), signal.SIGINT)  # a second signal: handled too (the daemon then hurries)
        wait_for(lambda: len(got) == 2, 10, what="SIGINT handled")
    finally:
        stops.close()
    assert got == [("SIGTERM", "stop-signals", True), ("SIGINT", "stop-signals", True)]


def test_close_puts_the_previous_handlers_back_and_ends_its_thread() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stops = StopSignals(lambda name: None).install()
    assert signal.getsignal(signal.SIGTERM) == stops._handler  # noqa: SLF001 - installed
    stops.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert not any(t.name == "stop-signals" and t.is_alive() for t in threading.enumerate())
