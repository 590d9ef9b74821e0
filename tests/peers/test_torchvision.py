"""fastssl.augment against torchvision's v2 functional ops (0.29): every op replayed sample
by sample from ``return_params=True`` through torchvision (resized_crop with antialias,
hflip, adjust_brightness/contrast/saturation/hue in the drawn order, rgb_to_grayscale,
gaussian_blur, solarize, normalize) gives fastssl's output; fastssl's ops run inside
``v2.Compose`` and a ``v2.Compose`` of them inside ``Augment``.

Tolerances are derived from the ops (u = 2**-24, float32's unit roundoff; values on the
[0, 1] scale). Two float32 evaluations of the same formula differ by at most the sum of
both roundings: an op whose result is a sum of T terms with non-negative weights summing
to 1 (the resize, the blur) rounds each to within (T + a few) u; a blend rounds four times;
the grayscale five; the hue round trip about 60 u (each channel is max - range * f with f
read from ratios of differences, each rounded to a relative u; see ``hue_rounding``).
Each op alone is checked against that bound on identical inputs. In a chain, an op also
carries its input's difference forward, multiplied by its Lipschitz constant: 1 for the
resize, flip, grayscale, blur and solarize at threshold 0.5 (continuous there), f for
brightness f, |f| + |1 - f| for contrast and saturation, 27 for the hue rotation (its
channels are piecewise linear in r, g, b with coefficients summing to at most 27), 1 / std
for normalize. The bound is computed per sample from the drawn parameters.
"""
import math

import pytest
import torch

from ._peers import need

tv = need("torchvision")
from torchvision.transforms import v2  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from fastssl import augment as A  # noqa: E402

U = 2.0 ** -24
JITTER = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
HUE_ROUNDING, HUE_LIPSCHITZ = 60, 27


def gen(seed):
    return torch.Generator().manual_seed(seed)


def uint8_images(n, H, W, seed):
    return torch.randint(0, 256, (n, 3, H, W), generator=gen(seed), dtype=torch.uint8)


def float_images(n, H, W, seed):
    return torch.rand(n, 3, H, W, generator=gen(seed))


# ----------------------------------------------------------------------------- replay

def replay(op, x, p, i):
    """Sample i's image x (3, h, w) float32 through torchvision's functional ops with the
    parameters fastssl drew for ``op``; returns (image, rounding bound, Lipschitz constant)."""
    h, w = x.shape[-2:]
    if isinstance(op, A.RandomResizedCrop):
        top, left, ch, cw = (int(p[k][i]) for k in ("top", "left", "height", "width"))
        taps = sum(2 * math.ceil(max(src / dst, 1.0)) + 1 for src, dst in
                   ((ch, op.size[0]), (cw, op.size[1])))
        return (TF.resized_crop(x, top, left, ch, cw, list(op.size), antialias=True),
                2 * (taps + 2 + 4) * U, 1.0)
    if isinstance(op, A.RandomHorizontalFlip):
        return (TF.hflip(x) if p["apply"][i] else x), 0.0, 1.0
    if isinstance(op, A.ColorJitter):
        return jitter(op, x, p, i)
    if isinstance(op, A.RandomGrayscale):
        return (TF.rgb_to_grayscale(x, 3) if p["apply"][i] else x), 10 * U, 1.0
    if isinstance(op, A.GaussianBlur):
        if not p["apply"][i]:
            return x, 0.0, 1.0
        k_h, k_w = op.kernel_sizes(h, w)
        s = float(p["sigma"][i])
        return (TF.gaussian_blur(x, [k_w, k_h], [s, s]),
                2 * (k_h * k_w + k_h + k_w + 4) * U, 1.0)
    if isinstance(op, A.RandomSolarize):
        # continuous only at 0.5 (x -> 1 - x meets x there): elsewhere an input difference
        # may straddle the threshold, so a chain can carry none into it
        lip = 1.0 if op.threshold == 0.5 else math.inf
        return (TF.solarize(x, op.threshold) if p["apply"][i] else x), 0.0, lip
    if isinstance(op, A.Normalize):
        return (TF.normalize(x, list(op.mean), list(op.std)), 4 * U / min(op.std),
                1.0 / min(op.std))
    raise TypeError(type(op))


def jitter(op, x, p, i):
    """ColorJitter for sample i, op by op in the drawn order: (image, bound, Lipschitz) with
    the bound already carried through the later ops of the jitter."""
    if not p["apply"][i]:
        return x, 0.0, 1.0
    bound, lip = 0.0, 1.0
    log_n = math.log2(x[0].numel())
    for k in p["order"][i].tolist():
        if not op.enabled[k]:
            continue
        f = float(p["factors"][i, k])
        x = JITTER[k](x, f)
        big = max(1.0, abs(f), abs(1 - f))
        r, L = [(2 * big * U, abs(f)), (2 * (10 + log_n) * big * U, abs(f) + abs(1 - f)),
                (2 * 10 * big * U, abs(f) + abs(1 - f)),
                (2 * HUE_ROUNDING * U, HUE_LIPSCHITZ)][k]
        bound, lip = L * bound + r, L * lip
    return x, bound, lip


def replay_chain(ops, images, params):
    """Every sample through torchvision op by op: (list of outputs, list of bounds)."""
    outs, bounds = [], []
    for i, im in enumerate(images):
        x = im.float() / 255 if im.dtype == torch.uint8 else im
        bound = 0.0
        for op, p in zip(ops, params):
            x, r, L = replay(op, x, p, i)
            bound = (L * bound if bound else 0.0) + r
        assert math.isfinite(bound), "a solarize off 0.5 after an op that rounds"
        outs.append(x)
        bounds.append(bound)
    return outs, bounds


def check_replay(ops, images, out, params, what):
    want, bounds = replay_chain(ops, images, params)
    for i, (a, b, bound) in enumerate(zip(out, want, bounds)):
        assert a.shape == b.shape, f"{what} sample {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        err = float((a - b).abs().max())
        assert err <= bound, f"{what} sample {i}: fastssl differs from torchvision by " \
                             f"{err:.3g} > {bound:.3g}"
    return bounds


# ----------------------------------------------------------------------------- each op alone

OPS_ALONE = {
    "crop down": lambda: A.RandomResizedCrop(8, scale=(0.2, 1.0)),
    "crop up, non-square": lambda: A.RandomResizedCrop((29, 17), scale=(0.05, 0.3)),
    "flip": lambda: A.RandomHorizontalFlip(0.5),
    "brightness": lambda: A.ColorJitter(brightness=0.8),
    "contrast": lambda: A.ColorJitter(contrast=(0.1, 1.9)),
    "saturation": lambda: A.ColorJitter(saturation=0.8),
    "hue": lambda: A.ColorJitter(hue=0.5),
    "jitter": lambda: A.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
    "grayscale": lambda: A.RandomGrayscale(0.5),
    "blur 5": lambda: A.GaussianBlur(5, sigma=(0.1, 2.0), p=0.7),
    "blur (3, 7)": lambda: A.GaussianBlur((3, 7), sigma=(0.5, 3.0)),
    "blur default size": lambda: A.GaussianBlur(sigma=1.5),
    "solarize 0.3": lambda: A.RandomSolarize(0.3, p=0.6),
    "normalize": lambda: A.Normalize(),
}


@pytest.mark.parametrize("H,W", [(23, 17), (1, 5), (32, 32)])
@pytest.mark.parametrize("name", list(OPS_ALONE))
def test_each_op_replayed_through_torchvision(name, H, W):
    """Float images in [0, 1] (so both sides see identical inputs), 12 samples; the flip,
    brightness, solarize and normalize are the same arithmetic as torchvision's: bitwise."""
    op = OPS_ALONE[name]()
    if isinstance(op, A.GaussianBlur) and op.kernel_size is None and min(H, W) < 10:
        H, W = 40, 44  # the default kernel is ~10% of the side
    x = float_images(12, H, W, seed=H * 31 + W)
    out, params = op(x, generator=gen(len(name)), return_params=True)
    check_replay([op], x, out, [params], name)
    if name in ("flip", "brightness", "solarize 0.3", "normalize"):
        want, _ = replay_chain([op], x, [params])
        assert torch.equal(out, torch.stack(want)), f"{name}: not bitwise torchvision's"


# ----------------------------------------------------------------------------- chains

def recipe(size=(12, 10), blur_k=5):
    return [A.RandomResizedCrop(size, scale=(0.1, 1.0)), A.RandomHorizontalFlip(),
            A.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), A.RandomGrayscale(0.2),
            A.GaussianBlur(blur_k, sigma=(0.1, 2.0), p=0.5), A.RandomSolarize(0.5, p=0.3),
            A.Normalize()]


CHAINS = {
    "BYOL-like recipe": lambda: recipe(),
    "square crop, blur 23": lambda: recipe(16, 23),
    "colour before the crop": lambda: [A.ColorJitter(0.8, 0.8, 0.8, 0.2), A.RandomGrayscale(0.5),
                                       A.RandomResizedCrop(9), A.RandomHorizontalFlip(0.5)],
    "no crop": lambda: [A.GaussianBlur(3, sigma=(0.5, 1.5)), A.ColorJitter(hue=0.3),
                        A.RandomSolarize(0.5, p=0.5), A.Normalize()],
    "blur, then jitter": lambda: [A.RandomResizedCrop(11), A.GaussianBlur(5, p=1.0),
                                  A.ColorJitter(0.4, 0.4, 0.4, 0.1), A.Normalize()],
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_chains_replayed_through_torchvision(name):
    """uint8 batches of an odd size, 16 samples: ``Augment``'s output (its fused or
    portable path) and an ``nn.Sequential`` of the same ops, both against torchvision."""
    ops = CHAINS[name]()
    x = uint8_images(16, 27, 35, seed=len(name))
    out, params = A.Augment(*ops)(x, generator=gen(3), return_params=True)
    check_replay(ops, x, out, params, f"Augment {name}")
    seq = torch.nn.Sequential(*ops)
    torch.manual_seed(5)
    out_seq = seq(x)
    torch.manual_seed(5)
    _, params_seq = A.Augment(*ops)(x, return_params=True)
    check_replay(ops, x, out_seq, params_seq, f"nn.Sequential {name}")


def test_images_of_different_sizes_replayed():
    """A list of uint8 images of different sizes (one 1 pixel high), crop first."""
    ops = recipe((7, 9))
    sizes = [(31, 17), (1, 40), (64, 64), (9, 9), (20, 50)]
    images = [uint8_images(1, h, w, seed=h + w)[0] for h, w in sizes]
    out, params = A.Augment(*ops)(images, generator=gen(8), return_params=True)
    check_replay(ops, images, out, params, "list of images")


# ----------------------------------------------------------------------------- Compose

def test_fastssl_ops_inside_v2_compose():
    """``v2.Compose`` calls each fastssl op in turn (per-sample parameters from the default
    generator, op by op): the same draws as ``Augment`` from the same seed, so the same
    views (within the chain's bound), and a torchvision op (Normalize) may follow."""
    ops = recipe()[:-1]
    x = uint8_images(10, 30, 26, seed=1)
    torch.manual_seed(7)
    composed = v2.Compose(ops)(x)
    torch.manual_seed(7)
    out, params = A.Augment(*ops)(x, return_params=True)
    bounds = check_replay(ops, x, composed, params, "v2.Compose of fastssl ops")
    for a, b, bound in zip(composed, out, bounds):
        assert float((a - b).abs().max()) <= 2 * bound
    torch.manual_seed(7)
    mixed = v2.Compose(ops + [v2.Normalize(list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))])(x)
    check_replay(ops + [A.Normalize()], x, mixed, params + [{}], "with v2.Normalize")


def test_v2_compose_inside_augment():
    """A ``v2.Compose`` of fastssl ops is spliced into ``Augment`` (the fused chain): the
    same views as the flat chain, bitwise, for the same generator. torchvision's own ops
    are not accepted there: they draw one parameter set per call for the whole batch,
    which ``Augment``'s per-sample parameters cannot express."""
    ops = recipe()
    x = uint8_images(6, 21, 19, seed=2)
    nested = A.Augment(v2.Compose(ops[:4]), v2.Compose(ops[4:]))
    flat = A.Augment(*ops)
    assert [type(o) for o in nested] == [type(o) for o in flat]
    assert torch.equal(nested(x, generator=gen(4)), flat(x, generator=gen(4)))
    with pytest.raises(TypeError, match="RandomHorizontalFlip"):
        A.Augment(A.RandomResizedCrop(8), v2.RandomHorizontalFlip())
