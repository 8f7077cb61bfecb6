"""A deterministic OpenAI-compatible LLM server for tests, staging and trial runs.

It speaks the slice of vLLM's HTTP API the pipeline uses (`/health`, `/v1/models`,
non-streaming `/v1/chat/completions`, `/metrics`) and answers the three MAGA calls
(pairs, rewrite, judge) without a model: every answer is a pure function of the source
document, the task and the seed, so runs are reproducible and need no GPU.

Switches inject the failures a real fleet produces, so the client's retry and
rejection paths can be exercised against a real socket rather than a monkeypatch.

The package keeps those parts apart: `answers` owns the deterministic content,
`chat_request` reads the prompt layout of a request, `faults` owns the fault specs
(their syntax is described there), when a fault fires and how content is spoiled,
`server` owns the HTTP side (the routes), `state` the configuration and counters, and
`serve` the process and the command line of ``python -m maga_tasks.tools.test_server``.
"""

from maga_tasks.tools.test_server.answers import (
    DocumentProfile,
    answer_for,
    count_tokens,
    cut_to_tokens,
    make_pairs,
    make_rewrite,
    profile_document,
)
from maga_tasks.tools.test_server.chat_request import ChatRequest, parse_chat_request
from maga_tasks.tools.test_server.faults import (
    CLOSERS,
    PREAMBLES,
    Fault,
    parse_fault,
    spoil,
)
from maga_tasks.tools.test_server.serve import main, run_server
from maga_tasks.tools.test_server.server import build_app
from maga_tasks.tools.test_server.state import ServerState

__all__ = [
    "CLOSERS",
    "PREAMBLES",
    "ChatRequest",
    "DocumentProfile",
    "Fault",
    "ServerState",
    "answer_for",
    "build_app",
    "count_tokens",
    "cut_to_tokens",
    "main",
    "make_pairs",
    "make_rewrite",
    "parse_chat_request",
    "parse_fault",
    "profile_document",
    "run_server",
    "spoil",
]
