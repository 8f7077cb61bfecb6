"""The recipe: everything that shapes the output corpus, validated on load.

A recipe's stable hash, `recipe_id`, names the output version. Only fields that change
what is written take part in it; where the workers run and how hard we drive them
(endpoints, concurrency, timeouts) live in `RunSettings` and never change the id.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maga_tasks.errors import EXIT_BAD_INPUT, MagaError
from maga_tasks.identifiers import shown
from maga_tasks.redaction import strip_control
from maga_tasks.reject_reasons import DETECTOR_REASONS, RejectReason

# Bounds of a recipe file: an operator's recipe is a few kB, nested a few levels.
MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_DEPTH = 32
MAX_RECIPE_ALIASES = 100
# Validation problems an error lists (a file that is not a recipe may have thousands).
_SHOWN_PROBLEMS = 5


class RecipeError(MagaError, ValueError):
    """A recipe file that cannot be used; the message names the field."""

    exit_code = EXIT_BAD_INPUT


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Strict):
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, ge=1, le=32768)
    # OpenAI's penalty on tokens by how often the answer has used them (None: not sent).
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)


class PairsCatalogue(_Strict):
    """Genres and audiences a small model chooses from instead of writing its own.

    A 135M model does not write five distinct descriptions of a genre and a reader (see
    recipes/smollm2-135m.yaml), but it can choose, one pair per call, the kinds of text
    and readers that suit a document from lists written here; the grammar holds each
    answer to the entries not chosen yet, so a document's pairs are distinct by construction.
    """

    genres: tuple[str, ...] = Field(..., min_length=1)
    audiences: tuple[str, ...] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _distinct_entries(self) -> "PairsCatalogue":
        for name in ("genres", "audiences"):
            entries = [" ".join(e.lower().split()) for e in getattr(self, name)]
            if any(not e for e in entries) or len(set(entries)) != len(entries):
                raise ValueError(f"{name} must be distinct, non-empty descriptions")
        return self


class PairsStage(_Strict):
    sampling: Sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=768)
    max_attempts: int = Field(3, ge=1, le=10)
    structured_output: Literal["auto", "json_schema", "off"] = "auto"
    # When set, the model chooses each pair from these lists (one call per pair).
    catalogue: PairsCatalogue | None = None
    genre_chars: tuple[int, int] = (20, 600)
    audience_chars: tuple[int, int] = (10, 400)
    # A genre or audience must read as a description: at least this many words, no JSON
    # fragments, not a bare name or place (0 switches the check off).
    min_description_words: int = Field(3, ge=0, le=50)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "PairsStage":
        for name in ("genre_chars", "audience_chars"):
            low, high = getattr(self, name)
            if not 0 < low < high:
                raise ValueError(f"{name} must be (min, max) with 0 < min < max")
        if self.catalogue and self.structured_output != "json_schema":
            raise ValueError("a pairs catalogue needs structured_output: json_schema (the grammar makes the choice)")
        return self


class RewriteStage(_Strict):
    sampling: Sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=1536)
    # Rewrites drawn at most per pair: one the cleaning rejects is drawn again with the next
    # seed, and the pair keeps the first accepted (else the last) one. Unset is 1, the
    # paper's single draw; a small model that invents facts needs more (smollm2 recipe).
    samples: int | None = Field(None, ge=1, le=8)

    @property
    def draws(self) -> int:
        return self.samples or 1


class Cleaning(_Strict):
    """Thresholds of the heuristic cleaning step (MAGA step 3)."""

    min_keyword_coverage: float = Field(0.2, ge=0.0, le=1.0)
    keyword_count: int = Field(20, ge=1, le=200)
    min_length_ratio: float = Field(0.15, gt=0.0)
    max_length_ratio: float = Field(4.0, gt=0.0)
    min_chars: int = Field(50, ge=0)
    # Rewrites that keep almost every 8-word run of the source behave like repetition.
    max_copy_ratio: float = Field(0.9, gt=0.0, le=1.0)
    # What real models get wrong (maga_tasks/method/detectors.py), each its own reason.
    # A random-weight test model trips them all, so its recipe switches them off.
    detectors: tuple[
        Literal[
            RejectReason.PROMPT_ECHO, RejectReason.PAIR_LABEL_ECHO, RejectReason.REFUSAL, RejectReason.TASK_TALK,
            RejectReason.REPETITION, RejectReason.OTHER_LANGUAGE, RejectReason.INVENTED_FACTS,
            RejectReason.OFF_GENRE,
        ],
        ...,
    ] = DETECTOR_REASONS
    # repetition: share of 4-word runs that occur more than once.
    max_repeated_share: float = Field(0.6, gt=0.0, le=1.0)
    # other_language: how sure the language identifier must be before it rejects.
    min_language_confidence: float = Field(0.8, ge=0.0, le=1.0)
    # invented_facts: numbers and names a rewrite states that its source does not hold
    # (method/fidelity.py), each kind allowed up to this many.
    max_invented_numbers: int = Field(0, ge=0)
    max_invented_names: int = Field(1, ge=0)


class Quality(_Strict):
    """Thresholds of the data-quality gate run on each committed shard."""

    min_text_chars: int = Field(50, ge=0)
    max_text_chars: int = Field(50_000, ge=1)
    min_coverage_share: float = Field(0.9, ge=0.0, le=1.0)
    min_accepted_per_document: float = Field(3.0, ge=0.0)
    min_expansion_ratio: float = Field(1.5, ge=0.0)
    max_expansion_ratio: float = Field(10.0, gt=0.0)
    min_source_chars: int = Field(1, ge=0)
    max_source_chars: int = Field(2_000_000, ge=1)
    # Share of source rows that must be usable (id, unique id, text, length) for the
    # shard to be expanded; the few bad rows below that are rejected row by row.
    min_valid_source_share: float = Field(0.99, ge=0.0, le=1.0)
    # The judge's measurement (not a gate): the share of sampled rewrites scoring >= 3
    # that counts as a pass on the dashboard. The method reports about 0.92.
    min_judge_pass_share: float = Field(0.9, ge=0.0, le=1.0)


class CardFields(_Strict):
    """What the corpus version's dataset card says that the rows cannot tell (engine/card.py).
    Not part of the id: a card is rewritten, never the rows."""

    # The Hugging Face license id (`odc-by`, `apache-2.0`...); unset, the card says `other`.
    license: str | None = Field(None, min_length=1, max_length=100)
    # Hub ids of the source corpus (e.g. `HuggingFaceFW/fineweb-edu`).
    source_datasets: tuple[str, ...] = ()
    # ISO 639-1 codes of the rows: the rewrites keep the source's language.
    language: tuple[str, ...] = ("en",)


class Recipe(_Strict):
    name: str = "default"
    model: str = Field(..., min_length=1)
    # The weights behind `model`: a hub commit, a tag or a checksum the operator names.
    # Part of the id (new weights behind the same served name are a new version); the
    # client checks it against what the workers report they loaded, where they can tell.
    model_revision: str | None = Field(None, min_length=1)
    # Tokenizer used to cut over-long documents: a local directory or a hub id.
    # Defaults to the model name. Where it lies is not part of the id (it must be the
    # served model's own tokenizer, which `model` and `model_revision` already name).
    tokenizer: str | None = None
    prompt_version: str = Field(..., min_length=1)
    # `document` (optional) frames the source in the user message, with `{document}` where
    # it goes; by default it is a "SOURCE DOCUMENT" block between <<< and >>> lines.
    prompts: dict[Literal["system", "document", "pairs", "rewrite", "judge"], str]
    pairs_per_document: int = Field(5, ge=1, le=20)
    context_budget_tokens: int = Field(3072, ge=64)
    pairs: PairsStage = PairsStage()
    rewrite: RewriteStage = RewriteStage()
    judge_sampling: Sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=512)
    cleaning: Cleaning = Cleaning()
    quality: Quality = Quality()
    card: CardFields = CardFields()

    @model_validator(mode="after")
    def _all_prompts(self) -> "Recipe":
        missing = {"system", "pairs", "rewrite", "judge"} - set(self.prompts)
        if missing:
            raise ValueError(f"prompts is missing {sorted(missing)}")
        for name, template in self.prompts.items():
            _check_placeholders(name, template)
        if "document" in self.prompts and self.prompts["document"].count("{document}") != 1:
            raise ValueError("prompts.document must hold {document} exactly once")
        catalogue = self.pairs.catalogue
        if catalogue and min(len(catalogue.genres), len(catalogue.audiences)) < self.pairs_per_document:
            raise ValueError(
                f"pairs.catalogue needs at least pairs_per_document ({self.pairs_per_document}) genres and audiences"
            )
        return self

    @cached_property
    def recipe_id(self) -> str:
        """Stable 12-hex-digit hash of everything that shapes the rows: every field that is
        set but `_NOT_IN_RECIPE_ID` (where the tokenizer lies, the publish gate's thresholds,
        the card's fields)."""
        shaping = _without_unset(self.model_dump(mode="json", exclude=set(_NOT_IN_RECIPE_ID)))
        canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return "r-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def required_context_tokens(self) -> int:
        """What a served model's context must hold at least: the document budget plus the
        longest answer (instructions and task lines come on top)."""
        return self.context_budget_tokens + max(self.rewrite.sampling.max_tokens, self.pairs.sampling.max_tokens)

    @property
    def judge_asks_genre(self) -> bool:
        """Whether the judge's task names the rewrite's genre, and so asks whether the
        rewrite keeps it (`genre_kept` in the judge's answer)."""
        fields = {field for _, field, _, _ in string.Formatter().parse(self.prompts["judge"]) if field}
        return "genre" in fields

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.model

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# The fields each prompt template is formatted with (method/prompts.py); `document` is
# filled by replacement, not format(), and holds {document} exactly once.
PLACEHOLDERS = {
    "system": {"n_pairs"},
    "pairs": {"n_pairs"},
    "rewrite": {"genre", "audience"},
    # {genre} in the judge's task asks its genre question too (`Recipe.judge_asks_genre`).
    "judge": {"rewrite", "genre", "audience"},
}


def _check_placeholders(prompt: str, template: str) -> None:
    """Refuse a template that format() would fail on later, in every shard: an unknown
    `{name}`, a positional `{}`, attribute or index access, unbalanced braces."""
    allowed = PLACEHOLDERS.get(prompt)
    if allowed is None:
        return
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError:
        raise ValueError(f"prompts.{prompt}: unbalanced braces (write {{{{ and }}}} for literal ones)") from None
    for field in fields:
        if field not in allowed:
            known = ", ".join(f"{{{name}}}" for name in sorted(allowed))
            raise ValueError(f"prompts.{prompt}: unknown placeholder {shown('{' + field + '}')} (known: {known})")


# Fields that do not shape the rows, so changing them keeps the corpus version: the
# tokenizer's location (a local copy of the served model's tokenizer cuts the same), the
# publish gate's thresholds (`quality`: a shard is re-checked, not re-expanded) and what
# the dataset card says (`card`: the card is rewritten).
_NOT_IN_RECIPE_ID = ("tokenizer", "quality", "card")


def _without_unset(value):
    """`value` without its None fields: an option a recipe leaves unset does not take part
    in the id, so adding one to the code keeps the ids of the recipes that do not use it."""
    if isinstance(value, dict):
        return {k: _without_unset(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_unset(v) for v in value]
    return value


def _describe(error: ValidationError) -> str:
    """The first few problems, each `field: what is wrong` (never the value given)."""
    items = error.errors()
    parts = []
    for item in items[:_SHOWN_PROBLEMS]:
        field = ".".join(strip_control(str(p))[:60] for p in item["loc"]) or "(recipe)"
        parts.append(f"{field}: {strip_control(item['msg'])[:300]}")
    if len(items) > _SHOWN_PROBLEMS:
        parts.append(f"and {len(items) - _SHOWN_PROBLEMS} more")
    return "; ".join(parts)


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping at top level")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(f"{source}: {_describe(error)}") from None


def builtin_recipes_dir() -> Path:
    return Path(str(resources.files("maga_tasks") / "recipes"))


def builtin_recipe_path(name: str) -> Path:
    """A recipe shipped in `maga_tasks/recipes/` (`default`, `tiny`, ...)."""
    return builtin_recipes_dir() / f"{name}.yaml"


def default_recipe_path() -> Path:
    return builtin_recipe_path("default")


def load_recipe(path: str | Path | None = None, **overrides) -> Recipe:
    """Load a recipe YAML (the built-in default when `path` is None).

    `overrides` replace top-level fields, e.g. `model=...` for a served model name.
    Errors name the file and the kind of problem (with line and column), never a line
    of it: a file that is not a recipe may hold anything.
    """
    source = Path(path) if path else default_recipe_path()
    data = parse_recipe_yaml(_read_recipe_text(source), str(source))
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return recipe_from_dict(data, str(source))


def _read_recipe_text(source: Path) -> str:
    try:
        if not source.is_file():
            raise RecipeError(
                f"recipe file not found: {source}" if not source.exists() else f"recipe {source}: not a file"
            )
        size = source.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {source}: {size:,} bytes, more than the {MAX_RECIPE_BYTES:,} a recipe may have")
        with open(source, "rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        raise RecipeError(f"recipe {source}: cannot be read ({error.strerror or type(error).__name__})") from None
    if len(raw) > MAX_RECIPE_BYTES:  # it grew since stat
        raise RecipeError(f"recipe {source}: more than the {MAX_RECIPE_BYTES:,} bytes a recipe may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {source}: not UTF-8 text") from None


def parse_recipe_yaml(text: str, source: str = "recipe"):
    """The YAML document of a recipe, its nesting and aliases bounded first: the event
    scan below keeps no stack of its own, while safe_load's composer recurses once per
    level (50,000 levels are a RecursionError) and aliases multiply what it builds."""
    try:
        depth = aliases = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_RECIPE_DEPTH:
                    raise RecipeError(
                        f"recipe {source}: nested deeper than {MAX_RECIPE_DEPTH} levels{_where(event.start_mark)}"
                    )
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_RECIPE_ALIASES:
                    raise RecipeError(f"recipe {source}: more than {MAX_RECIPE_ALIASES} YAML aliases")
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        kind = re.sub(r"(?<!^)(?=[A-Z])", " ", type(error).__name__).lower()
        where = _where(error.problem_mark or error.context_mark)
        raise RecipeError(f"recipe {source}: not valid YAML ({kind}{where})") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {source}: not valid YAML ({type(error).__name__})") from None


def _where(mark) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
