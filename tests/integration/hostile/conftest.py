"""Fixtures of the hostile-edge cases."""

from __future__ import annotations

import pytest

from tests.support.hostile_servers import RecordingServer


@pytest.fixture
def hostile_server():
    """A host on loopback that records every request it gets (the tests assert it got none)."""
    with RecordingServer() as server:
        yield server
