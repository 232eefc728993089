#!/usr/bin/env bash
# Every training stage once on CUDA with the tiny model (a smoke run of the GPU code paths), as run
# for docs/bench/gpu-2026-11-27/stages.txt. Wheels the machine lacks may be put in .whl/.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; fi
export PYTHONPATH=/tmp/site:$PWD
run() { echo "== $*"; local t=$SECONDS; python3 -c 'import sys; from lowrank.cli import main; sys.exit(main())' "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|^ *$" | tail -6; echo "rc=${PIPESTATUS[0]} $((SECONDS-t)) s"; }
A=lowrank/assets; O=/tmp/g
run sft --model tiny --data $A/alpaca_sample.jsonl --output-dir $O/sft --max-steps 30 --eval-every 10
python3 -c "import json; m=json.load(open('$O/sft/lowrank.json'))['metrics']; print('sft', m)"
run sft --model tiny --data $A/sharegpt_sample.json --output-dir $O/sft8 --quant int8 --max-steps 10
run reward --model tiny --sft-adapter $O/sft --data $A/preferences_sample.jsonl --output-dir $O/reward --max-steps 30
python3 -c "import json; m=json.load(open('$O/reward/lowrank.json'))['metrics']; print('reward', m)"
run score --reward $O/reward --prompt "Say hello." --response "Hello, please sit down."
run ppo --model tiny --sft-adapter $O/sft --reward-adapter $O/reward --prompts $A/prompts_sample.jsonl --output-dir $O/ppo --steps 4 --rollout-batch-size 8 --minibatch-size 4
python3 -c "import json; m=json.load(open('$O/ppo/lowrank.json'))['metrics']; print('ppo', m)"
python3 -c "import json; print(json.load(open('$O/ppo/lowrank.json'))['config']['quant'])"
