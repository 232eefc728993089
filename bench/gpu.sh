#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go (CUDA machine, ~1B LLaMA shape, nf4).
# Wheels for packages the machine lacks (bitsandbytes, datasets, ...) may be put in .whl/;
# the Hugging Face QLoRA reference protocol script, if present, as .whl/hf_qlora_baseline.py.
# Results go to $OUT (default: bench-gpu/).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench-gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
# 1. SFT tokens/s and peak memory: lowrank vs Trainer + peft, same run (issue 2)
timeout "${SFT_TIMEOUT:-260}" python3 bench/sft_throughput.py --gpu --examples "${SFT_EXAMPLES:-800}" \
    --mean-words 100 --max-length 1024 2>&1 | tee "$OUT/sft.txt"
# 2. PPO peak memory: adapter swapping vs SFT vs four models, TinyLlama-1.1B shape in nf4 (issue 3)
timeout "${PPO_TIMEOUT:-150}" python3 bench/ppo_memory.py --hidden 2048 --layers 22 --quant nf4 --device cuda \
    --new-tokens 32 2>&1 | tee "$OUT/ppo.txt"
# 3. The shared reference protocol on the same device, for scale
if [ -f .whl/hf_qlora_baseline.py ]; then
    timeout "${REF_TIMEOUT:-100}" python3 .whl/hf_qlora_baseline.py --shape tinyllama-1b --batch 4 --steps 15 2>&1 \
        | tail -3 | tee "$OUT/reference.txt"
fi
