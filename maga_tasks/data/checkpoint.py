"""Checkpoints of finished documents under `_work/{shard}/`, on local disk or S3.

Each run writes its own segment files (JSON lines, one line per finished document with
all its output rows), so nothing is ever appended to an object in place and two runs
never write the same file. Locally a line is flushed as soon as its document finishes;
on S3 a segment object is put every `s3_every` documents, by a background thread so the
shard's event loop never waits for the network (a failed put surfaces at the next
append or at close). Reading tolerates a torn last line (a kill in the middle of a
write) and keeps the first copy of any document.
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import orjson

from maga_tasks.data.storage import LocalStorage, Storage, join

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Segment puts queued at most before `append` waits for the oldest (bounds memory).
MAX_PENDING_PUTS = 2


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

    # -- reading ---------------------------------------------------------------------

    def _segment_uris(self) -> list[str]:
        return [uri for uri in self.storage.list(self.work_uri) if uri.rsplit("/", 1)[-1].startswith("part-")]

    def prepare(self) -> None:
        """Start fresh when the checkpoint belongs to another source or recipe."""
        manifest_uri = join(self.work_uri, MANIFEST)
        if self.storage.exists(manifest_uri):
            stored = json.loads(self.storage.read_bytes(manifest_uri))
            if stored == self.manifest:
                return
            log.warning("checkpoint at %s was made for other input (%s); starting over", self.work_uri, stored)
            self.storage.delete_prefix(self.work_uri)
        self.storage.put_bytes(manifest_uri, json.dumps(self.manifest, sort_keys=True).encode())

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
                        doc_index = _decode_line(line)["i"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    found.setdefault(doc_index, DocLocation(segment, start))
        return found

    @staticmethod
    def read(location: DocLocation) -> list[dict]:
        with open(location.segment, "rb") as handle:
            handle.seek(location.offset)
            return _decode_line(handle.readline())["rows"]

    # -- writing ---------------------------------------------------------------------

    def append(self, doc_index: int, rows: list[dict]) -> None:
        line = _encode_line({"i": doc_index, "rows": rows})
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

    def _put_segment(self) -> None:
        """Queue the pending lines as the next segment object (one uploader thread keeps
        the order)."""
        if not self._pending:
            return
        self._sequence += 1
        uri = join(self.work_uri, f"part-{self.run_id}-{self._sequence:06d}.jsonl")
        body = b"".join(self._pending)
        self._pending = []
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


# A line per finished document: orjson, several times faster than json at thousands of
# documents a minute; json where orjson refuses (lone surrogates, which a jsonl source can
# carry as \ud800 escapes), written and read back as they were.


def _encode_line(record: dict) -> bytes:
    try:
        return orjson.dumps(record) + b"\n"
    except orjson.JSONEncodeError:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")


def _decode_line(line: bytes):
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)  # json decodes its own surrogatepass lines
