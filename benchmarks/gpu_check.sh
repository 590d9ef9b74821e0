#!/usr/bin/env bash
# On a CUDA machine (no network needed): install fastssl offline, run the CUDA tests and
# every benchmark, write JSON results, print a short table last. Under ten minutes.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else benchmarks/results)
# The pretraining comparison runs as a second command (its own ten minutes):
#   fastssl pretrain --method all --no-progress --out "$OUT/runs"
# then copy runs/all-*/summary.json to benchmarks/results/<device>-<date>-pretrain.json.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET FASTSSL_BACKEND
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || echo "note: offline install failed; importing fastssl from the source tree"
python3 -m fastssl.cli info | tee "$out/info.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee -a "$out/info.txt"

echo "== CUDA tests"
timeout 220 python3 -m pytest tests -q --maxfail=20 --ignore=tests/test_aot_compile.py \
  --junitxml="$out/cuda-tests.xml" 2>&1 | tail -n 25
for op in infonce siglip maxbatch barlow vicreg ema augment dino ibot; do
  case "$op" in infonce) limit=120 ;; siglip|maxbatch|dino|ibot) limit=45 ;; *) limit=30 ;; esac
  echo "== fastssl bench $op (at most ${limit} s; results are saved row by row)"
  timeout "$limit" python3 -m fastssl.cli bench "$op" --out "$out" 2>&1 | tee -a "$out/bench.log"
done
echo "== one forward+backward at 2N = 1,048,576, D = 128, bf16"
timeout 30 python3 - <<'PY' 2>&1 | tee -a "$out/bench.log"
import time, torch, fastssl
n = 1 << 19
z0 = torch.randn(n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
z1 = torch.randn(n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
t = time.perf_counter(); fastssl.nt_xent(z0, z1).backward(); torch.cuda.synchronize()
print(f"2N=1048576 D=128 bf16: {time.perf_counter() - t:.2f} s, peak extra "
      f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB")
PY
echo "== the trainer on the GPU: SimCLR on the digits, 300 steps (bf16 autocast, channels-last)"
timeout 90 python3 -m fastssl.cli pretrain --method simclr --max-steps 300 --no-progress \
  --out "$out/runs" 2>&1 | tail -n 14 | tee -a "$out/bench.log"
echo "== summary"
cat "$out"/*.md 2>/dev/null | tail -n 60
