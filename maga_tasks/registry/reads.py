"""The registry's read model: shards, recipes, their quality results and audit trail, and
the totals behind the dashboard and `maga status` (with `format_totals`, its text).

Reads run in read-only transactions: on SQLite a deferred BEGIN, which does not take
the write lock that every write transaction holds from its start.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.sql.elements import TextClause

from maga_tasks.data.fidelity_rates import FIDELITY_COUNTS, fidelity_rates
from maga_tasks.redaction import clean_text, strip_control
from maga_tasks.registry import queries
from maga_tasks.registry.db import Database, row_dict
from maga_tasks.registry.errors import RegistryError
from maga_tasks.registry.queries import COUNTERS, STATUSES


@dataclass(frozen=True)
class PlanTriage:
    """Where each candidate shard of a plan stands: still to do, or left out and why."""

    # (source_uri, shard) still to do: never tried first, then by tries so far, each
    # group in the candidates' order.
    pending: list[tuple[str, str]]
    retried: frozenset[str]  # pending shards tried before
    registered: list[str]
    quarantined: list[str]  # wait for a person (requeue)
    failed: list[str]  # failed for good: out of the plan until requeued


_ATTENTION_FIELDS = ("recipe_id", "shard", "status", "attempts", "last_error", "updated_at")


def shard_dict(row) -> dict:
    """A shard row as a dict, with its fidelity rates (None where the counts are NULL:
    a shard registered before migration 0010, or not measured)."""
    shard = row_dict(row)
    return shard | fidelity_rates(shard)


class RegistryReads:
    """What the registry holds, as plain dicts (JSON columns decoded)."""

    def __init__(self, db: Database):
        self.db = db

    def recipes(self) -> list[dict]:
        """Every recipe with its shard counts, oldest first."""
        with self.db.read() as conn:
            rows = conn.execute(queries.RECIPES).all()
        return [row_dict(row) for row in rows]

    def recipe_ids(self) -> list[str]:
        """Every recipe with shards, stored recipe row or not (planning may come first)."""
        with self.db.read() as conn:
            return [row[0] for row in conn.execute(queries.RECIPE_IDS)]

    def shard(self, recipe_id: str, shard: str) -> dict | None:
        with self.db.read() as conn:
            row = conn.execute(queries.SHARD, {"rid": recipe_id, "shard": shard}).one_or_none()
        return shard_dict(row) if row is not None else None

    def shards(
        self, recipe_id: str | None = None, status: str | None = None, *, newest_first: bool = False,
        limit: int | None = None,
    ) -> list[dict]:
        """Shards by name, or most recently updated first; at most `limit` of them."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; one of {STATUSES}")
        query, params = queries.shards(recipe_id=recipe_id, status=status, newest_first=newest_first, limit=limit)
        with self.db.read() as conn:
            rows = conn.execute(query, params).all()
        return [shard_dict(row) for row in rows]

    def _of_shards(self, query: TextClause, recipe_id: str, shards: list[str]) -> dict[str, list[dict]]:
        """Rows of a `queries.*_OF` query for these shards, oldest first, grouped by shard."""
        grouped: dict[str, list[dict]] = {name: [] for name in shards}
        if not shards:
            return grouped
        with self.db.read() as conn:
            for row in conn.execute(query, {"rid": recipe_id, "shards": list(shards)}):
                item = row_dict(row)
                grouped[item["shard"]].append(item)
        return grouped

    def triage(
        self,
        shards: Iterable[tuple[str, str]],
        recipe_id: str,
        *,
        include_quarantined: bool = False,
        max_failures: int | None = None,
    ) -> PlanTriage:
        """Sort candidate `(source_uri, shard)` pairs for planning, in one query: a
        registered shard is done, a quarantined one waits for a person (unless
        `include_quarantined`), a `failed` one is failed for good once it has
        `max_failures` tries (None: any failed shard). Writes nothing."""
        with self.db.read() as conn:
            rows = conn.execute(queries.SHARDS_OF_RECIPE, {"rid": recipe_id}).all()
        known = {row.shard: row for row in rows}
        left_out: dict[str, list[str]] = {"registered": [], "quarantined": [], "failed": []}
        pending: list[tuple[int, str, str]] = []
        for source_uri, shard in shards:
            row = known.get(shard)
            if row is not None and row.source_uri != source_uri:
                raise RegistryError(
                    f"shard {shard!r} of {recipe_id} is recorded from {row.source_uri}, not {source_uri};"
                    " two source files map to one shard name"
                )
            status, tries = (row.status, int(row.attempts)) if row is not None else (None, 0)
            if (
                status == "registered"
                or (status == "quarantined" and not include_quarantined)
                or (status == "failed" and (max_failures is None or tries >= max_failures))
            ):
                left_out[status].append(shard)
            else:
                pending.append((tries, source_uri, shard))
        pending.sort(key=lambda item: item[0])  # stable: fresh shards first, in order
        return PlanTriage(
            pending=[(uri, shard) for _, uri, shard in pending],
            retried=frozenset(shard for tries, _, shard in pending if tries),
            **left_out,
        )

    def recent_shard_seconds(self, recipe_id: str, limit: int = 50) -> list[float]:
        """Wall seconds of the `limit` most recently registered shards of a recipe, newest
        first: from the start of the try that registered each (its lease) to its
        registration, so expansion, gates and register together, as a shard task's slot
        is held. A shard registered by hand (`maga register-shard`) counts from its last
        lease: an outlier, which a median over them leaves out."""
        with self.db.read() as conn:
            rows = conn.execute(queries.RECENT_REGISTERED_TIMES, {"rid": recipe_id, "limit": int(limit)}).all()
        seconds = []
        for started_at, registered_at in rows:
            elapsed = (datetime.fromisoformat(registered_at) - datetime.fromisoformat(started_at)).total_seconds()
            if elapsed >= 0:  # registered before its last lease: not a try's wall time
                seconds.append(elapsed)
        return seconds

    def attention_shards(self, recipe_id: str | None = None, *, limit: int = 50) -> list[dict]:
        """The `limit` most recently updated quarantined or failed shards, newest first."""
        with self.db.read() as conn:
            rows = conn.execute(*queries.attention_shards(recipe_id=recipe_id, limit=limit)).all()
        return [shard_dict(row) for row in rows]

    def status(self, recipe_id: str | None = None, *, limit: int = 20) -> dict:
        """What `maga status` shows: `totals` over every shard, and the `limit` newest
        quarantined or failed shards (`attention`), with how many more there are."""
        totals = self.totals(recipe_id)
        waiting = self.attention_shards(recipe_id, limit=limit)
        waiting_total = sum(totals["by_status"][status] for status in queries.ATTENTION_STATUSES)
        return {
            **totals,
            # A row written before errors were cleaned on the way in is cleaned on the way out.
            "attention": [
                {key: clean_text(shard[key]) if key == "last_error" and shard[key] else shard.get(key)
                 for key in _ATTENTION_FIELDS}
                for shard in waiting
            ],
            "attention_not_shown": max(0, waiting_total - len(waiting)),
        }

    def quality_results_of(self, recipe_id: str, shards: list[str]) -> dict[str, list[dict]]:
        """`quality_results` of many shards in one query: shard -> results, oldest first."""
        return self._of_shards(queries.QUALITY_RESULTS_OF, recipe_id, shards)

    def owner_events_of(self, recipe_id: str, shards: list[str]) -> dict[str, list[dict]]:
        """The events of many shards that name an owner, in one query, oldest first."""
        return self._of_shards(queries.OWNER_EVENTS_OF, recipe_id, shards)

    def quality_results(self, recipe_id: str, shard: str) -> list[dict]:
        """Every quality run of a shard, oldest first."""
        return self.quality_results_of(recipe_id, [shard])[shard]

    def events(self, recipe_id: str, shard: str) -> list[dict]:
        """The audit trail of a shard, oldest first."""
        return self._of_shards(queries.EVENTS_OF, recipe_id, [shard])[shard]

    def totals(self, recipe_id: str | None = None, *, top: int = 20) -> dict:
        """Figures for reports and the dashboard. Shards are counted in every status;
        documents, rows, tokens and distributions cover registered (published) shards,
        read from their running totals: a few rows, however many shards there are."""
        with self.db.read() as conn:
            by_status = dict(conn.execute(*queries.status_counts(recipe_id)).all())
            sums = conn.execute(*queries.registered_sums(recipe_id)).one()
            tallies = {
                kind: [
                    (label, int(total)) for label, total in conn.execute(*queries.top_tallies(recipe_id, kind, limit))
                ]
                for kind, limit in (("reason", None), ("genre", top), ("audience", top))
            }
        figures = {name: int(getattr(sums, name)) for name in COUNTERS}
        # Weighted by rows: the shards' counts summed, then divided (`fidelity_rates`).
        fidelity = fidelity_rates({name: int(getattr(sums, name)) for name in FIDELITY_COUNTS})
        return {
            "recipe_id": recipe_id,
            "shards": sum(by_status.values()),
            "by_status": {status: int(by_status.get(status, 0)) for status in STATUSES},
            "registered_shards": int(sums.shards),
            **figures,
            "seconds": round(float(sums.seconds), 3),
            "expansion_ratio": round(figures["output_chars"] / figures["source_chars"], 4)
            if figures["source_chars"]
            else 0.0,
            "accepted_per_document": round(figures["accepted"] / figures["documents"], 4)
            if figures["documents"]
            else 0.0,
            **fidelity,
            "rejects_by_reason": dict(tallies["reason"]),
            "genres": tallies["genre"],
            "audiences": tallies["audience"],
        }


# The fidelity rates as `maga status` names them.
FIDELITY_RATE_NAMES = {
    "invented_fact_rate": "invented facts", "label_echo_rate": "label echo", "genre_kept_rate": "genre kept",
}


def _share(rate: float | None) -> str:
    return "not measured" if rate is None else f"{rate:.1%}"


def format_totals(totals: dict) -> str:
    """The `maga status` text: shards by status, then what the registered shards hold."""
    scope = totals.get("recipe_id") or "all recipes"
    by_status = "  ".join(f"{status}={count}" for status, count in totals["by_status"].items() if count)
    lines = [
        f"registry totals ({scope}): {totals['shards']} shards  {by_status or '(none)'}",
        (
            f"registered: {totals['registered_shards']} shards, {totals['documents']:,} documents,"
            f" {totals['accepted']:,} accepted / {totals['rejected']:,} rejected rows"
            f" ({totals['accepted_per_document']:.2f} accepted per document)"
        ),
        (
            f"tokens: {totals['prompt_tokens']:,} in / {totals['completion_tokens']:,} out;"
            f" chars: {totals['source_chars']:,} source -> {totals['output_chars']:,} output"
            f" (expansion x{totals['expansion_ratio']:.2f})"
        ),
    ]
    if any(totals.get(rate) is not None for rate in FIDELITY_RATE_NAMES):
        lines.append(
            "fidelity: "
            + ", ".join(f"{label} {_share(totals.get(rate))}" for rate, label in FIDELITY_RATE_NAMES.items())
        )
    if totals["rejects_by_reason"]:
        lines.append(
            "rejects: " + ", ".join(f"{reason}={count}" for reason, count in totals["rejects_by_reason"].items())
        )
    for key in ("genres", "audiences"):
        if totals[key]:
            lines.append(f"top {key}: " + "; ".join(f"{label} ({count})" for label, count in totals[key][:5]))
    # Reasons and labels come from model output and shard names from files: shown, not obeyed.
    return strip_control("\n".join(lines))


def format_status(status: dict) -> str:
    """The `maga status` text: `format_totals`, then the bounded listing of quarantined
    and failed shards, saying how many are not shown."""
    lines = [format_totals(status)]
    if not status["attention"]:
        return "\n".join(lines + ["no quarantined or failed shards"])
    lines.append("quarantined or failed shards (newest first):")
    for shard in status["attention"]:
        error = clean_text((shard["last_error"] or "").splitlines()[0], 100) if shard["last_error"] else ""
        name = strip_control(f"{shard['recipe_id']}/{shard['shard']}")
        lines.append(f"  {name}  {shard['status']}  tries={shard['attempts']}  {error}")
    if status["attention_not_shown"]:
        lines.append(f"  ... {status['attention_not_shown']:,} more not shown (--limit)")
    return "\n".join(lines)
