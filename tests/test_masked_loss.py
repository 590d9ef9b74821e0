"""masked_patch_loss against float64 references written from MAE's and SimMIM's code, on
both paths (the Triton kernels interpreted on CPU), with odd shapes and every dtype."""
import pytest
import torch
import torch.nn.functional as tF

from fastssl import _ops
from fastssl.masking import masked_patch_loss


def patchify(imgs, p):
    """MAE's patchify: (N, C, H, W) -> (N, L, p*p*C), channel fastest inside a patch."""
    N, C, H, W = imgs.shape
    x = imgs.reshape(N, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(N, (H // p) * (W // p), p * p * C)


def mae_loss(pred, imgs, mask, p, norm_pix=True):
    """MAE's forward_loss, as written there (in pred's dtype; float64 for the reference)."""
    target = patchify(imgs.to(pred.dtype), p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.to(pred.dtype)
    return (loss * mask).sum() / mask.sum()


def elementwise_loss(pred, imgs, mask, p, norm_pix, loss, beta):
    target = patchify(imgs.to(pred.dtype), p)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True)
                                                            + 1e-6) ** .5
    e = {"mse": lambda: (pred - target) ** 2, "l1": lambda: (pred - target).abs(),
         "smooth_l1": lambda: tF.smooth_l1_loss(pred, target, reduction="none", beta=beta)}
    m = mask.reshape(mask.shape[0], -1).to(pred.dtype)
    return (e[loss]().mean(-1) * m).sum() / m.sum()


def simmim_loss(x_rec, imgs, mask, p, in_chans):
    """SimMIM's loss: pixel mask from the patch mask, L1 over masked pixels."""
    m = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).to(x_rec.dtype)
    rec = tF.l1_loss(imgs.to(x_rec.dtype), x_rec, reduction="none")
    return (rec * m).sum() / (m.sum() + 1e-5) / in_chans


def unpatchify(x, p, C, h, w):
    N = x.shape[0]
    x = x.reshape(N, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(N, C, h * p, w * p)


def data(N, C, H, W, p, ratio, g, uint8=True, dtype=torch.float32):
    L, P = (H // p) * (W // p), p * p * C
    if uint8:
        imgs = torch.randint(0, 256, (N, C, H, W), generator=g, dtype=torch.uint8)
    else:
        imgs = torch.randn(N, C, H, W, generator=g).to(dtype)
    mask = torch.rand(N, L, generator=g) < ratio
    pred = torch.randn(N, L, P, generator=g, dtype=torch.float64)
    return pred, imgs, mask


def fast_and_reference(x0, ref_x0, imgs, mask, p):
    """(value, gradient) of masked_patch_loss at x0 and of MAE's loss in float64 at ref_x0."""
    x = x0.clone().requires_grad_()
    out = masked_patch_loss(x, imgs, mask, p)
    r = ref_x0.double().clone().requires_grad_()
    ref = mae_loss(r, imgs.double(), mask.double(), p)
    return (out, torch.autograd.grad(out, x)[0]), (ref, torch.autograd.grad(ref, r)[0])


SHAPES = [(1, 3, 4, 6, 1), (2, 3, 12, 9, 3), (1, 3, 32, 48, 16), (3, 1, 10, 15, 5),
          (2, 2, 16, 16, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("loss", ["mse", "l1", "smooth_l1"])
def test_value_and_gradient_against_float64(backend, shape, norm_pix, loss):
    N, C, H, W, p = shape
    g = torch.Generator().manual_seed(sum(shape))
    pred, imgs, mask = data(N, C, H, W, p, 0.6, g)
    mask[0, 0] = True  # at least one masked patch
    x = pred.float().requires_grad_()
    out = masked_patch_loss(x, imgs, mask, p, norm_pix, loss, beta=0.5)
    (gx,) = torch.autograd.grad(out, x)
    r = pred.clone().requires_grad_()
    ref = elementwise_loss(r, imgs, mask, p, norm_pix, loss, 0.5)
    (gr,) = torch.autograd.grad(ref, r)
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) <= 1e-6 * abs(ref.item())
    assert (gx.double() - gr).norm() <= 1e-6 * gr.norm()
    assert torch.all(gx[~mask] == 0)


@pytest.mark.parametrize("ratio", [0.02, 0.75, 0.98])
def test_mae_loss_and_packed_predictions(backend, ratio):
    g = torch.Generator().manual_seed(int(ratio * 100))
    pred, imgs, mask = data(3, 3, 32, 32, 4, ratio, g, uint8=False)
    mask[:, 0] = True
    mask = mask.float()  # MAE's mask: 1 = removed
    (out, gx), (ref, gr) = fast_and_reference(pred.float(), pred, imgs, mask, 4)
    assert abs(out.item() - ref.item()) <= 1e-6 * abs(ref.item())
    assert (gx.double() - gr).norm() <= 1e-6 * gr.norm()
    # the masked rows only, in mask.nonzero() order
    live = mask.bool()
    xp = pred.float()[live].clone().requires_grad_()
    out_p = masked_patch_loss(xp, imgs, mask, 4)
    (gp,) = torch.autograd.grad(out_p, xp)
    assert torch.equal(out_p, out) and torch.equal(gp, gx[live])


def test_simmim_l1(backend):
    g = torch.Generator().manual_seed(3)
    N, C, H, W, p = 2, 3, 24, 16, 4
    h, w = H // p, W // p
    imgs = torch.rand(N, C, H, W, generator=g, dtype=torch.float64).float()
    mask = torch.rand(N, h, w, generator=g) < 0.6
    rec = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    want = simmim_loss(rec, imgs.double(), mask, p, C)
    pred = patchify(rec, p).float().requires_grad_()
    out = masked_patch_loss(pred, imgs, mask, p, norm_pix=False, loss="l1")
    # SimMIM adds 1e-5 to the masked pixel count: the only difference
    count = mask.sum().item() * p * p
    assert abs(out.item() - want.item() * (count + 1e-5) / count) <= 1e-6 * want.item()


def test_all_and_none_masked(backend):
    g = torch.Generator().manual_seed(5)
    pred, imgs, _ = data(2, 3, 8, 8, 4, 0.5, g)
    x = pred.float().requires_grad_()
    none = torch.zeros(2, 4, dtype=torch.bool)
    out = masked_patch_loss(x, imgs, none, 4)
    (gx,) = torch.autograd.grad(out, x)
    assert out.item() == 0 and torch.all(gx == 0)
    packed = torch.empty(0, 48).requires_grad_()
    assert masked_patch_loss(packed, imgs, none, 4).item() == 0
    full = torch.ones(2, 4, dtype=torch.bool)
    out = masked_patch_loss(x, imgs, full, 4)
    ref = mae_loss(pred, imgs.double(), full.double(), 4)
    assert abs(out.item() - ref.item()) <= 1e-6 * ref.item()


def test_weights_and_strided_images(backend):
    g = torch.Generator().manual_seed(6)
    pred, imgs, _ = data(2, 3, 12, 12, 3, 0.5, g, uint8=False)
    weight = torch.rand(2, 16, generator=g)
    weight[0, :3] = 0
    big = torch.randn(2, 3, 24, 12, generator=g)
    big[:, :, ::2] = imgs  # a strided view of the same values
    x = pred.float()
    a = masked_patch_loss(x, imgs, weight, 3)
    b = masked_patch_loss(x, big[:, :, ::2], weight, 3)
    assert torch.equal(a, b)
    ref = elementwise_loss(pred, imgs.double(), weight.double(), 3, True, "mse", 1.0)
    assert abs(a.item() - ref.item()) <= 1e-6 * ref.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_predictions(backend, dtype):
    """16-bit pred (and images in pred's dtype): as accurate as MAE's eager loss in that
    dtype, both against float64 on the same rounded inputs."""
    g = torch.Generator().manual_seed(7)
    pred, imgs, mask = data(2, 3, 16, 16, 4, 0.75, g, uint8=False, dtype=dtype)
    mask[0, 0] = True
    base = pred.to(dtype)
    x = base.clone().requires_grad_()
    out = masked_patch_loss(x, imgs, mask, 4)
    (gx,) = torch.autograd.grad(out, x)
    assert out.dtype == dtype and gx.dtype == dtype
    r = base.double().requires_grad_()
    ref = mae_loss(r, imgs.double(), mask.double(), 4)
    (gr,) = torch.autograd.grad(ref, r)
    e = base.clone().requires_grad_()
    eager = mae_loss(e, imgs, mask, 4)
    (ge,) = torch.autograd.grad(eager, e)
    u = 2.0 ** -8
    err = lambda a, b: (a.double() - b).norm().item() / b.norm().item()  # noqa: E731
    assert abs(out.double() - ref).item() / ref.item() <= 2 * abs(eager.double() - ref).item() \
        / ref.item() + 4 * u
    assert err(gx, gr) <= 2 * err(ge, gr) + 4 * u


def test_16_bit_predictions_keep_float32_targets(backend):
    """bf16 predictions (a decoder under autocast) with float32 images: the targets are read
    in float32, so the only rounding is the result's (eager autocast code promotes the
    same way)."""
    g = torch.Generator().manual_seed(12)
    pred, imgs, mask = data(2, 3, 16, 16, 4, 0.75, g, uint8=False)
    mask[0, 0] = True
    base = pred.bfloat16()
    (out, gx), (ref, gr) = fast_and_reference(base, base, imgs, mask, 4)
    u = 2.0 ** -8
    assert abs(out.double() - ref).item() <= u * ref.item()
    assert (gx.double() - gr).norm() <= 2 * u * gr.norm()


def test_float32_at_least_as_accurate_as_eager(backend):
    """Against float64 on the same float32 data: fastssl's error <= 2x MAE's eager float32
    error + 4 roundings, value and gradient."""
    u = 2.0 ** -24
    for seed in range(3):
        g = torch.Generator().manual_seed(10 + seed)
        pred, imgs, mask = data(4, 3, 32, 32, 16, 0.75, g, uint8=False)
        mask[0, 0] = True
        base = pred.float()
        res = {}
        for name, fn, dt in (("fast", masked_patch_loss, torch.float32),
                             ("eager", mae_loss, torch.float32), ("ref", mae_loss, torch.float64)):
            x = base.to(dt).requires_grad_()
            v = fn(x, imgs.to(dt), mask if name == "fast" else mask.to(dt), 16)
            res[name] = (v.double(), torch.autograd.grad(v, x)[0].double())
        rv, rg = res["ref"]
        for i, what in enumerate(("value", "grad")):
            ef = (res["fast"][i] - res["ref"][i]).norm() / res["ref"][i].norm()
            ee = (res["eager"][i] - res["ref"][i]).norm() / res["ref"][i].norm()
            assert ef <= 2 * ee + 4 * u, (what, ef.item(), ee.item())


def test_reproducible_and_no_patchified_copy_saved(backend):
    g = torch.Generator().manual_seed(8)
    pred, imgs, mask = data(2, 3, 32, 32, 8, 0.75, g)
    runs = []
    for _ in range(2):
        x = pred.float().requires_grad_()
        out = masked_patch_loss(x, imgs, mask, 8)
        runs.append((out, torch.autograd.grad(out, x)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    # what autograd keeps: pred, the images, the weights (twice: the op's and the sum's),
    # per-patch statistics (R, 2) and a scalar: O(R), never (R x P)
    saved = []
    x = pred.float().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        masked_patch_loss(x, imgs, mask, 8)
    R, P = mask.numel(), 8 * 8 * 3
    floats = [t for t in saved if t.is_floating_point() and t.data_ptr() != x.data_ptr()]
    assert sum(t.numel() for t in floats) <= 5 * R < R * P


def test_second_backward_through_the_same_graph(backend):
    """The portable path hands its kept gradient buffer to the first backward; a second
    backward (retain_graph) recomputes and gives the same gradient."""
    g = torch.Generator().manual_seed(11)
    pred, imgs, mask = data(2, 3, 16, 16, 4, 0.75, g)
    x = pred.float().requires_grad_()
    out = masked_patch_loss(x, imgs, mask, 4)
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(2 * out, x)
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-6, atol=0)


def test_opcheck_and_compile(device):
    g = torch.Generator().manual_seed(9)
    pred, imgs, mask = data(2, 3, 8, 12, 4, 0.5, g)
    rows = pred.float().reshape(-1, 48).to(device).requires_grad_()
    w = mask.reshape(-1).float().to(device)
    prow = torch.arange(w.numel(), device=device)
    torch.library.opcheck(_ops.masked_patch.custom, (rows, imgs.to(device), w, prow, 4, True,
                                                     "mse", 1.0, 1e-6))
    fn = torch.compile(masked_patch_loss, fullgraph=False)
    x = pred.float().to(device).requires_grad_()
    a = fn(x, imgs.to(device), mask.to(device), 4)
    b = masked_patch_loss(x, imgs.to(device), mask.to(device), 4)
    assert torch.allclose(a, b, rtol=1e-6)


def test_meta_shapes():
    pred = torch.empty(2, 6, 48, device="meta", requires_grad=True)
    imgs = torch.empty(2, 3, 8, 12, device="meta", dtype=torch.uint8)
    mask = torch.empty(2, 6, device="meta", dtype=torch.bool)
    out = masked_patch_loss(pred, imgs, mask, 4)
    assert out.shape == () and out.device.type == "meta"
    (gx,) = torch.autograd.grad(out, pred)
    assert gx.shape == pred.shape


def test_bad_arguments():
    imgs = torch.zeros(2, 3, 8, 12, dtype=torch.uint8)
    pred = torch.zeros(2, 6, 48)
    mask = torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not divide"):
        masked_patch_loss(torch.zeros(2, 2, 75), imgs, mask, 5)
    with pytest.raises(ValueError, match="mask must be"):
        masked_patch_loss(pred, imgs, torch.ones(2, 5, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="pred must be"):
        masked_patch_loss(torch.zeros(2, 6, 47), imgs, mask, 4)
    with pytest.raises(ValueError, match="rows but the mask marks"):
        masked_patch_loss(torch.zeros(11, 48), imgs, mask, 4)
    with pytest.raises(ValueError, match="loss"):
        masked_patch_loss(pred, imgs, mask, 4, loss="huber")
    with pytest.raises(ValueError, match="beta"):
        masked_patch_loss(pred, imgs, mask, 4, loss="smooth_l1", beta=0)
    with pytest.raises(ValueError, match="at least 2 values"):
        masked_patch_loss(torch.zeros(2, 96, 1), imgs[:, :1], torch.ones(2, 96), 1)
    with pytest.raises(ValueError, match="finite and >= 0"):
        masked_patch_loss(pred, imgs, -torch.ones(2, 6), 4)
    with pytest.raises(ValueError, match="images must be uint8 or floating"):
        masked_patch_loss(pred, imgs.long(), mask, 4)
    with pytest.raises(ValueError, match="mask must be bool or floating"):
        masked_patch_loss(pred, imgs, mask.long(), 4)
    with pytest.raises(ValueError, match="pred must have a floating dtype"):
        masked_patch_loss(pred.long(), imgs, mask, 4)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        masked_patch_loss(pred, imgs.numpy(), mask, 4)
    with pytest.raises(ValueError, match="images must be"):
        masked_patch_loss(pred, imgs[0], mask, 4)
    with pytest.raises(ValueError, match="patch_size"):
        masked_patch_loss(pred, imgs, mask, 0)
