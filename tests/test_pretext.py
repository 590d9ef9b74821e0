"""Pretext transforms (fastssl.pretext) against element-wise references: numpy's rot90, the
greedy permutation search written as loops, and crops taken by slicing at the drawn
offsets."""
import itertools

import numpy as np
import pytest
import torch

from fastssl import ShapeError
from fastssl import pretext as P


def images(n=3, c=3, h=20, w=20, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.to(dtype) / 255


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("side", [1, 2, 7])
def test_rotations_are_numpys_quarter_turns(device, dtype, side):
    x = images(2, 3, side, side, dtype=dtype).to(device)
    out, labels = P.rotations(x)
    assert out.shape == (8, 3, side, side) and out.dtype == dtype
    assert labels.tolist() == [0, 1, 2, 3] * 2
    for i in range(2):
        for k in range(4):
            want = np.rot90(x[i].cpu().numpy(), k, axes=(1, 2))
            assert np.array_equal(out[4 * i + k].cpu().numpy(), want)
    with pytest.raises(ShapeError, match="square"):
        P.rotations(images(1, 3, 4, 5))


def greedy_loops(cells, count, first):
    """The greedy set as plain loops over the permutations in lexicographic order."""
    allp = list(itertools.permutations(range(cells)))
    chosen = [first]
    for _ in range(1, count):
        best, best_score = None, -1
        for j, p in enumerate(allp):
            if j in chosen:
                continue
            score = sum(sum(a != b for a, b in zip(p, allp[c])) for c in chosen)
            if score > best_score:
                best, best_score = j, score
        chosen.append(best)
    return [list(allp[j]) for j in chosen]


@pytest.mark.parametrize("cells,count", [(4, 1), (4, 6), (5, 20)])
def test_permutation_set_is_the_greedy_mean_hamming_choice(cells, count):
    g = torch.Generator().manual_seed(cells * count)
    perms, dmin = P.jigsaw_permutations(count, cells, generator=g)
    first = int(torch.randint(len(list(itertools.permutations(range(cells)))), (1,),
                              generator=torch.Generator().manual_seed(cells * count)))
    assert perms.tolist() == greedy_loops(cells, count, first)
    pairs = [sum(a != b for a, b in zip(p, q)) for p, q in itertools.combinations(perms.tolist(), 2)]
    assert dmin == (min(pairs) if pairs else cells)


def test_the_nine_cell_set_and_its_minimum_distance():
    perms, dmin = P.jigsaw_permutations(100, 9, generator=torch.Generator().manual_seed(0))
    assert perms.shape == (100, 9) and len({tuple(p) for p in perms.tolist()}) == 100
    assert torch.equal(perms.sort(1).values, torch.arange(9).expand(100, 9))
    d = (perms[:, None] != perms[None]).sum(2).float()
    assert d.sum() / (100 * 99) > 8.0  # the greedy set's mean distance (random pairs: 8.0)
    assert dmin == int((d + 10 * torch.eye(100)).min())


@pytest.mark.parametrize("grid,h,w,tile", [(3, 20, 23, None), (2, 9, 8, 4), (1, 5, 5, 5)])
@pytest.mark.parametrize("normalize", [True, False])
def test_jigsaw_tiles_are_the_permuted_cells(device, grid, h, w, tile, normalize):
    x = images(3, 3, h, w).to(device)
    perms, _ = P.jigsaw_permutations(min(6, 24 if grid == 2 else 1), grid * grid,
                                     generator=torch.Generator().manual_seed(1)) \
        if grid > 1 else (torch.zeros(1, 1, dtype=torch.long), 1)
    g = torch.Generator(device=device).manual_seed(5)
    tiles, labels, params = P.jigsaw(x, perms, grid, tile, normalize, generator=g,
                                     return_params=True)
    ch, cw = h // grid, w // grid
    t = tiles.shape[-1]
    assert tiles.shape == (3, grid * grid, 3, t, t)
    for i in range(3):
        order = perms[labels[i]].tolist()
        for j, cell in enumerate(order):
            r, c = params["offsets"][i, cell].tolist()
            top, left = (cell // grid) * ch + r, (cell % grid) * cw + c
            assert 0 <= r <= ch - t and 0 <= c <= cw - t
            crop = x[i, :, top:top + t, left:left + t]
            if normalize:
                f = crop.double()
                crop = (f - f.mean((1, 2), keepdim=True)) / (
                    f.std((1, 2), keepdim=True, unbiased=False) + 1e-5)
                torch.testing.assert_close(tiles[i, j].double(), crop, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(tiles[i, j], crop)
    again = P.jigsaw(x, perms, grid, tile, normalize,
                     generator=torch.Generator(device=device).manual_seed(5))
    assert torch.equal(again[0], tiles) and torch.equal(again[1], labels)


@pytest.mark.parametrize("color_drop", [False, True])
def test_relative_patches_are_neighbours_at_the_drawn_places(device, color_drop):
    x = images(16, 3, 40, 44).to(device)
    g = torch.Generator(device=device).manual_seed(2)
    a, b, labels, params = P.relative_patches(x, 8, gap=4, jitter=2, color_drop=color_drop,
                                              generator=g, return_params=True)
    assert a.shape == b.shape == (16, 3, 8, 8) and labels.min() >= 0 and labels.max() <= 7
    steps = torch.tensor(P.NEIGHBOURS, device=device)[labels]
    delta = params["neighbour"] - params["centre"]
    assert ((delta - steps * 12).abs() <= 4).all()  # (patch + gap) x direction, +-2 jitter each
    for i in range(16):
        for patch, (r, c) in ((a, params["centre"][i]), (b, params["neighbour"][i])):
            crop = x[i, :, r:r + 8, c:c + 8].float()
            if not color_drop:
                assert torch.equal(patch[i], crop)
    if color_drop:
        for j, patch in enumerate((a, b)):
            corner = params["centre"] if j == 0 else params["neighbour"]
            for i in range(16):
                k = int(params["kept"][i, j])
                r, c = corner[i].tolist()
                assert torch.equal(patch[i, k], x[i, k, r:r + 8, c:c + 8].float())
                others = [q for q in range(3) if q != k]
                assert patch[i, others].abs().max() <= 0.2 * x[i].float().std() + 1e-6


def test_bad_arguments_are_clear_errors():
    x = images(2, 3, 12, 12)
    perms, _ = P.jigsaw_permutations(3, 9, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ShapeError, match="permutations"):
        P.jigsaw(x, perms[:, :4])
    with pytest.raises(ValueError, match="permutation of"):
        P.jigsaw(x, torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit"):
        P.jigsaw(x, perms, tile=5)
    with pytest.raises(ValueError, match="exceeds"):
        P.jigsaw_permutations(30, 4)
    with pytest.raises(ValueError, match="need images of at least"):
        P.relative_patches(x, 8)
    with pytest.raises(ShapeError, match="batch"):
        P.rotations(x[0])
    with pytest.raises(ValueError, match="uint8 or floating"):
        P.rotations(x.long())
    with pytest.raises(TypeError, match="generator"):
        P.relative_patches(images(1, 3, 40, 40), 8, generator=1)


def _rows(params, lo, hi):
    return {k: v[lo:hi] for k, v in params.items()}


def test_jigsaw_replays_parameters_drawn_on_a_stand_in_batch(device):
    """Parameters drawn for 7 rows on a zero-memory stand-in, replayed on rows [2, 5) of
    real float64 images: the tiles of those rows as if cut at those draws (float64 kept)."""
    perms, _ = P.jigsaw_permutations(5, 9, generator=torch.Generator().manual_seed(0))
    x = images(7, 3, 20, 23, dtype=torch.float64).to(device)
    g = torch.Generator(device=device).manual_seed(3)
    stand_in = torch.zeros((), device=device).expand(7, 1, 20, 23)
    _, labels, params = P.jigsaw(stand_in, perms, tile=5, normalize=False, generator=g,
                                 return_params=True)
    full = P.jigsaw(x, perms, tile=5, generator=torch.Generator(device=device).manual_seed(3))
    tiles, got = P.jigsaw(x[2:5], perms, tile=5, params=_rows(params, 2, 5))
    assert tiles.dtype == torch.float64 and torch.equal(got, labels[2:5])
    assert torch.equal(got, full[1][2:5]) and torch.equal(tiles, full[0][2:5])
    with pytest.raises(ValueError, match="missing 'offsets'"):
        P.jigsaw(x[:2], perms, tile=5, params={"labels": labels[:2]})
    with pytest.raises(ShapeError, match=r"must be integer \(2,\)"):
        P.jigsaw(x[:2], perms, tile=5, params=_rows(params, 0, 3))
    bad = _rows(params, 0, 2)
    bad["offsets"] = bad["offsets"] + 2  # 6-px cells, 5-px tiles: offsets 0 or 1
    with pytest.raises(ValueError, match="outside the 6 x 7 cells"):
        P.jigsaw(x[:2], perms, tile=5, params=bad)
    with pytest.raises(ValueError, match="permutation set"):
        P.jigsaw(x[:2], perms, tile=5, params=dict(_rows(params, 0, 2),
                                                   labels=torch.tensor([0, 5])))


@pytest.mark.parametrize("color_drop", [False, True])
def test_relative_patches_replay_parameters_drawn_on_a_stand_in_batch(device, color_drop):
    x = images(6, 3, 30, 30, dtype=torch.float64).to(device)
    kw = dict(patch=6, gap=2, jitter=1, color_drop=color_drop)
    stand_in = torch.zeros((), device=device).expand(6, 3, 30, 30)
    params = P.relative_patches(stand_in, generator=torch.Generator(device=device).manual_seed(4),
                                return_params=True, **kw)[3]
    assert ("noise" in params) == color_drop
    full = P.relative_patches(x, generator=torch.Generator(device=device).manual_seed(4), **kw)
    a, b, labels = P.relative_patches(x[1:4], params=_rows(params, 1, 4), **kw)
    assert a.dtype == b.dtype == torch.float64
    for got, want in zip((a, b, labels), full):
        assert torch.equal(got, want[1:4])
    if color_drop:
        with pytest.raises(ShapeError, match="noise"):
            P.relative_patches(x[:2], params=dict(_rows(params, 0, 2), noise=None), **kw)
    far = dict(_rows(params, 0, 2), centre=torch.tensor([[0, 0], [25, 0]]))
    with pytest.raises(ValueError, match="outside 30 x 30 images for 6-pixel patches"):
        P.relative_patches(x[:2], params=far, **kw)


@pytest.mark.parametrize("kind", ["center", "random"])
@pytest.mark.parametrize("size,fraction", [((9, 12), 0.5), ((5, 5), 0.0), ((8, 8), 1.0)])
def test_region_masks_are_squares_inside_the_image(device, kind, size, fraction):
    g = torch.Generator(device=device).manual_seed(0)
    m = P.region_mask(6, size, kind, fraction, generator=g)
    h, w = size
    side = round(fraction * min(h, w))
    assert m.shape == (6, h, w) and m.dtype == torch.bool and m.device.type == device.type
    for mi in m:
        rows, cols = mi.any(1).nonzero().flatten(), mi.any(0).nonzero().flatten()
        assert int(mi.sum()) == side * side
        if side:
            assert len(rows) == len(cols) == side
            assert torch.equal(mi[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1],
                               torch.ones(side, side, dtype=torch.bool, device=device))
            if kind == "center":
                assert int(rows[0]) == (h - side) // 2 and int(cols[0]) == (w - side) // 2


def test_inpainting_loss_is_the_mean_squared_error_over_the_hole(device):
    x = images(3, 3, 10, 10).to(device)
    pred = torch.rand(3, 3, 10, 10, device=device, requires_grad=True)
    m = P.region_mask(3, 10, "random", 0.4, generator=torch.Generator(device=device).manual_seed(1))
    loss = P.inpainting_loss(pred, x, m)
    t = x.double() / 255
    want = ((pred.double() - t) ** 2)[m[:, None].expand(-1, 3, -1, -1)].mean()
    torch.testing.assert_close(loss.double(), want)
    empty = torch.zeros_like(m)
    z = P.inpainting_loss(pred, x, empty)
    assert z.item() == 0 and torch.equal(torch.autograd.grad(z, pred)[0], torch.zeros_like(pred))


def test_corruptions(device):
    x = images(4, 3, 16, 16).to(device)
    g = torch.Generator(device=device).manual_seed(3)
    y, kept = P.corrupt(x, "masking", 0.3, generator=g)
    f = x.float() / 255
    assert torch.equal(y[kept[:, None].expand_as(y)], f[kept[:, None].expand_as(f)])
    assert (y[~kept[:, None].expand_as(y)] == 0).all()
    assert 0.2 < 1 - kept.float().mean().item() < 0.4
    y, kept = P.corrupt(x, "gaussian", 0.1, generator=g)
    assert kept.all() and abs((y - f).std().item() - 0.1) < 0.01
    with pytest.raises(ValueError, match="probability"):
        P.corrupt(x, "masking", 1.5)
    with pytest.raises(ShapeError, match="mask must be bool"):
        P.inpainting_loss(y, x, kept.float())
