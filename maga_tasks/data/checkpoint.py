"""Checkpoints of finished documents under `_work/{shard}/`, on local disk or S3.

Each run writes its own segment files (JSON lines, one line per finished document with
all its output rows), so nothing is ever appended to an object in place and two runs
never write the same file. Locally a line is flushed as soon as its document finishes;
on S3 a segment object is put every `s3_every` documents, by a background thread so the
shard's event loop never waits for the network (a failed put surfaces at the next
append or at close). Reading tolerates a torn last line (a kill in the middle of a
write) and keeps the first copy of any document.

A checkpoint belongs to one version of its source. Its manifest (`manifest()`) names the
recipe, the source URI and the source's identity: `sha256:{hex}` of the very bytes the
shard reads (`data.source.ShardReader.identity`), for a local file and for the local
copy of an S3 object alike. Hashing is cheap next to the expansion (0.06 s per 100 MB
on this machine, sha256 with SHA-NI, warm cache; one more pass over a file the shard
reads three times anyway), and unlike size + mtime + inode or an ETag it cannot be
fooled: a file rewritten in place with the same size and its mtime put back, or an
object re-uploaded in parts (whose ETag is no content hash), is still told apart, and
an S3 object replaced between a HEAD and the download cannot lend its identity to
other bytes. A run whose manifest differs from the stored one discards the old
checkpoint with one warning saying why and starts the shard afresh (`prepare`); a
commit of a checkpoint made from other bytes is refused (`check_source`). Versions are
never mixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import orjson

from maga_tasks.data.storage import LocalStorage, Storage, join
from maga_tasks.errors import MagaError
from maga_tasks.redaction import strip_control

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Segment puts queued at most before `append` waits for the oldest (bounds memory).
MAX_PENDING_PUTS = 2


def manifest(recipe_id: str, source_uri: str, source_identity: str) -> dict:
    """What a checkpoint was made for: the recipe and one version of one source."""
    return {"recipe_id": recipe_id, "source_uri": source_uri, "source_identity": source_identity}


class CheckpointMismatch(MagaError):
    """A checkpoint made from another version of the source than the one read now."""


@dataclass(frozen=True)
class DocLocation:
    segment: Path
    offset: int


class Checkpoint:
    def __init__(self, storage: Storage, work_uri: str, manifest: dict, s3_every: int = 32):
        self.storage = storage
        self.work_uri = work_uri
        self.manifest = manifest
        self.s3_every = s3_every
        self.run_id = uuid.uuid4().hex[:12]
        self._local = isinstance(storage, LocalStorage)
        self._handle = None
        self._pending: list[bytes] = []
        self._sequence = 0
        self._uploader: ThreadPoolExecutor | None = None
        self._puts: list[Future] = []
        # Objects put in step with the segments on S3 (the answer journal's snapshot):
        # each returns (uri, body) to queue after a segment, or None when unchanged.
        self._companions: list[Callable[[], tuple[str, bytes] | None]] = []

    # -- reading ---------------------------------------------------------------------

    def _segment_uris(self) -> list[str]:
        return [uri for uri in self.storage.list(self.work_uri) if uri.rsplit("/", 1)[-1].startswith("part-")]

    def stored_manifest(self) -> dict | None:
        """The manifest the checkpoint was made for (None: there is none, or it is unreadable)."""
        manifest_uri = join(self.work_uri, MANIFEST)
        if not self.storage.exists(manifest_uri):
            return None
        try:
            stored = json.loads(self.storage.read_bytes(manifest_uri))
        except ValueError:
            return {}
        return stored if isinstance(stored, dict) else {}

    def prepare(self) -> None:
        """Start fresh when the checkpoint belongs to another source version or recipe:
        the old one is deleted, with one warning saying what differs."""
        stored = self.stored_manifest()
        if stored == self.manifest:
            return
        if stored is not None:
            log.warning(
                "checkpoint at %s discarded, starting the shard afresh: it was made for %s",
                self.work_uri, _difference(stored, self.manifest),
            )
            self.storage.delete_prefix(self.work_uri)
        self.storage.put_bytes(join(self.work_uri, MANIFEST), json.dumps(self.manifest, sort_keys=True).encode())

    def check_source(self, source_identity: str) -> None:
        """Refuse to commit a checkpoint made from another version of the source (one with
        no manifest, as tests and benches write, is taken as it is)."""
        stored = self.stored_manifest()
        if stored is not None and stored.get("source_identity") != source_identity:
            raise CheckpointMismatch(
                f"checkpoint at {self.work_uri} was made from another version of the source"
                f" ({stored.get('source_identity')}, now {source_identity}); expand the shard again"
            )

    @contextlib.contextmanager
    def local_segments(self) -> Iterator[list[Path]]:
        """The segment files as local paths (downloaded to disk first from S3, never
        held in memory)."""
        uris = self._segment_uris()
        if self._local:
            yield [Path(uri) for uri in uris]
            return
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(self.storage.local_copy(uri)) for uri in uris]

    @staticmethod
    def index(segments: list[Path]) -> dict[int, DocLocation]:
        """Where each finished document's line is; first copy wins, torn lines are skipped."""
        found: dict[int, DocLocation] = {}
        for segment in segments:
            with open(segment, "rb") as handle:
                offset = 0
                for line in handle:
                    start, offset = offset, offset + len(line)
                    if not line.endswith(b"\n"):
                        break  # torn by a kill mid-write
                    try:
                        doc_index = decode_json_line(line)["i"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    found.setdefault(doc_index, DocLocation(segment, start))
        return found

    @staticmethod
    def read(location: DocLocation) -> list[dict]:
        with open(location.segment, "rb") as handle:
            handle.seek(location.offset)
            return decode_json_line(handle.readline())["rows"]

    # -- writing ---------------------------------------------------------------------

    def append(self, doc_index: int, rows: list[dict]) -> None:
        line = encode_json_line({"i": doc_index, "rows": rows})
        if self._local:
            if self._handle is None:
                path = Path(join(self.work_uri, f"part-{self.run_id}.jsonl"))
                path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(path, "ab")
            self._handle.write(line)
            self._handle.flush()  # survives a killed process; fsync would only add power-loss safety
        else:
            self._collect_puts(keep=MAX_PENDING_PUTS)
            self._pending.append(line)
            if len(self._pending) >= self.s3_every:
                self._put_segment()

    def add_companion(self, snapshot: Callable[[], tuple[str, bytes] | None]) -> None:
        """On S3, put `snapshot()`'s object after each segment (and at every flush),
        through the same ordered uploader: it is exactly as durable as the checkpoint."""
        self._companions.append(snapshot)

    def _put_segment(self) -> None:
        """Queue the pending lines as the next segment object, then the companions'
        objects (one uploader thread keeps the order)."""
        if self._pending:
            self._sequence += 1
            uri = join(self.work_uri, f"part-{self.run_id}-{self._sequence:06d}.jsonl")
            body = b"".join(self._pending)
            self._pending = []
            self._queue_put(uri, body)
        for snapshot in self._companions:
            if (put := snapshot()) is not None:
                self._queue_put(*put)

    def _queue_put(self, uri: str, body: bytes) -> None:
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-put")
        self._puts.append(self._uploader.submit(self.storage.put_bytes, uri, body))

    def _collect_puts(self, keep: int) -> None:
        """Wait until at most `keep` puts are outstanding; raise the first failed one."""
        while self._puts and (len(self._puts) > keep or self._puts[0].done()):
            self._puts.pop(0).result()

    def flush(self) -> None:
        if self._handle:
            self._handle.flush()
        self._put_segment()
        self._collect_puts(keep=0)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._uploader is not None:
                self._uploader.shutdown(wait=True)
                self._uploader = None
            if self._handle:
                self._handle.close()
                self._handle = None

    def clear(self) -> None:
        self.close()
        self.storage.delete_prefix(self.work_uri)


def _difference(stored: dict, wanted: dict) -> str:
    """`source_identity sha256:ab.. (now sha256:cd..)`: the fields that differ."""
    names = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return strip_control(", ".join(f"{k} {stored.get(k)} (now {wanted.get(k)})" for k in names))


# A line per finished document: orjson, several times faster than json at thousands of
# documents a minute; json where orjson refuses (lone surrogates, which a jsonl source can
# carry as \ud800 escapes), written and read back as they were.


def encode_json_line(record: dict) -> bytes:
    try:
        return orjson.dumps(record) + b"\n"
    except orjson.JSONEncodeError:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")


def decode_json_line(line: bytes):
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)  # json decodes its own surrogatepass lines
