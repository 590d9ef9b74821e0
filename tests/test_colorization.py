"""Colorization (fastssl.pretext, fastssl.pretrain.methods.colorization) against float64
references written here: the CIE formulas per pixel in numpy, the ab bins recomputed from
every 8-bit sRGB colour, the soft encoding by distances to every bin, the loss as the
explicit (N, Q, H, W) soft-target cross-entropy; then the trainer's method on the photos."""
import numpy as np
import pytest
import torch

from fastssl import augment as A
from fastssl import pretext as X
from fastssl import pretrain as P
from fastssl.pretrain.data import PHOTO_CROPS, PHOTO_REGIONS, load_photos, open_data
from fastssl.pretrain.methods.colorization import Colorization
from fastssl.pretrain.models import SmallResNet

# sRGB (BT.709) -> XYZ and the D65 white: kornia's and scikit-image's constants
M = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
              [0.019334, 0.119193, 0.950227]])
WHITE = np.array([0.95047, 1.0, 1.08883])
SHAPES = [(1, 3, 1, 1), (2, 3, 5, 7), (3, 3, 17, 1)]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}  # relative errors


def rel(x, ref):
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300)


def to_np(x):
    """(N, C, H, W) tensor -> (N, H, W, C) float64 array (one row per pixel)."""
    return x.detach().double().permute(0, 2, 3, 1).numpy()


def ref_lab(rgb):
    """CIE L*a*b* of sRGB pixels (..., 3) in [0, 1], the textbook steps."""
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    t = lin @ M.T / WHITE
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1)


def ref_rgb(lab, clip=True):
    """The inverse steps, switching branch in the middle of the gap that each forward curve
    leaves at its knee."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, np.maximum(fy - lab[..., 2] / 200, 0)], -1)
    t = np.where(f > (0.008856 ** (1 / 3) + 7.787 * 0.008856 + 16 / 116) / 2, f ** 3,
                 (f - 16 / 116) / 7.787)
    lin = (t * WHITE) @ np.linalg.inv(M).T
    knee = (0.04045 / 12.92 + ((0.04045 + 0.055) / 1.055) ** 2.4) / 2
    rgb = np.where(lin > knee, 1.055 * np.maximum(lin, knee) ** (1 / 2.4) - 0.055, 12.92 * lin)
    return np.clip(rgb, 0, 1) if clip else rgb


def random_rgb(shape, dtype, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- colour spaces

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_rgb_to_lab_is_the_cie_formula(shape, dtype):
    x = random_rgb(shape, dtype)
    lab = X.rgb_to_lab(x)
    assert lab.dtype == dtype and lab.shape == shape
    assert rel(to_np(lab), ref_lab(to_np(x))) < TOL[dtype]


def test_uint8_and_half_inputs_and_known_colours():
    x = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0],
                      [128, 128, 128]], dtype=torch.uint8).T.reshape(1, 3, 2, 3)
    lab = X.rgb_to_lab(x)
    assert lab.dtype == torch.float32
    assert rel(to_np(lab), ref_lab(to_np(x) / 255)) < 2e-6
    got = to_np(lab).reshape(-1, 3)
    # sRGB red, green, blue, white, black under D65 (the commonly quoted values)
    np.testing.assert_allclose(got[:5], [[53.24, 80.09, 67.20], [87.73, -86.18, 83.18],
                                         [32.30, 79.19, -107.86], [100, 0, 0], [0, 0, 0]],
                               atol=0.01)
    assert abs(got[5, 1]) < 1e-2 and abs(got[5, 2]) < 1e-2  # gray is neutral
    half = X.rgb_to_lab(x.half() / 255)
    assert half.dtype == torch.float32 and rel(half, lab) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [True, False])
def test_lab_to_rgb_inverts_the_formula(dtype, clip):
    g = torch.Generator().manual_seed(1)
    lab = torch.stack([100 * torch.rand(2, 9, 11, generator=g), 60 * torch.randn(2, 9, 11,
                       generator=g), 60 * torch.randn(2, 9, 11, generator=g)], 1).to(dtype)
    rgb = X.lab_to_rgb(lab, clip=clip)
    assert rgb.dtype == dtype and rgb.shape == lab.shape
    assert rel(to_np(rgb), ref_rgb(to_np(lab), clip)) < 5 * TOL[dtype]
    if not clip:  # many of these colours lie outside the gamut
        assert (rgb < 0).any() and (rgb > 1).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_is_exact_inside_the_gamut(dtype):
    # random colours, and colours at the sRGB knee (0.04045) and at Lab's (Y = 0.008856),
    # where rounded thresholds in the inverse would not invert the forward curve
    knee = 0.04045 + torch.linspace(-1e-6, 1e-6, 201, dtype=torch.float64)
    t = 0.008856 + torch.linspace(-1e-6, 1e-6, 201, dtype=torch.float64)
    gray = 1.055 * t ** (1 / 2.4) - 0.055  # r = g = b with Y / Yn = t
    edge = torch.cat([knee, gray]).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    for x in (random_rgb((3, 3, 31, 29), dtype), edge.to(dtype)):
        back = X.lab_to_rgb(X.rgb_to_lab(x))
        err = (back - x).abs().max().item()
        # float32: the inverse's conditioning (the inverse matrix's cancellation, the sRGB
        # curve's slope near black) turns Lab's rounding into up to ~7e-6 (3M random colours)
        assert err < (1e-12 if dtype == torch.float64 else 1e-5), err


def test_non_contiguous_inputs():
    x = random_rgb((2, 7, 5, 3), torch.float64).permute(0, 3, 1, 2)
    assert not x.is_contiguous()
    torch.testing.assert_close(X.rgb_to_lab(x), X.rgb_to_lab(x.contiguous()))
    lab = X.rgb_to_lab(x).transpose(2, 3)
    torch.testing.assert_close(X.lab_to_rgb(lab), X.lab_to_rgb(lab.contiguous()))


# ----------------------------------------------------------------------------- the bins

def reached_grid_points():
    """{(a, b)}: the multiples of 10 to which the a*b* of some 8-bit sRGB colour rounds, every
    one of the 2^24 colours computed (one red value at a time)."""
    v = np.arange(256) / 255
    lin = np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
    m = M / WHITE[:, None]
    seen = set()
    for r in lin:
        t = m[:, 0, None, None] * r + m[:, 1, None, None] * lin[:, None] + \
            m[:, 2, None, None] * lin[None, :]                      # (3, g, b)
        f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
        a = np.round(500 * (f[0] - f[1]) / 10).astype(np.int64)  # grid units, |a| < 50
        b = np.round(200 * (f[1] - f[2]) / 10).astype(np.int64)
        seen.update(np.unique((a + 50) * 100 + b + 50).tolist())
    return {(10 * (k // 100 - 50), 10 * (k % 100 - 50)) for k in seen}


def test_the_bins_are_the_grid_points_that_srgb_colours_reach():
    bins = X.ab_bins(torch.float64)
    got = [tuple(int(v) for v in row) for row in bins]
    assert len(got) == len(set(got)) == 261
    assert got == sorted(got)  # a-major, b ascending
    assert all(a % 10 == 0 and b % 10 == 0 for a, b in got)
    assert set(got) == reached_grid_points()  # every bin reached, no reached point missing
    assert X.ab_bins().dtype == torch.float32


# ----------------------------------------------------------------------------- soft encoding

def ref_soft(ab, bins, k=5, sigma=5.0):
    """(P, Q) dense soft targets: the k nearest bins by distance to every bin."""
    p = ab.reshape(-1, 2)
    d2 = ((p[:, None, :] - bins[None]) ** 2).sum(-1)
    near = np.argsort(d2, 1, kind="stable")[:, :k]
    w = np.exp(-np.take_along_axis(d2, near, 1) / (2 * sigma ** 2))
    out = np.zeros_like(d2)
    np.put_along_axis(out, near, w / w.sum(1, keepdims=True), 1)
    return out, near[:, 0]


def random_ab(shape, dtype, seed=0):
    """(N, 2, H, W) a*b* of random sRGB colours (in the gamut) plus a few far outside."""
    n, _, h, w = shape
    ab = X.rgb_to_lab(random_rgb((n, 3, h, w), torch.float64, seed))[:, 1:].clone()
    ab[0, 0, 0, 0], ab[-1, 1, -1, -1] = 150.0, -140.0
    return ab.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 2, 5, 7), (3, 2, 17, 1)])
def test_soft_encoding_is_the_brute_force_one(shape, dtype):
    ab, bins = random_ab(shape, dtype), X.ab_bins(dtype)
    idx, w = X.soft_encode(ab, bins)
    n, _, h, wd = shape
    assert idx.shape == w.shape == (n, 5, h, wd) and w.dtype == dtype
    dense = np.zeros((n * h * wd, len(bins)))
    np.put_along_axis(dense, to_np(idx.double()).reshape(-1, 5).astype(np.int64),
                      to_np(w).reshape(-1, 5), 1)
    ref, nearest = ref_soft(to_np(ab), bins.double().numpy())
    assert rel(dense, ref) < TOL[dtype]
    assert np.array_equal(X.nearest_bin(ab, bins).reshape(-1).numpy(), nearest)
    assert torch.equal(idx[:, 0], X.nearest_bin(ab, bins))


# ----------------------------------------------------------------------------- the loss

def ref_loss(logits, ab, bins, weights):
    """The explicit (N, Q, H, W) soft-target cross-entropy, float64, weighted by the
    nearest bin's weight, mean over pixels."""
    n, q, h, w = logits.shape
    target, nearest = ref_soft(to_np(ab), bins.double().numpy())
    target = torch.from_numpy(target).view(n, h, w, q).permute(0, 3, 1, 2)
    z = logits.double()
    per_pixel = -(target * torch.log_softmax(z, 1)).sum(1)
    v = torch.ones(n * h * w, dtype=torch.float64) if weights is None else \
        weights.double()[torch.from_numpy(nearest)]
    return (per_pixel * v.view(n, h, w)).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,weighted", [((1, 1, 1), False), ((2, 5, 7), True),
                                            ((3, 17, 1), True)])
def test_loss_and_gradient_are_the_dense_cross_entropy(shape, weighted, dtype):
    n, h, w = shape
    bins = X.ab_bins(dtype)
    g = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(n, len(bins), h, w, generator=g)).to(dtype).requires_grad_()
    ab = random_ab((n, 2, h, w), dtype, seed=3)
    weights = X.rebalance_weights(torch.rand(len(bins), generator=g, dtype=torch.float64),
                                  bins).to(dtype) if weighted else None
    loss = X.colorization_loss(logits, ab, bins, weights)
    assert loss.dtype == dtype
    ref_logits = logits.detach().double().requires_grad_()
    ref = ref_loss(ref_logits, ab, bins, weights)
    assert rel(loss.item(), ref.item()) < TOL[dtype]
    (grad,), (ref_grad,) = torch.autograd.grad(loss, logits), torch.autograd.grad(ref,
                                                                                  ref_logits)
    assert rel(grad, ref_grad) < 4 * TOL[dtype]


def test_rebalance_weights_are_the_formula():
    bins = X.ab_bins(torch.float64)
    b = bins.numpy()
    prior = np.random.default_rng(4).random(len(b)) ** 4
    prior[::7] = 0
    kernel = np.exp(-((b[:, None] - b[None]) ** 2).sum(-1) / 50)
    smooth = kernel @ (prior / prior.sum())
    smooth /= smooth.sum()
    w = 1 / (0.5 * smooth + 0.5 / len(b))
    w /= (smooth * w).sum()
    got = X.rebalance_weights(torch.from_numpy(prior), bins)
    assert rel(got, w) < 1e-12
    assert abs(float((got * torch.from_numpy(smooth)).sum()) - 1) < 1e-12
    counts = X.rebalance_weights(torch.from_numpy(prior * 1000).float(), bins)  # counts
    assert counts.dtype == torch.float32 and rel(counts, w) < 1e-6


def test_annealed_mean_is_the_tempered_expectation():
    bins = X.ab_bins(torch.float64)
    z = torch.randn(2, len(bins), 3, 5, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    zn = to_np(z)  # (N, H, W, Q)
    for t in (0.38, 1.0):
        e = np.exp((zn - zn.max(-1, keepdims=True)) / t)
        ref = (e / e.sum(-1, keepdims=True)) @ bins.numpy()
        assert rel(to_np(X.annealed_mean(z, bins, t)), ref) < 1e-12
    probs = torch.softmax(z, 1)
    torch.testing.assert_close(X.annealed_mean(probs, bins, probabilities=True),
                               X.annealed_mean(z, bins))
    top = torch.randint(len(bins), (2, 1, 3, 5), generator=torch.Generator().manual_seed(6))
    sharp = z.scatter_add(1, top, torch.full(top.shape, 20.0, dtype=torch.float64))
    mode = X.annealed_mean(sharp, bins, 1e-3)  # T -> 0: the most likely bin's centre
    torch.testing.assert_close(mode, bins[top[:, 0]].permute(0, 3, 1, 2))
    assert X.annealed_mean(z.float(), bins.float()).dtype == torch.float32


def test_meta_tensors_give_shapes():
    meta = torch.device("meta")
    lab = X.rgb_to_lab(torch.empty(2, 3, 4, 5, device=meta))
    assert lab.device == meta and lab.shape == (2, 3, 4, 5)
    assert X.lab_to_rgb(lab).shape == (2, 3, 4, 5)
    bins = X.ab_bins(device=meta)
    logits = torch.empty(2, len(bins), 4, 5, device=meta, requires_grad=True)
    loss = X.colorization_loss(logits, lab[:, 1:], bins, torch.empty(len(bins), device=meta))
    assert loss.device == meta and loss.shape == ()


BAD = [
    (TypeError, lambda: X.rgb_to_lab([[0.5]])),
    (ValueError, lambda: X.rgb_to_lab(torch.rand(2, 4, 3, 3))),          # 4 channels
    (ValueError, lambda: X.rgb_to_lab(torch.rand(3, 3, 3))),             # not a batch
    (ValueError, lambda: X.rgb_to_lab(torch.ones(1, 3, 2, 2, dtype=torch.int32))),
    (ValueError, lambda: X.rgb_to_lab(torch.full((1, 3, 2, 2), 1.5))),   # out of [0, 1]
    (ValueError, lambda: X.rgb_to_lab(torch.full((1, 3, 2, 2), float("nan")))),
    (ValueError, lambda: X.lab_to_rgb(torch.full((1, 3, 2, 2), float("inf")))),
    (TypeError, lambda: X.lab_to_rgb(torch.zeros(1, 3, 2, 2), clip="yes")),
    (ValueError, lambda: X.soft_encode(torch.zeros(1, 3, 2, 2), X.ab_bins())),  # 3 channels
    (ValueError, lambda: X.soft_encode(torch.zeros(1, 2, 2, 2), X.ab_bins()[:4])),  # Q < k
    (ValueError, lambda: X.soft_encode(torch.zeros(1, 2, 2, 2), X.ab_bins(), sigma=0)),
    (ValueError, lambda: X.soft_encode(torch.zeros(1, 2, 2, 2, dtype=torch.long),
                                       X.ab_bins())),
    (ValueError, lambda: X.nearest_bin(torch.full((1, 2, 1, 1), float("nan")), X.ab_bins())),
    (ValueError, lambda: X.colorization_loss(torch.zeros(1, 261, 2, 2), torch.zeros(1, 2, 2, 3),
                                             X.ab_bins())),
    (ValueError, lambda: X.colorization_loss(torch.zeros(1, 260, 2, 2), torch.zeros(1, 2, 2, 2),
                                             X.ab_bins())),
    (ValueError, lambda: X.colorization_loss(torch.zeros(1, 261, 2, 2), torch.zeros(1, 2, 2, 2),
                                             X.ab_bins(), torch.full((261,), -1.0))),
    (ValueError, lambda: X.colorization_loss(torch.zeros(1, 261, 2, 2), torch.zeros(1, 2, 2, 2),
                                             X.ab_bins(), torch.ones(260))),
    (ValueError, lambda: X.colorization_loss(torch.zeros(1, 261, 2), torch.zeros(1, 2, 2),
                                             X.ab_bins())),
    (ValueError, lambda: X.rebalance_weights(torch.zeros(261), X.ab_bins())),
    (ValueError, lambda: X.rebalance_weights(torch.ones(261), X.ab_bins(), lam=0)),
    (ValueError, lambda: X.rebalance_weights(torch.ones(261), X.ab_bins(), lam=1.5)),
    (ValueError, lambda: X.rebalance_weights(torch.ones(5), X.ab_bins())),
    (ValueError, lambda: X.annealed_mean(torch.zeros(1, 261, 2, 2), X.ab_bins(), 0)),
    (ValueError, lambda: X.annealed_mean(torch.full((1, 261, 1, 1), -1.0), X.ab_bins(),
                                         probabilities=True)),
    (ValueError, lambda: X.annealed_mean(torch.zeros(1, 5, 2, 2), X.ab_bins())),
]


@pytest.mark.parametrize("error,call", BAD)
def test_bad_arguments_raise(error, call):
    with pytest.raises(error):
        call()


# ----------------------------------------------------------------------------- the method

def test_the_method_loss_is_the_float64_reference():
    torch.manual_seed(0)
    model = Colorization(SmallResNet(8), size=12).double()
    prior = torch.rand(len(model.bins), dtype=torch.float64) ** 3
    model.prior.copy_(prior / prior.sum())
    model.weights.copy_(X.rebalance_weights(model.prior, model.bins))
    rgb = random_rgb((3, 3, 12, 12), torch.float64, seed=6)
    # augment.Normalize's constants are float32 tensors; the method inverts those
    mean = torch.tensor(A.IMAGENET_MEAN).double().view(1, 3, 1, 1)
    std = torch.tensor(A.IMAGENET_STD).double().view(1, 3, 1, 1)
    seen = {}
    model.encoder.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    model.head.register_forward_hook(lambda m, i, o: seen.update(logits=o))
    loss = model([(rgb - mean) / std])
    lab = ref_lab(to_np(rgb))                                             # (N, H, W, 3)
    cells = lab[..., 1:].reshape(3, 4, 3, 4, 3, 2).mean((2, 4))           # 3 x 3 areas
    ab = torch.from_numpy(cells).permute(0, 3, 1, 2)
    np.testing.assert_allclose(to_np(seen["x"]), np.repeat(lab[..., :1] / 50 - 1, 3, -1),
                               atol=1e-12)
    logits = seen["logits"].view(3, len(model.bins), 4, 4)
    ref = ref_loss(logits, ab, model.bins, model.weights)
    assert abs(loss.item() - ref.item()) < 1e-12 * ref.item()
    correct, count = model.pretext((rgb - mean) / std)
    truth = ref_soft(cells, model.bins.numpy())[1]
    assert count == 48 and correct == int((to_np(logits.argmax(1, keepdim=True).double())
                                           .reshape(-1) == truth).sum())


QUIET = dict(out_dir=None, evaluate=False, progress=False, log=lambda *a: None, width=8,
             size=12, device="cpu")


def test_the_digits_are_refused_with_a_pointer_to_the_photos():
    with pytest.raises(ValueError, match="--data photos"):
        P.pretrain("colorization", max_steps=2, **QUIET)


def test_the_photos_source_loads():
    data = open_data("photos", 20)
    assert data.images.shape == (2 * PHOTO_CROPS, 3, 20, 20)
    assert data.images.dtype == torch.uint8 and data.side == 20
    classes = 2 * PHOTO_REGIONS ** 2
    assert len(data.classes) == classes and data.classes[0] == "china.jpg top left"
    counts = data.labels.bincount(minlength=classes)
    assert len(counts) == classes and counts.min() > PHOTO_CROPS / PHOTO_REGIONS ** 2 / 2
    again = load_photos.__wrapped__(20)  # uncached: the same crops every time
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    x = data.images.double()
    assert (x.amax(1) - x.amin(1)).mean() > 20  # colour, not gray


def test_a_two_step_run_on_the_photos():
    logs = []
    report = P.pretrain("colorization", data="photos", max_steps=2,
                        **dict(QUIET, log=logs.append))
    assert len(report["step_loss"]) == 2 and all(v == v for v in report["step_loss"])
    assert report["dataset"]["train"] + report["dataset"]["test"] == 2 * PHOTO_CROPS
    assert any("bin prior" in line for line in logs)
