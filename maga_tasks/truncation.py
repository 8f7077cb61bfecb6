"""Cutting documents that exceed the context budget, on the served model's tokens.

The tokenizer is loaded only when a document could be over budget: byte-level BPE never
makes more tokens than the text has UTF-8 bytes, so shorter texts are never tokenized.
"""

from __future__ import annotations

import logging
import os
import threading

from .errors import TokenizerUnavailable

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
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
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
        encoding = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        if len(offsets) <= limit and len(head) == len(text):
            return text, None
        end = offsets[min(limit, len(offsets)) - 1][1]
        return text[:end], min(limit, len(offsets))
