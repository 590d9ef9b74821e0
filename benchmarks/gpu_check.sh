#!/usr/bin/env bash
# On a CUDA machine (no network needed): install fastssl offline, run the CUDA tests and
# every benchmark, write JSON results, print a short table last.
#   bash benchmarks/gpu_check.sh [OUT_DIR] [tests|bench|all]
# OUT_DIR defaults to $OUT, else benchmarks/results; the stage to all. Each stage's time
# limits add up to under ten minutes (one device call each): tests (the CUDA test suite,
# the 2N = 1,048,576 step, 300 trainer steps), bench (every fastssl bench op).
# The pretraining comparison runs as a second command (its own ten minutes):
#   fastssl pretrain --method all --no-progress --out "$OUT/runs"
# then copy runs/all-*/summary.json to benchmarks/results/<device>-<date>-pretrain.json.
# The peer libraries (lightly, open_clip, Inf-CL, Kornia, Cut Cross-Entropy) are timed when
# importable: wheels in .whl/ (not committed) are installed offline into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
stage="${2:-all}"
case "$stage" in tests|bench|all) ;; *) echo "stage: tests, bench or all, not $stage" >&2; exit 2 ;; esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET FASTSSL_BACKEND
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || echo "note: offline install failed; importing fastssl from the source tree"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "note: the peer wheels in .whl/ did not install"
fi
python3 -m fastssl.cli info | tee "$out/info.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee -a "$out/info.txt"

if [ "$stage" != bench ]; then
echo "== CUDA tests"
timeout 220 python3 -m pytest tests -q --maxfail=20 --ignore=tests/test_aot_compile.py \
  --junitxml="$out/cuda-tests.xml" 2>&1 | tail -n 25
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
fi
if [ "$stage" != tests ]; then
for op in infonce clip siglip maxbatch barlow vicreg ema augment dino ibot mae; do
  case "$op" in infonce) limit=120 ;; clip|siglip|maxbatch|dino|ibot) limit=45 ;; *) limit=30 ;; esac
  echo "== fastssl bench $op (at most ${limit} s; results are saved row by row)"
  timeout "$limit" python3 -m fastssl.cli bench "$op" --out "$out" 2>&1 | tee -a "$out/bench.log"
done
fi
echo "== summary"
cat "$out"/*.md 2>/dev/null | tail -n 60
