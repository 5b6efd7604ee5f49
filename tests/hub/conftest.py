"""Fixtures of the hub suites."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from proto import topics


@pytest.fixture(autouse=True)
def _no_announcement_left_behind(request: Any) -> Iterator[None]:
    """A hub publishes a retained HubAnnouncement on every connection; on the session's shared broker it
    would switch later tests' devices (delete_on = "auto") to waiting for receipts no hub sends. Cleared
    after every test that used that broker."""
    yield
    if "broker" in request.fixturenames:
        from tests.hub import publish_all
        b = request.getfixturevalue("broker")
        publish_all(b.host, b.port, [(topics.HUB_ANNOUNCE, b"")], retain=True)
