#!/usr/bin/env bash
# The llama.cpp check, apart from .ci/run (its build alone took 1002 s of a CI run on 2 cores): builds
# llama-cpp-python from source into the current environment (pip caches the wheel, so a second run is quick), then
# runs tests/test_llamacpp.py: a SmolLM2-135M RiM run, exported and converted to GGUF by llama.cpp's own converter,
# decodes `question + K blocks` in llama.cpp to exactly `rim answer`'s tokens (K = trained and another K).
#   bash bench/test_llamacpp.sh        # after the README's install command, in the same environment
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0 -e ".[llamacpp]"
python -m pytest -q -p no:cacheprovider tests/test_llamacpp.py -rs
