#!/usr/bin/env bash
# GPU lane: everything that needs a CUDA device, in under 10 minutes on one GPU. Run from anywhere:
#
#   bash benchmarks/gpu.sh            # PYTHON=/path/to/python to choose the interpreter
#
# 1. the CUDA-marked tests (`pytest -m cuda`), which include the bf16 guarantee stress test on CUDA;
# 2. the init decomposition at Llama-2-7B layer shapes (4096x4096 and 4096x11008) on the GPU;
# 3. GuardSpace vs plain LoRA at Llama-2-7B layer shapes (2 blocks): init, 20 training steps, peak memory.
# Without a CUDA device it stops at once with exit status 2. Time limits 180 + 180 + 210 s (9.5 minutes at most);
# if step 3 hits its limit on a slower GPU, run it alone with `--layers 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: torch sees no CUDA device (torch.cuda.is_available() is False); this lane needs a GPU." >&2
    exit 2
fi
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

echo "== 1/3 CUDA-marked tests (limit 180 s)"
timeout 180 "$PYTHON" -m pytest -q -m cuda tests/ -p no:cacheprovider

echo "== 2/3 init decomposition at 4096x4096 and 4096x11008 on CUDA (limit 180 s)"
timeout 180 "$PYTHON" benchmarks/bench_decomposition.py --device cuda --shapes 4096x4096 4096x11008

echo "== 3/3 GuardSpace vs LoRA at Llama-2-7B layer shapes, 2 blocks, 20 steps (limit 210 s)"
timeout 210 "$PYTHON" benchmarks/bench_gpu_7b.py --device cuda --layers 2 --steps 20

echo "GPU lane passed."
