"""Holding a shard's lease while a worker publishes it: renewals off the event loop,
database errors retried, and the moment the lease is lost.

`LeaseKeeper` renews the lease from a thread of its own, with every progress report
(stored with the renewal) and at least every third of the lease's TTL, so neither a slow
database nor a cut connection ever blocks the shard's event loop. A renewal is one fenced
conditional UPDATE (`ShardStore.progress` with the lease's token), and its outcome
decides:

- it changed the row: the lease holds for another TTL;
- it changed nothing: another token owns the shard (a takeover) or the shard was decided
  without this worker: the lease is lost;
- it raised a transient database error (connection cut, server restart, a locked SQLite
  file): retried with capped exponential backoff and full jitter, each failure logged.
  The lease counts as lost only once its last confirmed expiry has passed while renewals
  kept failing (or one hung that long), since from then on another worker may take the
  shard over.

Once lost, `lost()` returns the `LeaseLost` that `expand_shard` polls to cancel the
shard (its checkpoint stays for the new owner); every fenced write of the stale token is
refused by the registry anyway. The keeper is also the `CommitFence` of `expand_shard`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.exc import (
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from maga_tasks.registry import LeaseLost, Registry, RegistryUnavailable, utc_now

log = logging.getLogger(__name__)

# Failures worth another try: the database or the way to it, not the statement.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout, RegistryUnavailable)


class LeaseKeeper:
    """Keeps lease `token` of `owner` on one shard alive until `close()`; use it as a
    context manager. Pass it to `expand_shard` as both `progress` and `fence`."""

    def __init__(
        self,
        registry: Registry,
        recipe_id: str,
        shard: str,
        owner: str,
        token: int,
        ttl_s: float,
        *,
        forward: Callable[[dict], None] | None = None,
        renew_every_s: float | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 10.0,
    ):
        self.registry, self.recipe_id, self.shard = registry, recipe_id, shard
        self.owner, self.token, self.ttl_s = owner, token, ttl_s
        self.forward = forward
        self.renew_every_s = renew_every_s or ttl_s / 3
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.renewals = 0
        self.failed_renewals = 0
        self.committed_checksum: str | None = None  # set once the registry accepted this lease's commit
        self._expires = time.monotonic() + ttl_s  # the lease was just taken
        self._report: dict | None = None
        self._report_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._lost: LeaseLost | None = None
        self._renewing = False  # a renewal is waiting for the registry
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"LeaseKeeper({self.shard!r}, owner={self.owner!r}, token={self.token})"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> LeaseKeeper:
        """Start renewing in the background; returns the keeper."""
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.shard}", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop renewing, before the shard is decided (register, quarantine, failure end
        the lease itself); waits for a renewal under way. Safe to call again."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- what the shard asks ----------------------------------------------------------

    def __call__(self, snapshot: dict) -> None:
        """Progress report of `expand_shard`, on its event loop: handed to the renewal
        thread, never waits for the database."""
        counters = dict(snapshot)
        counters.setdefault("documents", snapshot.get("documents_done", 0))
        with self._report_lock:
            self._report = counters
        self._wake.set()
        if self.forward is not None:
            self.forward(snapshot)

    def lost(self) -> LeaseLost | None:
        if self._lost is None and self._renewing and time.monotonic() > self._expires:
            self._lose("it expired while a renewal was still waiting for the registry")
        return self._lost

    def advance(self, status: str, counters: dict | None = None) -> None:
        """Move the shard to `status` (a working state) under this lease; `LeaseLost`
        when the token no longer holds it."""
        self._raise_if_lost()
        if not self.registry.progress(
            self.recipe_id, self.shard, self.owner, token=self.token, status=status, counters=counters,
            ttl_s=self.ttl_s,
        ):
            raise self._lose(f"it cannot move to {status}")

    def record_commit(self, checksum: str) -> None:
        self._raise_if_lost()
        try:
            self.registry.record_commit(self.recipe_id, self.shard, self.token, checksum)
        except LeaseLost as error:
            self._lose(str(error))
            raise
        self.committed_checksum = checksum

    def holds(self) -> bool:
        if self._lost is not None:
            return False
        try:
            return self.registry.progress(self.recipe_id, self.shard, self.owner, token=self.token)
        except TRANSIENT_DB_ERRORS as error:
            log.warning("shard %s: cannot tell whether lease %d still holds: %s", self.shard, self.token, error)
            return False

    # -- renewals ----------------------------------------------------------------------

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise self._lost

    def _lose(self, why: str) -> LeaseLost:
        if self._lost is None:
            self._lost = LeaseLost(f"shard {self.shard}: lease {self.token} of {self.owner} is lost: {why}")
            log.warning("%s; this worker stops and leaves the shard to the owner", self._lost)
        return self._lost

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.renew_every_s)
            self._wake.clear()
            if self._closing.is_set() or not self._renew():
                return

    def _take_report(self) -> dict | None:
        with self._report_lock:
            report, self._report = self._report, None
        return report

    def _keep_report(self, report: dict | None) -> None:
        """Put back a report whose write failed, unless a newer one came meanwhile."""
        with self._report_lock:
            if self._report is None:
                self._report = report

    def _renewal(self, report: dict | None) -> bool:
        """The fenced UPDATE itself; `lost()` watches how long it takes."""
        self._renewing = True
        try:
            return self.registry.progress(
                self.recipe_id, self.shard, self.owner, token=self.token, counters=report, ttl_s=self.ttl_s
            )
        finally:
            self._renewing = False

    def _renew(self) -> bool:
        """One renewal, retried through transient database errors; False once lost."""
        failures = 0
        while not self._closing.is_set():
            report = self._take_report()
            started = time.monotonic()
            try:
                held = self._renewal(report)
            except TRANSIENT_DB_ERRORS as error:
                self._keep_report(report)
                failures += 1
                self.failed_renewals += 1
                left = self._expires - time.monotonic()
                if left <= 0:
                    self._lose(f"it expired while renewals kept failing ({failures} tries; last: {_brief(error)})")
                    return False
                delay = min(random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (failures - 1))), left)
                log.warning(
                    "shard %s: lease renewal failed (%s); try %d in %.1fs, the lease holds %.0fs more",
                    self.shard, _brief(error), failures + 1, delay, left,
                )
                self._closing.wait(delay)
                continue
            except SQLAlchemyError as error:  # not the connection: the statement itself cannot work
                log.exception("shard %s: lease renewal cannot work", self.shard)
                self._lose(f"renewal failed: {_brief(error)}")
                return False
            if not held:
                self._lose(f"another lease took it over or it was decided ({self._current_holder()})")
                return False
            self._expires = started + self.ttl_s
            self.renewals += 1
            if failures:
                log.info("shard %s: lease renewed after %d failed tries", self.shard, failures)
            return True
        return True

    def _current_holder(self) -> str:
        try:
            row = self.registry.shard(self.recipe_id, self.shard) or {}
        except (SQLAlchemyError, RegistryUnavailable):
            return "the registry cannot say who holds it now"
        return f"now {row.get('status')}, token {row.get('lease_token')}, owner {row.get('lease_owner')}"


def lease_within(
    registry: Registry, recipe_id: str, shard: str, source_uri: str, owner: str, ttl_s: float, *, force: bool,
    wait_s: float,
) -> int | None:
    """The lease's token, waiting up to `wait_s` for another owner's lease to expire
    (None when it stays held, or the shard was decided meanwhile)."""
    deadline = time.monotonic() + wait_s
    waited_for = None
    while True:
        token = registry.lease(recipe_id, shard, source_uri, owner, ttl_s, force=force)
        left = deadline - time.monotonic()
        if token is not None or left <= 0:
            return token
        row = registry.shard(recipe_id, shard) or {}
        if row.get("status") in ("registered", "quarantined") or not row.get("lease_expires_at"):
            return None
        expires_in = (datetime.fromisoformat(row["lease_expires_at"]) - utc_now()).total_seconds()
        if row.get("lease_owner") != waited_for:
            waited_for = row.get("lease_owner")
            log.info("shard %s is leased by %s for %.0fs more; waiting up to %.0fs for it", shard, waited_for,
                     expires_in, left)
        time.sleep(min(max(expires_in + 0.1, 0.1), 5.0, left))


def _brief(error: BaseException) -> str:
    """The first line of a database error (SQLAlchemy appends the statement and a link)."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
