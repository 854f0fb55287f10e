#!/usr/bin/env bash
# Rebuild every shipped model and adapter from the corpus texts (CPU, about 1 hour on 2 cores).
# Usage: bash scripts/train_all.sh CORPORA_DIR   (the folder of the Project Gutenberg texts)
# Each step is seeded; train_lm.py steps resume from runs/<role>/checkpoint.pt if interrupted.
set -euo pipefail
CORPORA=$(realpath "${1:?usage: bash scripts/train_all.sh CORPORA_DIR}")
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
$PY -m training.tokenizer --corpora "$CORPORA" --out models/tokenizer
$PY -m training.train_lm --corpora "$CORPORA" --role target --out models/target --steps 1000 --batch 8 --lr 2e-3
$PY -m training.train_lm --corpora "$CORPORA" --role draft --teacher models/target --out models/draft --steps 600 --batch 8 --lr 3e-3 --threads 1 &
$PY -m training.train_adapter --corpora "$CORPORA" --domain austen --qlora --out adapters/demo/austen --steps 150 --lr 5e-4 --threads 1
$PY -m training.train_adapter --domain stdlib --out adapters/demo/stdlib-docs --steps 150 --threads 1
wait
$PY -m training.measure_acceptance --quantization none --out models/draft/acceptance_bf16.json
$PY -m training.measure_acceptance --quantization nf4 --out models/draft/acceptance_nf4.json
$PY -m training.model_card models/target models/draft
