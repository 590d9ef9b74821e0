"""Every shipped kernel configuration compiles for sm_80 and sm_90 with no GPU present:
zero spill bytes (ptxas -v), and on sm_90 the kernels with tile matmuls use wgmma."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_worker.py")


@pytest.fixture(scope="module")
def compiled():
    """Both architectures compiled in parallel, one worker process each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cc: subprocess.Popen([sys.executable, WORKER, str(cc)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
             for cc in (80, 90)}
    rows = []
    for cc, p in procs.items():
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err[-3000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


# float32 tiles in three TF32 passes (the default for float32 inputs, as exact as PyTorch's
# float32 matmuls) need the split operands' registers too: zero spills on sm_90, and on
# sm_80 24-1,380 bytes with the float32 table (benchmarks/NOTES.md, H200 2026-12-04). Those
# are allowed up to this bound, and listed; every other entry compiles without spills.
SM80_TF32X3_SPILL_BOUND = 1536


def test_every_configuration_compiles_without_spills(compiled):
    assert len(compiled) >= 2 * 10
    failures, allowed = [], []
    for row in compiled:
        if not row["ok"]:
            failures.append(f"{row['id']} sm_{row['cc']}: {row.get('error') or row['ptxas']}")
        elif (row["cc"] == 80 and "-tf32x3" in row["id"]
              and 0 < (row["spill_bytes"] or 0) <= SM80_TF32X3_SPILL_BOUND):
            allowed.append(f"{row['id']}: {row['spill_bytes']}")
        elif row["spill_bytes"] != 0:
            failures.append(f"{row['id']} sm_{row['cc']}: {row['spill_bytes']} spill bytes, "
                            f"{row['registers']} registers")
        elif row["cc"] == 90 and row["matmul"] and not row["wgmma"]:
            failures.append(f"{row['id']} sm_90: no wgmma")
    print(f"{len(allowed)} float32 three-pass entries spill on sm_80 (bytes):", *allowed,
          sep="\n  ")
    assert not failures, "\n".join(failures)


def test_both_architectures_and_every_kernel(compiled):
    assert {r["cc"] for r in compiled} == {80, 90}
    kernels = {r["id"].split("-")[0] for r in compiled}
    assert kernels == {f"{family}.{k}" for family in ("infonce", "siglip")
                       for k in ("_fwd_kernel", "_bwd_rows_kernel", "_bwd_cols_kernel")} | {
                           "barlow._gram_inner_kernel", "barlow._gram_apply_kernel",
                           "barlow._gram_kernel",
                           "barlow._standardize_kernel", "barlow._standardize_bwd_kernel",
                           "augment._colour_kernel", "augment._blur_rows_kernel",
                           "augment._blur_cols_kernel", "augment._resize_kernel",
                           "prototype._rows_kernel", "prototype._cols_kernel",
                           "prototype._pair_rows_kernel", "prototype._pair_cols_kernel",
                           "masked._fwd_kernel", "masked._bwd_kernel",
                           "masked._latent_fwd_kernel", "masked._latent_bwd_kernel",
                           "masked._inorm_stats_kernel", "kmeans._assign_kernel",
                           "kmeans._segment_sum_kernel", "sketch._fwd_kernel",
                           "sketch._bwd_kernel"}
