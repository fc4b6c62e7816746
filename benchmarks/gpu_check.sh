#!/usr/bin/env bash
# One prepared run for a session that has a GPU machine (see benchmarks/README.md), about 10 minutes:
# install from this repository, the CUDA tests, per-stage ms and peak VRAM for 128->512 (fp16, bf16)
# and 1024->4096 (fp16; the VAE's maps on the GPU, then forced to the host), eager vs CUDA graph vs torch.compile on the fixed 512 path, and the ComfyUI
# nodes' time per image and weights moved per run.
# Every part runs on its own with a time limit, inside one overall deadline, and writes its output
# to $OUT (or ./gpu_results by hand): one failing or slow part does not lose the others.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-600} ))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...: run with min(SECONDS, time left), output in $out/NAME.txt
  local name=$1 limit=$2 left
  shift 2
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then echo "== $name: skipped (overall deadline)" | tee "$out/$name.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "exit status $?" >> "$out/$name.txt"
  tail -n 15 "$out/$name.txt"
}

# diffusers and friends: from wheels carried in .whl/ when the GPU image lacks them (torch is there)
if ! python3 -c "import diffusers, peft" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } \
  2>&1 | tee "$out/device.txt"

part cuda_tests 150 python3 -m pytest -q tests/test_cuda.py -p no:cacheprovider
part bench_small 120 python3 benchmarks/bench_pipeline.py --device cuda --cases small --precisions fp16,bf16 \
  --paths ours --repeats 10
part bench_huge 150 python3 benchmarks/bench_pipeline.py --device cuda --cases huge --precisions fp16 --paths ours
part bench_huge_host_maps 150 python3 benchmarks/bench_pipeline.py --device cuda --cases huge --precisions fp16 \
  --paths ours --host-maps
# the difference in one line: the tiled VAE's maps on the GPU (free memory) against maps forced to the host
python3 - "$out/bench_huge.txt" "$out/bench_huge_host_maps.txt" <<'PY' 2>&1 | tee "$out/maps_device_vs_host.txt"
import json, re, sys
def run(path):
    text = open(path).read()
    found = re.search(r'^\{\n  "torch".*?^\}$', text, re.S | re.M)
    return json.loads(found.group(0))["runs"][0] if found else None
runs = [run(path) for path in sys.argv[1:]]
if all(r and "stage_seconds" in r for r in runs):
    line = lambda r: "encode {encode:.2f} s, decode {decode:.2f} s".format(**r["stage_seconds"]) + \
        f", total {r['pipeline_seconds']:.2f} s, peak {r['peak_memory_mib']:.0f} MiB"
    print(f"1024->4096 fp16, VAE maps on the GPU: {line(runs[0])} | on the host: {line(runs[1])}")
else:
    print("1024->4096 maps device vs host: a run is missing (see bench_huge*.txt)")
PY
part compile_512 150 python3 benchmarks/gpu_compile.py --precision fp16 --variants eager,cudagraph,compile
# the nodes as ComfyUI's executor calls them: ms per 128->512 image and weights moved per run
# (ComfyUI's real memory manager when COMFYUI_PATH names a checkout, else the tests' stand-ins)
part comfyui_nodes 90 python3 benchmarks/comfy_node_bench.py --device cuda --model full --precision fp16 \
  ${COMFYUI_PATH:+--comfyui "$COMFYUI_PATH"}
echo "results in $out"
