"""The pretext-task methods of ``fastssl pretrain`` (jigsaw, relpos, inpainting, cpc and
multi-task sums): each loss against its paper's formulation written out in float64 from
the same weights and draws (tiles and patches cut by slicing at the drawn places, the
cross-entropy and L2 by hand, CPC's InfoNCE as loops over every prediction), the labels
and permutations fed, the pretext-accuracy hooks, rank-independent sampling and bad
configurations. Training on two ranks against one process is in test_trainer.py."""
import itertools
import math

import numpy as np
import pytest
import torch

from fastssl import pretrain as P
from fastssl import pretext as T
from fastssl.pretrain import methods as M
from fastssl.pretrain.methods import pretext as PM
from fastssl.pretrain.models import encoder as build_encoder
from test_trainer import FP64_RTOL, TINY, _checkpoint, _close, _run_ranks

N, WIDTH = 3, 4


def _method(name, size=None, cls=None, seed=0):
    torch.manual_seed(seed)
    size = size or M.get(name).digits_size
    enc = build_encoder("small", WIDTH, size)
    cls = cls or M.get(name)
    return cls.create(enc, size=size).double(), size


def _views(size, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)]


def _sample(method, rows=N, seed=2):
    return method.sample(torch.Generator().manual_seed(seed), 0, rows, rows, "cpu")


def _cross_entropy(logits, labels):
    """mean_i [log sum_j exp(l_ij) - l_i,y_i] in float64."""
    rows = range(len(labels))
    return sum(torch.logsumexp(logits[i], 0) - logits[i, labels[i]] for i in rows) / len(rows)


def _standardise(t):
    return (t - t.mean((-2, -1), keepdim=True)) / (
        t.std((-2, -1), keepdim=True, unbiased=False) + 1e-5)


def test_jigsaw_is_cross_entropy_over_the_concatenated_tile_features():
    m, size = _method("jigsaw")
    x, = views = _views(size)
    params = _sample(m)
    loss = m(views, params)
    perms, labels, off = m.permutations, params["labels"], params["offsets"]
    assert perms.shape == (100, 9) and torch.equal(perms.sort(1).values,
                                                   torch.arange(9).expand(100, 9))
    d = (perms[:, None] != perms[None]).sum(2) + 10 * torch.eye(100, dtype=torch.long)
    assert m.min_distance == int(d.min()) >= 2 and m.chance == 1.0
    cell, t = size // 3, m.tile
    assert (cell, t) == (12, 6) and ((off >= 0) & (off <= cell - t)).all()
    tiles = torch.stack([torch.stack([
        _standardise(x[i, :, (c // 3) * cell + off[i, c, 0]:][:, :t,
                     (c % 3) * cell + off[i, c, 1]:][:, :, :t])
        for c in perms[labels[i]].tolist()]) for i in range(N)])          # tile j: cell perm[j]
    feats = m.encoder(tiles.reshape(N * 9, 3, t, t)).reshape(N, 9, -1)
    ref = _cross_entropy(m.head(torch.cat([feats[:, j] for j in range(9)], 1)), labels)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    loss.backward()
    assert all(p.grad is not None for p in m.trainable())


def test_relpos_is_cross_entropy_over_the_concatenated_patch_features():
    m, size = _method("relpos")
    x, = views = _views(size)
    params = _sample(m)
    loss = m(views, params)
    p, gap, jit = m.patch, m.gap, m.jitter
    assert (p, gap, jit) == (7, 3, 1) and 3 * p + 2 * gap + 2 * jit <= size
    steps = torch.tensor(T.NEIGHBOURS)[params["labels"]]
    assert ((params["neighbour"] - params["centre"] - steps * (p + gap)).abs() <= 2 * jit).all()

    def patch(i, corner, j):  # the crop, one channel kept, the others scaled noise
        r, c = params[corner][i].tolist()
        crop = x[i, :, r:r + p, c:c + p]
        std = crop.std(unbiased=False)
        keep = int(params["kept"][i, j])
        noise = params["noise"][i, j].double()  # float32 draws, as the method replays them
        return torch.stack([crop[q] if q == keep else noise[q] * std * 0.01 for q in range(3)])
    a = torch.stack([patch(i, "centre", 0) for i in range(N)])
    b = torch.stack([patch(i, "neighbour", 1) for i in range(N)])
    f = m.encoder(torch.cat([a, b]))
    ref = _cross_entropy(m.head(torch.cat([f[:N], f[N:]], 1)), params["labels"])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_inpainting_is_l2_over_a_zero_filled_square_hole():
    m, size = _method("inpainting")
    x, = views = _views(size)
    hole = _sample(m)
    side = round(0.5 * size)
    assert hole.shape == (N, size, size) and (hole.sum((1, 2)) == side * side).all()
    loss = m(views, hole)
    filled = x.clone()
    for i in range(N):
        filled[i, :, hole[i]] = 0.0
    out = m.decoder(m.encoder(filled)).reshape(x.shape)
    err = sum(((out[i, :, hole[i]] - x[i, :, hole[i]]) ** 2).sum() for i in range(N))
    torch.testing.assert_close(loss, err / (N * 3 * side * side), rtol=1e-10, atol=1e-12)
    assert m.pretext(x) is None and m.chance is None


class _OddCPC(PM.CPC):
    GRID, STEPS = 3, 2  # a 3 x 3 grid of 4-px patches in 13-px views (a row and column unused)


def _hand_latents(m, x):
    g, p = m.GRID, m.patch
    cells = [x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] for r in range(g) for c in range(g)]
    z = m.encoder(torch.cat(cells)).reshape(g, g, len(x), -1)
    return z.permute(2, 0, 1, 3)                                            # (B, rows, cols, D)


def test_cpc_loss_is_infonce_of_every_k_step_prediction_written_as_loops():
    m, size = _method("cpc", 13, cls=_OddCPC)
    x, = views = _views(size)
    loss = m(views)
    z = _hand_latents(m, x)
    torch.testing.assert_close(m.latents(x), z, rtol=1e-10, atol=1e-12)
    c = m.context(z)
    B, H, W, _ = z.shape
    terms = []
    for k in range(1, m.STEPS + 1):
        w = m.criterion.predictors[k - 1].weight
        cands = [(b, i, j) for b in range(B) for i in range(k, H) for j in range(W)]
        per = []
        for b, i, j in itertools.product(range(B), range(H - k), range(W)):
            pred = w @ c[b, i, j]
            s = torch.stack([pred @ z[bb, ii, jj] for bb, ii, jj in cands])
            per.append(torch.logsumexp(s, 0) - pred @ z[b, i + k, j])
        terms.append(sum(per) / len(per))
    torch.testing.assert_close(loss, sum(terms) / len(terms), rtol=1e-10, atol=1e-12)


def test_cpc_context_never_sees_a_row_below():
    m, _ = _method("cpc", 13, cls=_OddCPC)
    z = torch.randn(2, 3, 3, m.encoder.dim, dtype=torch.float64)
    for i in range(3):
        moved = z.clone()
        moved[:, i + 1:] += torch.randn_like(moved[:, i + 1:])
        assert torch.equal(m.context(moved)[:, :i + 1], m.context(z)[:, :i + 1])
        if i < 2:
            moved = z.clone()
            moved[:, i] += 1.0
            assert not torch.equal(m.context(moved)[:, i], m.context(z)[:, i])


def test_cpc_pretext_accuracy_is_the_top_step_one_candidate_of_each_image():
    m, size = _method("cpc", 13, cls=_OddCPC)
    m.eval()
    x = _views(size, n=4)[0]
    with torch.no_grad():
        got = m.pretext(x)
        z = _hand_latents(m, x)
        c = m.context(z)
        w = m.criterion.predictors[0].weight
        correct = count = 0
        for b, i, j in itertools.product(range(4), range(2), range(3)):
            pred = w @ c[b, i, j]
            true = pred @ z[b, i + 1, j]
            others = [pred @ z[b, ii, jj] for ii in range(1, 3) for jj in range(3)
                      if (ii, jj) != (i + 1, j)]
            correct += int(all(true > o for o in others))
            count += 1
    assert got == (correct, count) and count == 4 * 2 * 3
    assert M.get("cpc").chance == pytest.approx(100 / 12)


@pytest.mark.parametrize("name,chance", [("jigsaw", 1.0), ("relpos", 12.5)])
def test_classification_pretext_hooks_are_deterministic_scores(name, chance):
    m, size = _method(name)
    m.eval()
    x = _views(size, n=5)[0]
    with torch.no_grad():
        first, again = m.pretext(x), m.pretext(x)
    assert first == again and first[1] == 5 * m.EVAL_DRAWS and 0 <= first[0] <= first[1]
    assert m.chance == chance


@pytest.mark.parametrize("name", ["jigsaw", "relpos", "inpainting", "rotation+jigsaw"])
def test_the_global_batch_draws_do_not_depend_on_the_ranks(name):
    """Rows [0, 3) and [3, 7) of a global batch of 7, drawn by two ranks from equal
    generators, are rows of the one-process draw."""
    m, _ = _method(name)
    whole = m.sample(torch.Generator().manual_seed(5), 0, 7, 7, "cpu")
    parts = [m.sample(torch.Generator().manual_seed(5), lo, hi, 7, "cpu")
             for lo, hi in ((0, 3), (3, 7))]

    def same(a, b, lo, hi):
        if a is None:
            return b is None
        if isinstance(a, list):
            return all(same(x, y, lo, hi) for x, y in zip(a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(torch.equal(a[k][lo:hi], b[k]) for k in a)
        return torch.equal(a[lo:hi], b)
    assert same(whole, parts[0], 0, 3) and same(whole, parts[1], 3, 7)


def test_multi_task_sums_the_task_losses_on_one_encoder():
    m, size = _method("rotation+jigsaw")
    cls = M.get("rotation+jigsaw")
    assert cls is M.get("rotation+jigsaw") and cls.name == "rotation+jigsaw"
    assert (cls.digits_size, cls.views, cls.chance) == (36, "plain", 25.0)
    assert cls.epochs == min(M.EPOCHS["rotation"], M.EPOCHS["jigsaw"])
    rot, jig = m.tasks
    assert rot.encoder is jig.encoder is m.encoder
    assert len(list(m.parameters())) == len({id(p) for p in m.parameters()}) == \
        len(list(m.encoder.parameters())) + len(list(rot.head.parameters())) + \
        len(list(jig.head.parameters()))
    views = _views(size)
    extras = _sample(m)
    assert extras[0] is None and torch.equal(extras[1]["labels"], _sample(jig)["labels"])
    loss = m(views, extras)
    torch.testing.assert_close(loss, rot(views) + jig(views, extras[1]), rtol=1e-10,
                               atol=1e-12)
    m.eval()
    with torch.no_grad():
        assert m.pretext(views[0]) == rot.pretext(views[0])


def test_multi_task_trains_and_bad_names_are_clear_errors(tmp_path):
    report = P.pretrain("rotation+jigsaw", out_dir=str(tmp_path), device="cpu", width=8,
                        size=24, batch_size=64, lr=0.04, max_steps=12, epochs=1,
                        evaluate=False, progress=False, log=lambda *a: None)
    losses = report["step_loss"]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert report["config"]["method"] == "rotation+jigsaw"
    with pytest.raises(ValueError, match="unknown pretext task 'jigsaw2' in --method"):
        M.get("rotation+jigsaw2")
    with pytest.raises(ValueError, match="unknown pretext task 'simclr'"):
        P.pretrain("rotation+simclr", out_dir=None, evaluate=False)
    with pytest.raises(ValueError, match="two or more different"):
        M.get("rotation+rotation")
    from fastssl import cli
    assert cli._method("jigsaw+cpc") == "jigsaw+cpc"
    with pytest.raises(Exception, match="unknown pretext task ''"):
        cli._method("rotation+")


def test_multi_task_on_two_ranks_is_the_one_process_run(tmp_path):
    """As test_trainer's test for every method: global batch 32 as 2 gloo ranks x 16 and as
    1 x 32 in float64, the same losses and weights to float64 rounding."""
    one = P.pretrain("rotation+jigsaw", out_dir=str(tmp_path / "one"), batch_size=32,
                     max_steps=4, **dict(TINY, precision="fp64"))
    two = _run_ranks(2, "rotation+jigsaw", str(tmp_path / "two"), batch_size=16, max_steps=4,
                     precision="fp64")
    (_, t1), (s2, t2) = _checkpoint(one["run_dir"]), _checkpoint(two)
    np.testing.assert_allclose(s2["history"]["step_loss"], one["step_loss"], rtol=FP64_RTOL,
                               atol=FP64_RTOL)
    _close(t2, t1, rtol=FP64_RTOL, atol=FP64_RTOL)


@pytest.mark.parametrize("name,size,minimum", [
    ("jigsaw", 8, 9), ("relpos", 9, 10), ("cpc", 7, 8), ("inpainting", 1, 2)])
def test_views_too_small_for_the_task_are_clear_errors(name, size, minimum):
    with pytest.raises(ValueError, match=rf"--method {name} needs views of at least "
                                         rf"{minimum} px .* got --size {size}"):
        M.build(name, build_encoder("small", WIDTH), size=size)
    M.build(name, build_encoder("small", WIDTH), size=minimum)
