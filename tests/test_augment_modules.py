"""Augmentation ops as torch modules: each op alone (replayed from its returned per-sample
parameters against independent references, square and non-square, on both paths),
torchvision's argument forms, single images, composition (nn.Sequential, Augment in any
order, nested chains, torchvision's Compose where installed) and the fused kernels kept
under composition."""
import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from fastssl import _dispatch
from fastssl import augment as A
from test_augment import ref_adjust, ref_gray

MEAN = torch.tensor(A.IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor(A.IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)


def uint8_images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def ref_blur(img, k_h, k_w, sigma):
    """float64 blur of one (3, H, W) image: conv2d with reflect padding, k_h x k_w taps."""
    def kernel(k):
        t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
        kern = torch.exp(-0.5 * (t / sigma) ** 2)
        return kern / kern.sum()
    ky, kx = kernel(k_h), kernel(k_w)
    xi = tF.pad(img[None], [k_w // 2] * 2 + [k_h // 2] * 2, mode="reflect")
    return tF.conv2d(xi, (ky[:, None] * kx[None, :]).expand(3, 1, k_h, k_w), groups=3)[0]


def ref_op(op, x, p, i):
    """Sample i of ``op`` applied to float64 image x (3, H, W) with parameters p."""
    if isinstance(op, A.RandomResizedCrop):
        t, l, h, w = (int(p[k][i]) for k in ("top", "left", "height", "width"))
        return tF.interpolate(x[None, :, t:t + h, l:l + w], size=op.size, mode="bilinear",
                              antialias=True)[0].clamp(0, 1)
    if isinstance(op, A.RandomHorizontalFlip):
        return x.flip(-1) if p["apply"][i] else x
    if isinstance(op, A.ColorJitter):
        if p["apply"][i]:
            for k in p["order"][i].tolist():
                if op.enabled[k]:
                    x = ref_adjust(x, k, float(p["factors"][i, k]))
        return x
    if isinstance(op, A.RandomGrayscale):
        return ref_gray(x)[None].expand(3, -1, -1) if p["apply"][i] else x
    if isinstance(op, A.GaussianBlur):
        if not p["apply"][i]:
            return x
        return ref_blur(x, *op.kernel_sizes(*x.shape[-2:]), float(p["sigma"][i]))
    if isinstance(op, A.RandomSolarize):
        return torch.where(x >= op.threshold, 1 - x, x) if p["apply"][i] else x
    if isinstance(op, A.Normalize):
        mean = torch.tensor(op.mean, dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor(op.std, dtype=torch.float64).view(3, 1, 1)
        return (x - mean) / std
    raise TypeError(op)


OPS = {
    "crop square": lambda: A.RandomResizedCrop(7, scale=(0.1, 1.0)),
    "crop (h, w)": lambda: A.RandomResizedCrop((6, 11), scale=(0.1, 1.0), ratio=(0.5, 2.0)),
    "flip": lambda: A.RandomHorizontalFlip(0.5),
    "jitter numbers": lambda: A.ColorJitter(0.4, 0.5, 0.3, 0.1),
    "jitter pairs": lambda: A.ColorJitter(brightness=(0.6, 1.4), contrast=(0.3, 0.9),
                                          saturation=(1.0, 2.0), hue=(-0.3, -0.05), p=0.7),
    "jitter brightness only": lambda: A.ColorJitter(brightness=(0.2, 0.5)),
    "grayscale": lambda: A.RandomGrayscale(0.5),
    "blur int": lambda: A.GaussianBlur(5, sigma=(0.3, 2.0), p=0.7),
    "blur (kx, ky), sigma float": lambda: A.GaussianBlur((3, 7), sigma=1.3),
    "blur default kernel": lambda: A.GaussianBlur(),
    "solarize": lambda: A.RandomSolarize(0.4, p=0.6),
    "normalize": lambda: A.Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.25)),
}


@pytest.mark.parametrize("shape", [(10, 10), (9, 16)], ids=["square", "non-square"])
@pytest.mark.parametrize("name", list(OPS))
def test_each_op_alone_against_references(backend, name, shape):
    op = OPS[name]()
    x = uint8_images(6, *shape, seed=len(name))
    out, p = op(x, generator=torch.Generator().manual_seed(3), return_params=True)
    assert isinstance(p, dict) and out.dtype == torch.float32
    for i in range(x.shape[0]):
        want = ref_op(op, x[i].double() / 255, p, i)
        torch.testing.assert_close(out[i].double(), want, rtol=0, atol=3e-5)


def test_torchvision_argument_forms_give_torchvisions_ranges():
    sizes = torch.tensor([[8, 8]]).expand(4000, 2)
    g = torch.Generator().manual_seed(0)
    cases = [(A.ColorJitter(brightness=(0.6, 1.4)), 0, (0.6, 1.4)),
             (A.ColorJitter(brightness=0.5), 0, (0.5, 1.5)),
             (A.ColorJitter(contrast=1.5), 1, (0.0, 2.5)),  # low end clipped at 0
             (A.ColorJitter(saturation=(0.0, 0.2)), 2, (0.0, 0.2)),
             (A.ColorJitter(hue=0.2), 3, (-0.2, 0.2)),
             (A.ColorJitter(hue=(-0.5, -0.3)), 3, (-0.5, -0.3))]
    for op, k, (lo, hi) in cases:
        f = op.params(sizes, g)["factors"][:, k].double()
        assert lo - 1e-6 <= f.min() and f.max() <= hi + 1e-6 and f.max() - f.min() > 0.9 * (hi - lo)
        assert op.enabled == [j == k for j in range(4)]
    assert A.ColorJitter(brightness=(1, 1), hue=(0, 0)).enabled == [False] * 4  # identities
    assert A.ColorJitter(brightness=(0.5, 0.5)).enabled[0]  # a fixed factor still applies
    assert A.RandomResizedCrop(5).size == (5, 5) and A.RandomResizedCrop((4, 9)).size == (4, 9)
    assert A.GaussianBlur((3, 5)).kernel_sizes(40, 40) == (5, 3)  # torchvision's (kx, ky)
    assert A.GaussianBlur(sigma=0.7).sigma == (0.7, 0.7)
    sigma = A.GaussianBlur(sigma=(0.5, 1.5)).params(sizes, g)["sigma"]
    assert 0.5 <= sigma.min() and sigma.max() <= 1.5


def test_a_single_image_gives_a_single_view(backend):
    x = uint8_images(1, 12, 14, seed=1)
    for make in (lambda: A.RandomResizedCrop((5, 7)), lambda: A.ColorJitter(0.4, 0.4, 0.4, 0.1),
                 lambda: A.Augment(A.RandomResizedCrop(6), A.GaussianBlur(3), A.Normalize())):
        op = make()
        one = op(x[0], generator=torch.Generator().manual_seed(2))
        batch = op(x, generator=torch.Generator().manual_seed(2))
        assert one.dim() == 3 and torch.equal(one, batch[0])
    views = A.SimCLRAugment(size=6)(x[0], generator=torch.Generator().manual_seed(2))
    assert [tuple(v.shape) for v in views] == [(3, 6, 6)] * 2


CHAINS = {
    "recipe": lambda: [A.RandomResizedCrop((8, 10), scale=(0.2, 1.0)), A.RandomHorizontalFlip(),
                       A.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), A.RandomGrayscale(0.3),
                       A.GaussianBlur(p=0.6), A.RandomSolarize(p=0.4), A.Normalize()],
    "colour only": lambda: [A.ColorJitter((0.5, 1.5), 0.3, 0.3, (-0.1, 0.2)),
                            A.RandomGrayscale(0.4), A.RandomSolarize(0.6, 0.5)],
    "flip, blur, then crop": lambda: [A.RandomHorizontalFlip(), A.GaussianBlur(3, p=0.5),
                                      A.RandomResizedCrop(7), A.RandomSolarize(p=0.5)],
    "two crops": lambda: [A.RandomResizedCrop(12), A.RandomGrayscale(0.5),
                          A.RandomResizedCrop((5, 6))],
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_sequential_equals_augment_given_the_same_randomness(backend, chain):
    """nn.Sequential (the default generator, seeded), Augment, and the ops called one after
    another with one generator all give the same view; each equals the float64 reference
    replayed from Augment's parameters."""
    ops = CHAINS[chain]()
    x = uint8_images(5, 13, 15, seed=4)
    torch.manual_seed(11)
    seq = nn.Sequential(*ops)(x)
    torch.manual_seed(11)
    aug, params = A.Augment(*ops)(x, return_params=True)
    g = torch.Generator().manual_seed(5)
    step = x
    for op in ops:
        step = op(step, generator=g)
    want_aug = A.Augment(*ops)(x, generator=torch.Generator().manual_seed(5))
    tol = 0 if backend == "torch" else 2e-5  # fused kernels vs one op at a time
    torch.testing.assert_close(seq, aug, rtol=0, atol=tol)
    torch.testing.assert_close(step, want_aug, rtol=0, atol=tol)
    for i in range(x.shape[0]):
        want = x[i].double() / 255
        for op, p in zip(ops, params):
            want = ref_op(op, want, p, i)
        torch.testing.assert_close(aug[i].double(), want, rtol=0, atol=5e-5)


class _Watch:
    """Counts the augmentation kernels called (and with which fusion)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = _dispatch.kernels("augment")
        watch = self

        class Proxy:
            def __getattr__(self, name):
                fn = getattr(real, name)

                def call(*args, **kw):
                    fused = name == "resize" and kw.get("colour") is not None
                    watch.calls.append(name + (" + colour" if fused else ""))
                    return fn(*args, **kw)
                return call
        real_kernels = _dispatch.kernels
        monkeypatch.setattr(_dispatch, "kernels",
                            lambda family: Proxy() if family == "augment" else real_kernels(family))


def test_composition_keeps_the_fused_kernels(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    watch = _Watch(monkeypatch)
    x = uint8_images(2, 12, 12)
    for view in A.BYOLAugment(size=8).views:  # the recipes' chains
        watch.calls.clear()
        view(x)
        assert watch.calls == ["resize + colour", "blur_finish"], watch.calls
    head = nn.Sequential(A.RandomResizedCrop(8), A.RandomHorizontalFlip(), A.ColorJitter(0.4),
                         A.RandomGrayscale(0.2))
    composed = A.Augment(head, A.Augment(A.GaussianBlur(p=0.5), A.RandomSolarize(p=0.2)),
                         A.Normalize(), dtype=torch.bfloat16)
    assert [type(op).__name__ for op in composed] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomGrayscale",
        "GaussianBlur", "RandomSolarize", "Normalize"]
    watch.calls.clear()
    out = composed(x)
    assert watch.calls == ["resize + colour", "blur_finish"] and out.dtype == torch.bfloat16
    watch.calls.clear()
    A.Augment(A.ColorJitter(0.4), A.RandomGrayscale(0.5))(x)  # a colour run without a crop
    assert watch.calls == ["colour"]


def test_presets_return_replayable_params():
    x = uint8_images(3, 14, 12)
    aug = A.DINOAugment(global_size=8, local_size=4, n_local=2)
    views, params = aug(x, generator=torch.Generator().manual_seed(0), return_params=True)
    assert len(views) == len(params) == 4
    batch, _ = A.as_batch(x)
    for view, out, p in zip(aug.views, views, params):
        assert len(p) == len(view) and torch.equal(view.apply(batch, p), out)


def test_modules_print_what_they_do():
    text = repr(A.SimCLRAugment(size=32))
    assert text.startswith("SimCLRAugment(") and "object at" not in text
    assert "RandomResizedCrop(size=(32, 32), scale=(0.08, 1.0)" in text
    assert "ColorJitter(brightness=(0.2, 1.8)" in text and "GaussianBlur(" in text
    for op in OPS.values():
        r = repr(op())
        assert r.startswith(type(op()).__name__ + "(") and "object at" not in r
    assert isinstance(nn.Sequential(A.SimCLRAugment(size=8)), nn.Module)
    assert len(nn.Sequential(A.SimCLRAugment(size=8))[0](uint8_images(2, 9, 9))) == 2


def test_sequential_chain_checks_the_range_once():
    """Each op's output is tagged as lying in [0, 1], so the next op of a chain reads nothing
    back; a tensor modified in place is checked again."""
    x = uint8_images(2, 9, 9)
    y = A.ColorJitter(0.4)(x)
    assert getattr(y, "_fastssl_in_range", None) == y._version
    A.RandomGrayscale(0.5)(y)
    y.mul_(255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.RandomGrayscale(0.5)(y)


def test_torchvision_compose_and_functional_ops():
    tv = pytest.importorskip("torchvision")
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF
    x = uint8_images(3, 16, 20)
    chain = v2.Compose([A.RandomResizedCrop((8, 9)), A.RandomHorizontalFlip(),
                        A.ColorJitter(0.4, 0.4, 0.4, 0.1)])
    assert chain(x).shape == (3, 3, 8, 9)
    assert [type(op) for op in A.Augment(chain)] == [A.RandomResizedCrop,
                                                      A.RandomHorizontalFlip, A.ColorJitter]
    crop = A.RandomResizedCrop((8, 9), scale=(0.2, 1.0))
    out, p = crop(x, generator=torch.Generator().manual_seed(0), return_params=True)
    for i in range(3):
        t, l, h, w = (int(p[k][i]) for k in ("top", "left", "height", "width"))
        want = TF.resized_crop(x[i].float() / 255, t, l, h, w, [8, 9], antialias=True)
        torch.testing.assert_close(out[i], want.clamp(0, 1), rtol=0, atol=1e-5)
    jitter = A.ColorJitter(brightness=(0.5, 1.5))
    out, p = jitter(x, generator=torch.Generator().manual_seed(1), return_params=True)
    for i in range(3):
        want = TF.adjust_brightness(x[i].float() / 255, float(p["factors"][i, 0]))
        torch.testing.assert_close(out[i], want, rtol=0, atol=1e-6)
    assert tv.__version__


# ----------------------------------------------------------------------------- meta tensors

PRESETS = {
    "SimCLRAugment": lambda: A.SimCLRAugment(size=6),
    "BYOLAugment": lambda: A.BYOLAugment(size=(5, 7), dtype=torch.bfloat16, channels_last=True),
    "BarlowTwinsAugment": lambda: A.BarlowTwinsAugment(size=6, normalize=False),
    "VICRegAugment": lambda: A.VICRegAugment(size=6, dtype=torch.float16),
    "MoCoV2Augment": lambda: A.MoCoV2Augment(size=6),
    "DINOAugment": lambda: A.DINOAugment(global_size=8, local_size=4, n_local=2),
    "MultiView": lambda: A.MultiView([A.Augment(A.RandomResizedCrop(5)),
                                      A.Augment(A.ColorJitter(0.4, hue=0.1), A.GaussianBlur(3))]),
    "Augment": lambda: A.Augment(*[make() for make in OPS.values()], dtype=torch.bfloat16,
                                 channels_last=True),
}


def _layout(t):
    return (tuple(t.shape), t.dtype, t.is_contiguous(),
            t.is_contiguous(memory_format=torch.channels_last))


def _params_layout(params):
    return [{k: (tuple(v.shape), v.dtype) for k, v in p.items()} for p in params]


@pytest.mark.parametrize("name", list(OPS) + list(PRESETS))
def test_meta_batch_gives_the_real_calls_shapes(backend, name):
    """Every op, Augment, MultiView and preset on a meta uint8 batch, on either backend:
    meta views (and meta parameters) with the shapes, dtypes and memory formats of the real
    call (made on the portable path: both paths give the same views, tested above)."""
    module = (OPS.get(name) or PRESETS[name])()
    real_x = uint8_images(3, 9, 11, seed=2)
    meta_x = torch.empty_like(real_x, device="meta")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTSSL_BACKEND", "torch")
        real, real_p = module(real_x, generator=torch.Generator().manual_seed(0),
                              return_params=True)
    meta, meta_p = module(meta_x, return_params=True)
    real, meta = ([real], [meta]) if isinstance(real, torch.Tensor) else (real, meta)
    real_p, meta_p = ([real_p], [meta_p]) if isinstance(real_p, dict) else (real_p, meta_p)
    assert len(meta) == len(real)
    for r, m in zip(real, meta):
        assert m.device.type == "meta" and _layout(m) == _layout(r)
    for r, m in zip(real_p, meta_p):
        r, m = (r, m) if isinstance(r, list) else ([r], [m])
        assert _params_layout(m) == _params_layout(r)
        assert all(v.device.type == "meta" for p in m for v in p.values())


def test_meta_single_image_and_list_of_images():
    x = [torch.empty(3, 10, 12, dtype=torch.uint8, device="meta"),
         torch.empty(1, 7, 9, dtype=torch.uint8, device="meta")]
    views = A.SimCLRAugment(size=5)(x)
    assert [(v.device.type, tuple(v.shape)) for v in views] == [("meta", (2, 3, 5, 5))] * 2
    one = A.Augment(A.RandomResizedCrop((4, 6)), A.Normalize())(x[0])
    assert one.device.type == "meta" and one.shape == (3, 4, 6)


def test_cpu_chunks_give_the_one_pass_views(monkeypatch):
    """The portable path runs a CPU batch chunk by chunk: the same views and parameters as
    one pass over the batch."""
    x = uint8_images(7, 13, 15, seed=6)
    aug = A.BYOLAugment(size=(6, 8))
    monkeypatch.setattr(A, "_CHUNK", 64 * 13 * 15)  # the batch in one pass
    whole, params = aug(x, generator=torch.Generator().manual_seed(1), return_params=True)
    monkeypatch.setattr(A, "_CHUNK", 3 * 13 * 15)  # chunks of 3 images
    chunked = aug(x, generator=torch.Generator().manual_seed(1))
    batch, _ = A.as_batch(x)
    for view, a, b, p in zip(aug.views, whole, chunked, params):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert torch.equal(view.apply(batch, p), b)
