"""`maga bench --suite quality`: what a real model's output looks like after cleaning.

Over N real Wikipedia summaries expanded by a real model (by default SmolLM2-135M-Instruct
served locally by vLLM CPU in float32; or `--endpoint URL --served-model NAME`):
yield (accepted / documents x pairs), reject reasons, pairs validity, the collapse band
(keyword coverage and 8-word copy ratio of every rewrite: near copies at one end, drift
at the other), the detectors run again over the accepted rows, independently of the
accept decision (their hits must be 0), an audit of the accepted rows for label echoes
and invented numbers written apart from the fidelity checks, the judge's pass share and
genre-kept share (and with `--judge-labels FILE`, its genre answers on labelled rows),
3 sample rows, and a table per shard (`--quality-shards`): yield and the collapse band
beside the shard's fidelity rates as the registry keeps them (`data.figures`: the
invented-fact, label-echo and genre-kept rates of its `ShardResult`).

A 135M judge measures mechanics (the score parses, the prompt fits), not quality.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from maga_tasks.data.fidelity_rates import FIDELITY_COUNTS, FIDELITY_RATES, fidelity_rates
from maga_tasks.reject_reasons import RejectReason
from maga_tasks.tools.benchmarks.figures import percentile

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO / "var" / "models" / "smollm2-135m-instruct"
SERVED_NAME = "smollm2-135m-instruct"


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    pick = lambda q: round(percentile(values, q), 3)  # noqa: E731
    return {"n": len(values), "p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9),
            "mean": round(statistics.fmean(values), 3)}


# An audit of the accepted rows that shares no code with the cleaning's fidelity checks
# (method/fidelity.py): plain word splitting and a plain number pattern, so a bug in one
# does not hide in the other.
_AUDIT_NUMBER = re.compile(r"\d[\d,]*\d|\d")


def _audit_label_echo(text: str, source: str, description: str, run: int = 5) -> bool:
    """Whether `run` words in a row of the description (case folded, punctuation
    dropped) occur in the text and not in the source."""
    def tokens(value: str) -> list[str]:
        return ["".join(ch for ch in word if ch.isalnum()) for word in value.lower().split()]

    said, seen, label = " ".join(tokens(text)), " ".join(tokens(source)), [t for t in tokens(description) if t]
    return any(
        f" {' '.join(label[i:i + run])} " in f" {said} " and f" {' '.join(label[i:i + run])} " not in f" {seen} "
        for i in range(len(label) - run + 1)
    )


def _audit_invented_number(text: str, source: str) -> bool:
    """Whether the text writes a number of 2+ digits (commas dropped) that the source does not."""
    known = {n.replace(",", "") for n in _AUDIT_NUMBER.findall(source)}
    return any(len(n.replace(",", "")) >= 2 and n.replace(",", "") not in known for n in _AUDIT_NUMBER.findall(text))


def measure(rows: list[dict], rejected: list[dict], sources: dict[str, str], recipe) -> dict:
    """The figures of one expanded shard (rows as dicts of data/ and rejected/)."""
    from maga_tasks.method.cleaning import copy_ratio, keyword_coverage
    from maga_tasks.method.detectors import junk_description, rewrite_findings
    from maga_tasks.method.fidelity import genre_kept

    pairs = recipe.pairs_per_document
    documents = {r["source_id"] for r in rows + rejected}
    pairs_failed = {r["source_id"] for r in rejected if (r["reject_reason"] or "").startswith("pairs_")}
    written = [r for r in rows + rejected if r.get("text")]
    coverage = [keyword_coverage(sources[r["source_id"]], r["text"], recipe.cleaning.keyword_count) for r in written]
    copied = [copy_ratio(sources[r["source_id"]], r["text"]) for r in written]
    hits: Counter = Counter()
    for row in rows:
        for reason, _ in rewrite_findings(row["text"], sources[row["source_id"]], row["genre"], row["audience"]):
            hits[reason] += 1
        for value, label in ((row["genre"], "genre"), (row["audience"], "audience")):
            if junk_description(value, label):
                hits[RejectReason.PAIRS_JUNK] += 1
    echoes = sum(
        _audit_label_echo(r["text"], sources[r["source_id"]], r["genre"] or "")
        or _audit_label_echo(r["text"], sources[r["source_id"]], r["audience"] or "")
        for r in rows
    )
    numbers = sum(_audit_invented_number(r["text"], sources[r["source_id"]]) for r in rows)
    counts = [r["invented_fact_count"] for r in rows if r.get("invented_fact_count") is not None]
    cues = [kept for r in rows if (kept := genre_kept(r["text"], r["genre"] or "")) is not None]
    drawn = [r["rewrite_samples"] for r in rows + rejected if r.get("rewrite_samples")]
    return {
        "documents": len(documents),
        "accepted": len(rows),
        "yield": round(len(rows) / max(1, len(documents) * pairs), 4),
        # What the yield costs: rewrites drawn per pair asked (recipe rewrite.samples) and
        # completion tokens spent (every draw, the pairs calls too) per accepted rewrite.
        "draws_per_pair": round(sum(drawn) / max(1, len(drawn)), 3),
        "completion_tokens_per_accepted": round(
            sum((r.get("completion_tokens") or 0) + (r.get("pairs_completion_tokens") or 0) for r in rows + rejected)
            / max(1, len(rows)), 1),
        "pairs_valid_share": round(1 - len(pairs_failed) / max(1, len(documents)), 4),
        "rejects_by_reason": dict(Counter(r["reject_reason"] for r in rejected).most_common()),
        "keyword_coverage": _quantiles(coverage),
        "copy_ratio": _quantiles(copied),
        "collapse_band": {
            "near_copies": sum(c > recipe.cleaning.max_copy_ratio for c in copied),
            "drifted": sum(c < recipe.cleaning.min_keyword_coverage for c in coverage),
            "rewrites_with_text": len(written),
        },
        "detector_hits_on_accepted": dict(hits),
        # The audit's share of accepted rows with a label echo / an invented 2+ digit number.
        "accepted_label_echo_share": round(echoes / max(1, len(rows)), 4),
        "accepted_invented_number_share": round(numbers / max(1, len(rows)), 4),
        "accepted_invented_fact_count": _quantiles(counts),
        # Of the accepted rows whose genre has a form cue (method/fidelity.py), those showing it.
        "genre_kept": {"rows": len(cues), "kept": sum(cues)},
        "samples": [
            {"genre": r["genre"], "audience": r["audience"], "text": r["text"][:400]} for r in rows[:3]
        ],
    }


def shard_row(shard: str, measured: dict, result) -> dict:
    """One row of the per-shard table: the shard's yield and collapse band (`measure`)
    beside its fidelity rates as the pipeline computed them at commit (`result`, a
    `ShardFigures`: what the registry, the dashboard and the card show)."""
    return {
        "shard": shard,
        "documents": measured["documents"],
        "accepted": measured["accepted"],
        "yield": measured["yield"],
        **measured["collapse_band"],
        **{name: getattr(result, name) for name in FIDELITY_COUNTS},
        **fidelity_rates({name: getattr(result, name) for name in FIDELITY_COUNTS}),
    }


_BAND = ("near_copies", "drifted", "rewrites_with_text")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def shard_table(rows: list[dict]) -> list[str]:
    """The per-shard table, then a row over all shards (rates weighted by rows)."""
    lines = [
        "| shard | documents | accepted | yield | near copies / drifted / with text | invented-fact rate |"
        " label-echo rate | genre-kept rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shard']} | {row['documents']} | {row['accepted']} | {row['yield']:.1%} |"
            f" {row['near_copies']} / {row['drifted']} / {row['rewrites_with_text']} |"
            + "".join(f" {_rate(row[rate])} |" for rate in FIDELITY_RATES)
        )
    if len(rows) > 1:
        sums = {name: sum(row[name] for row in rows) for name in FIDELITY_COUNTS}
        band = " / ".join(str(sum(row[key] for row in rows)) for key in _BAND)
        lines.append(
            f"| all | {sum(r['documents'] for r in rows)} | {sum(r['accepted'] for r in rows)} | | {band} |"
            + "".join(f" {_rate(value)} |" for value in fidelity_rates(sums).values())
        )
    return lines


def markdown(figures: dict) -> str:
    lines = [
        "### Quality report (real model)",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| documents | {figures['documents']} |",
        f"| accepted rewrites | {figures['accepted']} |",
        f"| yield (accepted / documents x pairs) | {figures['yield']:.1%} |",
        f"| rewrites drawn per pair / completion tokens per accepted rewrite | {figures['draws_per_pair']} / "
        f"{figures['completion_tokens_per_accepted']} |",
        f"| documents with valid pairs | {figures['pairs_valid_share']:.1%} |",
        f"| keyword coverage p10 / p50 / p90 | {_band(figures['keyword_coverage'])} |",
        f"| copy ratio p10 / p50 / p90 | {_band(figures['copy_ratio'])} |",
        f"| near copies / drifted / rewrites with text | {figures['collapse_band']['near_copies']} / "
        f"{figures['collapse_band']['drifted']} / {figures['collapse_band']['rewrites_with_text']} |",
        f"| detector hits on accepted rows | {sum(figures['detector_hits_on_accepted'].values())} |",
        f"| accepted rows with a label echo (audit) | {figures['accepted_label_echo_share']:.1%} |",
        f"| accepted rows with an invented number of 2+ digits (audit) | "
        f"{figures['accepted_invented_number_share']:.1%} |",
        f"| invented facts per accepted row p10 / p50 / p90 | {_band(figures['accepted_invented_fact_count'])} |",
        f"| accepted rows showing their genre's form (of those with a cue) | {figures['genre_kept']['kept']} of "
        f"{figures['genre_kept']['rows']} |",
        f"| judge pass share (score >= 3) | {figures.get('judge_pass_share')} |",
        f"| judge: share of judged rows keeping their genre | {figures.get('judge_genre_kept_share')} |",
        "",
        "Reject reasons: " + ", ".join(f"{k} {v}" for k, v in figures["rejects_by_reason"].items()),
    ]
    if figures.get("judge_genre_on_labels"):
        from maga_tasks.tools.judge_labels import markdown_lines

        lines += ["", "The judge's genre question on the labelled answers:", "",
                  *markdown_lines(figures["judge_genre_on_labels"])]
    if figures.get("shards"):
        lines += [
            "",
            "Per shard (the fidelity rates as the registry keeps them; `-`: nothing measured):",
            "",
            *shard_table(figures["shards"]),
        ]
    return "\n".join(lines)


def _band(q: dict) -> str:
    return f"{q['p10']} / {q['p50']} / {q['p90']}" if q.get("n") else "-"


def run_quality(args) -> dict:
    """Expand N documents with the real model, measure, judge a sample; write the report."""
    from maga_tasks.data.layout import shard_paths
    from maga_tasks.data.sample_corpus import write_sample_corpus
    from maga_tasks.engine.shard import expand_shard
    from maga_tasks.llm.vllm_local import start_vllm_server
    from maga_tasks.method.judging import judge_committed_shard
    from maga_tasks.recipe import builtin_recipe_path, load_recipe
    from maga_tasks.settings import RunSettings

    documents = min(args.quality_docs, 6) if args.short else args.quality_docs
    model_dir = Path(args.model_dir) if args.model_dir else DEFAULT_MODEL_DIR
    recipe = load_recipe(args.recipe or builtin_recipe_path("smollm2-135m"), tokenizer=str(model_dir))
    labelled = None
    if getattr(args, "judge_labels", None):  # refused before the expansion, not 20 minutes into it
        from maga_tasks.tools.judge_labels import check_judge_labels

        labelled = check_judge_labels(args.judge_labels, recipe)
    server, url = None, args.endpoint
    if url is None:
        server = start_vllm_server(model_dir, served_model_name=SERVED_NAME, dtype="float32",
                                   max_model_len=4096, max_num_seqs=max(args.concurrency, 8), kv_cache_space_gib=2)
        server.wait_healthy(timeout=600)
        url = server.url
    try:
        work = Path(tempfile.mkdtemp(prefix="maga-quality-"))
        shards = max(1, min(getattr(args, "quality_shards", 1), documents))
        sources = write_sample_corpus(work / "source", shards, documents // shards, offset=args.first_article)
        settings = RunSettings(endpoints=(url,), served_model=args.served_model or (SERVED_NAME if server else None),
                               max_concurrency=args.concurrency, api_key=server.api_key if server else None)
        rows, rejected, texts, table, seconds, tokens = [], [], {}, [], 0.0, 0
        for source in sources:
            result = expand_shard(str(source), str(work / "out"), recipe, settings)
            paths = shard_paths(str(work / "out"), recipe.recipe_id, result.shard)
            data, dropped = pq.read_table(paths.data).to_pylist(), pq.read_table(paths.rejected).to_pylist()
            shard_texts = {t["id"]: t["text"] for t in pq.read_table(source, columns=["id", "text"]).to_pylist()}
            table.append(shard_row(result.shard, measure(data, dropped, shard_texts, recipe), result))
            rows, rejected, texts = rows + data, rejected + dropped, texts | shard_texts
            seconds, tokens = seconds + result.seconds, tokens + result.completion_tokens
        figures = measure(rows, rejected, texts, recipe)
        figures["shards"] = table
        figures |= fidelity_rates({name: sum(row[name] for row in table) for name in FIDELITY_COUNTS})
        figures["model"] = settings.served_model or recipe.model
        figures["seconds"] = seconds
        figures["completion_tokens"] = tokens
        if rows and args.judge_sample:  # a sample of the first shard's rewrites
            report = judge_committed_shard(str(sources[0]), str(work / "out"), recipe, settings,
                                           sample=args.judge_sample)
            figures["judge_pass_share"] = report.pass_share
            figures["judge_scores"] = report.scores
            figures["judge_genre_kept_share"] = report.genre_kept_share
        if labelled:
            from maga_tasks.tools.judge_labels import genre_answers_by_label

            figures["judge_genre_on_labels"] = genre_answers_by_label(labelled, recipe, settings)
    finally:
        if server:
            server.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(figures, indent=2))
    (out / "quality.md").write_text(markdown(figures) + "\n")
    return figures
