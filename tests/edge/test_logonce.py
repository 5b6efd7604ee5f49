"""The one "log the first of each kind, count the rest" rule."""

from __future__ import annotations

import logging

import pytest

from edge.logonce import OncePerKind


def test_first_of_each_kind_logged_the_rest_counted(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("edge.test_logonce")
    once = OncePerKind(log)
    with caplog.at_level(logging.DEBUG, logger="edge.test_logonce"):
        assert once.log("a", logging.WARNING, "a %d", 1)
        assert not once.log("a", logging.WARNING, "a %d", 2)
        assert once.log("b", logging.ERROR, "b %d", 1, exc_info=ValueError("boom"))
        assert once.logged() and once.counts() == {"a": 2, "b": 1}
        once.reset()  # the episode is over: the next of each kind is logged again, counts are kept
        assert not once.logged()
        assert once.log("a", logging.WARNING, "a %d", 3)
    levels = [(r.getMessage(), r.levelno) for r in caplog.records]
    assert levels == [("a 1", logging.WARNING), ("a 2", logging.DEBUG), ("b 1", logging.ERROR),
                      ("a 3", logging.WARNING)]
    assert caplog.records[2].exc_info is not None and once.counts() == {"a": 3, "b": 1}
