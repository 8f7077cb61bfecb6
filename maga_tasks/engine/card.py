"""The dataset card of a corpus version: `{output_root}/{recipe_id}/README.md`, in the
Hugging Face dataset-card format (a YAML header the hub reads, then markdown).

It says what the corpus is, what made it (the recipe) and the figures so far, read from
the registry's running totals, so it is rewritten whenever a shard registers
(`engine.publish`) and at a run's end (the DAG's summarize): each write replaces the
whole file at once (`Storage.put_bytes`). Writing it is never worth failing a shard
for: `refresh_card` logs a failure and the next registration writes it again.

Labels and reasons come from model output and files: they are untrusted. The header is
built by `yaml.safe_dump` from one-line values; in the markdown they appear only inside
code spans or a fenced block, where neither markdown nor HTML is interpreted.
"""

from __future__ import annotations

import logging
import re

import yaml

from maga_tasks.data.schema import ACCEPTED_SCHEMA, MAGACORPUS_SCHEMA, REJECTED_SCHEMA
from maga_tasks.data.storage import join, storage_for
from maga_tasks.recipe import Recipe, Sampling
from maga_tasks.redaction import clean_text
from maga_tasks.registry import Registry

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
# The hub's configs: name -> the files of the corpus folder it loads (data/ is the default).
CONFIGS = {"default": "data/*.parquet", "rejected": "rejected/*.parquet", "magacorpus": "magacorpus/*.parquet"}
# Longest label the card shows (genre and audience labels are a few words).
_LABEL_CHARS = 200
_TOP_LABELS = 10
# The hub's size categories, by accepted rows.
_SIZES = ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
          (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
          (10**11, "10B<n<100B"), (10**12, "100B<n<1T"))


def card_uri(output_root: str, recipe_id: str) -> str:
    return join(output_root, recipe_id, CARD_NAME)


def write_card(output_root: str, recipe: Recipe, registry: Registry, *, s3_endpoint_url: str | None = None) -> str:
    """Render the card from the registry's totals now and replace the file; its URI."""
    uri = card_uri(output_root, recipe.recipe_id)
    text = render_card(recipe, registry.totals(recipe.recipe_id))
    storage_for(output_root, s3_endpoint_url).put_bytes(uri, text.encode("utf-8"))
    return uri


def refresh_card(
    output_root: str, recipe: Recipe, registry: Registry, *, s3_endpoint_url: str | None = None
) -> str | None:
    """`write_card`, or None after logging why not: a card is a summary of what the
    registry holds, so a failed write (storage or registry down) loses nothing."""
    try:
        return write_card(output_root, recipe, registry, s3_endpoint_url=s3_endpoint_url)
    except Exception as error:  # whatever it is, the shard's outcome must stand
        log.warning("dataset card of %s not written (rewritten at the next registration): %s",
                    recipe.recipe_id, clean_text(error, 500))
        return None


def render_card(recipe: Recipe, totals: dict) -> str:
    """The card's text for `recipe` with the registry's `totals` (`Registry.totals`)."""
    rid = recipe.recipe_id
    body = [
        f"# MAGA corpus {rid}",
        "",
        "Synthetic pretraining text made by MAGA (Massive Genre-Audience reformulation): a model",
        "proposes several genre/audience pairs for each source document, then rewrites the",
        "document once per pair; rewrites that fail the cleaning checks are kept apart with",
        "their reason. This card is rewritten by the pipeline whenever a shard is registered",
        "and at the end of each run: change the recipe, not this file.",
        "",
        *_made_by(recipe),
        *_figures(totals),
        *_columns(),
        *_loading(),
    ]
    return "---\n" + _header(recipe, totals) + "---\n\n" + "\n".join(body) + "\n"


# -- untrusted text ---------------------------------------------------------------------


def _one_line(value: object, limit: int = _LABEL_CHARS) -> str:
    """Redacted, without control characters, cut, and on one line: no value can open
    a line of its own (a `---` ending the header, a fence ending a code block)."""
    return " ".join(clean_text(value, limit).split())


def _code(value: object, limit: int = _LABEL_CHARS) -> str:
    """An inline code span, its backtick fence longer than any run of backticks inside."""
    text = _one_line(value, limit) or "(empty)"
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""  # a space each side is stripped
    return f"{fence}{pad}{text}{pad}{fence}"


def _counted_block(rows: list[tuple[str, int]] | dict[str, int]) -> list[str]:
    """`count  label` lines in a fenced block; each line starts with the count, so none
    can close the fence."""
    items = list(rows.items()) if isinstance(rows, dict) else rows
    return ["```text", *(f"{int(count):>14,}  {_one_line(label)}" for label, count in items), "```"]


# -- the parts --------------------------------------------------------------------------


def _header(recipe: Recipe, totals: dict) -> str:
    """The hub's metadata, from one-line values, dumped ASCII-only without line wrapping."""
    card = recipe.card
    header = {
        "pretty_name": _one_line(f"MAGA corpus {recipe.recipe_id} ({recipe.name})"),
        "license": _one_line(card.license) if card.license else "other",
        "language": [_one_line(code, 20) for code in card.language],
        "task_categories": ["text-generation"],
        "source_datasets": [_one_line(name) for name in card.source_datasets],
        "size_categories": [_size_category(totals["accepted"])],
        "tags": ["synthetic", "maga", "rewrites"],
        "configs": [
            {"config_name": name, "data_files": [{"split": "train", "path": glob}]} for name, glob in CONFIGS.items()
        ],
    }
    return yaml.safe_dump(header, sort_keys=False, allow_unicode=False, width=1_000_000, default_flow_style=False)


def _size_category(rows: int) -> str:
    return next((label for bound, label in _SIZES if rows < bound), "n>1T")


def _sampling(sampling: Sampling) -> str:
    shown = f"temperature {sampling.temperature}, top_p {sampling.top_p}, max_tokens {sampling.max_tokens}"
    if sampling.frequency_penalty is not None:
        shown += f", frequency_penalty {sampling.frequency_penalty}"
    return shown


def _made_by(recipe: Recipe) -> list[str]:
    card, catalogue = recipe.card, recipe.pairs.catalogue
    pairs = "the model writes each pair"
    if catalogue:
        pairs = f"chosen from the recipe's {len(catalogue.genres)} genres and {len(catalogue.audiences)} audiences"
    return [
        "## How it was made",
        "",
        f"- recipe id: {_code(recipe.recipe_id)} (name {_code(recipe.name)})",
        f"- model: {_code(recipe.model)}, revision "
        + (_code(recipe.model_revision) if recipe.model_revision else "not pinned"),
        f"- prompt version: {_code(recipe.prompt_version)}",
        f"- pairs per document: {recipe.pairs_per_document} ({pairs})",
        f"- pairs stage sampling: {_sampling(recipe.pairs.sampling)}",
        f"- rewrite stage sampling: {_sampling(recipe.rewrite.sampling)}",
        f"- source documents cut to at most {recipe.context_budget_tokens} tokens",
        "- source datasets: " + (", ".join(_code(name) for name in card.source_datasets) or "not named in the recipe"),
        "- license: " + (_code(card.license) if card.license else
                         "`other`: the recipe names none (`card.license`); the source's and the model's terms apply"),
        "",
    ]


def _figures(totals: dict) -> list[str]:
    waiting = {status: count for status, count in totals["by_status"].items() if count and status != "registered"}
    lines = [
        "## Figures so far",
        "",
        "From the registry, over the registered shards (each passed the output quality gate):",
        "",
        "| figure | value |",
        "|---|---:|",
        *(f"| {name} | {value} |" for name, value in (
            ("registered shards", f"{totals['registered_shards']:,}"),
            ("documents", f"{totals['documents']:,}"),
            ("accepted rows (`data/`)", f"{totals['accepted']:,}"),
            ("rejected rows (`rejected/`)", f"{totals['rejected']:,}"),
            ("accepted rows per document", f"{totals['accepted_per_document']:.2f}"),
            ("prompt tokens", f"{totals['prompt_tokens']:,}"),
            ("completion tokens", f"{totals['completion_tokens']:,}"),
            ("source characters", f"{totals['source_chars']:,}"),
            ("accepted output characters", f"{totals['output_chars']:,}"),
            ("expansion ratio (output / source characters)", f"{totals['expansion_ratio']:.2f}"),
            *((name, _rate(totals.get(key))) for name, key in FIDELITY_FIGURES),
        )),
        "",
        "The fidelity rates compare words, not meaning: the invented-fact rate is the share of the",
        "model's rewrites (accepted or rejected) stating a number or a capitalised name their source",
        "does not hold (each accepted row's `invented_fact_count` lets you filter stricter); the",
        "label-echo rate the share of the rewrites the label-echo check judged that repeat five words",
        "of their own genre or audience description; the genre-kept rate the share of accepted rows",
        "whose genre has a form a word check can see (a question-and-answer sheet, a letter, steps)",
        "that show it. Not measured: shards made before these checks, or a recipe without them.",
        "",
    ]
    if waiting:
        # Committed files of a shard that is not registered (quarantined, or between its
        # commit and the gate) sit in data/ too: the globs above load them, the figures don't.
        lines += [
            "Shards not registered: " + ", ".join(f"{status} {count:,}" for status, count in waiting.items())
            + ". A committed shard waiting for its gate or quarantined has files in `data/` that these figures"
            " do not count; the run's release manifest (the corpus asset event) lists the registered ones.",
            "",
        ]
    if totals["rejects_by_reason"]:
        lines += ["Rejected rows by reason:", "", *_counted_block(totals["rejects_by_reason"]), ""]
    for key, what in (("genres", "genre"), ("audiences", "audience")):
        if totals[key]:
            lines += [f"Most frequent {what} labels (opening words of the description):", "",
                      *_counted_block(totals[key][:_TOP_LABELS]), ""]
    return lines


# The card's names of the registry's fidelity rates (`data.figures`).
FIDELITY_FIGURES = (
    ("rewrites with an invented fact (invented-fact rate)", "invented_fact_rate"),
    ("rewrites echoing their pair's label (label-echo rate)", "label_echo_rate"),
    ("accepted rows keeping their genre's form (genre-kept rate)", "genre_kept_rate"),
)


def _rate(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.1%}"


def _columns() -> list[str]:
    magacorpus = [f"`{field.name}`" for field in MAGACORPUS_SCHEMA]
    extra = REJECTED_SCHEMA.names[len(ACCEPTED_SCHEMA.names):]
    return [
        "## Columns",
        "",
        "Config `default` (`data/`, one row per accepted rewrite):",
        "",
        "| column | type |",
        "|---|---|",
        *(f"| `{field.name}` | `{field.type}` |" for field in ACCEPTED_SCHEMA),
        "",
        "Config `rejected` (`rejected/`): the same columns, then " + " and ".join(f"`{name}`" for name in extra) + ".",
        "Config `magacorpus` (`magacorpus/`): the accepted rows in the released MAGACorpus layout ("
        + ", ".join(magacorpus) + ").",
        "",
    ]


def _loading() -> list[str]:
    return [
        "## Loading",
        "",
        "With pyarrow (files starting with `.` or `_`, such as a write in progress, are skipped):",
        "",
        "```python",
        "import pyarrow.dataset as ds",
        "",
        'root = "."  # this folder: a local path or s3://bucket/prefix/{recipe_id}',
        'accepted = ds.dataset(f"{root}/data", format="parquet").to_table()',
        'rejected = ds.dataset(f"{root}/rejected", format="parquet").to_table()',
        "```",
        "",
        "With the Hugging Face `datasets` library (not a dependency of the pipeline):",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'accepted = load_dataset("parquet", data_files={"train": f"{root}/data/*.parquet"}, split="train")',
        "```",
        "",
        "Uploaded to the hub as it is, `load_dataset(repo)` loads `data/` and",
        '`load_dataset(repo, "rejected")` the rejected rows (the `configs` above).',
    ]


__all__ = ["CARD_NAME", "CONFIGS", "FIDELITY_FIGURES", "card_uri", "refresh_card", "render_card", "write_card"]
