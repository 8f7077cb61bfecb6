"""The shard store: leases, progress and the outcome of every shard once planned (recipes
and planning: `planned.py`), each change of hands written to the audit log
(`shard_events`).

Exactly-once publication rests on three statements, each atomic on both backends:
- `lease`: one conditional UPDATE; of two racing workers exactly one changes the row,
  and it gets the shard's next fencing token.
- `register`: one conditional UPDATE; a second call with the same checksum changes
  nothing, with another checksum it raises `RegistryConflict`.
- `quarantine`/`mark_failed`: conditional UPDATEs that never touch a registered shard.

Fencing: the lease holder's writes (`progress`, `release`, `record_commit`, `register`,
`quarantine`, `mark_failed`) carry its token and are conditional on it
(`... AND lease_token = :token`), so a worker whose lease was taken over changes
nothing; its `record_commit`/`register`/`quarantine` raise `LeaseLost`. Without a token
(an operator's command) they only act while no live lease holds the shard.

Lease expiry uses the workers' clocks; keep them in sync (NTP) and leases long compared
with any skew.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection

from maga_tasks.data.fidelity_rates import FIDELITY_COUNTS
from maga_tasks.redaction import clean_text
from maga_tasks.registry import queries
from maga_tasks.registry.db import from_json, iso, to_json, utc_now
from maga_tasks.registry.errors import LeaseLost, RegistryConflict, RegistryError, ShardBusy
from maga_tasks.registry.planned import PlanStore
from maga_tasks.registry.queries import COUNTERS, WORKING_STATUSES

if TYPE_CHECKING:
    from maga_tasks.data.outcome import ShardResult

log = logging.getLogger(__name__)

# Free text the registry keeps (an error, a quarantine reason, an event's detail, the
# observed values of failed expectations) is redacted, stripped of NUL and control
# characters (PostgreSQL refuses NUL in text; a terminal obeys escape sequences) and cut
# to this many characters: a server's error body is untrusted and unbounded.
MAX_STORED_TEXT = 2000


def _stored(value: Any) -> Any:
    """`value` as the registry keeps free text (`clean_text`), inside lists and dicts too."""
    if isinstance(value, str):
        return clean_text(value, MAX_STORED_TEXT)
    if isinstance(value, dict):
        return {key: _stored(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stored(item) for item in value]
    return value


def _result_params(result: ShardResult) -> dict:
    """The bound parameters of a result's figures (`queries._RESULT_ASSIGNMENTS`)."""
    return {
        "uri": result.source_uri,
        "data_uri": result.data_uri,
        "rejected_uri": result.rejected_uri,
        "documents": int(result.documents),
        "accepted": int(result.accepted),
        "rejected": int(result.rejected),
        "requests": int(result.requests),
        "prompt_tokens": int(result.prompt_tokens),
        "completion_tokens": int(result.completion_tokens),
        "source_chars": int(result.source_chars),
        "output_chars": int(result.output_chars),
        "ratio": float(result.expansion_ratio),
        "reasons": to_json(dict(sorted(result.rejects_by_reason.items()))),
        "source_identity": result.source_identity,
    } | {name: int(getattr(result, name)) for name in FIDELITY_COUNTS}


def _insert_planned(conn: Connection, recipe_id: str, shard: str, source_uri: str, now: str) -> None:
    conn.execute(queries.PLAN_SHARD, {"rid": recipe_id, "shard": shard, "uri": source_uri, "now": now})


def _event(conn: Connection, recipe_id: str, shard: str, name: str, owner: str | None = None, **detail) -> None:
    """Append to the audit log, in the transaction of the change it records."""
    conn.execute(
        queries.INSERT_EVENT,
        {
            "id": uuid.uuid4().hex,
            "rid": recipe_id,
            "shard": shard,
            "event": name,
            "owner": owner,
            "detail": to_json(_stored(detail)) if detail else None,
            "at": iso(utc_now()),
        },
    )


def _add_to_totals(conn: Connection, recipe_id: str, shard: str) -> None:
    """Add a shard just registered to its recipe's running totals and tallies (in the
    registering transaction, so they are exact: registered is a final status)."""
    params = {"rid": recipe_id, "shard": shard}
    conn.execute(queries.ADD_TO_TOTALS, params)
    reasons_json, labels_json = conn.execute(queries.SHARD_TALLIES, params).one()
    labels = from_json(labels_json) or {}
    tallies = [("reason", reason, count) for reason, count in (from_json(reasons_json) or {}).items()]
    for kind, key in (("genre", "genres"), ("audience", "audiences")):
        tallies += [(kind, label, count) for label, count in labels.get(key) or []]
    if tallies:
        conn.execute(
            queries.ADD_TO_TALLY,
            [{"rid": recipe_id, "kind": kind, "label": label, "total": int(count)} for kind, label, count in tallies],
        )


def _refused(conn: Connection, recipe_id: str, shard: str, token: int | None, action: str):
    """Why a fenced (`token`) or unleased (None) write changed nothing: raises
    `LeaseLost`, `ShardBusy` or `RegistryError`, and returns the shard's row when the
    reason is that it is registered (for that token, or without one), which the caller
    judges."""
    row = conn.execute(queries.SHARD_FENCE, {"rid": recipe_id, "shard": shard}).one_or_none()
    name = f"shard {shard!r} of {recipe_id}"
    if row is None:
        raise RegistryError(f"unknown {name}")
    holder = f", leased by {row.lease_owner}" if row.lease_owner else ""
    if token is not None and int(row.lease_token) != token:
        raise LeaseLost(
            f"cannot {action} {name}: lease token {token} is stale, the shard is at token {row.lease_token}"
            f" ({row.status}{holder})"
        )
    if row.status == "registered":
        return row
    if token is not None:
        raise LeaseLost(f"cannot {action} {name}: lease token {token} no longer holds it ({row.status})")
    raise ShardBusy(f"cannot {action} {name}: it is leased by {row.lease_owner} until {row.lease_expires_at}")


class ShardStore(PlanStore):
    """Every write to the registry's shards, events and quality results once a shard is
    planned (recipes and planning: `PlanStore`)."""

    # -- leases -----------------------------------------------------------------------

    def lease(
        self,
        recipe_id: str,
        shard: str,
        source_uri: str,
        owner: str,
        ttl_s: float,
        *,
        force: bool = False,
    ) -> int | None:
        """Take the shard for `owner` for `ttl_s` seconds; its fencing token when taken
        (an int >= 1, larger than any earlier lease of the shard), else None.

        Free, expired and own leases can be taken; a registered shard never; a
        quarantined one only with `force`. Exactly one of several racing callers wins.
        """
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = utc_now()
        params = {
            "rid": recipe_id,
            "shard": shard,
            "owner": owner,
            "now": iso(now),
            "expires": iso(now + timedelta(seconds=ttl_s)),
        }
        with self.db.write() as conn:
            _insert_planned(conn, recipe_id, shard, source_uri, params["now"])
            previous = conn.execute(queries.SHARD_LEASE, params).one()
            if not conn.execute(queries.lease(force=force), params).rowcount:
                return None
            # Read in the transaction that took it: nobody else can have moved it on.
            token = int(conn.execute(queries.SHARD_LEASE, params).one().lease_token)
            takeover = previous.lease_owner not in (None, owner)
            _event(
                conn,
                recipe_id,
                shard,
                "takeover" if takeover else "lease",
                owner,
                ttl_s=ttl_s,
                token=token,
                **({"previous_owner": previous.lease_owner} if takeover else {}),
            )
        return token

    def release(self, recipe_id: str, shard: str, owner: str, *, token: int) -> bool:
        """Give the lease back (work not finished); the shard is free for the next run.
        False when `owner` no longer holds lease `token`."""
        now = iso(utc_now())
        with self.db.write() as conn:
            released = conn.execute(
                queries.RELEASE, {"rid": recipe_id, "shard": shard, "owner": owner, "token": token, "now": now}
            ).rowcount
            if released:
                _event(conn, recipe_id, shard, "release", owner)
        return bool(released)

    def progress(
        self,
        recipe_id: str,
        shard: str,
        owner: str,
        *,
        token: int,
        status: str | None = None,
        counters: dict | None = None,
        ttl_s: float | None = None,
    ) -> bool:
        """Heartbeat of the lease holder: store its progress report, move the status
        forward, extend the lease. False when `owner` no longer holds lease `token` (a
        takeover since, or the shard left the working states)."""
        if status is not None and status not in WORKING_STATUSES:
            raise ValueError(f"progress status must be one of {WORKING_STATUSES}, not {status!r}")
        now = utc_now()
        params: dict[str, Any] = {"rid": recipe_id, "shard": shard, "owner": owner, "token": token, "now": iso(now)}
        figures: dict[str, int] = {}
        if status is not None:
            params["status"] = status
        if counters is not None:
            params["progress"] = to_json(_stored(counters))  # names endpoints, which may carry a password
            for name in COUNTERS:
                value = counters.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    figures[name] = int(value)
        if ttl_s is not None:
            params["expires"] = iso(now + timedelta(seconds=ttl_s))
        statement = queries.progress(
            status=status is not None,
            counters=None if counters is None else figures,
            extend_lease=ttl_s is not None,
        )
        with self.db.write() as conn:
            changed = conn.execute(statement, params | figures).rowcount
        return bool(changed)

    # -- outcomes ----------------------------------------------------------------------

    def register(
        self,
        recipe_id: str,
        shard: str,
        result: ShardResult,
        checksum: str,
        *,
        docs_uri: str | None = None,
        label_summary: dict | None = None,
        token: int | None = None,
    ) -> bool:
        """Publish a validated shard. True when registered now; False when it already
        was with this checksum (a no-op). Another checksum raises `RegistryConflict`.

        With `token` (the lease holder's) it is fenced: a stale token raises `LeaseLost`
        and changes nothing. Without, it acts only while no live lease holds the shard
        (`ShardBusy`)."""
        if not checksum:
            raise ValueError("a checksum is required to register a shard")
        now = iso(utc_now())
        params = _result_params(result) | {
            "rid": recipe_id,
            "shard": shard,
            "checksum": checksum,
            "docs_uri": docs_uri,
            "labels": to_json(label_summary),
            "now": now,
            "seconds": float(result.seconds) if result.seconds else None,
            "token": token,
        }
        with self.db.write() as conn:
            _insert_planned(conn, recipe_id, shard, result.source_uri, now)
            changed = conn.execute(queries.register(fenced=token is not None), params).rowcount
            if changed:
                _add_to_totals(conn, recipe_id, shard)
                _event(conn, recipe_id, shard, "register", None, checksum=checksum, token=token)
                return True
            registered = _refused(conn, recipe_id, shard, token, "register").checksum
        if registered != checksum:
            raise RegistryConflict(
                f"shard {shard!r} of {recipe_id} is registered with checksum {registered},"
                f" refusing different content {checksum}"
            )
        return False

    def record_commit(self, recipe_id: str, shard: str, token: int, checksum: str) -> None:
        """The lease holder's commit, before any file of it is published: the checksum of
        the files it staged under `token` (`ShardPaths.staged`), which whoever holds the
        lease from now on publishes. A stale token raises `LeaseLost`: that worker must
        not publish anything."""
        params = {"rid": recipe_id, "shard": shard, "token": token, "checksum": checksum, "now": iso(utc_now())}
        with self.db.write() as conn:
            if not conn.execute(queries.RECORD_COMMIT, params).rowcount:
                _refused(conn, recipe_id, shard, token, "commit")
                raise RegistryConflict(f"cannot commit shard {shard!r} of {recipe_id}: it is registered")
            _event(conn, recipe_id, shard, "commit", None, token=token, checksum=checksum)

    def quarantine(
        self,
        recipe_id: str,
        shard: str,
        reason: str,
        failed_expectations: list | None = None,
        *,
        source_uri: str | None = None,
        result: ShardResult | None = None,
        checksum: str | None = None,
        docs_uri: str | None = None,
        token: int | None = None,
    ) -> None:
        """Hold a shard back from publication, with why. A registered shard is never
        quarantined (`RegistryConflict`); publication is final for a recipe. Fenced by
        `token` like `register` (`LeaseLost`, or `ShardBusy` without a token)."""
        now = iso(utc_now())
        params: dict[str, Any] = {
            "rid": recipe_id,
            "shard": shard,
            "reason": _stored(reason),
            "failed": to_json(_stored(failed_expectations or [])),
            "checksum": checksum,
            "docs_uri": docs_uri,
            "token": token,
            "now": now,
        }
        if result is not None:
            params |= _result_params(result)
        with self.db.write() as conn:
            uri = source_uri or (result.source_uri if result is not None else None)
            if uri:
                _insert_planned(conn, recipe_id, shard, uri, now)
            statement = queries.quarantine(with_result=result is not None, fenced=token is not None)
            if not conn.execute(statement, params).rowcount:
                _refused(conn, recipe_id, shard, token, "quarantine")
                raise RegistryConflict(f"cannot quarantine shard {shard!r} of {recipe_id}: it is registered")
            _event(conn, recipe_id, shard, "quarantine", None, reason=reason, token=token)
        log.warning("registry: quarantined %s/%s: %s", recipe_id, shard, params["reason"])

    def mark_failed(
        self, recipe_id: str, shard: str, error: str, *, owner: str | None = None, max_failures: int | None = 1,
        token: int | None = None,
    ) -> str | None:
        """Record a failed attempt and free the lease so a retry can take the shard.
        With `owner`, only that lease holder's attempt is marked; with `token`, only
        while that lease is the shard's current one (a stale worker marks nothing).
        Returns the shard's
        status: `failed` (for good) when this was at least its `max_failures`-th try,
        else `planned` (None for `max_failures`: a failure that is not the shard's own);
        None when nothing was marked (a registered shard is left alone)."""
        now = iso(utc_now())
        error = _stored(error)
        params = {"rid": recipe_id, "shard": shard, "error": error, "owner": owner, "now": now,
                  "max_failures": max_failures, "token": token}
        with self.db.write() as conn:
            marking = queries.mark_failed(by_owner=bool(owner), by_token=token is not None)
            changed = conn.execute(marking, params).rowcount
            if not changed:
                return None
            status = conn.execute(queries.SHARD_STATUS, params).scalar_one()
            _event(conn, recipe_id, shard, "fail", owner, error=error, final=status == "failed")
        return status

    def requeue(self, recipe_id: str, shard: str, *, moved_to: str | None = None) -> bool:
        """Put a quarantined or failed shard back to `planned` (False for any other
        status): the next run expands it afresh."""
        with self.db.write() as conn:
            changed = conn.execute(queries.REQUEUE, {"rid": recipe_id, "shard": shard, "now": iso(utc_now())}).rowcount
            if changed:
                _event(conn, recipe_id, shard, "requeue", None, moved_to=moved_to)
        return bool(changed)

    def record_quality(
        self,
        recipe_id: str,
        shard: str,
        suite: str,
        success: bool,
        statistics: dict | None = None,
        failed_expectations: list | None = None,
        docs_uri: str | None = None,
    ) -> str:
        """Keep one data-quality run of a shard; returns the result id."""
        result_id = uuid.uuid4().hex
        statistics = statistics or {}
        with self.db.write() as conn:
            conn.execute(
                queries.INSERT_QUALITY_RESULT,
                {
                    "id": result_id,
                    "rid": recipe_id,
                    "shard": shard,
                    "suite": suite,
                    "success": 1 if success else 0,
                    "evaluated": int(statistics.get("evaluated_expectations", 0) or 0),
                    "failed": int(statistics.get("unsuccessful_expectations", len(failed_expectations or [])) or 0),
                    "statistics": to_json(statistics),
                    "failed_expectations": to_json(_stored(failed_expectations or [])),
                    "docs_uri": docs_uri,
                    "at": iso(utc_now()),
                },
            )
        return result_id
