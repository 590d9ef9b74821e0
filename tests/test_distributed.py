"""Multi-process losses on gloo (CPU): each rank's loss and input gradients against a
single-process float64 reference on the global batch.

Gradient convention (fastssl.distributed): rank k's input gradient is the gradient of
sum_r loss_r with respect to its slice — world_size times the gradient of the global mean,
which DDP's averaging turns into exactly the single-process gradient (checked with DDP).
"""
import datetime
import gc
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as tF

import fastssl
from test_barlow import ref_barlow, ref_vicreg
from test_infonce import ref_clip, ref_info_nce, ref_nt_xent
from test_siglip import ref_siglip

D = 12
T = 0.3
SCALE = 7.0
BIAS = -2.0


# ----------------------------------------------------------------------------- data

def global_batch(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    return {k: torch.randn(N, D, generator=g, dtype=torch.float64) for k in ("a", "b")}


def offsets(sizes):
    return [sum(sizes[:r]) for r in range(len(sizes))]


# ----------------------------------------------------------------------------- worker

CASES = ["nt_xent", "info_nce", "info_nce_sym", "clip_ll_gg", "clip_ll", "clip_gg", "clip",
         "siglip", "barlow_local", "barlow_global", "vicreg", "bank", "queue"]


def run_case(case, a, b):
    """The loss on this rank's slice, through fastssl's public modules."""
    if case == "nt_xent":
        return fastssl.NTXentLoss(temperature=T, gather_distributed=True)(a, b)
    if case == "info_nce":
        return fastssl.InfoNCELoss(temperature=T, gather_distributed=True)(a, b)
    if case == "info_nce_sym":
        return fastssl.InfoNCELoss(temperature=T, symmetric=True, gather_distributed=True)(a, b)
    if case.startswith("clip"):
        loss = fastssl.ClipLoss(local_loss="_ll" in case, gather_with_grad=case.endswith("gg"),
                                rank=dist.get_rank(), world_size=dist.get_world_size())
        return loss(a, b, torch.tensor(SCALE))
    if case == "siglip":
        loss = fastssl.SigLipLoss(rank=dist.get_rank(), world_size=dist.get_world_size())
        return loss(a, b, torch.tensor(SCALE), torch.tensor(BIAS))
    if case.startswith("barlow"):
        return fastssl.BarlowTwinsLoss(lambda_param=0.05, gather_distributed=True,
                                       normalize=case.split("_")[1])(a, b)
    if case == "vicreg":
        return fastssl.VICRegLoss(gather_distributed=True)(a, b)
    raise ValueError(case)


def worker(rank, world, port, sizes, seed, out_dir, backend):
    os.environ["FASTSSL_BACKEND"] = backend
    if backend == "triton":  # CPU tensors: the kernels run in the interpreter, GPU or not
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        o, n = offsets(sizes)[rank], sizes[rank]
        data = global_batch(sizes, seed)
        results = {}
        for case in CASES:
            a = data["a"][o:o + n].float().requires_grad_()
            b = data["b"][o:o + n].float().requires_grad_()
            if case == "bank":
                # lightly's bank with gather: every rank enqueues the global out1.
                module = fastssl.NTXentLoss(temperature=T, memory_bank_size=(64, D),
                                            gather_distributed=True)
                module(a, b)
                results[case] = {"bank": module.bank.clone(), "ptr": int(module.bank_ptr)}
                continue
            if case == "queue":
                q = fastssl.MoCoQueue(D, 5, gather_distributed=True)
                q.enqueue(b.detach())
                results[case] = {"queue": q.negatives().clone(), "ptr": int(q.ptr)}
                continue
            loss = run_case(case, a, b)
            da, db = torch.autograd.grad(loss, [a, b], allow_unused=True)
            results[case] = {"loss": loss.detach(), "da": da, "db": db}
        results["ddp"] = ddp_step(rank, sizes, seed)
        results["ddp_compiled_bf16"] = ddp_step(rank, sizes, seed, compiled_bf16=True)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # The compiled DDP module (held by dynamo's cache) keeps the process group alive; its
        # gloo threads must stop before the interpreter exits, or the process aborts.
        torch._dynamo.reset()
        gc.collect()
        dist.destroy_process_group()


def ddp_step(rank, sizes, seed, compiled_bf16=False):
    """Parameter gradients of a DDP-wrapped projection under the gathered NT-Xent; optionally
    with the model compiled (the collective stays outside) and bf16 autocast."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, 8, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    forward = torch.compile(ddp, backend="aot_eager") if compiled_bf16 else ddp
    data = global_batch(sizes, seed)
    o, n = offsets(sizes)[rank], sizes[rank]
    loss_fn = fastssl.NTXentLoss(temperature=T, gather_distributed=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compiled_bf16):
        z = forward(torch.cat([data["a"][o:o + n], data["b"][o:o + n]]).float())
        if compiled_bf16:
            assert z.dtype == torch.bfloat16
        loss = loss_fn(z[:n], z[n:])
    loss.backward()
    return model.weight.grad.clone()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world, *args, backend="torch", timeout=240,
              failure="distributed run did not finish"):
    """``fn(rank, world, port, *args, out, backend)`` on ``world`` spawned ranks; each rank
    saves ``rank{r}.pt`` under ``out``. Fails the test (ranks terminated) past ``timeout``."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.spawn(fn, args=(world, free_port(), *args, out, backend), nprocs=world,
                       join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail(f"{failure} in {timeout} s")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


def launch(sizes, seed, backend="torch", timeout=240):
    return run_ranks(worker, len(sizes), sizes, seed, backend=backend, timeout=timeout)


# ----------------------------------------------------------------------------- references

def ref_losses(case, sizes, data):
    """float64 loss of every rank, with open_clip's detaching where it does not gather
    with gradient. Returns (list of losses, leaf tensors a, b)."""
    A = data["a"].clone().requires_grad_()
    B = data["b"].clone().requires_grad_()
    offs = offsets(sizes)
    losses = []
    for r, (o, n) in enumerate(zip(offs, sizes)):
        a, b = A[o:o + n], B[o:o + n]
        i = torch.arange(n)
        if case == "nt_xent":
            rows = tF.normalize(torch.cat([a, b]), dim=1)
            cols = tF.normalize(torch.cat([A, B]), dim=1)
            N = A.shape[0]
            logits = rows @ cols.T / T
            self_idx = torch.cat([o + i, N + o + i])
            logits[torch.arange(2 * n), self_idx] = float("-inf")
            losses.append(tF.cross_entropy(logits, torch.cat([N + o + i, o + i])))
        elif case.startswith("info_nce"):
            def one(x, Y):
                return tF.cross_entropy(tF.normalize(x, dim=1) @ tF.normalize(Y, dim=1).T / T, o + i)
            loss = one(a, B)
            losses.append((loss + one(b, A)) / 2 if case == "info_nce_sym" else loss)
        elif case.startswith("clip"):
            with_grad = case.endswith("gg")
            parts_a = [A[p:p + m] if (with_grad or q == r) else A[p:p + m].detach()
                       for q, (p, m) in enumerate(zip(offs, sizes))]
            parts_b = [B[p:p + m] if (with_grad or q == r) else B[p:p + m].detach()
                       for q, (p, m) in enumerate(zip(offs, sizes))]
            all_a, all_b = torch.cat(parts_a), torch.cat(parts_b)
            if "_ll" in case:
                lp_i, lp_t, labels = SCALE * a @ all_b.T, SCALE * b @ all_a.T, o + i
                losses.append((tF.cross_entropy(lp_i, labels) + tF.cross_entropy(lp_t, labels)) / 2)
            else:
                logits = SCALE * all_a @ all_b.T
                labels = torch.arange(all_a.shape[0])
                losses.append((tF.cross_entropy(logits, labels) + tF.cross_entropy(logits.T, labels)) / 2)
        elif case == "siglip":
            z = SCALE * a @ B.T + BIAS
            t = -torch.ones_like(z)
            t[i, o + i] = 1
            losses.append(-tF.logsigmoid(t * z).sum() / n)
        elif case == "barlow_local":   # lightly: per-rank standardisation, C averaged
            c = sum(bn(A[p:p + m]).T @ bn(B[p:p + m]) / m for p, m in zip(offs, sizes)) / len(sizes)
            losses.append(barlow_from_c(c))
        elif case == "barlow_global":  # reference implementation: global statistics and C
            losses.append(barlow_from_c(bn(A).T @ bn(B) / A.shape[0]))
        elif case == "vicreg":
            from test_barlow import ref_vicreg
            inv_local = ((a - b) ** 2).mean()
            inv_global = ((A - B) ** 2).mean()
            losses.append(ref_vicreg(A, B) - 25.0 * inv_global + 25.0 * inv_local)
    return losses, A, B


def bn(x):
    return tF.batch_norm(x, None, None, training=True, eps=1e-5)


def barlow_from_c(c, lam=0.05):
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    return (((c - eye) ** 2) * (eye + lam * (1 - eye))).sum()


def check(got, want, tol, what):
    err = (got.double() - want).norm() / want.norm().clamp_min(1e-12)
    assert err <= tol, f"{what}: relative error {err:.3g}"


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("sizes,backend", [([4, 4], "torch"), ([3, 5, 4], "torch"),
                                           ([3, 3, 3], "triton")],
                         ids=["2ranks", "3ranks-uneven", "3ranks-triton"])
def test_gathered_losses_match_single_process(sizes, backend):
    seed = sum(sizes) * 7 + len(sizes)
    results = launch(sizes, seed, backend)
    data = global_batch(sizes, seed)
    offs = offsets(sizes)
    for case in CASES:
        if case in ("bank", "queue"):
            continue
        losses, A, B = ref_losses(case, sizes, data)
        gA, gB = torch.autograd.grad(sum(losses), [A, B])
        for r, (o, n) in enumerate(zip(offs, sizes)):
            got = results[r][case]
            check(got["loss"], losses[r].detach(), 1e-5, f"{case} loss on rank {r}")
            check(got["da"], gA[o:o + n], 1e-5, f"{case} d(first input) on rank {r}")
            check(got["db"], gB[o:o + n], 1e-5, f"{case} d(second input) on rank {r}")

    # lightly's gathered bank: every rank enqueues the global normalised out1.
    expect = tF.normalize(data["b"].float(), dim=1)
    N = expect.shape[0]
    for r in range(len(sizes)):
        bank = results[r]["bank"]
        torch.testing.assert_close(bank["bank"][:N], expect, atol=1e-6, rtol=0)
        assert bank["ptr"] == N
        # MoCoQueue(size 5) after enqueueing all N >= 5 gathered keys: the last 5, wrapped.
        q = results[r]["queue"]
        last = data["b"].float()[-5:]
        slots = [(N - 5 + j) % 5 for j in range(5)]
        torch.testing.assert_close(q["queue"][slots], last, atol=0, rtol=0)
        assert q["ptr"] == N % 5

    # DDP: averaged parameter gradients equal the single-process gradient on the global batch.
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, 8, bias=False).double()
    offsets_ = offsets(sizes)
    ref = sum(fastssl_free_nt_xent(model(data["a"][o:o + n]), model(data["b"][o:o + n]),
                                   model(data["a"]), model(data["b"]), o)
              for o, n in zip(offsets_, sizes)) / len(sizes)
    (want,) = torch.autograd.grad(ref, [model.weight])
    for r in range(len(sizes)):
        check(results[r]["ddp"], want, 1e-5, f"DDP weight gradient on rank {r}")
        check(results[r]["ddp_compiled_bf16"], want, 3e-2,
              f"compiled DDP weight gradient under bf16 autocast on rank {r}")


def fastssl_free_nt_xent(a, b, A, B, o):
    """float64 gathered NT-Xent of one rank (local rows vs global columns), textbook form."""
    n, N = a.shape[0], A.shape[0]
    i = torch.arange(n)
    logits = tF.normalize(torch.cat([a, b]), dim=1) @ tF.normalize(torch.cat([A, B]), dim=1).T / T
    logits[torch.arange(2 * n), torch.cat([o + i, N + o + i])] = float("-inf")
    return tF.cross_entropy(logits, torch.cat([N + o + i, o + i]))


def test_world_size_must_match_the_process_group():
    with pytest.raises(ValueError, match="not initialised"):
        fastssl.ClipLoss(world_size=2)(torch.randn(2, 3), torch.randn(2, 3), 1.0)
    with pytest.raises(ValueError, match="not initialised"):
        fastssl.SigLipLoss(world_size=2)(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.0)


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    y, offs = fastssl.distributed.gather(x)
    assert y is x and offs == [0]
    # gather_distributed=True in a single process is the plain loss (lightly's rule).
    z = torch.randn(3, 4)
    assert torch.equal(fastssl.nt_xent(x, z, 0.5, gather_distributed=True),
                       fastssl.nt_xent(x, z, 0.5))


# ----------------------------------------------------------------------------- faults on one rank

FAULT_D = 8


def _rank_data(rank, n, D=FAULT_D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    a = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    return a.requires_grad_(), b.requires_grad_()


def _queue(a, b):
    q = fastssl.MoCoQueue(FAULT_D, 8, gather_distributed=True)
    q.enqueue(b.detach() if isinstance(b, torch.Tensor) else b)
    return q.queue


# entry -> (call(a, b, rank, world, fault), float64 single-process reference on rank 0's data
# when rank 1 holds no rows, or None where zero rows on a rank is an error)
FAULT_ENTRIES = {
    "nt_xent": (lambda a, b, r, w, f: fastssl.nt_xent(
        a, b, 0.0 if (f == "temperature 0" and r == 1) else T, gather_distributed=True),
        lambda a, b: ref_nt_xent(a, b, T)),
    "NTXentLoss": (lambda a, b, r, w, f: fastssl.NTXentLoss(T, gather_distributed=True)(a, b),
                   lambda a, b: ref_nt_xent(a, b, T)),
    "NTXentLoss(bank)": (lambda a, b, r, w, f: fastssl.NTXentLoss(
        T, memory_bank_size=(16, FAULT_D), gather_distributed=True)(a, b), None),
    "info_nce": (lambda a, b, r, w, f: fastssl.info_nce(a, b, T, gather_distributed=True),
                 lambda a, b: ref_info_nce(a, b, T)),
    "InfoNCELoss(symmetric)": (lambda a, b, r, w, f: fastssl.InfoNCELoss(
        T, symmetric=(f != "setting differs" or r == 0), gather_distributed=True)(a, b),
        lambda a, b: ref_info_nce(a, b, T, symmetric=True)),
    "clip_loss": (lambda a, b, r, w, f: fastssl.clip_loss(
        a, b, SCALE, local_loss=True, gather_with_grad=(f != "setting differs" or r == 0),
        gather_distributed=True), lambda a, b: ref_clip(a, b, SCALE)),
    "ClipLoss": (lambda a, b, r, w, f: fastssl.ClipLoss(
        local_loss=True, gather_with_grad=True, rank=0 if f == "rank argument" else r,
        world_size=w)(a, b, SCALE), lambda a, b: ref_clip(a, b, SCALE)),
    "siglip_loss": (lambda a, b, r, w, f: fastssl.siglip_loss(a, b, SCALE, BIAS,
                                                              gather_distributed=True),
                    lambda a, b: ref_siglip(a, b, SCALE, BIAS)),
    "SigLipLoss": (lambda a, b, r, w, f: fastssl.SigLipLoss(
        rank=0 if f == "rank argument" else r, world_size=w)(a, b, SCALE, BIAS),
        lambda a, b: ref_siglip(a, b, SCALE, BIAS)),
    "BarlowTwinsLoss(local)": (lambda a, b, r, w, f: fastssl.BarlowTwinsLoss(
        0.05, gather_distributed=True,
        normalize="global" if (f == "setting differs" and r == 1) else "local")(a, b), None),
    "BarlowTwinsLoss(global)": (lambda a, b, r, w, f: fastssl.BarlowTwinsLoss(
        0.05, gather_distributed=True, normalize="global")(a, b),
        lambda a, b: ref_barlow(a, b, 0.05)),
    "VICRegLoss": (lambda a, b, r, w, f: fastssl.VICRegLoss(gather_distributed=True)(a, b),
                   ref_vicreg),
    "MoCoQueue.enqueue": (lambda a, b, r, w, f: _queue(a, b), None),
    "distributed.gather": (lambda a, b, r, w, f: fastssl.distributed.gather(a)[0], None),
}

# fault -> (what rank 1 passes, entries it applies to (None: all))
FAULTS = {
    "empty batch": None, "wrong D": None, "wrong dtype": None, "not a tensor": None,
    "int dtype": None, "batch 1": ("BarlowTwinsLoss(local)",),
    "rank argument": ("ClipLoss", "SigLipLoss"),
    "setting differs": ("InfoNCELoss(symmetric)", "clip_loss", "BarlowTwinsLoss(local)"),
    "temperature 0": ("nt_xent",), "all ranks empty": ("nt_xent", "VICRegLoss",
                                                     "BarlowTwinsLoss(global)"),
}
FAULT_CASES = [(entry, fault) for fault, only in FAULTS.items() for entry in FAULT_ENTRIES
               if only is None or entry in only]


def _fault_inputs(rank, fault):
    n = 4
    if rank == 1 or fault == "all ranks empty":
        if fault in ("empty batch", "all ranks empty"):
            n = 0
        elif fault == "batch 1":
            n = 1
        elif fault == "wrong D":
            return _rank_data(rank, n, D=6)
        elif fault == "wrong dtype":
            return _rank_data(rank, n, dtype=torch.float64)
        elif fault == "not a tensor":
            return [[1.0] * FAULT_D] * n, [[1.0] * FAULT_D] * n
        elif fault == "int dtype":
            return (torch.ones(n, FAULT_D, dtype=torch.long),) * 2
    return _rank_data(rank, n)


def fault_worker(rank, world, port, out_dir, backend):
    os.environ["FASTSSL_BACKEND"] = backend
    if backend == "triton":  # CPU tensors: the kernels run in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    results = {}
    try:
        for entry, fault in FAULT_CASES:
            call = FAULT_ENTRIES[entry][0]
            torch.manual_seed(0)
            a, b = _fault_inputs(rank, fault)
            start = time.monotonic()
            try:
                out = call(a, b, rank, world, fault)
                got = {"value": out.detach().clone()}
                if out.requires_grad and out.dim() == 0:
                    da, db = torch.autograd.grad(out, [a, b], allow_unused=True)
                    got.update(da=da, db=db)
            except Exception as e:  # noqa: BLE001 - compared across ranks by the test
                got = {"error": type(e).__name__, "message": str(e)}
            got["seconds"] = time.monotonic() - start
            results[(entry, fault)] = got
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_fault_on_one_rank_raises_the_same_error_on_every_rank(backend):
    """Every distributed entry point with a bad input on rank 1 (or a rank holding no rows,
    which is legal where the loss allows it): the same exception and message on both ranks,
    naming rank 1 (or the setting), within seconds; a legal empty rank gives rank 0 the
    single-process loss and gradients of its rows and rank 1 a zero loss."""
    results = run_ranks(fault_worker, 2, backend=backend, failure="a fault left a rank blocked")
    legal_empty = {e for e, (_, ref) in FAULT_ENTRIES.items() if ref is not None} | {
        "MoCoQueue.enqueue", "distributed.gather", "NTXentLoss(bank)"}
    checked = 0
    for entry, fault in FAULT_CASES:
        r0, r1 = results[0][(entry, fault)], results[1][(entry, fault)]
        what = f"{entry} with {fault} on rank 1"
        assert r0["seconds"] < 20 and r1["seconds"] < 20, f"{what}: took {r0['seconds']:.0f} s"
        if fault == "empty batch" and entry in legal_empty:
            assert "error" not in r0 and "error" not in r1, f"{what}: {r0} / {r1}"
            _check_empty_rank(entry, r0, r1, what)
            checked += 1
            continue
        assert "error" in r0 and "error" in r1, f"{what}: no error ({r0}, {r1})"
        assert (r0["error"], r0["message"]) == (r1["error"], r1["message"]), \
            f"{what}: ranks disagree:\n{r0['message']}\n{r1['message']}"
        want = {"not a tensor": "TypeError", "wrong D": "ShapeError", "batch 1": "ShapeError",
                "empty batch": "ShapeError", "all ranks empty": "ShapeError"}.get(fault, "ValueError")
        assert r0["error"] == want, f"{what}: {r0['error']}: {r0['message']}"
        named = "rank 1" in r0["message"] or (fault == "all ranks empty" and
                                              "rows per rank: [0, 0]" in r0["message"])
        assert named, f"{what}: the message does not name the rank: {r0['message']}"
        checked += 1
    assert checked == len(FAULT_CASES) >= 40


def _check_empty_rank(entry, r0, r1, what):
    a, b = _rank_data(0, 4)
    A, B = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = FAULT_ENTRIES[entry][1]
    if entry == "MoCoQueue.enqueue":  # the queue holds rank 0's keys, in order, on both ranks
        for r in (r0, r1):
            torch.testing.assert_close(r["value"][:4], b.detach(), rtol=0, atol=0)
        return
    if entry == "distributed.gather":
        for r in (r0, r1):
            torch.testing.assert_close(r["value"], a.detach(), rtol=0, atol=0)
        return
    assert r1["da"].shape == (0, FAULT_D), f"{what}: rank 1 {r1}"
    if ref is None:
        return
    loss0 = ref(A, B)
    loss1 = RANK1_WITHOUT_ROWS.get(entry, lambda A, B: A.sum() * 0)(A, B)
    dA, dB = torch.autograd.grad(loss0 + loss1, [A, B])  # the gradient convention above
    check(r0["value"], loss0.detach(), 1e-5, f"{what}: rank 0 loss")
    check(r1["value"], loss1.detach(), 1e-5, f"{what}: rank 1 loss")
    check(r0["da"], dA, 1e-5, f"{what}: rank 0 d(first input)")
    check(r0["db"], dB, 1e-5, f"{what}: rank 0 d(second input)")


# The loss on a rank without rows, where it is not 0 (terms over the global batch).
RANK1_WITHOUT_ROWS = {
    "BarlowTwinsLoss(global)": lambda A, B: ref_barlow(A, B, 0.05),
    "VICRegLoss": lambda A, B: ref_vicreg(A, B) - 25.0 * ((A - B) ** 2).mean(),
}


# ----------------------------------------------------------------------------- prototype heads

PROTO_K, PROTO_S, PROTO_T = 37, 3, 2


def proto_data(B, seed):
    """Global batch: student rows (S x B, D) and teacher rows (T x B, D), crop-major; the
    prototypes (K, D); all unit rows in float64."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: tF.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)  # noqa: E731
    return mk(PROTO_S * B), mk(PROTO_T * B), mk(PROTO_K)


def proto_local(x, crops, B, o, n):
    """This rank's samples [o, o + n) of every crop, crop-major."""
    return torch.cat([x[v * B + o:v * B + o + n] for v in range(crops)])


def proto_worker(rank, world, port, sizes, seed, out_dir, backend):
    os.environ["FASTSSL_BACKEND"] = backend
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        B, o, n = sum(sizes), offsets(sizes)[rank], sizes[rank]
        s, t, W = proto_data(B, seed)
        s = proto_local(s, PROTO_S, B, o, n).float().requires_grad_()
        t = proto_local(t, PROTO_T, B, o, n).float()
        W = W.float().requires_grad_()
        results = {}
        module = fastssl.PrototypeCrossEntropy(output_dim=PROTO_K, center_momentum=0.5)
        module.center.fill_(0.25)
        loss = module(s, t, W)
        ds, dW = torch.autograd.grad(loss, [s, W])
        results["softmax"] = {"loss": loss.detach(), "ds": ds, "dW": dW,
                              "center": module.center.clone()}
        results["sinkhorn_c"] = fastssl.sinkhorn_knopp(t, W.detach(), 0.05, 3,
                                                       gather_distributed=True)
        loss = fastssl.prototype_cross_entropy(s, t, W, teacher_target="sinkhorn",
                                               teacher_temp=0.05, gather_distributed=True)
        ds, dW = torch.autograd.grad(loss, [s, W])
        results["sinkhorn"] = {"loss": loss.detach(), "ds": ds, "dW": dW}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prototype_heads_across_ranks_equal_one_process(backend):
    """Centre statistics and Sinkhorn column sums all-reduced: every rank's centre and
    Sinkhorn scalings equal one process's on the global batch, and the rank-averaged
    gradients (what DDP applies) equal the global batch's."""
    sizes, seed = [3, 3], 5
    world = len(sizes)
    results = run_ranks(proto_worker, world, sizes, seed, backend=backend)
    B = sum(sizes)
    s, t, W = proto_data(B, seed)
    s, W = s.requires_grad_(), W.requires_grad_()
    # One process, float64: the module's loss and centre, then the Sinkhorn target.
    center = torch.full((PROTO_K,), 0.25, dtype=torch.float64)
    ls = torch.log_softmax(s @ W.T / 0.1, 1)
    pairs = [(v, u) for v in range(PROTO_S) for u in range(PROTO_T) if u != v]
    for target in ("softmax", "sinkhorn"):
        if target == "softmax":
            q = torch.softmax((t @ W.detach().T - center) / 0.04, 1)
        else:
            sc = t @ W.detach().T
            q = fastssl.sinkhorn(sc, 3, 0.05)
        loss = sum(-(q[u * B:(u + 1) * B] * ls[v * B:(v + 1) * B]).sum(1).mean()
                   for v, u in pairs) / len(pairs)
        ds, dW = torch.autograd.grad(loss, [s, W], retain_graph=True)
        got_dW = sum(r[target]["dW"] for r in results) / world  # DDP's average
        check(got_dW, dW, 1e-4, f"{target}: averaged prototype gradient")
        for r, (o, n) in enumerate(zip(offsets(sizes), sizes)):
            # each rank's loss is its samples' mean; DDP averages: d/ds_local = world * global
            check(results[r][target]["ds"], world * proto_local(ds, PROTO_S, B, o, n), 1e-4,
                  f"{target}: student gradient on rank {r}")
    want_center = 0.5 * center + 0.5 * (t @ W.detach().T).mean(0)
    sc = t @ W.detach().T
    for r in range(world):
        check(results[r]["softmax"]["center"].reshape(-1), want_center, 1e-5, f"centre on rank {r}")
        c = results[r]["sinkhorn_c"].double()
        codes = torch.softmax((sc - c) / 0.05, 1)
        check(codes, fastssl.sinkhorn(sc, 3, 0.05), 1e-4,
              f"Sinkhorn codes from rank {r}'s scalings")
