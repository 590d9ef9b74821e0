"""benchmarks/gpu_check.sh rehearsed on the CPU (FASTSSL_GPU_CHECK_DRY_RUN=1): every step
runs at tiny sizes under its timeout, and what comes back is what a lent GPU's run returns:
exactly three files, a tarball whose bench results benchmarks/results_table.py reads, and a
summary naming every step. A second run with failing and hanging steps still returns them."""
import json
import os
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_table  # noqa: E402

from fastssl.bench import OPS, headline  # noqa: E402

# The rehearsal takes about 60 s on two shared cores; the budget allows a machine four times
# slower (its step limits, the GPU run's times 3 in a rehearsal, allow more still).
BUDGET_S = 300
RETURNED = {"results.tar.gz", "summary.md", "log.txt"}
STEPS = ["install", "peer-wheels", "info", "tests", *[f"bench-{op}" for op in OPS],
         "ntxent-1m", "pretrain"]


def _run(out, tmp, **overrides):
    env = dict(os.environ, FASTSSL_GPU_CHECK_DRY_RUN="1", TMPDIR=str(tmp), **overrides)
    for name in ("FASTSSL_GPU_CHECK_KEEP", "FASTSSL_GPU_CHECK_SCALE", "OMP_NUM_THREADS"):
        if name not in overrides:
            env.pop(name, None)
    start = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True, env=env,
                          timeout=BUDGET_S + 120, stdin=subprocess.DEVNULL)
    return proc, time.monotonic() - start


def _returned(out):
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8 and set(files) == RETURNED, files
    for f in files:
        assert os.path.getsize(os.path.join(out, f)) <= 16 << 20, f


def _steps(unpacked):
    with open(os.path.join(unpacked, "gpu-check", "steps.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return {r[0]: r[1] for r in rows}


def _unpack(out, where):
    with tarfile.open(os.path.join(out, "results.tar.gz")) as tar:
        tar.extractall(where, filter="data")
    return where


def test_dry_run_returns_three_files_that_results_table_reads(tmp_path):
    out, work_tmp = tmp_path / "out", tmp_path / "tmp"
    work_tmp.mkdir()
    proc, seconds = _run(out, work_tmp)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert seconds <= BUDGET_S, f"the rehearsal took {seconds:.0f} s"
    _returned(out)
    assert not list(work_tmp.glob("fastssl-gpu-check.*")), "the work directory was left behind"

    unpacked = _unpack(out, tmp_path / "unpacked")
    names = set(os.listdir(unpacked))
    jsons = sorted(str(unpacked / n) for n in names if n.endswith(".json"))
    chosen = results_table.newest(jsons)
    assert {r["op"] for _, r in chosen} == set(OPS)
    for path, result in chosen:
        assert result["cpu"] and any("error" not in row for row in result["rows"]), path
        assert headline(result)
        stem = path[:-len(".json")]
        assert os.path.exists(stem + ".md") and os.path.exists(stem + ".png"), stem
    meta = unpacked / "gpu-check"
    for name in ("info.txt", "steps.tsv", "summary.md", "cuda-tests.xml", "ntxent-1m.json"):
        assert (meta / name).is_file(), name
    step = json.loads((meta / "ntxent-1m.json").read_text())
    assert step["two_n"] == 1024 and step["finite"]
    (report,) = meta.glob("pretrain/simclr-*/report.json")
    assert json.loads(report.read_text())["steps"] == 3
    assert not list(unpacked.rglob("*.pt")) and not list(unpacked.rglob("*.py"))

    status = _steps(unpacked)
    assert list(status) == STEPS
    assert status["install"] == "skipped"  # the environment's fastssl is not reinstalled
    assert all(s == "pass" for k, s in status.items() if k not in ("install", "peer-wheels"))

    summary = (out / "summary.md").read_text()
    assert summary == (meta / "summary.md").read_text()
    for step in STEPS:
        assert f"| {step} | {status[step]} |" in summary, step
    assert "Total wall time:" in summary and " passed, 0 failed, 0 errors, " in summary
    for op in OPS:
        assert f"\n| {op} | CPU" in summary, op
    log = (out / "log.txt").read_text()
    assert "== tests (at most 360 s" in log and summary.strip() in log
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])


def test_failing_and_hanging_steps_still_return_three_files(tmp_path):
    """A python3 that fails at once, hangs under pytest, and a tiny scale: every step fails,
    times out or is not run; the tarball and a summary (the fallback one: the summary script
    needs python3 too) come back all the same."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python3").write_text('#!/bin/sh\n[ "$1 $2" = "-m pytest" ] && exec sleep 60\nexit 3\n')
    (stub / "python3").chmod(0o755)
    out, work_tmp = tmp_path / "out", tmp_path / "tmp"
    work_tmp.mkdir()
    proc, seconds = _run(out, work_tmp, FASTSSL_GPU_CHECK_SCALE="0.02",
                         PATH=f"{stub}{os.pathsep}{os.environ['PATH']}")
    assert proc.returncode == 1 and seconds < 60, (proc.returncode, seconds, proc.stdout[-3000:])
    _returned(out)
    status = _steps(_unpack(out, tmp_path / "unpacked"))
    assert status["tests"] == "timeout" and status["info"] == "fail"
    assert set(status.values()) <= {"skipped", "fail", "timeout", "not run"}
    assert "tests\ttimeout\t124" in (out / "summary.md").read_text()
