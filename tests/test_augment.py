"""Augmentation ops against independent references given the same per-sample parameters:
torch's antialiased bilinear interpolate (what torchvision calls), colorsys for HSV, conv2d
with reflect padding for the blur, and the textbook formulas in float64."""
import colorsys
import math

import pytest
import torch
import torch.nn.functional as tF

from fastssl import augment as A


def images(n=5, h=37, w=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def float_images(n=4, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g, dtype=torch.float64).float()


# ----------------------------------------------------------------------------- crop + resize

@pytest.mark.parametrize("size", [16, 48, (20, 31)])
def test_resized_crop_matches_antialiased_interpolate(backend, size):
    x = images(n=5 if backend == "torch" else 2)
    crop = A.RandomResizedCrop(size, scale=(0.05, 1.0))
    batch, sizes = A.as_batch(x)
    p = crop.params(sizes, torch.Generator().manual_seed(1))
    out = crop.apply(batch, p)
    S = crop.size
    for i in range(x.shape[0]):
        t, l, h, w = (int(p[k][i]) for k in ("top", "left", "height", "width"))
        want = tF.interpolate(batch[i:i + 1, :, t:t + h, l:l + w].double(), size=S,
                              mode="bilinear", antialias=True, align_corners=False)[0]
        torch.testing.assert_close(out[i].double(), want, rtol=0, atol=2e-5)


def test_crop_parameters_follow_torchvision_ranges():
    n = 4000
    sizes = torch.tensor([[300, 200]]).expand(n, 2)
    crop = A.RandomResizedCrop(32, scale=(0.2, 0.9), ratio=(0.5, 2.0))
    g = torch.Generator().manual_seed(3)
    p = crop.params(sizes, g)
    h, w, top, left = p["height"], p["width"], p["top"], p["left"]
    assert (h > 0).all() and (w > 0).all() and (h <= 300).all() and (w <= 200).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 300).all() and (left + w <= 200).all()
    area = (h * w).double() / (300 * 200)
    # w, h are rounded: allow one pixel of slack on the area and ratio ranges.
    assert area.min() > 0.2 - 0.02 and area.max() < 0.9 + 0.02
    ratio = w.double() / h.double()
    assert ratio.min() > 0.5 * 0.9 and ratio.max() < 2.0 * 1.1
    rate = A.RandomHorizontalFlip(0.3).params(sizes, g)["apply"].double().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    # Per-sample independence: positions vary across the batch.
    assert top.unique().numel() > 50 and left.unique().numel() > 50


def test_crop_falls_back_to_a_central_crop():
    sizes = torch.tensor([[4, 200]])  # ratio 50: no try can fit the ratio range
    p = A.RandomResizedCrop(8, scale=(0.9, 1.0)).params(sizes, torch.Generator().manual_seed(0))
    assert int(p["height"]) == 4 and int(p["width"]) == round(4 * 4 / 3)
    assert int(p["top"]) == 0 and int(p["left"]) == (200 - round(4 * 4 / 3)) // 2


def test_list_of_images_of_different_sizes(backend):
    g = torch.Generator().manual_seed(0)
    ims = [torch.randint(0, 256, (3, 20 + 7 * i, 30 - 3 * i), generator=g, dtype=torch.uint8)
           for i in range(4)]
    ims.append(torch.randint(0, 256, (1, 15, 15), generator=g, dtype=torch.uint8))  # gray
    crop = A.RandomResizedCrop(12)
    batch, sizes = A.as_batch(ims)
    p = crop.params(sizes, g)
    out = crop.apply(batch, p)
    for i, im in enumerate(ims):
        t, l, h, w = (int(p[k][i]) for k in ("top", "left", "height", "width"))
        assert t + h <= im.shape[1] and l + w <= im.shape[2]
        src = im.expand(3, -1, -1).double()[None, :, t:t + h, l:l + w] / 255
        want = tF.interpolate(src, size=(12, 12), mode="bilinear", antialias=True)[0]
        torch.testing.assert_close(out[i].double(), want, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- colour

def ref_gray(x):
    return 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def ref_adjust(x, op, f):
    """float64 torchvision semantics for one image (3, H, W)."""
    if op == 0:
        return (x * f).clamp(0, 1)
    if op == 1:
        return (f * x + (1 - f) * ref_gray(x).mean()).clamp(0, 1)
    if op == 2:
        return (f * x + (1 - f) * ref_gray(x)[None]).clamp(0, 1)
    out = torch.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
            out[:, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + f) % 1.0, s, v))
    return out


@pytest.mark.parametrize("op", [0, 1, 2, 3])
def test_single_colour_ops(op):
    x = float_images()
    f = torch.tensor([0.0, 0.6, 1.3, -0.35 if op == 3 else 1.9])
    if op == 3:
        f = torch.tensor([0.0, 0.1, -0.5, 0.37])
    got = A.adjust(x, op, f)
    for i in range(x.shape[0]):
        torch.testing.assert_close(got[i].double(), ref_adjust(x[i].double(), op, float(f[i])),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("strengths", [(0.4, 0.4, 0.3, 0.1), (0.8, 0.0, 0.8, 0.0)])
def test_colour_chain_random_order_per_sample(backend, strengths):
    """ColorJitter -> RandomGrayscale -> RandomSolarize, on the portable path and in the
    fused kernel, against the float64 / colorsys reference."""
    x = float_images(n=24, h=5, w=6, seed=1)
    g = torch.Generator().manual_seed(2)
    cj, gray, sol = A.ColorJitter(*strengths, p=0.7), A.RandomGrayscale(0.3), A.RandomSolarize(0.6, 0.4)
    sizes = torch.tensor([[5, 6]]).expand(24, 2)
    p, pg, ps = cj.params(sizes, g), gray.params(sizes, g), sol.params(sizes, g)
    got = A.colour_ops(x, (cj, p), (gray, pg), (sol, ps))
    assert len({tuple(o.tolist()) for o in p["order"]}) > 5  # orders differ across samples
    for i in range(24):
        want = x[i].double()
        if p["apply"][i]:
            for op in p["order"][i].tolist():
                if strengths[op] > 0:  # a zero strength skips the op, as torchvision
                    want = ref_adjust(want, op, float(p["factors"][i, op]))
        if pg["apply"][i]:
            want = ref_gray(want)[None].expand(3, -1, -1)
        if ps["apply"][i]:
            want = torch.where(want >= 0.6, 1 - want, want)
        torch.testing.assert_close(got[i].double(), want, rtol=0, atol=2e-5)


def test_colour_ops_each_alone(backend):
    x = float_images(n=8, seed=4)
    g = torch.Generator().manual_seed(5)
    gray, sol = A.RandomGrayscale(0.5), A.RandomSolarize(0.5, 0.5)
    sizes = torch.tensor([list(x.shape[-2:])]).expand(8, 2)
    pg, ps = gray.params(sizes, g), sol.params(sizes, g)
    got_g, got_s = A.colour_ops(x, gray=(gray, pg)), A.colour_ops(x, solarize=(sol, ps))
    assert 0 < int(pg["apply"].sum()) < 8 and 0 < int(ps["apply"].sum()) < 8
    for i in range(8):
        xi = x[i].double()
        want = ref_gray(xi)[None].expand(3, -1, -1) if pg["apply"][i] else xi
        torch.testing.assert_close(got_g[i].double(), want, rtol=0, atol=1e-6)
        want = torch.where(xi >= 0.5, 1 - xi, xi) if ps["apply"][i] else xi
        torch.testing.assert_close(got_s[i].double(), want, rtol=0, atol=1e-7)


def test_grayscale_solarize_normalize():
    x = float_images(n=6)
    g = torch.Generator().manual_seed(0)
    gray, sol, norm = A.RandomGrayscale(0.5), A.RandomSolarize(0.5, 0.5), A.Normalize()
    sizes = torch.tensor([list(x.shape[-2:])]).expand(6, 2)
    pg, ps = gray.params(sizes, g), sol.params(sizes, g)
    out_g, out_s, out_n = gray.apply(x, pg), sol.apply(x, ps), norm.apply(x, {})
    for i in range(6):
        want = ref_gray(x[i].double())[None].expand(3, -1, -1) if pg["apply"][i] else x[i].double()
        torch.testing.assert_close(out_g[i].double(), want, rtol=0, atol=1e-6)
        xi = x[i].double()
        want = torch.where(xi >= 0.5, 1 - xi, xi) if ps["apply"][i] else xi
        torch.testing.assert_close(out_s[i].double(), want, rtol=0, atol=1e-7)
    mean = torch.tensor(A.IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(A.IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(out_n.double(), (x.double() - mean) / std, rtol=0, atol=1e-6)


def ref_blur(img, k, sigma):
    """float64 Gaussian blur of one image (3, H, W): conv2d with reflect padding, the kernel
    capped per axis at 2 * side - 1 taps (reflect padding needs pad < side)."""
    def kernel(side):
        kk = min(k, 2 * side - 1)
        half = (kk - 1) / 2
        t = torch.linspace(-half, half, kk, dtype=torch.float64)
        kern = torch.exp(-0.5 * (t / sigma) ** 2)
        return kern / kern.sum()
    ky, kx = kernel(img.shape[1]), kernel(img.shape[2])
    xi = tF.pad(img[None].double(), [len(kx) // 2] * 2 + [len(ky) // 2] * 2, mode="reflect")
    return tF.conv2d(xi, (ky[:, None] * kx[None, :]).expand(3, 1, len(ky), len(kx)), groups=3)[0]


@pytest.mark.parametrize("k,size", [(23, 40), (5, 7), (9, 3)])
def test_blur_matches_reflect_padded_conv(backend, k, size):
    x = float_images(n=4, h=size, w=size + 2, seed=3)
    blur = A.GaussianBlur(kernel_size=k, p=0.75)
    p = blur.params(torch.tensor([[size, size + 2]]).expand(4, 2), torch.Generator().manual_seed(4))
    got = A.blur_finish(x, (blur, p))
    for i in range(4):
        if not p["apply"][i]:
            torch.testing.assert_close(got[i], x[i], rtol=0, atol=0)
            continue
        torch.testing.assert_close(got[i].double(), ref_blur(x[i], k, float(p["sigma"][i])),
                                   rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- views and presets

def test_fused_and_portable_views_agree(monkeypatch):
    x = images(n=4)
    out = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("FASTSSL_BACKEND", name)
        out[name] = A.BYOLAugment(size=16)(x, generator=torch.Generator().manual_seed(3))
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_crop_and_colour_view_against_references(backend):
    """One view: crop/resize/flip then jitter -> gray -> solarize (one kernel on the Triton
    path), against torch's antialiased interpolate and the float64 / colorsys colour ops."""
    x = images(n=6, h=23, w=29, seed=8)
    aug = A.Augment(A.RandomResizedCrop(9, scale=(0.1, 1.0)), A.RandomHorizontalFlip(),
                    A.ColorJitter(0.4, 0.4, 0.3, 0.1, p=0.8), A.RandomGrayscale(0.3),
                    A.RandomSolarize(0.5, 0.4))
    out, (pc, pf, pj, pg, ps) = aug(x, generator=torch.Generator().manual_seed(9),
                                    return_params=True)
    batch, _ = A.as_batch(x)
    for i in range(6):
        t, l, h, w = (int(pc[k][i]) for k in ("top", "left", "height", "width"))
        want = tF.interpolate(batch[i:i + 1, :, t:t + h, l:l + w].double(), size=(9, 9),
                              mode="bilinear", antialias=True)[0].clamp(0, 1)
        if pf["apply"][i]:
            want = want.flip(-1)
        if pj["apply"][i]:
            for op in pj["order"][i].tolist():
                want = ref_adjust(want, op, float(pj["factors"][i, op]))
        if pg["apply"][i]:
            want = ref_gray(want)[None].expand(3, -1, -1)
        if ps["apply"][i]:
            want = torch.where(want >= 0.5, 1 - want, want)
        torch.testing.assert_close(out[i].double(), want, rtol=0, atol=2e-5)


def test_generator_makes_views_reproducible_and_views_independent():
    x = images(n=8)
    aug = A.SimCLRAugment(size=16)
    a = aug(x, generator=torch.Generator().manual_seed(7))
    b = aug(x, generator=torch.Generator().manual_seed(7))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("name", ["SimCLRAugment", "BYOLAugment", "BarlowTwinsAugment",
                                  "VICRegAugment", "MoCoV2Augment"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_presets(name, dtype):
    views = getattr(A, name)(size=20, dtype=dtype, channels_last=True)(images(n=3))
    assert len(views) == 2
    for v in views:
        assert v.shape == (3, 3, 20, 20) and v.dtype == dtype and torch.isfinite(v.float()).all()
        assert v.is_contiguous(memory_format=torch.channels_last)


def test_byol_views_are_asymmetric():
    aug = A.BYOLAugment(size=16)
    blur = [[op for op in v.ops if isinstance(op, A.GaussianBlur)][0].p for v in aug.views]
    sol = [[op.p for op in v.ops if isinstance(op, A.RandomSolarize)] for v in aug.views]
    assert blur == [1.0, 0.1] and sol == [[], [0.2]]


def test_dino_views_and_channels_last_input():
    x = images(n=2, h=60, w=64).permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)
    views = A.DINOAugment(global_size=32, local_size=12, n_local=3)(x, channels_last_input=True)
    assert [tuple(v.shape) for v in views] == [(2, 3, 32, 32)] * 2 + [(2, 3, 12, 12)] * 3


def test_augment_returns_replayable_params():
    x = images(n=3)
    aug = A.Augment(A.RandomResizedCrop(10), A.ColorJitter(), A.RandomGrayscale(),
                    A.GaussianBlur(p=1.0), A.RandomSolarize(p=1.0), A.Normalize())
    out, params = aug(x, generator=torch.Generator().manual_seed(0), return_params=True)
    batch, _ = A.as_batch(x)
    assert torch.equal(aug.apply(batch, params), out)


def test_one_pixel_images_and_border_crops(backend):
    x = torch.randint(0, 256, (4, 3, 1, 1), dtype=torch.uint8)
    out = A.SimCLRAugment(size=8, normalize=False)(x, generator=torch.Generator().manual_seed(0))
    for v in out:
        assert v.shape == (4, 3, 8, 8) and torch.isfinite(v).all()
        assert v.min() >= 0 and v.max() <= 1
    # A 1x1 image resizes to a constant; the colour ops keep each view constant per channel.
    crop = A.RandomResizedCrop(5)
    batch, sizes = A.as_batch(x)
    resized = crop.apply(batch, crop.params(sizes, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(resized, batch.expand(-1, -1, 5, 5), rtol=0, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="channels"):
        A.SimCLRAugment(size=8)(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="tensor"):
        A.SimCLRAugment(size=8)(torch.zeros(8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or floating"):
        A.SimCLRAugment(size=8)(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="scale"):
        A.RandomResizedCrop(8, scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="probability"):
        A.RandomGrayscale(1.5)
    with pytest.raises(ValueError, match="odd"):
        A.GaussianBlur(kernel_size=4)
    with pytest.raises(ValueError, match="hue"):
        A.ColorJitter(hue=0.7)
    with pytest.raises(ValueError, match="first op"):
        A.Augment(A.ColorJitter(0.4))([torch.zeros(3, 8, 8, dtype=torch.uint8),
                                       torch.zeros(3, 9, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="dtype"):
        A.Augment(A.RandomResizedCrop(8), dtype=torch.int8)
    with pytest.raises(ValueError, match="empty"):
        A.as_batch([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blur_solarize_normalize_cast_fused(backend, dtype):
    x = float_images(n=5, h=12, w=9, seed=6)
    g = torch.Generator().manual_seed(7)
    blur, sol, norm = A.GaussianBlur(kernel_size=5, p=0.5), A.RandomSolarize(0.55, 0.5), A.Normalize()
    sizes = torch.tensor([[12, 9]]).expand(5, 2)
    pb, ps = blur.params(sizes, g), sol.params(sizes, g)
    got = A.blur_finish(x, (blur, pb), (sol, ps), (norm, {}), dtype, channels_last=True)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(A.IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(A.IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    want = []
    for i in range(5):
        v = ref_blur(x[i], 5, float(pb["sigma"][i])) if pb["apply"][i] else x[i].double()
        v = torch.where(v >= 0.55, 1 - v, v) if ps["apply"][i] else v
        want.append((v - mean) / std)
    want = torch.stack(want)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
