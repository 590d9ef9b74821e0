"""The command line: `fastssl info` and `fastssl bench --quick` on this machine."""
import json
import os
import subprocess
import sys

import torch

from fastssl import _dispatch, cli


def _peer_names(op):
    """The peer libraries a bench row may add where they are installed."""
    from fastssl.bench import peers
    return {name for name, _, _ in peers.PEERS[op]}


def test_info_lists_versions_and_paths(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch   {torch.__version__}" in out
    assert "infonce (nt_xent, info_nce, clip_loss)" in out
    if not torch.cuda.is_available() and "FASTSSL_BACKEND=auto" in out:
        assert "torch (portable): no CUDA device" in out


def test_describe_follows_the_environment(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    assert "forced" in next(iter(_dispatch.describe().values()))
    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    assert "triton" in next(iter(_dispatch.describe().values()))


def test_bench_quick_writes_valid_json(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", "--quick", "--sizes",
                          "512", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob("*-infonce.json")
    result = json.loads(path.read_text())
    assert result["environment"]["torch"] == torch.__version__
    impls = {r["impl"] for r in result["rows"]}
    ours = ({"fastssl", "eager", "torch.compile"} if torch.cuda.is_available()
            else {"fastssl (portable)", "eager", "torch.compile"})
    assert ours <= impls and impls - ours <= _peer_names("infonce")
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["fwd_bwd_ms"] > 0 and row["peak_extra_mib"] >= 0
    assert (tmp_path / path.name.replace(".json", ".md")).read_text().count("|") > 10
    with open(tmp_path / path.name.replace(".json", ".png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_give_usage_not_traceback():
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", "--sizes", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "usage:" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", "nosuchop"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_max_batch_search_doubles_then_bisects():
    from fastssl.bench import max_batch
    limit = 11000
    probes = []

    def fits(size):
        probes.append(size)
        return size <= limit, 0.0
    size, why = max_batch(fits, 1024, 1 << 20, 256, lambda *_: None, "x")
    assert why == "memory" and limit - 256 < size <= limit
    assert probes[:5] == [1024, 2048, 4096, 8192, 16384]
    size, why = max_batch(lambda s: (True, 0.0), 1024, 4096, 256, lambda *_: None, "x")
    assert size == 4096 and "cap" in why
    # a failure other than memory past 6000 rows (out of memory past 9000): its reason
    size, why = max_batch(lambda s: (True, 0.0) if s <= 6000 else
                          (False, "RuntimeError: too many keys") if s <= 9000 else (False, None),
                          1024, 1 << 20, 256, lambda *_: None, "x")
    assert 6000 - 256 < size <= 6000 and why == "RuntimeError: too many keys"


def test_gpu_bench_measures_torch_compile_after_every_other_row(monkeypatch):
    """bench_gpu's order, with the GPU timing replaced by a recorder: each shape's fastssl,
    eager and peer rows first, torch.compile's rows (compiled at their first call) last, and
    none of them without ``compiled``."""
    from fastssl.bench import timing
    calls = []
    monkeypatch.setattr(timing, "_gpu_ceiling", lambda: 1.0)
    monkeypatch.setattr(timing.peers, "report", lambda *a: ({"peer": object()}, {}))
    monkeypatch.setattr(timing, "make_inputs", lambda op, size, D, dtype, dev: (size, D))
    monkeypatch.setattr(timing.torch, "compile", lambda fn, **kw: "compiled")
    monkeypatch.setattr(timing.torch.cuda, "empty_cache", lambda: None)

    def record(fn, a, b):
        calls.append(a)
        return {"fwd_ms": 1.0, "bwd_ms": 1.0, "fwd_bwd_ms": 2.0, "peak_extra_mib": 0.0}
    monkeypatch.setattr(timing, "_time_gpu", record)
    rows, _ = timing.bench_gpu("infonce", [64, 128], [8], [torch.bfloat16], lambda *_: None)
    order = [(r["impl"], r["rows"]) for r in rows]
    assert order == [("fastssl", 64), ("eager", 64), ("peer", 64), ("fastssl", 128),
                     ("eager", 128), ("peer", 128), ("torch.compile", 64),
                     ("torch.compile", 128)]
    assert all("error" not in r for r in rows) and calls == [64, 64, 64, 128, 128, 128, 64, 128]
    rows, _ = timing.bench_gpu("infonce", [64], [8], [torch.bfloat16], lambda *_: None,
                               compiled=False)
    assert [r["impl"] for r in rows] == ["fastssl", "eager", "peer"]


def _quick_bench_rows(tmp_path, op, size, dim):
    """The rows of ``fastssl bench op --quick`` at one size and width, run as a user would."""
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", op, "--quick",
                          "--sizes", str(size), "--dims", str(dim), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob(f"*-{op}.json")
    return json.loads(path.read_text())["rows"]


def test_bench_siglip_quick_on_cpu(tmp_path):
    rows = _quick_bench_rows(tmp_path, "siglip", 256, 32)
    assert rows and all("error" not in r and r["fwd_bwd_ms"] > 0 for r in rows)


def test_bench_all_runs_every_op_into_one_summary(tmp_path, monkeypatch):
    from fastssl import bench
    monkeypatch.setattr(bench.runner, "OPS", ("ema", "augment"))  # the two quickest on CPU
    logged = []
    results = bench.run("all", quick=True, dtypes=["float32"], out_dir=str(tmp_path),
                        log=logged.append)
    assert [r["op"] for r in results] == ["ema", "augment"]
    assert any("ema does not take --dtypes" in line for line in logged)
    for op in ("ema", "augment"):
        (path,) = tmp_path.glob(f"*-{op}.json")
        result = json.loads(path.read_text())
        assert set(result) >= {"op", "cpu", "environment", "rows"} and result["rows"]
        with open(str(path).replace(".json", ".png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    (summary,) = tmp_path.glob("*-all.md")
    text = summary.read_text()
    assert "| ema |" in text and "| augment |" in text and "### augment" in text
    if not torch.cuda.is_available():
        assert "**CPU run**" in text


def test_version():
    import fastssl
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"fastssl {fastssl.__version__}"


def test_bench_writes_into_fastssl_bench_by_default(tmp_path):
    """Without --out, results go to ./fastssl-bench, not the checkout's benchmarks/results."""
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", "barlow", "--quick",
                          "--sizes", "8", "--dims", "16"], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [p.suffix for p in sorted((tmp_path / "fastssl-bench").iterdir())] == [
        ".json", ".md", ".png"]
    assert [p.name for p in tmp_path.iterdir()] == ["fastssl-bench"]


def test_largest_batch_in_a_memory_budget():
    """The largest-batch search of the new losses' benches, in child processes that measure
    their peak RSS: at a 64 MiB budget eager DetConB's (b*m)^2 logit copies stop it below
    the cap that fastssl's tiles reach; the search itself ends on doubling or bisection."""
    from fastssl.bench.maxbatch import LARGEST, largest_rows
    lines = []
    got = largest_rows("detcon", 8, "float32", True, lines.append, budget_mib=64)
    cap, step = LARGEST["detcon"][2][0], LARGEST["detcon"][1]
    assert set(got) == {"fastssl", "eager"}
    assert got["fastssl"] == {"max_rows": cap, "stopped_by": f"reached the cap of {cap} images",
                              "budget": "64 MiB extra"}
    assert got["eager"]["stopped_by"] == "memory" and step <= got["eager"]["max_rows"] < cap
    assert got["eager"]["max_rows"] % step == 0
    assert any("images (16 regions each)" in line for line in lines)


def test_bench_dino_quick_on_cpu(tmp_path):
    """The prototype-head bench end to end at a small K: timing rows for fastssl, eager and
    torch.compile, and the largest rows count each fits in the memory budget."""
    env = dict(os.environ, FASTSSL_BENCH_K="256", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", "dino", "--quick",
                          "--sizes", "40", "--dims", "16", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob("*-dino.json")
    result = json.loads(path.read_text())
    impls = {r["impl"] for r in result["rows"]}
    ours = {"fastssl (portable)", "eager", "torch.compile"}
    assert ours <= impls and impls - ours <= _peer_names("dino")
    assert all("error" not in r and r["fwd_bwd_ms"] > 0 for r in result["rows"])
    assert set(result["max_rows"]) == {"fastssl", "eager"}
    assert all(r["max_rows"] > 0 for r in result["max_rows"].values())
    assert result["max_rows_unit"] == "student rows (K = 256)"
    assert "largest batch, in student rows" in (tmp_path / path.name.replace(".json", ".md")).read_text()


def test_bench_mae_quick_on_cpu(tmp_path):
    """The masked-patch loss bench end to end on small images: fastssl, MAE's eager loss and
    its torch.compile, each with a time and a peak; a side that 16-px patches do not tile is
    refused before anything runs."""
    rows = _quick_bench_rows(tmp_path, "mae", 2, 32)
    assert {r["impl"] for r in rows} == {"fastssl (portable)", "eager", "torch.compile"}
    assert all("error" not in r and r["fwd_bwd_ms"] > 0 and "peak_extra_mib" in r for r in rows)
    bad = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", "mae", "--dims", "30"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "multiple of 16" in bad.stderr


def test_bench_kmeans_quick_on_cpu(tmp_path):
    """The k-means bench end to end on small data: fastssl, the eager (N x K) formulation and
    scikit-learn from the same init reach the same inertia (float32 rounding), each with a
    time and a peak; the table and the headline name every implementation."""
    rows = _quick_bench_rows(tmp_path, "kmeans", 3000, 8)
    assert {"fastssl", "eager", "scikit-learn"} <= {r["impl"] for r in rows}
    assert all("error" not in r and r["ms"] > 0 and "peak_extra_mib" in r for r in rows)
    for it in {r["iterations"] for r in rows}:
        inertia = [r["inertia"] for r in rows if r["iterations"] == it]
        assert max(inertia) - min(inertia) <= 1e-4 * max(inertia)
    from fastssl.bench import headline
    (path,) = tmp_path.glob("*-kmeans.json")
    line = headline(json.loads(path.read_text()))
    assert "fastssl" in line and "scikit-learn" in line
