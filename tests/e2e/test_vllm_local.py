"""The real vLLM CPU engine serving the random-weight `maga-tiny`: the tests share one
server (the session fixtures of tests/conftest.py). Its text is random; its tokens,
structured outputs, metrics, prefix cache and authentication are real. (vllm_local, the
tiny model and its recipe without a server: tests/unit/llm/test_vllm_local.py.)
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from maga_tasks.llm.prometheus import prefix_cache_hit_rate
from maga_tasks.llm.vllm_local import VllmServer, read_metrics
from maga_tasks.method.prompts import pairs_json_schema, pairs_messages, rewrite_messages
from maga_tasks.recipe import load_recipe
from tests.support.vllm import TINY_RECIPE, TINY_SERVED_NAME

DOCUMENT = (
    "The Moon is Earth's only natural satellite. It orbits at an average distance of "
    "384,400 km, about thirty times the diameter of Earth. Its gravitational influence "
    "is the main driver of Earth's tides and very slowly lengthens Earth's day. The Moon "
    "is in synchronous rotation with Earth, so the same side always faces it. "
) * 3


def _request(server: VllmServer, path: str, body: dict | None = None, *, key: str | None = ...):
    """(status, parsed JSON) of one request; `key=...` means the server's own key."""
    key = server.api_key if key is ... else key
    request = urllib.request.Request(
        server.url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _chat(server, messages, *, max_tokens, seed, temperature=0.7, response_format=None):
    body = {"model": server.served_model_name, "messages": messages, "max_tokens": max_tokens,
            "temperature": temperature, "top_p": 0.95, "seed": seed}
    if response_format:
        body["response_format"] = response_format
    status, answer = _request(server, "/v1/chat/completions", body)
    assert status == 200, answer
    return answer


def _pairs_request(server, recipe, document, seed):
    schema = pairs_json_schema(recipe)
    return _chat(
        server, pairs_messages(recipe, document), max_tokens=recipe.pairs.sampling.max_tokens,
        seed=seed, temperature=recipe.pairs.sampling.temperature,
        response_format={"type": "json_schema", "json_schema": {"name": "pairs", "schema": schema}},
    )


@pytest.fixture(scope="module")
def tiny_recipe(tiny_model_dir):
    return load_recipe(TINY_RECIPE, tokenizer=str(tiny_model_dir))


@pytest.mark.vllm
def test_health_and_models(vllm_server):
    assert vllm_server.is_healthy()
    status, models = _request(vllm_server, "/v1/models")
    assert status == 200
    assert [m["id"] for m in models["data"]] == [TINY_SERVED_NAME]


@pytest.mark.vllm
def test_api_key_is_required_on_v1_and_never_logged(vllm_server, vllm_api_key):
    assert _request(vllm_server, "/v1/models", key=None)[0] == 401
    assert _request(vllm_server, "/v1/models", key="wrong-" + vllm_api_key)[0] == 401
    # Probes and scrapes stay open: vLLM's key guards /v1 only.
    assert vllm_server.is_healthy()
    read_metrics(vllm_server.url)
    assert vllm_api_key not in vllm_server.log_path.read_text(errors="replace")
    cmdline = Path(f"/proc/{vllm_server.pid}/cmdline").read_bytes()
    assert vllm_api_key.encode() not in cmdline


@pytest.mark.vllm
def test_chat_completion_and_seeded_reproducibility(vllm_server, tiny_recipe):
    messages = rewrite_messages(tiny_recipe, DOCUMENT, "A short story.", "Children.")
    first = _chat(vllm_server, messages, max_tokens=64, seed=7)
    again = _chat(vllm_server, messages, max_tokens=64, seed=7)
    choice = first["choices"][0]
    assert choice["finish_reason"] in {"stop", "length"}
    assert first["usage"]["completion_tokens"] <= 64
    assert choice["message"]["content"] == again["choices"][0]["message"]["content"]


@pytest.mark.vllm
def test_structured_pairs_are_valid_json_despite_random_weights(vllm_server, tiny_recipe):
    g_min, g_max = tiny_recipe.pairs.genre_chars
    a_min, a_max = tiny_recipe.pairs.audience_chars
    for seed in range(4):
        answer = _pairs_request(vllm_server, tiny_recipe, DOCUMENT, seed)
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", answer["usage"]
        pairs = json.loads(choice["message"]["content"])["pairs"]  # strict JSON
        assert len(pairs) == tiny_recipe.pairs_per_document
        assert len({(p["genre"], p["audience"]) for p in pairs}) == len(pairs)
        for pair in pairs:
            assert set(pair) == {"genre", "audience"}
            assert g_min <= len(pair["genre"]) <= g_max
            assert a_min <= len(pair["audience"]) <= a_max


@pytest.mark.vllm
def test_usage_tokens_agree_with_metrics(vllm_server, tiny_recipe):
    before = read_metrics(vllm_server.url)
    answers = [
        _pairs_request(vllm_server, tiny_recipe, DOCUMENT, seed=11),
        _chat(vllm_server, rewrite_messages(tiny_recipe, DOCUMENT, "A memo.", "Managers."),
              max_tokens=96, seed=12),
    ]
    after = read_metrics(vllm_server.url)

    def delta(name):
        return after[name] - before.get(name, 0.0)

    assert delta("vllm:prompt_tokens_total") == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert delta("vllm:generation_tokens_total") == sum(
        a["usage"]["completion_tokens"] for a in answers
    )
    assert delta("vllm:request_success_total") == len(answers)


@pytest.mark.vllm
def test_prefix_cache_serves_the_shared_document(vllm_server, tiny_recipe):
    document = "A new document for the cache. " + DOCUMENT * 2
    before = read_metrics(vllm_server.url)
    _chat(vllm_server, rewrite_messages(tiny_recipe, document, "A report.", "Engineers."),
          max_tokens=8, seed=1)
    middle = read_metrics(vllm_server.url)
    _chat(vllm_server, rewrite_messages(tiny_recipe, document, "A poem.", "Poets."),
          max_tokens=8, seed=2)
    after = read_metrics(vllm_server.url)
    # The second request shares system prompt and document with the first: most of its
    # prompt comes from the cache.
    assert after["vllm:prefix_cache_hits_total"] > middle["vllm:prefix_cache_hits_total"]
    assert prefix_cache_hit_rate(middle, after) > 0.5
    assert prefix_cache_hit_rate(before, middle) < prefix_cache_hit_rate(middle, after)


@pytest.mark.vllm
def test_concurrent_seeded_long_prompts_do_not_kill_the_engine(vllm_server, tiny_recipe):
    """Regression: with chunked prefill, seeded requests crash vLLM's CPU worker."""
    documents = [f"Document number {i}. " + DOCUMENT * 3 for i in range(8)]
    messages = [rewrite_messages(tiny_recipe, d, "A guide.", "Students.") for d in documents]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda i: _chat(vllm_server, messages[i], max_tokens=32, seed=100 + i), range(8)
        ))
    assert all(a["usage"]["prompt_tokens"] > 600 for a in answers)
    assert vllm_server.is_healthy()
