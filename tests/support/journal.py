"""Answer journal entries made by hand: answers, request digests, and the journal files a
work folder holds."""

from __future__ import annotations

from pathlib import Path

from maga_tasks.data.answer_journal import request_digest
from maga_tasks.llm.client import Completion
from maga_tasks.recipe import load_recipe

SAMPLING = load_recipe().rewrite.sampling
# The bound on one journal line the tests give their journals.
BOUND = 64 * 1024


def answer(text: str, prompt: int = 10, completion: int = 5) -> Completion:
    return Completion(text, "stop", prompt, completion, 1, "http://127.0.0.1:1")


def digest_of(text: str, seed: int = 1) -> str:
    return request_digest("m", [{"role": "user", "content": text}], SAMPLING, {"seed": seed, "kind": "rewrite"})


def journal_files(work: Path) -> list[Path]:
    return sorted(work.glob("answers-*.jsonl"))
