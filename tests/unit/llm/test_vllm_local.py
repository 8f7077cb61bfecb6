"""maga_tasks.llm.vllm_local without a server, the tiny model and its recipe (the real
vLLM CPU engine serving it: tests/e2e/test_vllm_local.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from maga_tasks.llm.prometheus import parse_prometheus_text, prefix_cache_hit_rate
from maga_tasks.llm.vllm_local import VllmServer, vllm_command, vllm_environment
from maga_tasks.method.prompts import judge_messages, pairs_messages, rewrite_messages
from maga_tasks.recipe import load_recipe
from tests.support.vllm import BUILD_TINY_MODEL, TINY_RECIPE, TINY_SERVED_NAME, VLLM_MAX_MODEL_LEN


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
        "judge": _prompt_tokens(tokenizer, judge_messages(recipe, "", "", genre, audience))
        + document + int(1.25 * rewrite_tokens) + recipe.judge_sampling.max_tokens,
    }
    assert all(n <= VLLM_MAX_MODEL_LEN for n in needs.values()), needs
    # Five pairs written up to maxLength, at a pessimistic 2 characters per token.
    pair_chars = recipe.pairs_per_document * (
        recipe.pairs.genre_chars[1] + recipe.pairs.audience_chars[1] + 30
    )
    assert pair_chars / 2 <= recipe.pairs.sampling.max_tokens
