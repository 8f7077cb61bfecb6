"""maga_tasks.llm.vllm_local, the tiny model and its recipe, and the real vLLM CPU engine.

The first part needs no server. Tests marked `vllm` share one real server (fixtures in
tests/vllm_fixtures.py) serving the random-weight `maga-tiny`: its text is random, its
tokens, structured outputs, metrics, prefix cache and authentication are real.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from maga_tasks.llm.prometheus import parse_prometheus_text, prefix_cache_hit_rate
from maga_tasks.llm.vllm_local import (
    VllmServer,
    read_metrics,
    vllm_command,
    vllm_environment,
)
from maga_tasks.method.prompts import (
    judge_messages,
    pairs_json_schema,
    pairs_messages,
    rewrite_messages,
)
from maga_tasks.recipe import load_recipe

# Registers the session fixtures (tiny_model_dir, vllm_server, ...) as a plugin, so that
# a conftest registering them too still gives one server per run.
pytest_plugins = ["vllm_fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_TINY_MODEL = REPO_ROOT / "scripts" / "build_tiny_model.py"
TINY_RECIPE = REPO_ROOT / "maga_tasks" / "recipes" / "tiny.yaml"
TINY_SERVED_NAME = "maga-tiny"
VLLM_MAX_MODEL_LEN = 2048

DOCUMENT = (
    "The Moon is Earth's only natural satellite. It orbits at an average distance of "
    "384,400 km, about thirty times the diameter of Earth. Its gravitational influence "
    "is the main driver of Earth's tides and very slowly lengthens Earth's day. The Moon "
    "is in synchronous rotation with Earth, so the same side always faces it. "
) * 3


# --- without a server ---------------------------------------------------------------


def test_parse_prometheus_text_sums_over_labels():
    text = (
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
        "# TYPE vllm:prompt_tokens_total counter\n"
        'vllm:prompt_tokens_total{engine="0",model_name="a b"} 10.0\n'
        'vllm:prompt_tokens_total{engine="1",model_name="x}\\"y"} 5.0\n'
        'vllm:prompt_tokens_created{engine="0"} 1.79e+09\n'
        "vllm:num_requests_running 2 1700000000000\n"
        "vllm:kv_cache_usage_perc NaN\n"
        "garbage line\n"
    )
    assert parse_prometheus_text(text) == {
        "vllm:prompt_tokens_total": 15.0,
        "vllm:num_requests_running": 2.0,
    }


def test_prefix_cache_hit_rate_between_two_reads():
    before = {"vllm:prefix_cache_queries_total": 100.0, "vllm:prefix_cache_hits_total": 10.0}
    after = {"vllm:prefix_cache_queries_total": 300.0, "vllm:prefix_cache_hits_total": 160.0}
    assert prefix_cache_hit_rate(before, after) == pytest.approx(0.75)
    assert prefix_cache_hit_rate(after, after) is None


def test_api_key_reaches_server_only_through_its_environment():
    command = vllm_command(
        "/models/m", python="/venv/bin/python", host="127.0.0.1", port=8000,
        served_model_name="m", max_model_len=2048, max_num_seqs=8, block_size=32,
        enforce_eager=True,
    )
    assert not any("key" in arg.lower() for arg in command)
    assert {"--enable-prefix-caching", "--no-enable-chunked-prefill"} <= set(command)
    env = vllm_environment(api_key="s3cret", kv_cache_space_gib=1, offline=True,
                           base={"VLLM_API_KEY": "inherited", "PATH": "/bin"})
    assert env["VLLM_API_KEY"] == "s3cret"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    no_key = vllm_environment(api_key=None, kv_cache_space_gib=1, offline=False,
                              base={"VLLM_API_KEY": "inherited"})
    assert "VLLM_API_KEY" not in no_key


def test_server_repr_hides_api_key():
    class _Process:
        pid = 4242

    server = VllmServer(_Process(), host="127.0.0.1", port=1, served_model_name="m",
                        model="/m", log_path=Path("/dev/null"), api_key="s3cret")
    assert "s3cret" not in repr(server)
    assert "auth=on" in repr(server)


def test_tiny_model_build_is_deterministic_and_idempotent(tiny_model_dir, tmp_path):
    again = tmp_path / "again"
    subprocess.run([sys.executable, str(BUILD_TINY_MODEL), str(again)], check=True,
                   capture_output=True)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    rerun = subprocess.run([sys.executable, str(BUILD_TINY_MODEL), str(again)], check=True,
                           capture_output=True, text=True)
    assert "up to date" in rerun.stderr
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_model_tokenizer_and_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert 4000 <= len(tokenizer) <= 8192
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert prompt.startswith(tokenizer.bos_token)
    assert prompt.endswith("<|assistant|>\n")
    text = "Naïve café — “quoted” text, 1969."
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def _prompt_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_tiny_recipe_fits_the_server_context(tiny_model_dir):
    """Every request the tiny recipe can make fits --max-model-len, or vLLM refuses it."""
    from transformers import AutoTokenizer

    recipe = load_recipe(TINY_RECIPE, tokenizer=str(tiny_model_dir))
    assert recipe.model == TINY_SERVED_NAME
    assert recipe.prompts == load_recipe(None).prompts  # the default prompts, verbatim
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    document = recipe.context_budget_tokens
    genre, audience = "g" * recipe.pairs.genre_chars[1], "a" * recipe.pairs.audience_chars[1]
    rewrite_tokens = recipe.rewrite.sampling.max_tokens
    # A rewrite's text re-encodes to about as many tokens as it was generated with;
    # allow a quarter more.
    needs = {
        "pairs": _prompt_tokens(tokenizer, pairs_messages(recipe, ""))
        + document + recipe.pairs.sampling.max_tokens,
        "rewrite": _prompt_tokens(tokenizer, rewrite_messages(recipe, "", genre, audience))
        + document + rewrite_tokens,
        "judge": _prompt_tokens(tokenizer, judge_messages(recipe, "", ""))
        + document + int(1.25 * rewrite_tokens) + recipe.judge_sampling.max_tokens,
    }
    assert all(n <= VLLM_MAX_MODEL_LEN for n in needs.values()), needs
    # Five pairs written up to maxLength, at a pessimistic 2 characters per token.
    pair_chars = recipe.pairs_per_document * (
        recipe.pairs.genre_chars[1] + recipe.pairs.audience_chars[1] + 30
    )
    assert pair_chars / 2 <= recipe.pairs.sampling.max_tokens


# --- against the real engine ----------------------------------------------------------


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
