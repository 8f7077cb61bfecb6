"""Tests of the deterministic test LLM server, run as real processes on loopback (its
fault specs and pairs without a server: tests/unit/tools/test_test_server.py).

Every server configuration the tests need is started at once (module scope) and torn
down by PID in the finalizer; requests go over HTTP with urllib, nothing is patched.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from maga_tasks.method import prompts
from maga_tasks.recipe import default_recipe_path, load_recipe
from maga_tasks.tools.test_server import CLOSERS, PREAMBLES, parse_fault
from maga_tasks.tools.test_server_process import TestServerProcess
from tests.support.texts import BEES, PRESS, TIDES

# Read by path: the package may be imported through an editable-install finder.
RECIPE = load_recipe(default_recipe_path())
STARTUP_TIMEOUT_S = 20


def faults(*specs: str) -> list[str]:
    return [arg for spec in specs for arg in ("--fault", spec)]


# One entry per server process; faults are narrowed by stage so one process can hold
# several without them masking each other.
SERVER_ARGS = {
    "plain": [],
    "guarded": [
        *("--api-key", "sekret"),
        *("--model", "other-model"),
        *("--latency-ms", "150"),
        "--no-structured-outputs",
    ],
    "transient": faults(
        "http500:1:2:stage=pairs", "http429:stage=judge", "disconnect:stage=rewrite"
    ),
    "timeout": faults("timeout:1:1:hang=0.6"),
    "rates": faults("http500:0.5:stage=judge", "bad_json:0.5"),
    "content_pairs": faults("wrong_count", "bad_json:stage=judge"),
    "truncate": faults("truncate"),
    "boilerplate": faults("boilerplate"),
    "empty": faults("empty"),
    "off_topic": faults("off_topic"),
    "die": faults("die_after:2"),
}

# Function words the keyword check below ignores (its own short list, on purpose).
STOPWORDS = set(
    """the and for that with from are was were this these those its their there which whose
    into than then when while about within they them too two one most more far""".split()
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("test-llm-logs")
    # All spawned first, so they boot in parallel.
    started = {name: TestServerProcess(extra=args, log_dir=log_dir).start() for name, args in SERVER_ARGS.items()}
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for server in started.values():
            server.wait_ready(max(0.1, deadline - time.monotonic()))
        yield started
    finally:
        for server in started.values():  # signal all first, so they stop in parallel
            server.terminate()
        for server in started.values():
            server.stop()


# Loopback only: never route through a proxy taken from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(
    server: TestServerProcess,
    path: str,
    body: dict | None = None,
    headers: dict | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        server.url + path,
        data=data,
        method="POST" if data is not None or path == "/_reset" else "GET",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def chat(server, messages, request_id=None, seed=0, timeout=5.0, **extra) -> tuple[int, dict, dict]:
    body = {
        "model": extra.pop("model", "maga-default"),
        "messages": messages,
        "seed": seed,
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 4096,
        **extra,
    }
    headers = {"X-Request-Id": request_id} if request_id else {}
    status, response_headers, raw = call(server, "/v1/chat/completions", body, headers, timeout)
    return status, response_headers, json.loads(raw) if raw else {}


def content_of(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


def pairs_of(server, document, request_id=None, seed=0, recipe=RECIPE) -> list[dict]:
    status, _, answer = chat(server, prompts.pairs_messages(recipe, document), request_id, seed)
    assert status == 200, answer
    return json.loads(content_of(answer))["pairs"]


def rewrite_messages(document: str) -> list[dict]:
    return prompts.rewrite_messages(
        RECIPE,
        document,
        "A question-and-answer sheet. Short questions and answers.",
        "Busy parents who read on a phone.",
    )


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def top_keywords(text: str, n: int = 20) -> set[str]:
    counts = Counter(w for w in words(text) if len(w) >= 3 and w not in STOPWORDS)
    return {word for word, _ in counts.most_common(n)}


def copy_ratio(source: str, rewrite: str, n: int = 8) -> float:
    def shingles(text):
        tokens = words(text)
        return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}

    mine = shingles(rewrite)
    return len(mine & shingles(source)) / len(mine) if mine else 0.0


# ---------------------------------------------------------------------------------------
# Honest answers


@pytest.mark.integration
def test_health_and_models(servers):
    status, _, body = call(servers["plain"], "/health")
    assert (status, body) == (200, b"")
    status, _, raw = call(servers["plain"], "/v1/models")
    models = json.loads(raw)
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["maga-default"]


@pytest.mark.integration
def test_pairs_are_valid_distinct_and_deterministic(servers):
    server = servers["plain"]
    low_g, high_g = RECIPE.pairs.genre_chars
    low_a, high_a = RECIPE.pairs.audience_chars
    for document in (BEES, TIDES, PRESS):
        pairs = pairs_of(server, document, seed=7)
        assert len(pairs) == RECIPE.pairs_per_document
        assert len({(p["genre"], p["audience"]) for p in pairs}) == len(pairs)
        for pair in pairs:
            assert (
                low_g <= len(pair["genre"]) <= high_g and low_a <= len(pair["audience"]) <= high_a
            )
        assert pairs_of(server, document, seed=7) == pairs
    # Varied by document and seed; N comes from the task text.
    assert pairs_of(server, BEES, seed=7) != pairs_of(server, TIDES, seed=7)
    assert len({json.dumps(pairs_of(server, BEES, seed=s)) for s in range(4)}) > 1
    assert (
        len(pairs_of(server, PRESS, recipe=RECIPE.model_copy(update={"pairs_per_document": 3})))
        == 3
    )


@pytest.mark.integration
def test_pairs_accept_structured_outputs(servers):
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "pairs", "schema": prompts.pairs_json_schema(RECIPE)},
    }
    status, _, answer = chat(
        servers["plain"], prompts.pairs_messages(RECIPE, BEES), response_format=schema
    )
    assert status == 200 and len(json.loads(content_of(answer))["pairs"]) == 5


@pytest.mark.integration
def test_rewrite_keeps_keywords_without_copying(servers):
    for document in (BEES, TIDES, PRESS):
        status, _, answer = chat(
            servers["plain"], rewrite_messages(document), "doc/rewrite/0/0", seed=3
        )
        assert status == 200 and answer["choices"][0]["finish_reason"] == "stop"
        text = content_of(answer)
        keywords = top_keywords(document)
        coverage = len(keywords & set(words(text))) / len(keywords)
        assert coverage >= 0.8, (coverage, text)
        assert 0.5 * len(document) <= len(text) <= 2 * len(document)
        assert copy_ratio(document, text) < 0.1
        again = chat(servers["plain"], rewrite_messages(document), "doc/rewrite/0/1", seed=3)[2]
        assert content_of(again) == text  # same document, task and seed


@pytest.mark.integration
def test_rewrite_of_a_tiny_document_is_long_enough(servers):
    status, _, answer = chat(servers["plain"], rewrite_messages("Photosynthesis needs light."))
    text = content_of(answer)
    assert status == 200 and 80 <= len(text) <= 4 * 27 and "photosynthesis" in text.lower()


@pytest.mark.integration
def test_max_tokens_cuts_the_answer(servers):
    status, _, answer = chat(servers["plain"], rewrite_messages(BEES), max_tokens=10)
    assert status == 200
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 10
    full = content_of(chat(servers["plain"], rewrite_messages(BEES))[2])
    assert full.startswith(content_of(answer)) and len(content_of(answer)) < len(full)


@pytest.mark.integration
def test_usage_counts_tokens(servers):
    answer = chat(servers["plain"], rewrite_messages(TIDES))[2]
    usage = answer["usage"]
    assert usage["prompt_tokens"] > len(TIDES.split())
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.integration
def test_judge_scores_word_overlap(servers):
    server = servers["plain"]
    rewrite = content_of(chat(server, rewrite_messages(PRESS))[2])
    for text, scores in ((rewrite, {4, 5}), (TIDES, {1, 2}), ("", {1})):
        status, _, answer = chat(
            server, prompts.judge_messages(RECIPE, PRESS, text), temperature=0.0
        )
        verdict = json.loads(content_of(answer))
        assert status == 200 and verdict["score"] in scores and verdict["analysis"], (
            text[:40],
            verdict,
        )


@pytest.mark.integration
def test_stats_reset_and_metrics(servers):
    server = servers["plain"]
    assert call(server, "/_reset")[0] == 200
    chat(server, prompts.pairs_messages(RECIPE, BEES), "bees/pairs/0/0")
    chat(server, rewrite_messages(BEES), "bees/rewrite/1/0")
    chat(server, rewrite_messages(BEES), "bees/rewrite/2/0")
    chat(server, prompts.judge_messages(RECIPE, TIDES, "Tides."))  # no id: stage from the task
    stats = json.loads(call(server, "/_stats")[2])
    assert stats["requests_total"] == 4
    assert stats["by_stage"] == {"pairs": 1, "rewrite": 2, "judge": 1}
    assert stats["by_doc"]["bees"] == 3 and len(stats["by_doc"]) == 2
    assert stats["prompt_tokens_total"] > 0 and stats["completion_tokens_total"] > 0
    assert stats["faults_fired"] == {}
    metrics = call(server, "/metrics")[2].decode()
    for name in (
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
    ):
        assert re.search(
            rf'^{name}\{{[^}}]*model_name="maga-default"[^}}]*\}} \d+$', metrics, re.MULTILINE
        ), name
    call(server, "/_reset")
    assert json.loads(call(server, "/_stats")[2])["requests_total"] == 0


@pytest.mark.integration
def test_bad_requests_are_rejected(servers):
    server = servers["plain"]
    status, _, answer = chat(server, rewrite_messages(BEES), model="no-such-model")
    assert status == 404 and "no-such-model" in answer["error"]["message"]
    status, _, _raw = call(server, "/v1/chat/completions", {"model": "maga-default", "messages": []})
    assert status == 400


# ---------------------------------------------------------------------------------------
# Server switches


@pytest.mark.integration
def test_api_key_is_enforced_on_v1_routes(servers):
    server = servers["guarded"]
    assert call(server, "/v1/models")[0] == 401
    assert call(server, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, _, raw = call(server, "/v1/models", headers={"Authorization": "Bearer sekret"})
    assert status == 200 and json.loads(raw)["data"][0]["id"] == "other-model"
    assert call(server, "/health")[0] == 200 and call(server, "/metrics")[0] == 200
    status, _, body = call(server, "/v1/chat/completions", {"messages": rewrite_messages(BEES)})
    assert status == 401 and json.loads(body) == {"error": "Unauthorized"}


@pytest.mark.integration
def test_structured_outputs_can_be_refused(servers):
    server, auth = servers["guarded"], {"Authorization": "Bearer sekret"}
    messages = prompts.pairs_messages(RECIPE, BEES)
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "pairs", "schema": prompts.pairs_json_schema(RECIPE)},
    }
    body = {"model": "other-model", "messages": messages, "response_format": schema}
    status, _, raw = call(server, "/v1/chat/completions", body, auth)
    assert status == 400 and "response_format" in json.loads(raw)["error"]["message"]
    del body["response_format"]
    started = time.monotonic()
    assert call(server, "/v1/chat/completions", body, auth)[0] == 200
    assert time.monotonic() - started >= 0.15  # --latency-ms


# ---------------------------------------------------------------------------------------
# Transient faults


@pytest.mark.integration
def test_http500_fires_times_per_request_then_passes(servers):
    server = servers["transient"]
    messages = prompts.pairs_messages(RECIPE, BEES)
    # The pipeline's ids: PAIR is "-1.<stage attempt>" for pairs, ATTEMPT counts from 1.
    statuses = [chat(server, messages, f"b5/pairs/-1.0/{attempt}")[0] for attempt in (1, 2, 3)]
    assert statuses == [500, 500, 200]
    assert chat(server, messages, "other5/pairs/0/0")[0] == 500  # a new request is hit anew
    assert json.loads(call(server, "/_stats")[2])["faults_fired"]["http500"] == 3


@pytest.mark.integration
def test_http429_says_retry_after(servers):
    server = servers["transient"]
    messages = prompts.judge_messages(RECIPE, BEES, "Bees make honey.")
    status, headers, answer = chat(server, messages, "b4/judge/0/0")
    assert status == 429 and headers["Retry-After"] == "0" and answer["error"]["code"] == 429
    assert chat(server, messages, "b4/judge/0/1")[0] == 200


@pytest.mark.integration
def test_disconnect_drops_the_connection_once(servers):
    server = servers["transient"]
    with pytest.raises((ConnectionError, urllib.error.URLError, OSError)):
        chat(server, rewrite_messages(BEES), "bd/rewrite/3/0")
    assert chat(server, rewrite_messages(BEES), "bd/rewrite/3/1")[0] == 200


@pytest.mark.integration
def test_timeout_hangs_then_answers(servers):
    server = servers["timeout"]
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        chat(server, rewrite_messages(TIDES), "tA/rewrite/0/0", timeout=0.2)
    started = time.monotonic()
    assert chat(server, rewrite_messages(TIDES), "tA/rewrite/0/1")[0] == 200  # the retry is quick
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    assert chat(server, rewrite_messages(TIDES), "tB/rewrite/0/0")[0] == 200  # a patient client
    assert time.monotonic() - started >= 0.6


@pytest.mark.integration
def test_rates_aim_at_a_stable_share_of_requests(servers):
    server, fault = servers["rates"], parse_fault("http500:0.5")
    messages = prompts.judge_messages(RECIPE, TIDES, "The moon pulls the sea.")
    hit = {k for k in range(60) if chat(server, messages, f"r{k}/judge/0/0")[0] == 500}
    assert 15 <= len(hit) <= 45
    assert hit == {k for k in range(60) if fault.aims_at(f"r{k}/judge/0")}  # hash of the key
    assert all(chat(server, messages, f"r{k}/judge/0/1")[0] == 200 for k in hit)


@pytest.mark.integration
def test_content_fault_retries_may_escape(servers):
    server = servers["rates"]
    messages = prompts.pairs_messages(RECIPE, PRESS)

    def parses(request_id, seed):
        try:
            return bool(json.loads(content_of(chat(server, messages, request_id, seed)[2])))
        except ValueError:
            return False

    spoiled = [k for k in range(60) if not parses(f"c{k}/pairs/0/0", seed=k)]
    assert 15 <= len(spoiled) <= 45
    escaped = [k for k in spoiled if parses(f"c{k}/pairs/0/1", seed=1000 + k)]
    assert 0 < len(escaped) < len(spoiled)


# ---------------------------------------------------------------------------------------
# Content faults


@pytest.mark.integration
def test_wrong_count_and_bad_json(servers):
    server = servers["content_pairs"]
    for k in range(6):
        answer = chat(server, prompts.pairs_messages(RECIPE, BEES), f"w{k}/pairs/0/0", seed=k)[2]
        pairs = json.loads(content_of(answer))["pairs"]
        distinct = {(p["genre"], p["audience"]) for p in pairs}
        assert len(pairs) == 4 or len(distinct) < len(pairs)
    verdict = content_of(
        chat(server, prompts.judge_messages(RECIPE, BEES, "Bees."), "w/judge/0/0")[2]
    )
    with pytest.raises(ValueError):
        json.loads(verdict)
    assert verdict.startswith("Score:")
    assert chat(server, rewrite_messages(BEES), "w/rewrite/0/0")[0] == 200  # other stages untouched
    fired = json.loads(call(server, "/_stats")[2])["faults_fired"]
    assert fired == {"wrong_count": 6, "bad_json": 1}


@pytest.mark.integration
def test_truncate_cuts_mid_text(servers):
    answer = chat(servers["truncate"], rewrite_messages(BEES), "t/rewrite/0/0", seed=5)[2]
    honest = content_of(chat(servers["plain"], rewrite_messages(BEES), "t/rewrite/0/0", seed=5)[2])
    text = content_of(answer)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert honest.startswith(text) and 0.3 * len(honest) < len(text) < 0.7 * len(honest)


@pytest.mark.integration
def test_boilerplate_wraps_the_rewrite(servers):
    text = content_of(chat(servers["boilerplate"], rewrite_messages(TIDES), seed=2)[2])
    honest = content_of(chat(servers["plain"], rewrite_messages(TIDES), seed=2)[2])
    assert any(text.startswith(p) for p in PREAMBLES) and any(text.endswith(c) for c in CLOSERS)
    assert honest in text


@pytest.mark.integration
def test_empty_rewrite(servers):
    answer = chat(servers["empty"], rewrite_messages(TIDES))[2]
    assert content_of(answer) == "" and answer["usage"]["completion_tokens"] == 0


@pytest.mark.integration
def test_off_topic_shares_no_word_with_the_source(servers):
    for document in (BEES, TIDES, PRESS):
        text = content_of(chat(servers["off_topic"], rewrite_messages(document))[2])
        assert len(text) >= 80 and not set(words(text)) & set(words(document))


@pytest.mark.integration
@pytest.mark.parametrize(
    "server_name, finish, removed, reason",
    [
        ("plain", "stop", 0, None),
        ("boilerplate", "stop", 2, None),
        ("truncate", "length", 0, "truncated"),
        ("empty", "stop", 0, "empty"),
        ("off_topic", "stop", 0, "low_keyword_coverage"),
    ],
)
def test_pipeline_cleaning_sees_what_each_fault_means(
    servers, server_name, finish, removed, reason
):
    # The contract with the cleaning step: honest rewrites pass, and each content fault
    # is caught for the reason it stands for.
    from maga_tasks.method.cleaning import clean_rewrite

    honest = content_of(chat(servers["plain"], rewrite_messages(BEES), "cl/rewrite/0/0", 9)[2])
    answer = chat(servers[server_name], rewrite_messages(BEES), "cl/rewrite/0/0", 9)[2]
    assert answer["choices"][0]["finish_reason"] == finish
    verdict = clean_rewrite(BEES, content_of(answer), finish, RECIPE.cleaning)
    assert (verdict.reject_reason, verdict.boilerplate_removed) == (reason, removed), verdict
    if reason is None:
        assert verdict.text == honest


@pytest.mark.integration
def test_die_after_exits_the_process(servers):
    server = servers["die"]
    messages = rewrite_messages(PRESS)
    assert chat(server, messages, "d/rewrite/0/0")[0] == 200
    assert chat(server, messages, "d/rewrite/1/0")[0] == 200
    assert server.popen.wait(timeout=5) != 0
    assert "die_after:2" in server.log_text()
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        chat(server, messages, "d/rewrite/2/0")
