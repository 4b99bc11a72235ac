#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install megaphi into it.
#   bash tools/setup_env.sh            # CPU or GPU machine: torch, megatron-core, megaphi[test,hf,dali]
#   MEGAPHI_EXTRAS=test,hf,dali,gpu bash tools/setup_env.sh   # add Transformer Engine (CUDA machines only)
# Re-running is cheap: it reinstalls only when setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MEGAPHI_VENV:-.venv}
EXTRAS=${MEGAPHI_EXTRAS:-test,hf,dali}
TORCH=${MEGAPHI_TORCH:-torch==2.13.0}

if [[ ",$EXTRAS," == *",gpu,"* ]] && ! command -v nvidia-smi >/dev/null; then
  echo "setup_env: the gpu extra (transformer-engine) needs a CUDA machine; on a CPU-only machine" \
       "importing it breaks Megatron-Core. Drop 'gpu' from MEGAPHI_EXTRAS." >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.megaphi-installed"
want="$(cat setup.py | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "$TORCH"
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -W ignore -c "import megaphi, megatron.core, torch; print(f'megaphi {megaphi.__version__}, megatron-core {megatron.core.__version__}, torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
