#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests, the executor benchmark's cascade (T3) on the
# GPU, training speed at fp32 and bf16 with the accuracy each reaches (the main job's
# graph), and a torchrun job over the visible GPUs.
# Prints what it measured; record the numbers in docs/performance.md.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `pip install -e .`
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA device (torch " + torch.__version__ + ")")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
PY

echo "== CUDA tests"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py "tests/test_executor.py::test_cuda_matches_cpu"

echo "== the executor on the GPU: the T3 cascade (70/15/15% leave after stage 1/2/3) against static modules"
python benchmarks/bench_executor.py --device cuda --only t3

echo "== one epoch at fp32 and bf16, then the whole train block (eenet_resnet: the README's main job)"
python benchmarks/bench_precision.py --graphs eenet_resnet --device cuda --threads 1 --rounds 3 --full

echo "== the same on the CPU of this machine, for the ratio"
python benchmarks/bench_precision.py --graphs eenet_resnet --device cpu --threads 1 --rounds 3

gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    echo "== torchrun over $gpus GPUs (nccl), the main job"
    start=$(date +%s)
    torchrun --standalone --nproc_per_node "$gpus" -m d2graph train examples/eenet_resnet.d2 --set device=cuda \
        --out "$(mktemp -d)/run" --quiet
    echo "torchrun, $gpus processes: $(( $(date +%s) - start )) s"
fi
