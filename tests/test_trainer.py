"""``fastssl pretrain`` as a trainer: the same run on 2 gloo ranks as on one process, resume,
the batch order across ranks, streamed and prepared data with unreadable files, LARS
against float64, the low-shot evaluation against scikit-learn, backbones by name."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastssl import LARS
from fastssl import pretrain as P
from fastssl.pretrain.data import BatchOrder, open_prepared
from fastssl.pretrain.models import encoder
from test_distributed import free_port

def _quiet(*args):
    pass


TINY = dict(evaluate=False, progress=False, log=_quiet, width=8, size=12, epochs=1,
            device="cpu", optimizer="lars")


def _tensors(state, prefix=""):
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _tensors(v, prefix + k + ".")
        elif isinstance(v, torch.Tensor):
            yield prefix + k, v


def _checkpoint(run_dir):
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    return state, dict(_tensors(state["model"]))


def _rank(rank, world, port, method, out, kw):
    """One rank as torchrun starts it; an exception is written to ``out/rank<r>.err`` (the
    tests check that every rank raised the same one) and re-raised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastssl import pretrain
    try:
        pretrain.pretrain(method, out_dir=out, **kw)
    except Exception as e:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise


def _spawn(world, method, out, timeout=240, **kw):
    """``pretrain`` on ``world`` gloo ranks, bounded in time; True when every rank ended
    without an exception."""
    ctx = mp.start_processes(_rank, args=(world, free_port(), method, out, dict(TINY, **kw)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail(f"{world} ranks did not finish in {timeout} s")
    except mp.ProcessRaisedException:
        return False
    return True


def _run_ranks(world, method, out, **kw):
    """``pretrain`` on ``world`` gloo ranks (each joins the group as under torchrun);
    returns rank 0's run folder."""
    before = set(os.listdir(out)) if os.path.isdir(out) else set()
    assert _spawn(world, method, out, **kw), [
        open(os.path.join(out, f)).read() for f in os.listdir(out) if f.endswith(".err")]
    (new,) = set(os.listdir(out)) - before
    return os.path.join(out, new)


def _close(a, b, rtol, atol=1e-6):
    """Every float tensor of ``a`` within ``rtol`` of ``b``'s (relative to its norm, plus
    ``atol`` per entry: a statistic of near-zero means is all rounding)."""
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            x, y = a[k].double(), b[k].double()
            err = (x - y).norm()
            assert err <= rtol * y.norm() + atol * y.numel() ** 0.5, (k, err.item(),
                                                                       y.norm().item())
        else:
            assert torch.equal(a[k], b[k]), k


# The 2-rank and the 1-process runs differ only in the order of floating-point sums (the
# gathered batch, all-reduces, BLAS blocking, thread counts), so they are compared in float64
# (--precision fp64): each reordered sum differs by at most ~n·2^-53 relative, and the few
# optimiser steps amplify that by the conditioning of the step (LARS' trust ratio, Adam's
# 1/sqrt(v), DINO's teacher at temperature 0.02 multiplying score rounding by 50). A bound of
# 1e-9 leaves a margin of ~10^5 over float64's reordering error and is still ~10^4 below
# float32's unit roundoff, so a real difference between the runs (a sample seen twice, a
# wrong gradient scale, a teacher out of step: all > 1e-3) cannot pass; it does not depend
# on the machine's thread count or speed.
FP64_RTOL = 1e-9


@pytest.mark.parametrize("method", P.METHODS)
def test_two_ranks_give_the_one_process_run(method, tmp_path):
    """Global batch 32 as 2 ranks x 16 and as 1 x 32: same images, same augmentation
    parameters, so the same losses and weights to float64 rounding (negatives gathered,
    MoCo's queue shared, BatchNorm over the global batch, the EMA teacher in step)."""
    colour = {"data": "photos"} if method == "colorization" else {}  # the digits are gray
    kw = dict(TINY, precision="fp64", **colour)
    one = P.pretrain(method, out_dir=str(tmp_path / "one"), batch_size=32, max_steps=4, **kw)
    two = _run_ranks(2, method, str(tmp_path / "two"), batch_size=16, max_steps=4,
                     precision="fp64", **colour)
    s1, t1 = _checkpoint(one["run_dir"])
    s2, t2 = _checkpoint(two)
    assert s2["step"] == 4 and len(s2["history"]["step_loss"]) == 4
    assert all(t.dtype == torch.float64 for t in t1.values() if t.is_floating_point())
    np.testing.assert_allclose(s2["history"]["step_loss"], one["step_loss"], rtol=FP64_RTOL,
                               atol=FP64_RTOL)
    _close(t2, t1, rtol=FP64_RTOL, atol=FP64_RTOL)
    report = json.loads(open(os.path.join(two, "report.json")).read())
    assert report["throughput"]["world"] == 2 and report["throughput"]["global_batch"] == 32


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "barlow", "deepcluster",
                                    "deepclusterv2"])
def test_resume_is_bitwise_on_one_process(method, tmp_path):
    """Stopped after 3 steps (inside the first epoch of 5 steps) and resumed: the losses and
    every tensor of the final checkpoint equal the uninterrupted run's bitwise."""
    kw = dict(TINY, batch_size=256, max_steps=8, epochs=2, optimizer="adamw")
    whole = P.pretrain(method, out_dir=str(tmp_path / "a"), **kw)
    part = P.pretrain(method, out_dir=str(tmp_path / "b"), stop_after=3, **kw)
    assert part["steps"] == 3 and part["planned_steps"] == 8
    done = P.pretrain(method, out_dir=str(tmp_path / "b"), resume=part["run_dir"], **kw)
    assert done["run_dir"] == part["run_dir"]
    assert done["step_loss"] == whole["step_loss"] and len(whole["step_loss"]) == 8
    assert done["epoch_loss"] == whole["epoch_loss"] and len(whole["epoch_loss"]) == 2
    (sa, ta), (sb, tb) = _checkpoint(whole["run_dir"]), _checkpoint(done["run_dir"])
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert torch.equal(sa["augment_rng"], sb["augment_rng"])
    # The encoder saved for downstream use is the trained one.
    enc = P.load_encoder(done["run_dir"])
    assert all(torch.equal(v, ta["encoder." + k]) for k, v in enc.state_dict().items())


def test_resume_on_two_ranks(tmp_path):
    whole = _run_ranks(2, "moco", str(tmp_path / "a"), batch_size=16, max_steps=6)
    part = _run_ranks(2, "moco", str(tmp_path / "b"), batch_size=16, max_steps=6, stop_after=2)
    # continues in its own folder
    assert _spawn(2, "moco", str(tmp_path / "c"), batch_size=16, max_steps=6, resume=part)
    (sa, ta), (sb, tb) = _checkpoint(whole), _checkpoint(part)
    assert sb["step"] == 6
    np.testing.assert_allclose(sb["history"]["step_loss"], sa["history"]["step_loss"], rtol=1e-5)
    _close(tb, ta, rtol=1e-5)


def test_resume_refuses_changed_settings(tmp_path):
    part = P.pretrain("simclr", out_dir=str(tmp_path), batch_size=64, max_steps=4, stop_after=1,
                      **TINY)
    for change in ({"batch_size": 32}, {"seed": 1}, {"optimizer": "adamw"}, {"lr": 0.1}):
        with pytest.raises(ValueError, match=f"--resume continues a run with its own settings: "
                                             f"{list(change)[0]} was"):
            P.pretrain("simclr", out_dir=str(tmp_path), max_steps=4, resume=part["run_dir"],
                       **dict(TINY, **{"batch_size": 64, **change}))
    with pytest.raises(ValueError, match="is a simclr run, not byol"):
        P.pretrain("byol", out_dir=str(tmp_path), resume=part["run_dir"], **TINY)


@pytest.mark.parametrize("settings,error,match", [
    (dict(optimizer="sgd"), ValueError, "optimizer must be one of adamw, lars"),
    (dict(precision="fp16"), ValueError, "precision must be one of auto, fp32, bf16, fp64"),
    (dict(workers=-1), ValueError, "workers must be >= 0"),
    (dict(max_steps=0), ValueError, "max_steps must be >= 1"),
    (dict(stop_after=0), ValueError, "stop_after must be >= 1"),
    (dict(batch_size=1), ValueError, "batch_size must be >= 2"),
    (dict(epochs=0), ValueError, "epochs must be >= 1"),
    (dict(width=0), ValueError, "width must be >= 1"),
    (dict(test_fraction=1.0), ValueError, "test_fraction must be in"),
    (dict(arch="no_such_net"), ValueError, "unknown --arch 'no_such_net'"),
    (dict(resume="/no/such/run"), ValueError, "no such checkpoint"),
])
def test_bad_settings_are_refused_before_training(settings, error, match):
    with pytest.raises(error, match=match):
        P.pretrain("simclr", out_dir=None, **dict(TINY, **settings))
    with pytest.raises(ValueError, match="unknown method 'simclr2'"):
        P.pretrain("simclr2", out_dir=None, **TINY)


def test_bad_data_files_are_refused(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="x.npy.json' is missing"):
        P.pretrain("simclr", data=str(tmp_path / "x.npy"), out_dir=None, **TINY)
    torch.save({"something": 1}, tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="not a fastssl pretrain checkpoint"):
        P.pretrain("simclr", resume=str(tmp_path / "ck.pt"), out_dir=None, **TINY)


@pytest.mark.parametrize("settings,match", [
    (dict(batch_size=700), "a global batch of 700 x 2 ranks needs at least 1400 training images"),
    (dict(batch_size=16, optimizer="sgd"), "optimizer must be one of adamw, lars"),
])
def test_every_rank_raises_the_same_error(settings, match, tmp_path):
    """A setting that cannot run fails on every rank with the same message, in bounded time
    (no rank waits alone in a collective)."""
    assert not _spawn(2, "simclr", str(tmp_path), timeout=120, **settings)
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert errors[0] == errors[1] and match in errors[0], errors


@pytest.mark.parametrize("n,rank_batch,world", [(37, 4, 1), (37, 4, 2), (100, 7, 3), (64, 8, 4),
                                                (10, 5, 2)])
def test_batch_order_covers_each_image_once_per_epoch(n, rank_batch, world):
    indices = torch.arange(1000, 1000 + n)
    orders = [BatchOrder(indices, rank_batch, r, world, seed=3) for r in range(world)]
    single = BatchOrder(indices, rank_batch * world, 0, 1, seed=3)
    B = rank_batch * world
    for epoch in range(3):
        for o in orders + [single]:
            o.set_epoch(epoch)
        per_rank = [list(o) for o in orders]
        steps = n // B
        assert all(len(batches) == steps for batches in per_rank)
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen)) == steps * B and set(seen) <= set(indices.tolist())
        # Global batch s = the one-process batch s, ranks in order.
        for s, batch in enumerate(list(single)):
            assert sum((per_rank[r][s] for r in range(world)), []) == batch
    # A resumed epoch starts at its step.
    orders[0].set_epoch(2, 1)
    assert list(orders[0]) == per_rank[0][1:]
    o = BatchOrder(indices, rank_batch, 0, world, seed=3)
    assert o.permutation(0).tolist() != o.permutation(1).tolist()


def _folder(root, bad):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        os.makedirs(root / f"c{c}")
        for i in range(10):
            size = (20 + 3 * i, 16 + 2 * i)
            noise = torch.randint(0, 40, (size[1], size[0], 3), generator=g)
            arr = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.{'png' if i % 2 else 'jpg'}")
    for name in bad:
        if name.endswith("truncated.png"):
            data = (root / "c0" / "1.png").read_bytes()
            (root / name).write_bytes(data[:len(data) // 2])
        else:
            (root / name).write_bytes(b"this is not an image")


def test_unreadable_files_are_skipped_and_counted(tmp_path, capsys):
    bad = ["c0/truncated.png", "c1/garbage.jpg", "c1/zz.webp"]
    _folder(tmp_path / "data", bad)
    lines = []
    report = P.pretrain("simclr", data=str(tmp_path / "data"), out_dir=str(tmp_path / "runs"),
                        **dict(TINY, batch_size=8, epochs=3, test_fraction=0.2,
                               log=lines.append))
    assert report["dataset"]["train"] + report["dataset"]["test"] == 23
    assert report["skipped_files"] >= 1
    skipped = {line.split()[3] for line in lines if line.startswith("skipped unreadable file")}
    assert skipped and skipped <= {str(tmp_path / "data" / b) for b in bad}
    # prepare leaves them out and lists them; the array equals the folder's decoding.
    meta = P.prepare(str(tmp_path / "data"), 14, str(tmp_path / "d.npy"), log=lambda *a: None)
    assert meta["images"] == 20 and sorted(p for p, _ in meta["skipped"]) == \
        sorted(str(tmp_path / "data" / b) for b in bad)
    arr = open_prepared(str(tmp_path / "d.npy"))
    folder = P.ImageFolder(str(tmp_path / "data"), 14)
    good = [i for i, (p, _) in enumerate(folder.files) if not any(p.endswith(b) for b in bad)]
    images, labels, skipped = folder.batch(good)
    assert not skipped
    a_images, a_labels, _ = arr.batch(list(range(20)))
    assert torch.equal(a_images, images) and torch.equal(a_labels, labels)
    assert isinstance(arr.images, np.memmap)


def test_prepared_array_trains_like_its_folder(tmp_path):
    _folder(tmp_path / "data", [])
    P.prepare(str(tmp_path / "data"), 14, str(tmp_path / "d.npy"), log=lambda *a: None)
    kw = dict(TINY, batch_size=8, max_steps=3, size=12, test_fraction=0.2)
    a = P.pretrain("byol", data=str(tmp_path / "data"), out_dir=None, **kw)
    b = P.pretrain("byol", data=str(tmp_path / "d.npy"), out_dir=None, **dict(kw, workers=2))
    assert a["step_loss"] == b["step_loss"]


def test_cli_prepare_and_torchrun(tmp_path):
    _folder(tmp_path / "data", ["c1/garbage.jpg"])
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "prepare", str(tmp_path / "data"),
                          "--side", "14", "--out", str(tmp_path / "d.npy")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "20 images of 14x14 in 2 classes (1 unreadable" in out.stdout
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "pretrain", "--method", "simclr",
                          "--nproc", "2", "--data", str(tmp_path / "d.npy"), "--batch-size", "4",
                          "--size", "12", "--width", "8", "--max-steps", "2", "--out",
                          str(tmp_path / "runs"), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "2 processes x batch 4 = global batch 8" in out.stdout
    assert out.stdout.count("| simclr |") == 3  # rank 0 alone reports: the three tables
    (run,) = (tmp_path / "runs").glob("simclr-*")
    report = json.loads((run / "report.json").read_text())
    assert report["throughput"]["world"] == 2 and report["accuracy"]["simclr"]["low_shot"]
    assert set(report["accuracy"]["simclr"]["fine_tune"]) >= {"1", "5", "10", "all"}


def _lars_reference(params, grads, steps, lr, momentum, wd, eta):
    """The LARS update in float64, one tensor at a time."""
    params = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for g_list in grads:
        for i, (p, g) in enumerate(zip(params, g_list)):
            g = g.double()
            if p.dim() > 1:
                u = g + wd * p
                pn, un = p.norm(), u.norm()
                trust = eta * pn / un if pn > 0 and un > 0 else 1.0
                u = trust * u
            else:
                u = g
            bufs[i] = momentum * bufs[i] + u
            params[i] = p - lr * bufs[i]
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lars_matches_float64(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2, 2), (1,), (6, 3)]
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    init[4].zero_()  # a zero tensor: trust ratio 1
    grads = [[torch.randn(s, generator=g, dtype=dtype) * 10 ** k for s in shapes]
             for k in (-3, 0, 2)]
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = LARS(params, lr=0.7, momentum=0.9, weight_decay=1e-3, eta=0.02)
    for gl in grads:
        for p, gr in zip(params, gl):
            p.grad = gr.clone()
        opt.step()
    ref = _lars_reference(init, grads, 3, 0.7, 0.9, 1e-3, 0.02)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for p, r in zip(params, ref):
        assert p.dtype == dtype
        torch.testing.assert_close(p.detach().double(), r, rtol=tol, atol=tol)


def test_lars_errors_and_options():
    p = torch.nn.Parameter(torch.ones(3))
    for kw, match in (({"lr": -1}, "lr must be >= 0"), ({"lr": 0.1, "momentum": 1.5},
                                                          "momentum must be <= 1"),
                      ({"lr": 0.1, "eta": "x"}, "eta must be a number")):
        with pytest.raises((ValueError, TypeError), match=match):
            LARS([p], **kw)
    # exclude_1d=False adapts biases too: trust = eta * |p| / |g|.
    q = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = LARS([q], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.5, exclude_1d=False)
    q.grad = torch.full((4,), 8.0)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.full((4,), 2.0 - 0.5 * 4 / 16 * 8))


def test_low_shot_agrees_with_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from fastssl.pretrain.evaluation import few_shot_draw
    ds = P.load_digits()
    x = ds.images[:, 0].flatten(1).float()
    train, test = P.split(ds.labels, 0.3, seed=1)
    xtr, ytr, xte, yte = x[train], ds.labels[train], x[test], ds.labels[test]
    table = P.low_shot(xtr, ytr, xte, yte, knn_k=20, draws=3, seed=0)
    for shots in (1, 5, 10):
        for d in range(3):
            pick = few_shot_draw(ytr, shots, 100 * shots + d)
            assert (torch.bincount(ytr[pick], minlength=10) == shots).all()
            knn = KNeighborsClassifier(n_neighbors=min(20, len(pick)), metric="cosine",
                                       weights=lambda dist: np.exp((1 - dist) / 0.1))
            knn.fit(xtr[pick].numpy(), ytr[pick].numpy())
            expected = 100 * (knn.predict(xte.numpy()) == yte.numpy()).mean()
            assert table[str(shots)]["accuracies"]["knn"][d] == pytest.approx(expected, abs=1e-9)
            mean, std = xtr[pick].mean(0), xtr[pick].std(0).nan_to_num(0).clamp_min(1e-6)
            # mean cross-entropy + 1e-4 ||W||^2  ==  C = 1 / (2e-4 n) in scikit-learn's terms
            lr = LogisticRegression(C=1 / (2e-4 * len(pick)), max_iter=5000, tol=1e-8)
            lr.fit(((xtr[pick] - mean) / std).numpy(), ytr[pick].numpy())
            expected = 100 * (lr.predict(((xte - mean) / std).numpy()) == yte.numpy()).mean()
            assert abs(table[str(shots)]["accuracies"]["linear"][d] - expected) <= 1.5
        accs = table[str(shots)]["accuracies"]["knn"]
        assert table[str(shots)]["knn"] == pytest.approx([np.mean(accs), np.std(accs, ddof=1)])


def test_backbones_by_name():
    with pytest.raises(ValueError, match="unknown --arch 'resnet-9000'"):
        encoder("resnet-9000")
    small = encoder("small", width=8)
    assert small.dim == 32 and small(torch.rand(2, 3, 12, 12)).shape == (2, 32)


def test_torchvision_backbone():
    pytest.importorskip("torchvision")
    net = encoder("resnet18")
    assert net.dim == 512 and net(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_library_backbones_through_their_apis(monkeypatch):
    """The adapter for torchvision's and timm's model registries (stand-ins with their
    function names and return types, as neither is installed on the CI machine): the
    classifier is removed and the feature width read from the model."""
    import types
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=10, img_size=None):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 24, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(24, num_classes) if num_classes else nn.Identity()
            self.num_features, self.img_size = 24, img_size

        def forward(self, x):
            return self.fc(self.body(x))

    models = types.SimpleNamespace(list_models=lambda: ["tvnet"],
                                   get_model=lambda name, weights=None, **kw: Net())
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=models))
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(
        list_models=lambda: ["timmnet"],
        create_model=lambda name, pretrained, num_classes, **kw: Net(num_classes, **kw)))
    for name in ("tvnet", "timmnet"):
        net = encoder(name, size=20)
        assert net.dim == 24 and net(torch.rand(2, 3, 20, 20)).shape == (2, 24)
    assert encoder("timmnet", size=20).model.img_size == 20
    with pytest.raises(ValueError, match="not a model of torchvision or timm"):
        encoder("resnet-9000")
