#!/usr/bin/env bash
# fastssl on a CUDA GPU in one command of at most eight minutes, no network needed:
#   bash benchmarks/gpu_check.sh OUT
# Steps, in this order (the most important evidence first), each under its own `timeout`
# (status pass / fail / timeout; skipped when not wanted, not run when out of time):
#   install      fastssl, editable and offline (pip --no-deps --no-build-isolation -e .)     30 s
#   peer-wheels  the wheels in .whl/ (not committed), offline, into a private --target dir   30 s
#   info         fastssl info and nvidia-smi                                                 20 s
#   tests        the tests that run on CUDA: those taking the `device` fixture and those
#                skipped without CUDA or nvcc (tests/test_gpu.py first, torch.compile and
#                opcheck tests last, each group's files in turns); tests/test_aot_compile.py
#                and tests/peers left out                                                    120 s
#   bench-OP     fastssl bench OP --quick, for every op of fastssl.bench.OPS, each under its
#                own limit (rows are saved as they are measured): on the GPU, --quick is
#                the GPU targets' workloads, with torch.compile rows for infonce alone  265 s in all
#   ntxent-1m    one NT-Xent forward+backward at 2N = 1,048,576, D = 128, bf16                25 s
#   pretrain     fastssl pretrain --method simclr --max-steps 200 (kNN and linear probe)     35 s
# No step starts after 465 s, and a step that would run past that gets a shorter limit.
# Everything measured is written into a work directory; OUT then holds exactly three files:
#   results.tar.gz  the bench results (<device>-<date>-<op>.json, .md, .png) at its top level,
#                   so `tar -xzf OUT/results.tar.gz -C benchmarks/results` puts them where
#                   benchmarks/results_table.py reads them, and gpu-check/ beside them:
#                   info.txt, steps.tsv, summary.md, cuda-tests.xml (junit), ntxent-1m.json,
#                   pretrain/simclr-*/report.json and loss.png (no checkpoints)
#   summary.md      per step pass / fail / timeout / skipped with its seconds and limit, the
#                   pytest counts and failures, each bench result's headline, the NT-Xent
#                   step and the pretraining run (also printed at the end)
#   log.txt         everything the run printed
# The tarball and the summary are written on exit whatever happened to the steps. The exit
# status is 0 when every step passed, 1 otherwise.
#
# Rehearsal on a CPU: FASTSSL_GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh OUT runs the
# same steps at tiny sizes under the same timeouts, scaled by FASTSSL_GPU_CHECK_SCALE
# (default 3, for slow shared CPUs; about a minute on two cores): no editable install (the environment's fastssl is left as it is), no
# nvidia-smi, pytest over the CUDA-skipped tests and three quick CUDA-selected ones, each
# bench op at tiny --sizes/--dims with its CPU cases measured in the bench process instead
# of a child process each and torch.compile as the identity (its rows are eager then),
# prototype heads at K = 1024 (FASTSSL_BENCH_K), the NT-Xent step at 2N = 1024 and
# 3 pretraining steps without evaluation. Its numbers rehearse the plumbing, nothing more.
#
# Peer wheels. The GPU image has torch, Triton, torchvision and timm; the peers fastssl is
# timed against travel as wheels in .whl/ (ignored by git), installed with --no-deps into
# the work directory and put first on PYTHONPATH. Expected there (the versions the README's
# compatibility table names; their registry dependencies beyond the image's packages):
PEER_WHEELS=(
  # lightly (bench infonce, supcon, sigreg, detcon, barlow, vicreg, dino, ibot) and its
  # dependencies (pytorch_lightning, tqdm, PyYAML and packaging are in the image)
  lightly-1.6.0 hydra_core-1.3.8 omegaconf-2.3.1
  antlr4_python3_runtime-4.9.3   # the registry has only its sdist: build the wheel (pip wheel)
  # open_clip (bench clip, siglip); regex, huggingface_hub and safetensors are in the image
  open_clip_torch-3.3.0 ftfy-6.3.1
  wcwidth-0.9.4                  # binary: a manylinux abi3 wheel
  # Kornia (bench augment)
  kornia-0.9.0
  kornia_rs-0.2.0                # binary: a cp<python>-manylinux wheel for the image's Python
  # Inf-CL (bench clip, CUDA) and Cut Cross-Entropy (bench dino, CUDA); both need Triton only
  inf_cl-1.2.1 cut_cross_entropy-25.1.1
)
# Fetched with (the image's Python is 3.12): python3 -m pip download --no-deps
#   --only-binary=:all: --python-version 3.12 --implementation cp --platform
#   manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# and `python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3`: 11 files, 10 MB.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)
out="${1:-${OUT:-}}"
if [ -z "$out" ] || [ $# -gt 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT   (FASTSSL_GPU_CHECK_DRY_RUN=1: CPU rehearsal)" >&2
  exit 2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
if [ -n "$(ls -A "$out")" ]; then
  echo "note: $out is not empty; its results.tar.gz, summary.md and log.txt are replaced" >&2
fi
rm -f "$out/results.tar.gz" "$out/summary.md" "$out/log.txt"

dry=0; case "${FASTSSL_GPU_CHECK_DRY_RUN:-0}" in ""|0|false|no) ;; *) dry=1 ;; esac
scale=1
[ "$dry" = 1 ] && scale="${FASTSSL_GPU_CHECK_SCALE:-3}"  # room for slow shared CPUs
work=$(mktemp -d "${TMPDIR:-/tmp}/fastssl-gpu-check.XXXXXX") || exit 2
meta="$work/gpu-check"          # everything that is not a bench result file
tools="$work/.tools"            # helper scripts and the peer site (not in the tarball)
mkdir -p "$meta/pretrain" "$tools"
steps="$meta/steps.tsv"
printf 'step\tstatus\trc\tseconds\tlimit\tnote\n' >"$steps"
start=$(date +%s.%N)
deadline=$(awk -v s="$scale" 'BEGIN { printf "%d", 465 * s + 0.5 }')

exec 3>&1 4>&2
exec > >(tee -a "$out/log.txt") 2>&1
tee_pid=$!

elapsed() { awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
limit_of() { awk -v l="$1" -v s="$scale" 'BEGIN { v = int(l * s + 0.5); print (v < 1 ? 1 : v) }'; }

# run_step NAME LIMIT CMD...: CMD under `timeout LIMIT` (scaled, and cut to what is left of
# the overall deadline); status pass / fail / timeout / skipped into steps.tsv, rc in $step_rc.
# STEP_SIGNAL=INT asks for SIGINT at the limit (pytest then still writes its junit file).
step_rc=0
run_step() {
  local name=$1 limit note=""; limit=$(limit_of "$2"); shift 2
  local left=$(( deadline - SECONDS ))
  if [ "$left" -lt 1 ]; then
    echo "== $name: not run (the overall deadline of ${deadline} s is reached)"
    printf '%s\tnot run\t-\t0.0\t-\tno time left\n' "$name" >>"$steps"
    step_rc=125; return
  fi
  if [ "$left" -lt "$limit" ]; then limit=$left; note="limit cut to ${left} s by the overall deadline"; fi
  echo "== $name (at most ${limit} s, at $(elapsed) s): $*"
  local t0 t1 status secs
  t0=$(date +%s.%N)
  timeout -s "${STEP_SIGNAL:-TERM}" -k 5 "$limit" "$@"
  step_rc=$?
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [ "$step_rc" -eq 0 ]; then status=pass
  elif [ "$step_rc" -eq 124 ] || { [ "$step_rc" -eq 137 ] && awk -v s="$secs" -v l="$limit" 'BEGIN { exit !(s >= l) }'; }; then
    status=timeout
  else status=fail; fi
  echo "== $name: $status (rc $step_rc, $secs s)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$step_rc" "$secs" "$limit" "$note" >>"$steps"
}
skip_step() { printf '%s\tskipped\t-\t0.0\t-\t%s\n' "$1" "$2" >>"$steps"; echo "== $1: skipped ($2)"; }

finish() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  echo "== packing results (at $(elapsed) s)"
  local total; total=$(elapsed)
  python3 "$tools/summary.py" "$work" "$meta/summary.md" "$dry" "$total" "$repo" \
    || printf '# fastssl GPU check\n\n(the summary script failed; steps:)\n\n```\n%s\n```\n' \
         "$(cat "$steps")" >"$meta/summary.md"
  find "$work" -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null
  # the work directory's entries by name, not ".": unpacking into benchmarks/results then
  # leaves that folder's own mode alone (mktemp made the work directory 0700)
  pack() {
    find "$work" -mindepth 1 -maxdepth 1 ! -name .tools -printf '%P\n' \
      | tar -czf "$out/results.tar.gz" -C "$work" --exclude='*.pt' "$@" -T - 2>&1
  }
  pack
  local size; size=$(stat -c %s "$out/results.tar.gz" 2>/dev/null || echo 0)
  if [ "$size" -gt $((15 * 1024 * 1024)) ]; then  # a returned file holds at most 16 MiB
    printf '\nresults.tar.gz was %s bytes: packed again without the plots\n' "$size" >>"$meta/summary.md"
    pack --exclude='*.png'
  fi
  cp "$meta/summary.md" "$out/summary.md"
  echo "== summary ($out/summary.md; results in $out/results.tar.gz, log in $out/log.txt)"
  cat "$out/summary.md"
  if [ "$rc" -eq 0 ] && awk -F'\t' 'NR > 1 && $2 != "pass" && $2 != "skipped" { bad = 1 } END { exit !bad }' "$steps"; then
    rc=1
  fi
  exec 1>&3 2>&4 3>&- 4>&-
  wait "$tee_pid" 2>/dev/null
  [ "${FASTSSL_GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$work"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helper scripts
cat >"$tools/gpu_check_select.py" <<'PY'
"""pytest plugin: keep the tests that run on CUDA (a `device` fixture or parameter, or a
skip without CUDA / a GPU / nvcc), tests/test_gpu.py first, compile and opcheck tests last,
the files in turns within each group.
GPU_CHECK_PICK (comma-separated node-id parts; the CPU rehearsal): keep only the skipped
ones and the picked ones. GPU_CHECK_REVERSE=1: the same tests in the reverse order."""
import os
import signal

# KeyboardInterrupt on SIGINT even where it was inherited as ignored (a background job):
# `timeout -s INT` then ends the session early with its junit file written
signal.signal(signal.SIGINT, signal.default_int_handler)


def _skipped_without_cuda(item):
    for mark in item.iter_markers("skipif"):
        text = " ".join(map(str, (*mark.args, mark.kwargs.get("reason", "")))).lower()
        if any(word in text for word in ("cuda", "gpu", "nvcc")):
            return True
    return False


def _on_cuda(item):
    return "device" in getattr(item, "fixturenames", ()) or _skipped_without_cuda(item)


def _group(item):
    name = item.nodeid
    return (0 if name.startswith("tests/test_gpu.py") else 1 if _skipped_without_cuda(item)
            else 3 if ("compile" in name or "opcheck" in name) else 2)


def _ordered(items):
    """By group, and within a group the files taken in turns (each file's first test,
    then each file's second, ...): a session stopped at its limit has tried every family."""
    seen = {}
    keyed = []
    for i in items:
        group, path = _group(i), i.nodeid.split("::")[0]
        rank = seen[group, path] = seen.get((group, path), -1) + 1
        keyed.append(((group, rank, path), i))
    return [i for _, i in sorted(keyed, key=lambda k: k[0])]


def pytest_collection_modifyitems(session, config, items):
    picks = [p for p in os.environ.get("GPU_CHECK_PICK", "").split(",") if p]
    if picks:
        keep = [i for i in items if _skipped_without_cuda(i)
                or (_on_cuda(i) and any(p in i.nodeid for p in picks))]
    else:
        keep = [i for i in items if _on_cuda(i)]
    chosen = set(map(id, keep))
    config.hook.pytest_deselected(items=[i for i in items if id(i) not in chosen])
    items[:] = _ordered(keep)
    if os.environ.get("GPU_CHECK_REVERSE"):  # a second session: the other end first
        items[:] = items[::-1]
PY

cat >"$tools/bench_in_process.py" <<'PY'
"""The CPU rehearsal's `fastssl bench`: the CLI itself, with each CPU case (which
fastssl.bench.timing.cpu_case runs as `python -c CODE` in a child process) run in this
process instead, so that tiny cases cost no interpreter start each, and torch.compile the
identity (the rows named torch.compile are eager)."""
import contextlib
import io
import os
import subprocess
import sys
import types

import torch

import fastssl.bench.timing as timing


def run_here(cmd, capture_output=True, text=True, env=None, timeout=None, **_):
    code, saved_env, saved_path = cmd[-1], dict(os.environ), list(sys.path)
    os.environ.update(env or {})
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, "<bench case>", "exec"), {"__name__": "__bench_case__"})
        return subprocess.CompletedProcess(cmd, 0, stdout.getvalue(), "")
    except Exception as e:  # the child's last stderr line, as cpu_case reads it
        return subprocess.CompletedProcess(cmd, 1, stdout.getvalue(), f"{type(e).__name__}: {e}")
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path


def no_compile(model=None, **_):  # TORCHDYNAMO_DISABLE's effect, without importing dynamo
    return model if model is not None else (lambda fn: fn)


timing.subprocess = types.SimpleNamespace(run=run_here, TimeoutExpired=subprocess.TimeoutExpired)
torch.compile = no_compile
from fastssl import cli  # noqa: E402

sys.exit(cli.main(["bench", *sys.argv[1:]]))
PY

cat >"$tools/ntxent_step.py" <<'PY'
"""One NT-Xent forward+backward at 2N rows: seconds (the first call includes compiling
the kernels; a second call when the first took under 10 s) and peak extra memory."""
import json
import sys
import time

import torch

import fastssl

two_n, D, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
sync = torch.cuda.synchronize if cuda else (lambda: None)
g = torch.Generator(device=device).manual_seed(0)
z0 = torch.randn(two_n // 2, D, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
z1 = torch.randn(two_n // 2, D, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
result = {"op": "nt_xent fwd+bwd", "two_n": two_n, "D": D, "dtype": "bfloat16",
          "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
if cuda:
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
seconds = []
for _ in range(2):
    z0.grad = z1.grad = None
    sync()
    t = time.perf_counter()
    loss = fastssl.nt_xent(z0, z1)
    loss.backward()
    sync()
    seconds.append(time.perf_counter() - t)
    if seconds[-1] >= 10:
        break
result.update(seconds=seconds, loss=loss.item(),
              finite=bool(torch.isfinite(loss).item() and torch.isfinite(z0.grad).all().item()))
if cuda:
    result["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
with open(path, "w") as f:
    json.dump(result, f, indent=1)
print(f"2N={two_n} D={D} bf16 on {result['device']}: " + ", ".join(f"{s:.2f} s" for s in seconds)
      + (f", peak extra {result['peak_extra_mib']:.0f} MiB" if cuda else "")
      + f", loss {result['loss']:.4f}")
sys.exit(0 if result["finite"] else 1)
PY

cat >"$tools/summary.py" <<'PY'
"""summary.md of a gpu_check run: the steps, the pytest counts, each bench result's
headline (benchmarks/results_table.py's choice of files, fastssl.bench's headline), the
NT-Xent step and the pretraining run. Each part is written even when another fails."""
import glob
import json
import os
import sys
import traceback
import xml.etree.ElementTree as ET

work, path, dry, total, repo = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
meta = os.path.join(work, "gpu-check")
sys.path[:0] = [repo, os.path.join(repo, "benchmarks")]
lines = ["# fastssl GPU check" + (" — CPU rehearsal (dry run)" if dry else ""), ""]
if dry:
    lines.extend(["Tiny sizes, CPU cases in the bench process, torch.compile off (its rows are "
                  "eager): this rehearses the run, it measures nothing.", ""])


def part(fn):
    try:
        fn()
    except Exception:
        lines.extend(["", "(this part of the summary failed:)", "```",
                      traceback.format_exc().strip(), "```", ""])
    return fn


@part
def header():
    info = os.path.join(meta, "info.txt")
    if os.path.exists(info):
        keep = [s for s in open(info).read().splitlines()
                if s.startswith(("fastssl ", "torch ", "triton ", "device ", "python "))]
        lines.extend(["```", *keep, "```", ""])
    lines.append(f"Total wall time: {total} s.")
    lines.append("")


@part
def steps():
    rows = [r.rstrip("\n").split("\t") for r in open(os.path.join(meta, "steps.tsv"))][1:]
    lines.extend(["| step | status | seconds | limit s | note |", "|---|---|---|---|---|"])
    lines.extend(f"| {r[0]} | {r[1]} | {r[3]} | {r[4]} | {r[5] if len(r) > 5 else ''} |"
                 for r in rows)
    counts = {}
    for r in rows:
        counts[r[1]] = counts.get(r[1], 0) + 1
    lines.extend(["", "Steps: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), ""])


@part
def tests():
    xml = os.path.join(meta, "cuda-tests.xml")
    lines.append("## pytest (tests that run on CUDA)")
    lines.append("")
    if not os.path.exists(xml):
        lines.extend(["no junit file: pytest did not finish its session", ""])
        return
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    lines.append(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, "
                 f"{n['skipped']} skipped ({n['tests']} run)")
    status = [r.split("\t")[1] for r in open(os.path.join(meta, "steps.tsv"))
              if r.startswith("tests\t")]
    if status and status[0] == "timeout":
        lines.append("(stopped at the step's limit: the counts cover the tests that ran)")
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    if bad:
        lines.extend(["", "Failed:", *[f"- `{b}`" for b in bad[:30]]]
                     + ([f"- ... and {len(bad) - 30} more"] if len(bad) > 30 else []))
    lines.append("")


@part
def bench():
    import results_table
    from fastssl.bench import headline
    lines.extend(["## fastssl bench --quick", ""])
    good, bad = [], []
    for p in sorted(glob.glob(os.path.join(work, "*.json"))):
        try:
            with open(p) as f:
                r = json.load(f)
            r["environment"]["device"], r["op"]  # noqa: B018 (what newest() reads)
            good.append(p)
        except Exception as e:
            bad.append(f"{os.path.basename(p)}: {type(e).__name__}")
    lines.extend(["| op | device | rows | headline |", "|---|---|---|---|"])
    for p, r in results_table.newest(good):
        device = r["environment"]["device"] + (" (CPU run)" if r["cpu"] else "")
        ok = sum("error" not in row for row in r["rows"])
        try:
            head = headline(r)
        except Exception as e:
            head = f"(no headline: {type(e).__name__})"
        lines.append(f"| {r['op']} | {device} | {ok} of {len(r['rows'])} measured | {head} |")
    if bad:
        lines.extend(["", "Unreadable result files: " + "; ".join(bad)])
    lines.append("")


@part
def ntxent():
    p = os.path.join(meta, "ntxent-1m.json")
    lines.extend(["## NT-Xent forward+backward at the largest batch", ""])
    if not os.path.exists(p):
        lines.extend(["no result", ""])
        return
    r = json.load(open(p))
    lines.extend([f"2N = {r['two_n']:,}, D = {r['D']}, {r['dtype']} on {r['device']}: "
                  + ", ".join(f"{s:.2f} s" for s in r["seconds"]) + " (the first includes "
                  "compiling)" + (f", peak extra {r['peak_extra_mib']:.0f} MiB"
                                  if "peak_extra_mib" in r else "")
                  + f", loss {r['loss']:.4f}" + ("" if r["finite"] else " — NOT FINITE"), ""])


@part
def pretrain():
    lines.extend(["## fastssl pretrain --method simclr", ""])
    reports = sorted(glob.glob(os.path.join(meta, "pretrain", "*", "report.json")))
    if not reports:
        lines.extend(["no report", ""])
        return
    r = json.load(open(reports[-1]))
    t = r.get("throughput") or {}
    text = (f"{r['steps']} steps, {r['timings']['train_s']:.1f} s of training, "
            f"{t.get('images_per_s', 0):.0f} images/s, final loss "
            f"{(r['epoch_loss'] or r['step_loss'])[-1]:.4f}")
    acc = (r.get("accuracy") or {}).get(r["method"])
    if acc:
        text += (f"; kNN {acc['knn']:.1f}%, linear probe {acc['linear']:.1f}%, kNN above random "
                 f"init {r['knn_margin_over_random_init']:+.1f} points")
    lines.extend([text, ""])


with open(path, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")
PY

# ---------------------------------------------------------------- the run
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# the rehearsal's tiny sizes gain nothing from threads, and lose much on a busy machine
[ "$dry" = 1 ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
unset TRITON_INTERPRET FASTSSL_BACKEND
echo "fastssl GPU check$([ "$dry" = 1 ] && echo " (CPU rehearsal, limits x $scale)"): $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), work dir $work"

if [ "$dry" = 1 ]; then
  skip_step install "dry run: the environment's fastssl is used as installed"
else
  run_step install 30 python3 -m pip install -q --no-deps --no-build-isolation -e .
  [ "$step_rc" = 0 ] || echo "note: offline install failed; importing fastssl from the source tree"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "peer wheels in .whl/: $(ls .whl/*.whl | wc -l) files, $(du -ch .whl/*.whl | tail -n 1 | cut -f1) in all"
  for w in "${PEER_WHEELS[@]}"; do
    compgen -G ".whl/${w}*.whl" >/dev/null || compgen -G ".whl/${w//_/-}*.whl" >/dev/null \
      || echo "  expected but absent: $w"
  done
  run_step peer-wheels 30 python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$tools/site" .whl/*.whl
  if [ "$step_rc" = 0 ]; then export PYTHONPATH="$tools/site${PYTHONPATH:+:$PYTHONPATH}"
  else echo "note: the peer wheels in .whl/ did not install; the peers are timed where they import"; fi
else
  skip_step peer-wheels "no .whl/ folder: the peers are timed where they import"
fi
if [ "$dry" = 1 ]; then
  run_step info 20 bash -c 'set -o pipefail; python3 -m fastssl.cli info 2>&1 | tee "$1"' _ "$meta/info.txt"
else
  run_step info 20 bash -c 'set -o pipefail; { python3 -m fastssl.cli info && nvidia-smi \
    --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu,memory.total --format=csv; } 2>&1 | tee "$1"' _ "$meta/info.txt"
fi
# fastssl.bench.OPS, read from its source (importing it costs an interpreter with torch)
ops=$(timeout 30 python3 -c 'import ast, sys
tree = ast.parse(open("fastssl/bench/runner.py").read())
ops = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
       and any(getattr(t, "id", None) == "OPS" for t in n.targets)]
print(*ops[0])' 2>/dev/null) && [ -n "$ops" ] \
  || ops=$(timeout 60 python3 -c 'from fastssl.bench import OPS; print(*OPS)' 2>/dev/null) \
  || ops="infonce clip siglip maxbatch barlow vicreg ema augment dino ibot mae"
echo "bench ops: $ops"

# 1. compiled-kernel correctness
pytest_args=(tests -q -rfE --maxfail=50 --continue-on-collection-errors -p gpu_check_select
             -p no:cacheprovider --ignore=tests/test_aot_compile.py --ignore=tests/peers
             --ignore=tests/test_gpu_check.py --junitxml="$meta/cuda-tests.xml")
pick=""
[ "$dry" = 1 ] && pick="test_siglip_bias_defaults_to_zero,test_queue_feeds_info_nce,test_siglip_deterministic"
STEP_SIGNAL=INT run_step tests 120 env GPU_CHECK_PICK="$pick" \
  PYTHONPATH="$tools${PYTHONPATH:+:$PYTHONPATH}" python3 -m pytest "${pytest_args[@]}"

# 2. every bench op beside the peers, each under its own limit, 265 s in all
bench_end=$(( SECONDS + $(limit_of 265) ))
for op in $ops; do
  case "$op" in
    # limits from the H200 run of 2026-12-04 (benchmarks/NOTES.md): a fresh process, the
    # kernels' compilation and the peers' float32 check take most of each
    infonce) limit=50 tiny=(--sizes 64 --dims 8) ;;  # the one op with torch.compile rows
    supcon) limit=18 tiny=(--sizes 64 --dims 8) ;;
    sigreg) limit=16 tiny=(--sizes 64 --dims 8) ;;
    detcon) limit=18 tiny=(--sizes 64 --dims 8) ;;
    clip) limit=25 tiny=(--sizes 32 --dims 8) ;;
    siglip) limit=18 tiny=(--sizes 32 --dims 8) ;;
    maxbatch) limit=12 tiny=(--dims 8) ;;
    augment) limit=15 tiny=(--sizes 2) ;;
    barlow) limit=15 tiny=(--sizes 32 --dims 16) ;;
    vicreg) limit=14 tiny=(--sizes 32 --dims 16) ;;
    dino) limit=18 tiny=(--sizes 20 --dims 8) ;;
    ibot) limit=14 tiny=(--sizes 16 --dims 8) ;;
    ema) limit=12 tiny=() ;;
    mae) limit=10 tiny=(--sizes 2 --dims 32) ;;
    kmeans) limit=10 tiny=(--sizes 2000 --dims 8) ;;
    *) limit=20 tiny=() ;;  # an op this list does not know yet: its quick defaults
  esac
  left=$(( bench_end - SECONDS ))
  if [ "$left" -lt 1 ]; then
    printf '%s\tnot run\t-\t0.0\t-\tthe bench steps'"'"' time is spent\n' "bench-$op" >>"$steps"
    echo "== bench-$op: not run (the bench steps' time is spent)"; continue
  fi
  [ "$(limit_of "$limit")" -gt "$left" ] && limit=$(awk -v l="$left" -v s="$scale" 'BEGIN { print l / s }')
  if [ "$dry" = 1 ]; then
    run_step "bench-$op" "$limit" env TORCHDYNAMO_DISABLE=1 FASTSSL_BENCH_K=1024 \
      python3 "$tools/bench_in_process.py" "$op" --quick ${tiny[@]+"${tiny[@]}"} --out "$work"
  else
    run_step "bench-$op" "$limit" python3 -m fastssl.cli bench "$op" --quick --out "$work"
  fi
done

# 3. the largest NT-Xent step and the trainer on the GPU
if [ "$dry" = 1 ]; then
  run_step ntxent-1m 25 python3 "$tools/ntxent_step.py" 1024 128 "$meta/ntxent-1m.json"
  run_step pretrain 35 python3 -m fastssl.cli pretrain --method simclr --max-steps 3 --no-eval \
    --batch-size 32 --no-progress --out "$meta/pretrain"
else
  run_step ntxent-1m 25 python3 "$tools/ntxent_step.py" 1048576 128 "$meta/ntxent-1m.json"
  run_step pretrain 35 python3 -m fastssl.cli pretrain --method simclr --max-steps 200 \
    --no-fine-tune --no-progress --out "$meta/pretrain"
fi
echo "== steps done at $(elapsed) s"
