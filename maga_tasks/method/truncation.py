"""Cutting documents that exceed the context budget, on the served model's tokens.

The tokenizer is loaded only when a document could be over budget: byte-level BPE never
makes more tokens than the text has UTF-8 bytes, so shorter texts are never tokenized.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from maga_tasks.errors import TokenizerUnavailable

log = logging.getLogger(__name__)

# No tokenizer we serve averages more characters per token than this, so the text is
# pre-cut here before tokenizing (keeps a 5 MB document from costing seconds).
_MAX_CHARS_PER_TOKEN = 32
# Special tokens some tokenizers add (BOS and the like) must fit in the budget too.
_SAFETY_TOKENS = 8


class DocumentCutter:
    def __init__(self, tokenizer_name: str, budget_tokens: int):
        self.tokenizer_name = tokenizer_name
        self.budget = budget_tokens
        self._tokenizer = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._tokenizer is None:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                try:
                    self._tokenizer = _load_offsets_tokenizer(self.tokenizer_name)
                except Exception as error:  # hub/network/format errors all mean the same here
                    raise TokenizerUnavailable(
                        f"cannot load tokenizer {self.tokenizer_name!r} to cut an over-long document "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                        "set `tokenizer:` in the recipe to a local directory or hub id"
                    ) from None
                log.info("loaded tokenizer %s", self.tokenizer_name)
        return self._tokenizer

    def cut(self, text: str) -> tuple[str, int | None]:
        """The text within budget, and its token count when it had to be cut (else None)."""
        limit = self.budget - _SAFETY_TOKENS
        if len(text.encode("utf-8", "surrogatepass")) <= limit:
            return text, None
        tokenizer = self._load()
        head = text[: self.budget * _MAX_CHARS_PER_TOKEN]
        offsets = tokenizer(head)
        if len(offsets) <= limit and len(head) == len(text):
            return text, None
        end = offsets[min(limit, len(offsets)) - 1][1]
        return text[:end], min(limit, len(offsets))


def _load_offsets_tokenizer(name: str):
    """A function text -> token character offsets, for a local directory or a hub id.

    A local `tokenizer.json` is read with `tokenizers` directly (the engine behind
    transformers' fast tokenizers; it loads in milliseconds where importing
    transformers takes seconds); anything else goes through transformers' AutoTokenizer.
    """
    local = Path(name) / "tokenizer.json"
    if local.is_file():
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(local))
        return lambda text: fast.encode(text, add_special_tokens=False).offsets
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(name)
    return lambda text: auto(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
