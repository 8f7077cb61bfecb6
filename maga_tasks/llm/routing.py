"""Which endpoint a request goes to: rendezvous hashing over the usable endpoints, so the
requests of one document meet the same endpoint's prefix cache, and a retry goes to the
next endpoint in that document's order."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from maga_tasks.llm.endpoints import Endpoint


def rendezvous_choice(usable: Sequence[Endpoint], affinity: str, tried: set[str]) -> Endpoint | None:
    """The first endpoint in the `affinity` key's rendezvous order this request has not
    failed on yet (all of them again once it has failed on every one); None when none is
    usable."""
    fresh = [e for e in usable if e.url not in tried] or list(usable)
    if not fresh:
        return None
    if len(fresh) == 1:
        return fresh[0]
    return max(fresh, key=lambda e: hashlib.blake2b(f"{affinity}|{e.url}".encode(), digest_size=8).digest())
