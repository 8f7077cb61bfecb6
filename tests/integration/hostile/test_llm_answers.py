"""Hostile LLM answers: the fleet is half-trusted, so a lying answer is a failed attempt.

Each case is a real test LLM server on loopback with a hostile fault switch
(`maga_tasks.tools.test_server.faults`) and a real shard expanded against it:

- aimed at one document, a malformed answer (usage 1e30, negative or a string,
  finish_reason a list, content a number or an object, pairs JSON 50,000 deep, a 20 MiB
  or endless body, a 5xx with NUL bytes or a 20 MiB error page) spends that request's
  budget and rejects that document with a clear reason; the shard commits the rest;
- answered by the whole fleet, it fails the shard with one clear line, nothing committed
  and no bad value in the checkpoint;
- no bad value reaches data/, rejected/ or the checkpoint, and the API key is in no
  output file, log line or error, even when a 401 echoes the Authorization header.

The last test prints the peak RSS of a shard whose every request is first answered
with 20 MiB, beside an honest shard's, each in a fresh process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest

from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.shard import expand_shard
from maga_tasks.errors import EndpointsUnavailable, FleetRefused
from maga_tasks.llm.answer import MAX_USAGE_TOKENS
from maga_tasks.llm.client import POOLED_CONNECTION_IDLE_S, LLMClient
from maga_tasks.recipe import Sampling, load_recipe
from maga_tasks.settings import RunSettings
from tests.support.hostile_servers import IdleClosingServer, RecordingServer
from tests.support.paths import REPO

pytestmark = pytest.mark.integration

RECIPE = load_recipe()
PAIRS = RECIPE.pairs_per_document
DOCUMENTS = 12
API_KEY = "hostile-test-key-7f3a91c2"
USAGE_COLUMNS = ("prompt_tokens", "completion_tokens", "pairs_prompt_tokens", "pairs_completion_tokens")
FINISH_REASONS = {"stop", "length", "eos", None}
DETAIL_BOUND = 400  # reject_detail: the stage keeps 300 characters of the client's reason


def settings(*urls: str, **extra) -> RunSettings:
    values = dict(endpoints=urls, api_key=API_KEY, max_concurrency=16, backoff_base_s=0.05, backoff_max_s=0.2,
                  progress_interval_s=1)
    values.update(extra)
    return RunSettings(**values)


@pytest.fixture
def shard(tmp_path) -> tuple[Path, str]:
    """A source shard and the fault option that aims at its first document."""
    source = write_sample_corpus(tmp_path / "src", 1, DOCUMENTS)[0]
    victim = pq.read_table(source, columns=["id"]).column("id")[0].as_py()
    return source, victim


def server_args() -> list[str]:
    return ["--api-key", API_KEY, "--model", RECIPE.model]


def aimed(kind: str, victim_key: str, *options: str) -> str:
    return ":".join((kind, *options, f"doc={quote(victim_key, safe='')}"))


def output_texts(root: Path) -> list[str]:
    """Every text written under `root`: raw bytes of each file and every parquet value."""
    texts = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        texts.append(path.read_bytes().decode("utf-8", "replace"))
        if path.suffix == ".parquet":
            texts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
    return texts


def checkpoint_rows(root: Path) -> list[dict]:
    rows = []
    for segment in root.rglob("part-*.jsonl"):  # _work/{shard}/part-{run}.jsonl
        for line in segment.read_text().splitlines():
            if line.strip():
                rows.extend(json.loads(line)["rows"])
    return rows


def assert_sane_rows(rows: list[dict]) -> None:
    for row in rows:
        for column in USAGE_COLUMNS:
            value = row[column]
            assert type(value) is int and 0 <= value <= MAX_USAGE_TOKENS, (column, value)
        assert row["finish_reason"] in FINISH_REASONS, row["finish_reason"]
        detail = row.get("reject_detail") or ""
        assert len(detail) <= DETAIL_BOUND and "\x00" not in detail and "\x1b" not in detail, detail


def assert_key_nowhere(out: Path, *texts: str) -> None:
    for text in (*output_texts(out), *texts):
        assert API_KEY not in text


# Aimed at the first document: (id, fault kind, options, extra settings, its rows' reason, words of the detail)
ONE_DOCUMENT = [
    ("usage-1e30", "usage_huge", (), {}, "pairs_request_retries_exhausted", "usage.prompt_tokens is 1e+30"),
    ("usage-negative", "usage_negative", (), {}, "pairs_request_retries_exhausted", "usage.prompt_tokens is -19997666"),
    ("usage-string", "usage_string", ("stage=rewrite",), {}, "rewrite_request_retries_exhausted",
     "usage.completion_tokens is a string"),
    ("finish-reason-list", "finish_list", (), {}, "pairs_request_retries_exhausted", "finish_reason is a list"),
    ("content-number", "content_number", ("stage=rewrite",), {}, "rewrite_request_retries_exhausted",
     "content is a number"),
    ("content-object", "content_object", (), {}, "pairs_request_retries_exhausted", "content is an object"),
    ("pairs-50000-deep-over-size", "deep_json", (), {}, "pairs_request_retries_exhausted", "answer over"),
    ("pairs-50000-deep-within-size", "deep_json", (), {"answer_bytes_per_token": 512}, "pairs_invalid_json",
     "nested deeper than 1024 levels"),
    ("answer-20MiB", "huge_answer", (), {}, "pairs_request_retries_exhausted", "answer over"),
    ("answer-endless", "endless_answer", (), {}, "pairs_request_retries_exhausted", "answer over"),
    ("5xx-with-NUL", "nul_5xx", (), {}, "pairs_request_retries_exhausted", "http_500: upstream \\x00\\x00 failed"),
    ("5xx-page-20MiB", "huge_error", (), {}, "pairs_request_retries_exhausted", "http_503: <html><body>Service"),
]


@pytest.mark.parametrize("kind, options, extra, reason, words", [case[1:] for case in ONE_DOCUMENT],
                         ids=[case[0] for case in ONE_DOCUMENT])
def test_a_malformed_answer_rejects_its_document_with_a_reason(
    tmp_path, llm_server_factory, shard, caplog, capfd, kind, options, extra, reason, words
):
    source, victim = shard
    server = llm_server_factory(aimed(kind, f"{source.stem}:{victim}", *options), extra=server_args())
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        result = expand_shard(str(source), str(out), RECIPE, settings(server.url, **extra))

    assert server.stats()["faults_fired"][kind] >= 1
    assert result.documents == DOCUMENTS and result.accepted == (DOCUMENTS - 1) * PAIRS, result.rejects_by_reason
    data, rejected = pq.read_table(result.data_uri).to_pylist(), pq.read_table(result.rejected_uri).to_pylist()
    victim_rows = [row for row in rejected if row["source_id"] == victim]
    assert len(victim_rows) == PAIRS and {row["reject_reason"] for row in victim_rows} == {reason}, victim_rows
    assert all(words in row["reject_detail"] for row in victim_rows), victim_rows[0]["reject_detail"]
    assert_sane_rows(data + rejected)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + caplog.text
    assert_key_nowhere(out, caplog.text, captured.out, captured.err)


# Answered by the whole fleet: (id, fault kind, the error class, words of its one line)
WHOLE_FLEET = [
    ("usage-1e30", "usage_huge", EndpointsUnavailable, "every LLM endpoint fails pairs requests (bad_response: usage"),
    ("finish-reason-list", "finish_list", EndpointsUnavailable, "finish_reason is a list"),
    ("answer-20MiB", "huge_answer", EndpointsUnavailable, "answer over"),
    ("5xx-with-NUL", "nul_5xx", EndpointsUnavailable, "(http_500: upstream \\x00\\x00 failed"),
    ("401-echoing-the-key", "echo_auth", FleetRefused, "refused the API key (http 401"),
]


@pytest.mark.parametrize(
    "kind, error, words", [case[1:] for case in WHOLE_FLEET], ids=[case[0] for case in WHOLE_FLEET]
)
def test_a_fleet_that_answers_malformed_fails_the_shard_with_one_line(
    tmp_path, llm_server_factory, shard, caplog, capfd, kind, error, words
):
    source, _ = shard
    servers = [llm_server_factory(kind, extra=server_args()) for _ in range(2)]
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG), pytest.raises(error) as raised:
        expand_shard(str(source), str(out), RECIPE, settings(*(s.url for s in servers)))

    message = str(raised.value)
    assert words in message and "\n" not in message and len(message) < 1200, message
    assert not list(out.rglob("*.parquet"))  # nothing committed
    assert_sane_rows(checkpoint_rows(out))
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + caplog.text
    assert_key_nowhere(out, message, caplog.text, captured.out, captured.err)


def test_a_401_echoing_the_key_on_one_endpoint_is_routed_around_and_logged_masked(
    tmp_path, llm_server_factory, shard, caplog
):
    source, _ = shard
    echoing, honest = llm_server_factory("echo_auth", extra=server_args()), llm_server_factory(extra=server_args())
    with caplog.at_level(logging.INFO):
        result = expand_shard(str(source), str(tmp_path / "out"), RECIPE, settings(echoing.url, honest.url))
    assert result.accepted == DOCUMENTS * PAIRS, result.rejects_by_reason
    # Rendezvous hashing sends about half the documents to the echoing endpoint first.
    assert echoing.stats()["faults_fired"].get("echo_auth", 0) >= 1
    refusals = [r.getMessage() for r in caplog.records if "left the rotation" in r.getMessage()]
    assert refusals and all("refused the API key (http 401" in line and "Authorization: ***" in line
                            for line in refusals), refusals
    assert_key_nowhere(tmp_path / "out", caplog.text)


def test_an_endpoint_with_user_info_beside_an_api_key_is_refused_before_any_request(
    tmp_path, llm_server_factory, shard
):
    """aiohttp cannot send both: without this check every request failed as if its
    document were at fault, and the shard ended failed for good."""
    source, _ = shard
    server = llm_server_factory(extra=server_args())
    url = server.url.replace("http://", "http://proxy-user:proxy-pass-99@")
    with pytest.raises(FleetRefused) as raised:
        expand_shard(str(source), str(tmp_path / "out"), RECIPE, settings(url))
    message = str(raised.value)
    assert "user:password@ and an API key" in message and "proxy-pass-99" not in message, message
    assert server.stats()["requests_total"] == 0
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_an_endpoint_that_redirects_is_refused_and_nothing_reaches_the_host_it_points_to(
    tmp_path, shard, hostile_server
):
    """The key and the documents go to configured URLs only: a redirect (a proxy, an
    http->https hop, a compromised balancer) is not followed, and says so in one line."""
    source, _ = shard
    redirect_to = hostile_server.url.replace("://", "://user:pw-in-location@")
    with RecordingServer(redirect_to=redirect_to) as redirector, pytest.raises(FleetRefused) as raised:
        expand_shard(str(source), str(tmp_path / "out"), RECIPE, settings(redirector.url))
    message = str(raised.value)
    assert "redirects (http 307 to http://***@127.0.0.1:" in message and "\n" not in message, message
    assert "pw-in-location" not in message
    assert redirector.requests and hostile_server.requests == []
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_the_cli_says_one_line_when_the_fleet_answers_usage_1e30(tmp_path, llm_server_factory, shard):
    source, _ = shard
    server = llm_server_factory("usage_huge", extra=server_args())
    run = subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "expand-shard", str(source), "--output-root", str(tmp_path / "out"),
         "--endpoint", server.url],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "MAGA_API_KEY": API_KEY, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 3, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("maga: error:")]
    assert len(errors) == 1 and "usage.prompt_tokens is 1e+30" in errors[0], run.stderr
    assert "Traceback" not in run.stderr and API_KEY not in run.stderr + run.stdout


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from maga_tasks.engine.shard import expand_shard
    from maga_tasks.recipe import load_recipe
    from maga_tasks.settings import RunSettings
    source, out, url = sys.argv[1:4]
    settings = RunSettings(endpoints=(url,), api_key=%r, max_concurrency=16, backoff_base_s=0.01,
                           backoff_max_s=0.05, progress_interval_s=5)
    result = expand_shard(source, out, load_recipe(), settings)
    print(result.accepted, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""" % API_KEY)


def peak_rss_kib(source: Path, out: Path, url: str) -> tuple[int, int]:
    """(accepted rows, peak RSS in KiB) of expanding `source` in a fresh process."""
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(source), str(out), url],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    accepted, rss = run.stdout.split()[-2:]
    return int(accepted), int(rss)


def test_peak_rss_with_20MiB_answers_stays_near_an_honest_shards(tmp_path, llm_server_factory):
    source = write_sample_corpus(tmp_path / "src", 1, 24)[0]
    honest = llm_server_factory(extra=server_args())
    # Every request's first attempt is answered with 20 MiB; its retry honestly.
    oversized = llm_server_factory("huge_answer:1:1", extra=server_args())
    honest_rows, honest_rss = peak_rss_kib(source, tmp_path / "honest", honest.url)
    oversized_rows, oversized_rss = peak_rss_kib(source, tmp_path / "oversized", oversized.url)
    fired = oversized.stats()["faults_fired"]["huge_answer"]
    ratio = oversized_rss / honest_rss
    print(f"\npeak RSS: honest shard {honest_rss / 1024:.1f} MiB, shard with {fired} answers of 20 MiB"
          f" {oversized_rss / 1024:.1f} MiB, ratio {ratio:.3f}")
    assert fired == 24 * (1 + PAIRS) and oversized_rows == honest_rows == 24 * PAIRS
    assert ratio <= 1.3


def test_a_pooled_connection_retires_before_the_servers_keep_alive_drops_it():
    """vLLM's server closes a connection idle for 5 s; a request sent on it that instant is
    lost (13 retried attempts in one CI shard). The client retires a pooled connection
    first, so a request after an idle pause goes out on a fresh one and is answered at once."""
    idle_s = 4.5  # vLLM's keep-alive is 5 s: the server here is a little quicker still
    assert POOLED_CONNECTION_IDLE_S < idle_s

    async def two_requests_with_a_pause(url: str) -> dict:
        async with LLMClient(settings(url, adaptive_concurrency=False), "maga-default") as client:
            messages = [{"role": "user", "content": "hello"}]
            await client.chat(messages, Sampling(max_tokens=4), request_id="first")
            await asyncio.sleep(idle_s + 0.2)
            await client.chat(messages, Sampling(max_tokens=4), request_id="second")
            return client.stats.snapshot()

    with IdleClosingServer(idle_s) as server:
        stats = asyncio.run(two_requests_with_a_pause(server.url))
    assert (stats["requests"], stats["failures"], server.dropped) == (2, {}, 0), (stats, server.dropped)
    assert server.connections == 2
