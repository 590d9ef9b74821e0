"""Multi-positive and decoupled contrastive losses (fastssl.multipositive) against float64
formulas written out here with the full similarity matrix: the keyed log-partition on both
paths (every key mode, with and without the row's own column, odd shapes, 16-bit inputs),
SupCon in both contrast modes, with labels, without, and with an explicit mask, rows
without a positive, solo-learn's multi-positive SimCLR, DCL and DCLW, the custom op under
opcheck and torch.compile, and the reference implementation's errors."""
import math

import pytest
import torch

from fastssl import _ops, multipositive as mp

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _rel(x, ref, floor=1e-300):
    """||x - ref|| / max(||ref||, floor): ``floor`` is the size of the terms a gradient sums
    where they cancel exactly (one sample whose only other column is its positive)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(floor))


def ref_lse(rows, cols, rk, ck, s, mode, self_idx):
    """float64: log sum over the selected columns of exp(s r . c), -inf when none."""
    x = s * rows.double() @ cols.double().T
    keep = torch.ones_like(x, dtype=torch.bool)
    if mode == 1:
        keep &= rk[:, None] != ck[None, :]
    if mode == 2:
        keep &= rk[:, None] == ck[None, :]
    if self_idx is not None:
        i = torch.arange(rows.shape[0])
        ok = self_idx >= 0
        keep[i[ok], self_idx[ok]] = False
    return torch.logsumexp(x.masked_fill(~keep, float("-inf")), 1)


@pytest.mark.parametrize("n,m,D", [(1, 5, 3), (17, 33, 1), (9, 130, 257)])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("with_self", [False, True])
def test_keyed_lse_value_and_gradients(backend, n, m, D, mode, with_self):
    g = torch.Generator().manual_seed(n * 1000 + m + D + mode)
    rows = torch.randn(n, D, generator=g, dtype=torch.float64)
    cols = torch.randn(m, D, generator=g, dtype=torch.float64)
    rk = torch.randint(0, 4, (n,), generator=g)
    ck = torch.randint(0, 4, (m,), generator=g)
    self_idx = torch.randint(-1, m, (n,), generator=g) if with_self else None
    s = 1.7
    ref = ref_lse(rows, cols, rk, ck, s, mode, self_idx)
    finite = torch.isfinite(ref)
    w = torch.randn(n, generator=g, dtype=torch.float64) * finite
    r64, c64 = rows.clone().requires_grad_(), cols.clone().requires_grad_()
    torch.where(finite, ref_lse(r64, c64, rk, ck, s, mode, self_idx), 0.0).mul(w).sum().backward()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        r = rows.to(dtype).requires_grad_()
        c = cols.to(dtype).requires_grad_()
        got = mp.keyed_lse(r, c, rk, ck, s, mode, self_idx)
        assert torch.equal(torch.isfinite(got), finite), (dtype, got, ref)
        assert (got[~finite] == float("-inf")).all()
        if finite.any():
            # the reference at the rounded inputs: the error of the op, not of the cast
            ref_d = ref_lse(rows.to(dtype).double(), cols.to(dtype).double(), rk, ck, s, mode,
                            self_idx)
            assert _rel(got[finite], ref_d[finite]) < TOL[dtype] * (1 + math.log2(D + 1)), dtype
        torch.where(finite, got, 0.0).mul(w.to(torch.float32)).sum().backward()
        if finite.any() and dtype == torch.float32:
            assert _rel(r.grad, r64.grad) < 1e-4 and _rel(c.grad, c64.grad) < 1e-4
        assert torch.isfinite(r.grad.float()).all() and torch.isfinite(c.grad.float()).all()


def ref_supcon(features, labels, mask, T, mode, T_base):
    """The reference implementation's formula in float64 with full matrices."""
    f = features.double().reshape(features.shape[0], features.shape[1], -1)
    B, V, _ = f.shape
    if mask is None:
        lab = torch.arange(B) if labels is None else labels
        mask = (lab[:, None] == lab[None, :]).double()
    contrast = torch.cat(torch.unbind(f, 1))
    anchor, count = (f[:, 0], 1) if mode == "one" else (contrast, V)
    logits = anchor @ contrast.T / T
    m = mask.double().repeat(count, V)
    eye = torch.zeros_like(logits)
    eye[torch.arange(anchor.shape[0]), torch.arange(anchor.shape[0])] = 1
    m = m * (1 - eye)
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye.bool(), float("-inf")), 1,
                                        keepdim=True)
    pos = m.sum(1)
    mean = (m * log_prob).sum(1) / torch.where(pos < 1e-6, torch.ones_like(pos), pos)
    return (-(T / T_base) * mean).mean()


@pytest.mark.parametrize("B,V,D", [(1, 2, 4), (7, 3, 1), (12, 2, 257)])
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("how", ["labels", "none", "mask"])
def test_supcon_against_reference(backend, B, V, D, mode, how):
    g = torch.Generator().manual_seed(B * 100 + V * 10 + D)
    f = torch.nn.functional.normalize(torch.randn(B, V, D, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 3, (B,), generator=g)
    mask = (labels[:, None] == labels[None, :]).float() if how == "mask" else None
    lab = labels if how == "labels" else None
    ref_mask = mask if how == "mask" else None
    x64 = f.clone().requires_grad_()
    ref = ref_supcon(x64, lab, ref_mask, 0.1, mode, 0.07)
    ref.backward()
    x = f.float().requires_grad_()
    got = mp.SupConLoss(0.1, mode, 0.07)(x, lab, mask)
    got.backward()
    assert abs(float(got) - float(ref)) <= 2e-5 * max(1.0, abs(float(ref)))
    assert _rel(x.grad, x64.grad, floor=1 / 0.07) < 1e-4  # terms of size 1/T_base


def test_supcon_rows_without_positive_and_extra_dims(backend):
    g = torch.Generator().manual_seed(3)
    f = torch.randn(6, 1, 2, 3, generator=g)  # one view, features (2, 3) flattened
    labels = torch.tensor([0, 1, 1, 2, 3, 3])  # samples 0 and 3 have no positive
    got = mp.supcon_loss(f, labels, temperature=0.5, base_temperature=0.5)
    ref = ref_supcon(f, labels, None, 0.5, "all", 0.5)
    assert abs(float(got) - float(ref)) < 1e-5


def test_supcon_16bit_inputs_close_to_float64(backend):
    g = torch.Generator().manual_seed(5)
    f = torch.nn.functional.normalize(torch.randn(20, 2, 64, generator=g), dim=-1)
    labels = torch.randint(0, 4, (20,), generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        x = f.to(dtype)
        ref = ref_supcon(x.double(), labels, None, 0.1, "all", 0.07)
        got = mp.supcon_loss(x, labels, temperature=0.1)
        assert got.dtype == dtype
        eager = ref_supcon(x.float(), labels, None, 0.1, "all", 0.07)  # float32 eager
        assert abs(float(got) - float(ref)) <= max(2 * abs(float(eager) - float(ref)),
                                                   torch.finfo(dtype).eps * abs(float(ref)))


def test_supcon_errors():
    loss = mp.SupConLoss()
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        loss(torch.randn(4, 8))
    with pytest.raises(ValueError, match="Cannot define both"):
        loss(torch.randn(4, 2, 8), torch.arange(4), torch.eye(4))
    with pytest.raises(ValueError, match="Num of labels does not match"):
        loss(torch.randn(4, 2, 8), torch.arange(3))
    with pytest.raises(ValueError, match="Unknown mode"):
        mp.SupConLoss(contrast_mode="both")(torch.randn(4, 2, 8))
    with pytest.raises(ValueError, match="temperature"):
        mp.SupConLoss(temperature=0.0)


def ref_simclr_multi(z, idx, T):
    u = torch.nn.functional.normalize(z.double(), dim=-1)
    x = u @ u.T / T
    eye = torch.eye(len(idx), dtype=torch.bool)
    pos = (idx[:, None] == idx[None, :]) & ~eye
    every = torch.logsumexp(x.masked_fill(eye, float("-inf")), 1)
    return (every - torch.logsumexp(x.masked_fill(~pos, float("-inf")), 1)).mean()


@pytest.mark.parametrize("N,D", [(2, 1), (15, 33), (24, 257)])
def test_multi_positive_simclr(backend, N, D):
    g = torch.Generator().manual_seed(N + D)
    z = torch.randn(N, D, generator=g, dtype=torch.float64)
    idx = torch.arange(N) % max(1, N // 3)  # three or more crops per image
    if N == 2:
        idx = torch.tensor([0, 0])
    z64 = z.clone().requires_grad_()
    ref = ref_simclr_multi(z64, idx, 0.2)
    ref.backward()
    x = z.float().requires_grad_()
    got = mp.simclr_loss_func(x, idx, 0.2)
    got.backward()
    assert abs(float(got) - float(ref)) <= 2e-5 * max(1.0, abs(float(ref)))
    assert _rel(x.grad, z64.grad, 1 / 0.2) < 1e-4


def ref_dcl(a, b, T, weights=None):
    u = torch.nn.functional.normalize(a.double(), dim=1)
    v = torch.nn.functional.normalize(b.double(), dim=1)

    def one(p, q):
        n = p.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        pos = (p * q).sum(1) / T
        if weights is not None:
            pos = pos * weights(p, q)
        negs = torch.cat([(p @ p.T / T)[~eye].view(n, -1), (p @ q.T / T)[~eye].view(n, -1)], 1)
        return (torch.logsumexp(negs, 1) - pos).mean()
    return 0.5 * (one(u, v) + one(v, u))


def vmf(p, q, sigma=0.5):
    return 2 - p.shape[0] * torch.softmax((p * q).sum(1) / sigma, 0)


@pytest.mark.parametrize("n,D", [(2, 1), (9, 17), (16, 257)])
@pytest.mark.parametrize("weighted", [False, True])
def test_dcl_and_dclw(backend, n, D, weighted):
    g = torch.Generator().manual_seed(n * 10 + D)
    a = torch.randn(n, D, generator=g, dtype=torch.float64)
    b = torch.randn(n, D, generator=g, dtype=torch.float64)
    a64, b64 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = ref_dcl(a64, b64, 0.1, (lambda p, q: vmf(p.detach(), q.detach())) if weighted else None)
    ref.backward()
    x, y = a.float().requires_grad_(), b.float().requires_grad_()
    loss = mp.DCLWLoss(0.1, 0.5) if weighted else mp.DCLLoss(0.1)
    got = loss(x, y)
    got.backward()
    assert abs(float(got) - float(ref)) <= 2e-5 * max(1.0, abs(float(ref)))
    # D = 1: unit rows are +-1 and every gradient is exactly zero (float64: roundings)
    assert _rel(x.grad, a64.grad, 10.0) < 1e-4 and _rel(y.grad, b64.grad, 10.0) < 1e-4


def test_dcl_with_custom_weight_fn(backend):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    fn = lambda p, q: ((p - q) ** 2).sum(1)  # noqa: E731  (lightly's docstring example)
    got = mp.DCLLoss(weight_fn=fn)(a, b)
    assert abs(float(got) - float(ref_dcl(a, b, 0.1, fn))) < 1e-5


def test_keyed_infonce_opcheck_and_compile():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 5, generator=g, requires_grad=True)
    cols = torch.randn(9, 5, generator=g, requires_grad=True)
    keys = torch.randint(0, 3, (15,), generator=g)
    pos = torch.full((6,), -1, dtype=torch.int64)
    for mode in (1, 2):
        args = (rows, cols, None, pos, torch.arange(6), torch.tensor(2.0), False, keys, mode)
        torch.library.opcheck(_ops.infonce.custom, args)
    f = torch.randn(8, 2, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (8,), generator=g)
    eager = mp.supcon_loss(f, labels)
    compiled = torch.compile(mp.supcon_loss, fullgraph=True, backend="aot_eager")(f, labels)
    assert torch.allclose(eager, compiled, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 2 ranks

def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(10, 12, generator=g), torch.randn(10, 12, generator=g)
    idx = torch.arange(10) % 4
    return a, b, idx


def _rank_worker(rank, world, port, out_dir):
    import datetime
    import os
    import torch.distributed as dist
    # a forked child must not enter the parent's OpenMP pool (it would wait on threads
    # that fork did not copy): one thread, as DataLoader workers do
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        a, b, idx = _global_batch()
        rows = slice(5 * rank, 5 * rank + 5)
        x, y = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        dcl = mp.DCLLoss(0.2, gather_distributed=True)(x, y)
        dcl.backward()
        z = a[rows].clone().requires_grad_()
        multi = mp.simclr_loss_func(z, idx[rows], 0.2)
        multi.backward()
        torch.save({"dcl": dcl.detach(), "dx": x.grad, "dy": y.grad, "multi": multi.detach(),
                    "dz": z.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    """Each rank's loss over its 5 rows against the gathered columns: the mean of the two
    ranks' losses is the one-process loss on the 10 rows, and each rank's input gradient is
    world_size x the global gradient of its slice (the convention of fastssl.distributed)."""
    import os
    import tempfile
    import time
    import torch.multiprocessing as tmp
    with tempfile.TemporaryDirectory() as out:
        # fork: the ranks need nothing re-imported (spawn costs ~10 s of imports on 2 cores)
        ctx = tmp.start_processes(_rank_worker, args=(2, _free_port(), out), nprocs=2,
                                  join=False, start_method="fork")
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail("the 2-rank run did not finish in 120 s")
        res = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    a, b, idx = _global_batch()
    x, y, z = (t.clone().requires_grad_() for t in (a, b, a))
    ref = mp.DCLLoss(0.2)(x, y)
    ref.backward()
    ref_multi = mp.simclr_loss_func(z, idx, 0.2)
    ref_multi.backward()
    for key, want in (("dcl", ref), ("multi", ref_multi)):
        assert torch.allclose((res[0][key] + res[1][key]) / 2, want, rtol=1e-5, atol=1e-6)
    for key, want in (("dx", x.grad), ("dy", y.grad), ("dz", z.grad)):
        got = torch.cat([r[key] for r in res])
        assert torch.allclose(got, 2 * want, rtol=1e-4, atol=1e-6), key
