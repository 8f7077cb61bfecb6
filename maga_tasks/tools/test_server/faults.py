"""The test LLM server's fault switches: the failures a real fleet produces.

It owns the fault specs and their parsing, the decision whether a fault fires for a
request, and the content spoilers (how a misbehaving model spoils an answer); what a
transient fault does to the HTTP exchange is the server's part.

Fault specs (repeatable), ``KIND[:RATE[:TIMES]][:KEY=VALUE...]``:

* RATE (default 1.0) is the share of requests the fault is aimed at, chosen by hashing
  the request key, so the same requests are hit on every run.
* TIMES caps how often the fault fires per request (document/stage/pair): an integer
  or ``inf``. Default 1 for transient faults, ``inf`` for content faults.
* Options: ``rate=``, ``times=``, ``hang=SECONDS`` (timeout only, default 30),
  ``stage=pairs+rewrite`` to narrow the stages a fault applies to, and ``doc=KEY`` to
  aim it at one document only (KEY as in the request id: ``shard%3Aid``, URL-quoted).

Transient faults are aimed by the request key without the attempt number, so a retry
of a hit request is hit again until the fault has fired TIMES times: ``http500``,
``http429`` (with ``Retry-After: 0``), ``timeout`` (sleep ``hang`` seconds, then
answer), ``disconnect`` (close the connection without a response) and ``crash`` (the
process exits on receipt, like a worker that a request kills).

Content faults are aimed by the full key with attempt and seed, so a retry with a new
seed may escape: ``bad_json`` (pairs: prose instead of JSON), ``wrong_count`` (pairs:
one pair short or a duplicate), ``truncate`` (rewrite: cut in the middle, finish
reason "length"), ``boilerplate`` (rewrite wrapped in assistant chatter), ``empty``
(rewrite: empty content), ``off_topic`` (rewrite: text sharing no word with the
source) and ``eos`` (rewrite: the honest answer, with finish reason "eos" instead of
"stop", as servers other than vLLM say a natural end).

``deep_json`` is a content fault too: the answer (pairs or judge; default pairs) is JSON
nested 50,000 levels deep. ``loose_types`` (judge) keeps the verdict's fields but not
their types: the score ``true``, ``genre_kept`` the string "yes" (JSON allows both; a
grammar-less model writes them).

Hostile faults are what a broken server or a proxy that rewrites bodies sends instead of
a chat completion. They are aimed like transient faults (the request key without the
attempt) but fire on every attempt by default (TIMES ``inf``), so a hit request never
gets a good answer unless TIMES says so. The answer's envelope breaks its schema:
``usage_huge`` (``usage.prompt_tokens`` 1e30), ``usage_negative`` (a negative
``prompt_tokens``), ``usage_string`` (``completion_tokens`` as a string),
``finish_list`` (``finish_reason`` a list), ``content_number`` and ``content_object``
(``message.content`` a number or an object); or its size does: ``huge_answer`` (a 20 MiB
body with its Content-Length), ``endless_answer`` (a chunked body that never ends until
the client leaves); or it is an error page that must not be shown as it is:
``echo_auth`` (401 whose body echoes the request's headers, Authorization included),
``nul_5xx`` (500 with NUL and escape bytes in its body), ``huge_error`` (503 with a
20 MiB page).

``die_after:N`` makes the process exit (``os._exit``) once N chat completion requests
have been answered (any status), like a worker that dies under load.

Faults are tried in the order given and the first that fires wins. Examples:
``http500:0.2:2``, ``timeout:0.1:1:hang=5``, ``bad_json:1:stage=pairs+judge``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from maga_tasks.tools.test_server.answers import (
    STAGES,
    WORD_RE,
    DocumentProfile,
    _unit_hash,
    count_tokens,
    cut_to_tokens,
)

TRANSIENT_KINDS = ("http500", "http429", "timeout", "disconnect", "crash")
CONTENT_KINDS = (
    "bad_json", "wrong_count", "truncate", "boilerplate", "empty", "off_topic", "eos", "deep_json", "loose_types"
)
ENVELOPE_KINDS = ("usage_huge", "usage_negative", "usage_string", "finish_list", "content_number", "content_object")
HOSTILE_KINDS = (*ENVELOPE_KINDS, "huge_answer", "endless_answer", "echo_auth", "nul_5xx", "huge_error")
# Stages each kind may apply to, and the default when the spec names none. Content
# faults default to the stage whose output they spoil in the method's description.
ALLOWED_STAGES = {
    **{kind: frozenset(STAGES) for kind in (*TRANSIENT_KINDS, *HOSTILE_KINDS)},
    "bad_json": frozenset({"pairs", "judge"}),
    "deep_json": frozenset({"pairs", "judge"}),
    "loose_types": frozenset({"judge"}),
    "wrong_count": frozenset({"pairs"}),
    "truncate": frozenset(STAGES),
    "boilerplate": frozenset({"rewrite"}),
    "empty": frozenset(STAGES),
    "off_topic": frozenset({"rewrite"}),
    "eos": frozenset(STAGES),
}
DEFAULT_STAGES = {
    **{kind: frozenset(STAGES) for kind in (*TRANSIENT_KINDS, *HOSTILE_KINDS)},
    "bad_json": frozenset({"pairs"}),
    "deep_json": frozenset({"pairs"}),
    "loose_types": frozenset({"judge"}),
    "wrong_count": frozenset({"pairs"}),
    "truncate": frozenset({"rewrite"}),
    "boilerplate": frozenset({"rewrite"}),
    "empty": frozenset({"rewrite"}),
    "off_topic": frozenset({"rewrite"}),
    "eos": frozenset({"rewrite"}),
}
KINDS = (*TRANSIENT_KINDS, *CONTENT_KINDS, *HOSTILE_KINDS, "die_after")
DEFAULT_HANG_S = 30.0
DEEP_JSON_LEVELS = 50_000
HUGE_BODY_BYTES = 20 * 1024**2


# ---------------------------------------------------------------------------------------
# Fault specs


@dataclass(frozen=True)
class Fault:
    """One injected failure mode; build it with `parse_fault`."""

    kind: str
    rate: float = 1.0
    times: float = 1  # math.inf for no cap
    hang_s: float = DEFAULT_HANG_S
    stages: frozenset[str] = frozenset(STAGES)
    after: int = 0  # die_after only: chat completions answered before the exit
    doc: str | None = None  # aimed at this document's requests only

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS

    @property
    def hostile(self) -> bool:
        return self.kind in HOSTILE_KINDS

    def aims_at(self, key: str) -> bool:
        """Whether this fault is aimed at the request with this selection key."""
        if self.doc is not None and not key.startswith(f"{self.doc}/"):
            return False
        return self.rate >= 1.0 or _unit_hash(self.kind, key) < self.rate


def _parse_rate(text: str, spec: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"bad fault spec {spec!r}: RATE must be a number in [0, 1], got {text!r}")
    return rate


def _parse_times(text: str, spec: str) -> float:
    if text.lower() in ("inf", "*"):
        return math.inf
    if not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"bad fault spec {spec!r}: TIMES must be an integer >= 1 or 'inf', got {text!r}"
        )
    return int(text)


def _parse_seconds(text: str, spec: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0.0 <= seconds <= 86400.0:
        raise ValueError(
            f"bad fault spec {spec!r}: hang must be seconds in [0, 86400], got {text!r}"
        )
    return seconds


def _parse_stages(text: str, kind: str, spec: str) -> frozenset[str]:
    stages = frozenset(s.strip() for s in text.split("+") if s.strip())
    wrong = stages - ALLOWED_STAGES[kind]
    if not stages or wrong:
        allowed = "+".join(s for s in STAGES if s in ALLOWED_STAGES[kind])
        raise ValueError(
            f"bad fault spec {spec!r}: stage for {kind} must be among {allowed}, got {text!r}"
        )
    return stages


def _parse_die_after(parts: list[str], spec: str) -> Fault:
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"bad fault spec {spec!r}: expected die_after:N with N an integer >= 0")
    return Fault(kind="die_after", after=int(parts[1]), stages=frozenset(STAGES))


def parse_fault(spec: str) -> Fault:
    """Parse ``KIND[:RATE[:TIMES]][:KEY=VALUE...]`` (see the module docstring).

    Raises ValueError with a one-line message naming the problem.
    """
    parts = [part.strip() for part in spec.strip().split(":")]
    kind = parts[0]
    if kind not in KINDS:
        raise ValueError(
            f"bad fault spec {spec!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})"
        )
    if kind == "die_after":
        return _parse_die_after(parts, spec)
    values: dict[str, object] = {
        "rate": 1.0,
        "times": 1 if kind in TRANSIENT_KINDS else math.inf,  # content and hostile: every time
        "hang_s": DEFAULT_HANG_S,
        "stages": DEFAULT_STAGES[kind],
    }
    positional = ["rate", "times"]
    for part in parts[1:]:
        name, has_value, text = part.partition("=")
        if not has_value:
            if not positional:
                raise ValueError(
                    f"bad fault spec {spec!r}: too many positional fields (KIND:RATE:TIMES)"
                )
            name, text = positional.pop(0), part
        elif name in positional:
            positional.remove(name)
        if name == "rate":
            values["rate"] = _parse_rate(text, spec)
        elif name == "times":
            values["times"] = _parse_times(text, spec)
        elif name == "hang" and kind == "timeout":
            values["hang_s"] = _parse_seconds(text, spec)
        elif name == "stage":
            values["stages"] = _parse_stages(text, kind, spec)
        elif name == "doc" and text:
            values["doc"] = text
        else:
            options = "rate, times, stage, doc" + (", hang" if kind == "timeout" else "")
            raise ValueError(
                f"bad fault spec {spec!r}: unknown option {name!r} for {kind} (options: {options})"
            )
    return Fault(kind=kind, **values)  # type: ignore[arg-type]


def fault_fires(
    fired_per_key: dict[tuple[int, str], int],
    index: int,
    fault: Fault,
    stage: str,
    aim_key: str,
    request_key: str,
) -> bool:
    """Whether `fault` (the `index`-th of the server's) fires now; `aim_key` picks the
    requests it is aimed at and `request_key` (no attempt) is what TIMES counts firings
    against in `fired_per_key`, which a firing updates."""
    if stage not in fault.stages or not fault.aims_at(aim_key):
        return False
    if fault.times != math.inf:
        counter_key = (index, request_key)
        fired = fired_per_key.get(counter_key, 0)
        if fired >= fault.times:
            return False
        fired_per_key[counter_key] = fired + 1
    return True


# ---------------------------------------------------------------------------------------
# Content faults: how a misbehaving model spoils an answer


PREAMBLES = (
    "Sure! Here is the rewritten text:",
    "The following is a rewritten version of the document for the requested audience.",
    "Certainly. Below is the rewrite you asked for.",
)
CLOSERS = (
    "Note: all information points of the original have been kept.",
    "I hope this helps! Let me know if you would like any changes.",
    "Please note that some details were simplified for the audience.",
    "The above is as required by the task.",
)
OFF_TOPIC_TEXT = (
    "Sourdough bread begins with a starter: flour and water left to ferment for several "
    "days until wild yeast and lactobacilli make it bubble. Bakers feed the starter daily, "
    "discard part of it, and judge readiness by smell and rise. Dough is folded gently "
    "every half hour, shaped, proofed overnight in a cool place, then baked very hot in a "
    "covered pot so steam builds a crisp, blistered crust around an open crumb. "
)


def spoil(
    kind: str, answer: str, stage: str, profile: DocumentProfile, salt: int
) -> tuple[str, bool]:
    """Apply a content fault to an answer; returns (content, cut_for_length)."""
    if kind == "empty":
        return "", False
    if kind == "truncate":
        return cut_to_tokens(answer, max(1, count_tokens(answer) // 2)), True
    if kind == "bad_json":
        return _prose_instead_of_json(answer, stage), False
    if kind == "wrong_count":
        return _wrong_count(answer, salt), False
    if kind == "boilerplate":
        return f"{PREAMBLES[salt % 3]}\n\n{answer}\n\n{CLOSERS[(salt >> 4) % 4]}", False
    if kind == "off_topic":
        return _off_topic(profile), False
    if kind == "eos":  # the content stays; the server reports the end differently
        return answer, False
    if kind == "deep_json":
        return '{"pairs": ' + "[" * DEEP_JSON_LEVELS + "]" * DEEP_JSON_LEVELS + "}", False
    if kind == "loose_types":
        return json.dumps({**json.loads(answer), "score": True, "genre_kept": "yes"}), False
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------
# Hostile faults: an answer that breaks the chat-completions schema


def spoil_envelope(kind: str, completion: dict) -> dict:
    """A chat completion body with one field of the wrong type or out of bounds."""
    choice, usage = completion["choices"][0], completion["usage"]
    if kind == "usage_huge":
        usage["prompt_tokens"] = 1e30
    elif kind == "usage_negative":
        usage["prompt_tokens"] = -19_997_666
    elif kind == "usage_string":
        usage["completion_tokens"] = str(usage["completion_tokens"])
    elif kind == "finish_list":
        choice["finish_reason"] = [choice["finish_reason"]]
    elif kind == "content_number":
        choice["message"]["content"] = 42
    elif kind == "content_object":
        choice["message"]["content"] = {"text": choice["message"]["content"]}
    else:
        raise AssertionError(kind)
    return completion


def huge_completion(completion: dict) -> bytes:
    """The completion with its content padded to a body of HUGE_BODY_BYTES."""
    choice = completion["choices"][0]
    choice["message"]["content"] = ""
    envelope = len(json.dumps(completion))
    choice["message"]["content"] = "a" * max(0, HUGE_BODY_BYTES - envelope)
    return json.dumps(completion).encode()


def _prose_instead_of_json(answer: str, stage: str) -> str:
    if stage == "pairs":
        pairs = json.loads(answer)["pairs"]
        lines = [
            f"{i}. Genre: {p['genre']} Audience: {p['audience']}" for i, p in enumerate(pairs, 1)
        ]
        return "Here are some genre and audience pairs for this document:\n" + "\n".join(lines)
    if stage == "judge":
        verdict = json.loads(answer)
        return f"Score: {verdict['score']}/5. {verdict['analysis']}"
    return answer


def _wrong_count(answer: str, salt: int) -> str:
    pairs = json.loads(answer)["pairs"]
    if salt % 2 and len(pairs) > 1:
        pairs[-1] = dict(pairs[0])  # a duplicate: the right count, but not distinct pairs
    else:
        pairs = pairs[:-1]
    return json.dumps({"pairs": pairs}, ensure_ascii=False)


def _off_topic(profile: DocumentProfile) -> str:
    # Drop every word the source uses, so keyword coverage is exactly zero.
    kept = [w for w in OFF_TOPIC_TEXT.split() if not _shares_word(w, profile)]
    text = " ".join(kept) or " ".join(f"zq{i}x" for i in range(12))  # source used every word
    while len(text) < max(80, profile.chars // 2):
        text = f"{text} {text}"
    return text


def _shares_word(token: str, profile: DocumentProfile) -> bool:
    return any(w.lower() in profile.vocabulary for w in WORD_RE.findall(token))
