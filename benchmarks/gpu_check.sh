#!/usr/bin/env bash
# One prepared run for a session that has a GPU machine (see benchmarks/README.md):
# the CUDA tests, then the GPU benchmark (fp16, bf16, fp32; 128->512 and a large tiled case).
# Results land in $OUT (or ./gpu_results when run by hand).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
if [ -d .whl ]; then  # diffusers/kornia wheels carried from the dev machine (the GPU image lacks them)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python3 -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.txt"
python3 benchmarks/bench_pipeline.py --device cuda --cases small,large --precisions fp16,bf16,fp32 --repeats 5 \
  > "$out/bench_gpu.json" 2> "$out/bench_gpu.log"
tail -c 3000 "$out/bench_gpu.json"
