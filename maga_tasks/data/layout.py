"""Output layout: checked path templates under `{output_root}/{recipe_id}/`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from maga_tasks.data.storage import join
from maga_tasks.errors import EXIT_BAD_INPUT, MagaError
from maga_tasks.identifiers import is_identifier, shown

_SOURCE_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")
# Control characters (terminal escape sequences start with one): a name holding them is
# refused, not made safe, since what it shows and what it is differ.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class LayoutError(MagaError, ValueError):
    """A shard or path that cannot be placed safely in the output layout."""

    exit_code = EXIT_BAD_INPUT


def shard_name(source_uri: str) -> str:
    """A safe shard name from a source file: its base name without the format suffix.

    Only letters, digits, '.', '_', '=' and '-' survive; anything else becomes '_', so a
    name can never climb out of its directory. A name with control characters, or with
    nothing left, raises `LayoutError`.
    """
    base = source_uri.rstrip("/").rsplit("/", 1)[-1]
    if _CONTROL.search(base):
        raise LayoutError(f"a file name with control characters makes no shard name: {source_uri!r}")
    for suffix in _SOURCE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name = re.sub(r"\.{2,}", "_", _UNSAFE.sub("_", base)).strip("._")
    if not name:
        raise LayoutError(f"cannot derive a shard name from {source_uri!r}")
    return name[:200]


def check_shard_name(name: str, what: str = "shard name") -> str:
    if not is_identifier(name):
        raise LayoutError(f"unsafe {what}: {shown(name)}")
    return name


@dataclass(frozen=True)
class ShardPaths:
    output_root: str
    recipe_id: str
    shard: str

    @property
    def version_root(self) -> str:
        return join(self.output_root, self.recipe_id)

    @property
    def data(self) -> str:
        return join(self.version_root, "data", f"{self.shard}.parquet")

    @property
    def rejected(self) -> str:
        return join(self.version_root, "rejected", f"{self.shard}.parquet")

    @property
    def export(self) -> str:
        return join(self.version_root, "magacorpus", f"{self.shard}.parquet")

    @property
    def work(self) -> str:
        return join(self.version_root, "_work", self.shard)

    def staged(self, token: int) -> tuple[tuple[str, str], ...]:
        """(staged, published) URI pairs of the commit made under lease `token`: staged
        in `_work/{shard}/commit-{token}/`, where no other lease writes, then copied to
        `rejected/`, `magacorpus/` and last `data/`, whose presence marks the shard
        committed."""
        stage = join(self.work, f"commit-{token:08d}")
        return tuple(
            (join(stage, f"{kind}.parquet"), published)
            for kind, published in (("rejected", self.rejected), ("magacorpus", self.export), ("data", self.data))
        )

    @property
    def quality_docs(self) -> str:
        return join(self.version_root, "quality", self.shard)


def trial_root(output_root: str, max_docs: int) -> str:
    """Where a trial over the first `max_docs` documents of each shard writes: beside the
    corpus, never inside it, so a trial neither mixes into the corpus nor stands in for
    the full shard."""
    if max_docs < 1:
        raise LayoutError(f"max_docs must be at least 1, not {max_docs}")
    return join(output_root.rstrip("/"), "_trials", f"first-{max_docs}")


def shard_paths(output_root: str, recipe_id: str, shard: str) -> ShardPaths:
    return ShardPaths(output_root.rstrip("/"), check_shard_name(recipe_id, "recipe id"), check_shard_name(shard))
