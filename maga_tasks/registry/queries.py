"""Every SQL statement the registry runs, as SQLAlchemy `text()` with bound parameters,
and the shard statuses and counters that statements and callers share.

Statements are portable across SQLite and PostgreSQL. Where one depends on what the
caller asks (filters, which columns a progress report sets), a function here builds it
from fixed fragments and the names of this module; values always travel as bound
parameters. Only the SQLite connection pragmas stay with the engine setup in `db.py`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import bindparam, text
from sqlalchemy.sql.elements import TextClause

from maga_tasks.data.fidelity_rates import FIDELITY_COUNTS

STATUSES = (
    "planned",
    "leased",
    "expanding",
    "committed",
    "validated",
    "registered",
    "quarantined",
    "failed",
)
# States a worker may report while it holds the lease.
WORKING_STATUSES = ("leased", "expanding", "committed", "validated")
# Shard counters: set by progress reports and results, summed by totals.
COUNTERS = (
    "documents",
    "accepted",
    "rejected",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "source_chars",
    "output_chars",
)


def _sql_list(names: Sequence[str]) -> str:
    """`('a', 'b')` for an `IN`, from the fixed names of this module."""
    return "(" + ", ".join(f"'{name}'" for name in names) + ")"


# -- schema_version ----------------------------------------------------------------------

APPLIED_MIGRATIONS = text("SELECT version, checksum FROM schema_version")
# PostgreSQL: a transaction advisory lock per schema, released at commit.
LOCK_SCHEMA = text("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.maga_registry'))")
RECORD_MIGRATION = text(
    "INSERT INTO schema_version (version, name, checksum, applied_at)"
    " VALUES (:version, :name, :checksum, :at)"
)

# -- recipes -----------------------------------------------------------------------------

INSERT_RECIPE = text(
    "INSERT INTO recipes (recipe_id, name, prompt_version, model, pairs_per_document,"
    " recipe_yaml, created_at) VALUES (:rid, :name, :pv, :model, :pairs, :yaml, :at)"
    " ON CONFLICT (recipe_id) DO NOTHING"
)
RECIPES = text(
    "SELECT r.recipe_id, r.name, r.prompt_version, r.model, r.pairs_per_document,"
    " r.recipe_yaml, r.created_at,"
    " (SELECT COUNT(*) FROM shards s WHERE s.recipe_id = r.recipe_id) AS shards,"
    " (SELECT COUNT(*) FROM shards s WHERE s.recipe_id = r.recipe_id"
    "   AND s.status = 'registered') AS registered"
    " FROM recipes r ORDER BY r.created_at, r.recipe_id"
)
# Each recipe with shards, one primary-key lookup per recipe (a loose index scan), not
# a DISTINCT over every shard.
RECIPE_IDS = text(
    "WITH RECURSIVE ids (recipe_id) AS ("
    " SELECT MIN(recipe_id) FROM shards"
    " UNION ALL SELECT (SELECT MIN(s.recipe_id) FROM shards s WHERE s.recipe_id > ids.recipe_id)"
    " FROM ids WHERE ids.recipe_id IS NOT NULL)"
    " SELECT recipe_id FROM ids WHERE recipe_id IS NOT NULL ORDER BY recipe_id"
)

# -- one shard ---------------------------------------------------------------------------

_ONE_SHARD = " WHERE recipe_id = :rid AND shard = :shard"
# Fencing: the lease holder's writes need its token (`:token`) to be the shard's current
# one and the lease not given up; a stale token (a takeover since) changes nothing.
_FENCED = " AND lease_token = :token AND lease_owner IS NOT NULL"
# Writes without a lease (an operator's command) only while no live lease holds the shard.
_UNLEASED = " AND (lease_owner IS NULL OR lease_expires_at < :now)"
_HELD = _ONE_SHARD + " AND lease_owner = :owner" + _FENCED
_NOT_REGISTERED = _ONE_SHARD + " AND status <> 'registered'"
_FREE_LEASE = "lease_owner = NULL, lease_expires_at = NULL"
# The end of an attempt: the lease is free and the finish time set.
_FINISHED = _FREE_LEASE + ", finished_at = :now, updated_at = :now"
# The figures of a `ShardResult`, as bound by `store._result_params`.
_RESULT_ASSIGNMENTS = (
    "data_uri = :data_uri, rejected_uri = :rejected_uri, documents = :documents,"
    " accepted = :accepted, rejected = :rejected, requests = :requests,"
    " prompt_tokens = :prompt_tokens, completion_tokens = :completion_tokens,"
    " source_chars = :source_chars, output_chars = :output_chars,"
    " expansion_ratio = :ratio, rejects_by_reason = :reasons, source_identity = :source_identity, "
    + ", ".join(f"{name} = :{name}" for name in FIDELITY_COUNTS)
)

SHARD = text("SELECT * FROM shards" + _ONE_SHARD)
SHARD_STATUS = text("SELECT status FROM shards" + _ONE_SHARD)
SHARD_LEASE = text("SELECT lease_owner, lease_expires_at, lease_token FROM shards" + _ONE_SHARD)
# Why a fenced or unleased write changed nothing.
SHARD_FENCE = text(
    "SELECT status, checksum, lease_owner, lease_expires_at, lease_token FROM shards" + _ONE_SHARD
)
SHARDS_OF_RECIPE = text("SELECT shard, status, source_uri, attempts FROM shards WHERE recipe_id = :rid")

PLAN_SHARD = text(
    "INSERT INTO shards (recipe_id, shard, source_uri, status, created_at, updated_at)"
    " VALUES (:rid, :shard, :uri, 'planned', :now, :now)"
    " ON CONFLICT (recipe_id, shard) DO NOTHING"
)
RELEASE = text(
    f"UPDATE shards SET {_FREE_LEASE}, updated_at = :now,"
    " status = CASE WHEN status IN ('leased', 'expanding') THEN 'planned' ELSE status END"
    + _HELD
)
# The lease holder's commit: the checksum of the files it publishes next, under its token.
RECORD_COMMIT = text(
    "UPDATE shards SET status = 'committed', checksum = :checksum, commit_token = :token, updated_at = :now"
    + _ONE_SHARD + _FENCED + f" AND status IN {_sql_list(WORKING_STATUSES)}"
)


def register(*, fenced: bool) -> TextClause:
    """Publish an unregistered shard: by the holder of lease `:token` when `fenced`,
    else only while no live lease holds it."""
    return text(
        f"UPDATE shards SET status = 'registered', {_RESULT_ASSIGNMENTS},"
        " checksum = :checksum, docs_uri = COALESCE(:docs_uri, docs_uri),"
        " label_summary = COALESCE(:labels, label_summary),"
        " seconds = COALESCE(:seconds, seconds), last_error = NULL, failed_expectations = NULL,"
        f" registered_at = :now, {_FINISHED}"
        + _NOT_REGISTERED
        + (_FENCED if fenced else _UNLEASED)
    )


def lease(*, force: bool) -> TextClause:
    """Take a free, expired or own lease; never of a registered shard, of a quarantined
    one only with `force`. Every lease gets the next fencing token."""
    blocked = ("registered",) if force else ("registered", "quarantined")
    return text(
        "UPDATE shards SET status = 'leased', lease_owner = :owner, lease_token = lease_token + 1,"
        " lease_expires_at = :expires, attempts = attempts + 1, started_at = :now,"
        " finished_at = NULL, updated_at = :now"
        + _ONE_SHARD
        + f" AND status NOT IN {_sql_list(blocked)}"
        " AND (lease_owner IS NULL OR lease_owner = :owner OR lease_expires_at < :now)"
    )


def progress(*, status: bool, counters: Collection[str] | None, extend_lease: bool) -> TextClause:
    """The lease holder's heartbeat: `:status` when `status`, the `:progress` report and
    the `COUNTERS` named in `counters` (None: no report), `:expires` when `extend_lease`."""
    assignments = ["updated_at = :now"]
    if status:
        assignments.append("status = :status")
    if counters is not None:
        assignments.append("progress = :progress")
        assignments += [f"{name} = :{name}" for name in COUNTERS if name in counters]
    if extend_lease:
        assignments.append("lease_expires_at = :expires")
    return text(
        f"UPDATE shards SET {', '.join(assignments)}" + _HELD + f" AND status IN {_sql_list(WORKING_STATUSES)}"
    )


def quarantine(*, with_result: bool, fenced: bool) -> TextClause:
    """Hold back an unregistered shard; with its result's figures when `with_result`; by
    the holder of lease `:token` when `fenced`, else only while no live lease holds it.
    Its commit is judged: no longer one for a later lease to publish (`commit_token`)."""
    assignments = (
        "status = 'quarantined', last_error = :reason, failed_expectations = :failed, commit_token = NULL,"
        f" checksum = COALESCE(:checksum, checksum), docs_uri = COALESCE(:docs_uri, docs_uri), {_FINISHED}"
    )
    if with_result:
        assignments += ", " + _RESULT_ASSIGNMENTS
    return text(f"UPDATE shards SET {assignments}" + _NOT_REGISTERED + (_FENCED if fenced else _UNLEASED))


def mark_failed(*, by_owner: bool, by_token: bool = False) -> TextClause:
    """Fail an unregistered shard's attempt; only `:owner`'s when `by_owner`. The shard is
    `failed` for good when this try (counted by its lease) is at least its
    `:max_failures`-th, else back to `planned`; a NULL `:max_failures` never compares
    true, so such a failure is never final."""
    return text(
        "UPDATE shards SET status = CASE WHEN attempts >= :max_failures THEN 'failed' ELSE 'planned' END,"
        f" last_error = :error, {_FINISHED}"
        + _NOT_REGISTERED
        + (" AND lease_owner = :owner" if by_owner else "")
        + (_FENCED if by_token else "")
    )


# Back into the plan: only a quarantined or failed shard, which no worker holds; its
# tries start again from zero.
REQUEUE = text(
    f"UPDATE shards SET status = 'planned', attempts = 0, last_error = NULL, failed_expectations = NULL, {_FREE_LEASE},"
    " updated_at = :now" + _ONE_SHARD + " AND status IN ('quarantined', 'failed')"
)


# -- history: events and quality results ---------------------------------------------

INSERT_EVENT = text(
    "INSERT INTO shard_events (event_id, recipe_id, shard, event, owner, detail, created_at)"
    " VALUES (:id, :rid, :shard, :event, :owner, :detail, :at)"
)
INSERT_QUALITY_RESULT = text(
    "INSERT INTO quality_results (result_id, recipe_id, shard, suite, success,"
    " evaluated, failed, statistics, failed_expectations, docs_uri, created_at)"
    " VALUES (:id, :rid, :shard, :suite, :success, :evaluated, :failed,"
    " :statistics, :failed_expectations, :docs_uri, :at)"
)


def _of_shards(table: str, id_column: str, extra: str = "") -> TextClause:
    """Rows of `table` for the `:shards` of `:rid` (one query), oldest first."""
    return text(
        f"SELECT * FROM {table} WHERE recipe_id = :rid AND shard IN :shards{extra}"
        f" ORDER BY created_at, {id_column}"
    ).bindparams(bindparam("shards", expanding=True))


QUALITY_RESULTS_OF = _of_shards("quality_results", "result_id")
EVENTS_OF = _of_shards("shard_events", "event_id")
OWNER_EVENTS_OF = _of_shards("shard_events", "event_id", " AND owner IS NOT NULL")

# -- many shards -------------------------------------------------------------------------


def _filters(*, recipe_id: str | None = None, status: str | None = None) -> tuple[str, dict]:
    """A WHERE clause holding only the filters given, with its bound parameters."""
    clauses, params = [], {}
    if recipe_id is not None:
        clauses.append("recipe_id = :rid")
        params["rid"] = recipe_id
    if status is not None:
        clauses.append("status = :status")
        params["status"] = status
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def shards(
    *, recipe_id: str | None, status: str | None, newest_first: bool, limit: int | None
) -> tuple[TextClause, dict]:
    """Shards by name, or most recently updated first; at most `limit` of them."""
    where, params = _filters(recipe_id=recipe_id, status=status)
    # Ties broken newest-name first, in the order of index `shards_recipe_updated_shard`.
    order = "updated_at DESC, recipe_id DESC, shard DESC" if newest_first else "recipe_id, shard"
    sql = f"SELECT * FROM shards{where} ORDER BY {order}"
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = int(limit)
    return text(sql), params


# Shards that wait for a person: the dashboard lists them past its page of newest ones,
# `maga status` lists them under its totals.
ATTENTION_STATUSES = ("quarantined", "failed")


def attention_shards(*, recipe_id: str | None, limit: int) -> tuple[TextClause, dict]:
    """The `limit` most recently updated quarantined or failed shards (index
    `shards_recipe_status_updated_shard`)."""
    where, params = _filters(recipe_id=recipe_id)
    where += (" AND " if where else " WHERE ") + f"status IN {_sql_list(ATTENTION_STATUSES)}"
    params["limit"] = int(limit)
    sql = f"SELECT * FROM shards{where} ORDER BY updated_at DESC, recipe_id DESC, shard DESC LIMIT :limit"
    return text(sql), params


# Start of the registering try and its registration, most recently registered first.
RECENT_REGISTERED_TIMES = text(
    "SELECT started_at, registered_at FROM shards"
    " WHERE recipe_id = :rid AND status = 'registered' AND started_at IS NOT NULL AND registered_at IS NOT NULL"
    " ORDER BY registered_at DESC LIMIT :limit"
)


def status_counts(recipe_id: str | None) -> tuple[TextClause, dict]:
    """(status, shards) of every status in use."""
    where, params = _filters(recipe_id=recipe_id)
    return text(f"SELECT status, COUNT(*) FROM shards{where} GROUP BY status"), params


# -- running totals of registered shards (migrations 0006-0007, 0010) ----------------------

_TOTALS = ("shards", *COUNTERS, "seconds", *FIDELITY_COUNTS)
# A shard's figures, as it was just registered, added to its recipe's running totals
# (fidelity counts of a shard without them, migration 0010, add 0).
ADD_TO_TOTALS = text(
    f"INSERT INTO registered_totals (recipe_id, {', '.join(_TOTALS)})"
    f" SELECT recipe_id, 1, {', '.join(COUNTERS)}, COALESCE(seconds, 0),"
    f" {', '.join(f'COALESCE({name}, 0)' for name in FIDELITY_COUNTS)} FROM shards"
    " WHERE recipe_id = :rid AND shard = :shard"
    " ON CONFLICT (recipe_id) DO UPDATE SET "
    + ", ".join(f"{name} = registered_totals.{name} + excluded.{name}" for name in _TOTALS)
)
ADD_TO_TALLY = text(
    "INSERT INTO registered_tallies (recipe_id, kind, label, total) VALUES (:rid, :kind, :label, :total)"
    " ON CONFLICT (recipe_id, kind, label) DO UPDATE SET total = registered_tallies.total + excluded.total"
)
SHARD_TALLIES = text("SELECT rejects_by_reason, label_summary FROM shards WHERE recipe_id = :rid AND shard = :shard")


def registered_sums(recipe_id: str | None) -> tuple[TextClause, dict]:
    """One row: `shards`, the sum of each of `COUNTERS` and `seconds` over registered
    shards, from the running totals (a row per recipe)."""
    where, params = _filters(recipe_id=recipe_id)
    sums = ", ".join(f"COALESCE(SUM({name}), 0) AS {name}" for name in _TOTALS)
    return text(f"SELECT {sums} FROM registered_totals{where}"), params


def top_tallies(recipe_id: str | None, kind: str, limit: int | None) -> tuple[TextClause, dict]:
    """(label, total) of one kind of tally, largest first; at most `limit` (None: all).
    For one recipe, read in index order (`registered_tallies_top`)."""
    where, params = _filters(recipe_id=recipe_id)
    where += (" AND " if where else " WHERE ") + "kind = :kind"
    params["kind"] = kind
    if recipe_id is not None:
        sql = f"SELECT label, total FROM registered_tallies{where} ORDER BY total DESC, label"
    else:
        sql = (
            f"SELECT label, SUM(total) AS total FROM registered_tallies{where}"
            " GROUP BY label ORDER BY total DESC, label"
        )
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = int(limit)
    return text(sql), params
