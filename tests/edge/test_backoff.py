"""The one reconnect backoff rule (MQTT and live sources): doubling, capped, reset only when stable."""

from __future__ import annotations

from proto.backoff import HISTORY, Backoff


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_doubles_up_to_the_cap_and_resets_only_after_a_stable_link() -> None:
    clock = Clock()
    b = Backoff(0.5, 3.0, stable_s=10.0, clock=clock)
    assert [b.next() for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]
    b.up()
    clock.t += 9.9
    assert not b.stable() and b.next() == 3.0      # dropped before it was stable: no reset
    b.up()
    clock.t += 10.0
    assert b.stable() and b.next() == 0.5          # stable: starts over
    assert not b.stable()                          # down again (next() was called)
    b.reset()
    assert b.next() == 0.5
    assert list(b.history) == [0.5, 1.0, 2.0, 3.0, 3.0, 0.5, 0.5] and b.history.maxlen == HISTORY
