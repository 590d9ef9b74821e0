"""masked_latent_loss against float64 references written from I-JEPA's and data2vec's losses
(F.layer_norm, F.instance_norm, F.smooth_l1_loss / mse / l1, torch.gather), on both paths
(the Triton kernels interpreted on CPU), with odd shapes, every dtype and every mask form."""
import math

import pytest
import torch
import torch.nn.functional as tF

from fastssl import _ops, _reference, masking
from fastssl.masking import masked_latent_loss

U32 = 2.0 ** -24  # float32 unit roundoff
U16 = 2.0 ** -8   # bfloat16's (float16's is smaller)


# ----------------------------------------------------------------------------- references

def instance_norm(t, eps):
    """Per image and channel over the L tokens (biased variance): F.instance_norm on
    (N, D, L); with one token (which F.instance_norm refuses) the same formula, 0."""
    if t.shape[1] > 1:
        return tF.instance_norm(t.transpose(1, 2), eps=eps).transpose(1, 2)
    mean = t.mean(1, keepdim=True)
    return (t - mean) / (t.var(1, unbiased=False, keepdim=True) + eps).sqrt()


def teacher_targets(layers, layer_norm, inorm, eps):
    """data2vec's target: instance-normalise each layer, average, layer-normalise."""
    ys = [instance_norm(t, eps) if inorm else t for t in layers]
    y = sum(ys) / len(ys)
    return tF.layer_norm(y, y.shape[-1:], eps=eps) if layer_norm else y


def elementwise(p, y, loss, beta):
    if loss == "mse":
        return tF.mse_loss(p, y, reduction="none")
    if loss == "l1":
        return tF.l1_loss(p, y, reduction="none")
    return tF.smooth_l1_loss(p, y, reduction="none", beta=beta)


def reference(pred, layers, mask, loss="smooth_l1", beta=1.0, layer_norm=True,
              instance_norm=False, dim_scale=None, eps=1e-5):
    """The loss in pred's dtype from the textbook formulas (float64 for the reference)."""
    y = teacher_targets([t.to(pred.dtype) for t in layers], layer_norm, instance_norm, eps)
    D = y.shape[-1]
    if mask.dtype == torch.bool:
        target, p = y[mask], (pred[mask] if pred.dim() == 3 else pred)
    else:
        target, p = torch.gather(y, 1, mask[..., None].expand(-1, -1, D)), pred
    ell = elementwise(p, target, loss, beta).sum(-1) / (D if dim_scale is None else dim_scale)
    return ell.mean() if ell.numel() else ell.sum()


def ijepa_eager(pred, h, idx):
    """I-JEPA as written: layer-norm the teacher's output, gather the target blocks,
    smooth-L1 with the element mean."""
    target = masking.get_at_index(tF.layer_norm(h, (h.size(-1),)), idx)
    return tF.smooth_l1_loss(pred, target)


def data2vec_eager(pred, layers, mask):
    """data2vec 2.0 as written: instance-normalise the top layers, average, layer-normalise,
    smooth-L1 summed over D and scaled by 1 / sqrt(D), mean over the masked tokens."""
    y = sum(tF.instance_norm(t.transpose(1, 2)).transpose(1, 2) for t in layers) / len(layers)
    y = tF.layer_norm(y, y.shape[-1:])
    loss = tF.smooth_l1_loss(pred[mask], y[mask], reduction="none").sum(-1)
    return (loss / math.sqrt(pred.size(-1))).mean()


# ----------------------------------------------------------------------------- data

def layers_and_pred(K, N, L, D, g, M=None):
    """K teacher layers (N, L, D) and a prediction, float64 with offsets and scales so that
    the normalisations do something."""
    layers = [torch.randn(N, L, D, generator=g, dtype=torch.float64) * (1 + k) + 0.5 * k
              for k in range(K)]
    pred = torch.randn(N, L if M is None else M, D, generator=g, dtype=torch.float64)
    return layers, pred


def index_mask(N, L, M, g):
    """Target-block indices with repeats (overlapping blocks concatenated)."""
    idx = torch.randint(0, L, (N, M), generator=g)
    if M >= 2:
        idx[:, -1] = idx[:, 0]
    return idx


def form(layers, kind, dtype):
    """The targets argument: 'tensor' (K, N, L, D) (a 3-D tensor for K = 1), 'list' of
    separate tensors, 'views' (a list of views of one tensor)."""
    ts = [t.to(dtype) for t in layers]
    if kind == "list":
        return ts
    stacked = torch.stack(ts)
    if kind == "views":
        return list(stacked.unbind(0))
    return stacked[0] if len(ts) == 1 else stacked


def value_and_grad(fn, x, *args, **kw):
    x = x.clone().requires_grad_()
    out = fn(x, *args, **kw)
    return out, torch.autograd.grad(out, x)[0]


def rel(a, b):
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_against_float64(pred, layers, mask, tol, dtype=torch.float32, tdtype=None, **kw):
    """Value and gradient of the fused loss (pred in ``dtype``, targets in ``tdtype``)
    against the float64 reference on the same rounded inputs."""
    base = pred.to(dtype)
    targets = [t.to(tdtype or dtype) for t in layers]
    out, gx = value_and_grad(masked_latent_loss, base, torch.stack(targets), mask, **kw)
    ref, gr = value_and_grad(reference, base.double(), [t.double() for t in targets], mask,
                             **kw)
    assert out.dtype == dtype and gx.dtype == dtype
    assert torch.isfinite(out) and torch.isfinite(gx).all()
    assert abs(out.double() - ref).item() <= tol * max(abs(ref.item()), 1e-30), (out, ref)
    assert rel(gx, gr) <= tol or gr.norm() == 0 and gx.norm() == 0
    return out, gx


# ----------------------------------------------------------------------------- values, gradients

NORMS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("loss", ["mse", "l1", "smooth_l1"])
@pytest.mark.parametrize("norms", NORMS, ids=lambda n: f"ln{int(n[0])}-in{int(n[1])}")
def test_every_loss_and_normalisation(backend, loss, norms):
    ln, inorm = norms
    g = torch.Generator().manual_seed(len(loss) + 10 * ln + 20 * inorm)
    layers, pred = layers_and_pred(3, 2, 9, 130, g, M=7)
    idx = index_mask(2, 9, 7, g)
    check_against_float64(pred, layers, idx, 1e-6, loss=loss, beta=0.5, layer_norm=ln,
                          instance_norm=inorm, dim_scale=3.0 if loss == "l1" else None)


@pytest.mark.parametrize("kind", ["tensor", "list", "views"])
@pytest.mark.parametrize("K", [1, 3])
def test_layer_forms_agree(backend, kind, K):
    """A (K, N, L, D) tensor (3-D for K = 1), a list of separate layers and a list of views
    of one tensor give the same bits; all match the float64 reference."""
    g = torch.Generator().manual_seed(K)
    layers, pred = layers_and_pred(K, 2, 6, 5, g, M=4)
    idx = index_mask(2, 6, 4, g)
    x = pred.float()
    kw = dict(instance_norm=True, dim_scale=5 ** 0.5)
    out, gx = value_and_grad(masked_latent_loss, x, form(layers, kind, torch.float32), idx, **kw)
    want, gw = value_and_grad(masked_latent_loss, x, form(layers, "tensor", torch.float32),
                              idx, **kw)
    assert torch.equal(out, want) and torch.equal(gx, gw)
    check_against_float64(pred, layers, idx, 1e-6, **kw)


@pytest.mark.parametrize("ratio", [0.1, 0.6, 1.0])
def test_bool_mask_full_and_packed(backend, ratio):
    g = torch.Generator().manual_seed(int(10 * ratio))
    layers, pred = layers_and_pred(2, 3, 11, 40, g)
    mask = torch.rand(3, 11, generator=g) < ratio
    mask[0, 0] = True
    kw = dict(instance_norm=True, dim_scale=40 ** 0.5, beta=2.0)
    out, gx = check_against_float64(pred, layers, mask, 1e-6, **kw)
    assert torch.all(gx[~mask] == 0)
    packed = pred.float()[mask]
    out_p, gp = value_and_grad(masked_latent_loss, packed, form(layers, "list", torch.float32),
                               mask, **kw)
    assert torch.equal(out_p, out) and torch.equal(gp, gx[mask])


SHAPES = [(1, 1, 1), (1, 1, 3), (2, 5, 5), (3, 1, 130), (1, 4, 130), (2, 3, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norms", [(True, True), (False, False)], ids=["ln-in", "plain"])
def test_odd_shapes(backend, shape, norms):
    N, L, D = shape
    g = torch.Generator().manual_seed(N + 3 * L + 7 * D)
    layers, pred = layers_and_pred(2, N, L, D, g, M=3)
    idx = index_mask(N, L, 3, g)
    kw = dict(layer_norm=norms[0], instance_norm=norms[1])
    check_against_float64(pred, layers, idx, 1e-6, **kw)
    full = torch.randn(N, L, D, generator=g, dtype=torch.float64)
    mask = torch.rand(N, L, generator=g) < 0.5
    mask[-1, -1] = True
    check_against_float64(full, layers, mask, 1e-6, loss="mse", **kw)


def test_float64_predictions(backend):
    g = torch.Generator().manual_seed(4)
    layers, pred = layers_and_pred(3, 2, 8, 33, g, M=5)
    idx = index_mask(2, 8, 5, g)
    check_against_float64(pred, layers, idx, 1e-13, dtype=torch.float64, instance_norm=True)


def test_mixed_target_dtypes(backend):
    """The teacher under autocast: bf16 tokens are read as they are (no float copy) and
    the arithmetic stays float32, so the result is float32-accurate on those tokens; so
    are float64 tokens beside float32 predictions, and bf16 ones beside float16."""
    g = torch.Generator().manual_seed(5)
    layers, pred = layers_and_pred(3, 2, 10, 130, g, M=6)
    idx = index_mask(2, 10, 6, g)
    check_against_float64(pred, layers, idx, 1e-6, tdtype=torch.bfloat16, instance_norm=True)
    check_against_float64(pred, layers[:1], idx, 1e-6, tdtype=torch.bfloat16)
    check_against_float64(pred, layers, idx, 1e-6, tdtype=torch.float64, instance_norm=True)
    check_against_float64(pred, layers, idx, 1e-2, dtype=torch.float16, tdtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_predictions(backend, dtype):
    """16-bit pred and targets: as accurate as the eager formulation in that dtype (both
    against float64 on the same rounded inputs), within the result's own rounding (2 u: the
    cast of the float32 result and of its gradient)."""
    g = torch.Generator().manual_seed(6)
    layers, pred = layers_and_pred(1, 3, 14, 64, g, M=12)
    idx = index_mask(3, 14, 12, g)
    base, h = pred.to(dtype), layers[0].to(dtype)
    out, gx = value_and_grad(masked_latent_loss, base, h, idx)
    assert out.dtype == dtype and gx.dtype == dtype
    ref, gr = value_and_grad(ijepa_eager, base.double(), h.double(), idx)
    eager, ge = value_and_grad(ijepa_eager, base, h, idx)
    assert rel(out, ref) <= rel(eager, ref) + 2 * U16
    assert rel(gx, gr) <= rel(ge, gr) + 2 * U16


# ----------------------------------------------------------------------------- edge cases

def test_no_scored_pair_gives_zero_and_a_zero_gradient(backend):
    g = torch.Generator().manual_seed(7)
    layers, pred = layers_and_pred(2, 2, 5, 6, g)
    none = torch.zeros(2, 5, dtype=torch.bool)
    for x, mask in ((pred.float(), none), (torch.empty(0, 6), none),
                    (torch.empty(2, 0, 6), torch.empty(2, 0, dtype=torch.long))):
        out, gx = value_and_grad(masked_latent_loss, x, form(layers, "tensor", torch.float32),
                                 mask, instance_norm=True)
        assert out.item() == 0 and gx.shape == x.shape and torch.all(gx == 0)


def test_all_tokens_scored(backend):
    g = torch.Generator().manual_seed(8)
    layers, pred = layers_and_pred(3, 2, 7, 9, g)
    full = torch.ones(2, 7, dtype=torch.bool)
    check_against_float64(pred, layers, full, 1e-6, instance_norm=True, dim_scale=3.0)
    every = torch.arange(7).repeat(2, 1)  # the same pairs as an index list
    a = masked_latent_loss(pred.float(), form(layers, "tensor", torch.float32), full)
    b = masked_latent_loss(pred.float(), form(layers, "tensor", torch.float32), every)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_strided_targets_and_reproducible(backend):
    """Targets in any strides (a transposed (N, D, L) teacher, every other layer of a
    bigger stack) give the same bits as contiguous ones; two runs are bitwise equal."""
    g = torch.Generator().manual_seed(9)
    layers, pred = layers_and_pred(3, 2, 6, 20, g, M=5)
    idx = index_mask(2, 6, 5, g)
    t = torch.stack(layers).float()
    big = torch.randn(6, 2, 20, 6, generator=g)
    big[::2] = t.transpose(2, 3)
    strided = big[::2].transpose(2, 3)
    assert not strided.is_contiguous()
    runs = [value_and_grad(masked_latent_loss, pred.float(), tt, idx, instance_norm=True)
            for tt in (t, strided, t)]
    for out, gx in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(gx, runs[0][1])


def test_no_gradient_to_the_targets(backend):
    g = torch.Generator().manual_seed(10)
    layers, pred = layers_and_pred(2, 2, 5, 8, g, M=3)
    t = torch.stack(layers).float().requires_grad_()
    x = pred.float().requires_grad_()
    out = masked_latent_loss(x, t, index_mask(2, 5, 3, g), instance_norm=True)
    gx, gt = torch.autograd.grad(out, [x, t], allow_unused=True)
    assert gt is None and gx is not None


def test_second_backward_through_the_same_graph(backend):
    g = torch.Generator().manual_seed(11)
    layers, pred = layers_and_pred(2, 2, 8, 16, g)
    x = pred.float().requires_grad_()
    out = masked_latent_loss(x, layers[0].float(), torch.rand(2, 8, generator=g) < 0.5)
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(2 * out, x)
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-6, atol=0)


def test_a_list_of_views_is_read_in_place():
    t = torch.randn(4, 2, 3, 5, dtype=torch.bfloat16)
    for layers in (list(t), list(t[::2]), list(t.transpose(2, 3).unbind(0))):
        view = masking._stacked(layers)
        assert view.data_ptr() == layers[0].data_ptr()
        assert torch.equal(view, torch.stack(layers))
    separate = [t[0].clone(), t[1].clone()]
    assert torch.equal(masking._stacked(separate), t[:2])


def _peak_bytes(fn):
    """The peak of the CPU memory allocated while ``fn`` runs, over what was allocated
    before: the running sum of the profiler's allocation events (frees are negative)."""
    from torch._C._profiler import _EventType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    sizes = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    level = peak = 0
    for _, size in sorted(sizes):
        level += size
        peak = max(peak, level)
    assert sizes, "the profiler recorded no allocation"
    return peak


def test_portable_path_keeps_no_float_copy_of_the_targets(monkeypatch):
    """bf16 teacher tokens: the portable forward (instance and layer norm) allocates less
    than half of a float32 copy of the targets, or of the gathered (N, M, D) targets: its
    temporaries are chunks of about LATENT_CHUNK values plus O(pairs) bookkeeping."""
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    monkeypatch.setattr(_reference, "LATENT_CHUNK", 2 ** 13)
    g = torch.Generator().manual_seed(12)
    K, N, L, D, M = 4, 8, 32, 256, 160
    t = torch.randn(K, N, L, D, generator=g).bfloat16()
    pred = torch.randn(N, M, D, generator=g)
    idx = index_mask(N, L, M, g)
    masked_latent_loss(pred, t, idx, instance_norm=True)  # warm-up
    peak = _peak_bytes(lambda: masked_latent_loss(pred, t, idx, instance_norm=True))
    assert peak < min(t.numel(), N * M * D) * 4 / 2, peak


# ----------------------------------------------------------------------------- accuracy

def test_float32_at_least_as_accurate_as_eager(backend):
    """Against float64 on the same float32 data, I-JEPA's and data2vec's recipes: the fused
    error <= the eager float32 formulation's + 4 u, value and gradient. The margin: both
    round the result to float32 (up to u / 2 each way) and form the normalised targets with
    a few roundings per element (mean, difference, rstd product), each within u of the exact
    target, but in a different order, so one may be ~2 u luckier on a given draw; 4 u covers
    the cast and that difference (measured: both ~1e-7 here)."""
    for seed in range(2):
        g = torch.Generator().manual_seed(20 + seed)
        layers, pred = layers_and_pred(1, 3, 49, 384, g, M=24)
        idx = index_mask(3, 49, 24, g)
        h = layers[0].float()
        fast = value_and_grad(masked_latent_loss, pred.float(), h, idx)
        eager = value_and_grad(ijepa_eager, pred.float(), h, idx)
        ref = value_and_grad(ijepa_eager, pred.float().double(), h.double(), idx)
        layers, full = layers_and_pred(3, 2, 49, 384, g)
        mask = torch.rand(2, 49, generator=g) < 0.6
        ts = [t.float() for t in layers]
        kw = dict(instance_norm=True, dim_scale=384 ** 0.5)
        fast2 = value_and_grad(masked_latent_loss, full.float(), ts, mask, **kw)
        eager2 = value_and_grad(data2vec_eager, full.float(), ts, mask)
        ref2 = value_and_grad(data2vec_eager, full.float().double(), [t.double() for t in ts],
                              mask)
        for f, e, r in ((fast, eager, ref), (fast2, eager2, ref2)):
            for i, what in enumerate(("value", "grad")):
                ef, ee = rel(f[i], r[i]), rel(e[i], r[i])
                assert ef <= ee + 4 * U32, (what, ef, ee)


# ----------------------------------------------------------------------------- tracing

def test_opcheck_and_compile(device):
    g = torch.Generator().manual_seed(13)
    layers, pred = layers_and_pred(2, 2, 6, 10, g, M=4)
    t = torch.stack(layers).float().to(device)
    idx = index_mask(2, 6, 4, g).to(device)
    rows = pred.float().reshape(8, 10).to(device).requires_grad_()
    w = torch.ones(8, device=device)
    prow = torch.arange(8, device=device)
    trow = (torch.arange(2, device=device)[:, None] * 6 + idx).reshape(8)
    for ln, inorm in ((True, True), (False, False)):
        args = (rows, t, w, prow, trow, "smooth_l1", 1.0, ln, inorm, 10.0, 1e-5)
        torch.library.opcheck(_ops.masked_latent.custom, args)
        _, stats, istats = _ops.masked_latent.custom(*args)
        torch.library.opcheck(_ops.masked_latent_backward.custom, (
            rows.detach(), t, w, prow, trow, "smooth_l1", 1.0, ln, inorm, 10.0, stats, istats,
            torch.rand(8, generator=g).to(device)))
    fn = torch.compile(masked_latent_loss, fullgraph=True, backend="aot_eager")
    x = pred.float().to(device).requires_grad_()
    a, ga = value_and_grad(fn, x, t, idx, instance_norm=True)
    b, gb = value_and_grad(masked_latent_loss, x, t, idx, instance_norm=True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=0)
    mask = (torch.rand(2, 6, generator=g) < 0.5).to(device)
    full = torch.randn(2, 6, 10, generator=g).to(device)
    a = fn(full, list(t), mask, loss="mse")
    torch.testing.assert_close(a, masked_latent_loss(full, t, mask, loss="mse"), rtol=1e-6,
                               atol=0)


def test_meta_shapes():
    pred = torch.empty(2, 4, 8, device="meta", requires_grad=True)
    t = torch.empty(3, 2, 6, 8, device="meta", dtype=torch.bfloat16)
    idx = torch.empty(2, 4, device="meta", dtype=torch.long)
    out = masked_latent_loss(pred, t, idx, instance_norm=True)
    assert out.shape == () and out.device.type == "meta"
    (gx,) = torch.autograd.grad(out, pred)
    assert gx.shape == pred.shape and gx.device.type == "meta"


# ----------------------------------------------------------------------------- bad arguments

def test_bad_arguments():
    t = torch.randn(2, 6, 8)
    pred = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    idx = torch.tensor([[0, 5], [1, 2]])
    f = masked_latent_loss
    cases = [
        (ValueError, "at least one layer", lambda: f(pred, [], mask)),
        (ValueError, "at least one layer", lambda: f(pred, torch.randn(0, 2, 6, 8), mask)),
        (ValueError, "targets must be", lambda: f(pred, torch.randn(6, 8), mask)),
        (ValueError, r"targets\[1\] must be \(N, L, D\)",
         lambda: f(pred, [t, torch.randn(2, 6, 7)], mask)),
        (ValueError, "targets must have a floating dtype", lambda: f(pred, t.long(), mask)),
        (ValueError, r"targets\[0\] must have a floating", lambda: f(pred, [t.long()], mask)),
        (TypeError, "targets must be a torch.Tensor", lambda: f(pred, t.numpy(), mask)),
        (ValueError, "pred must have a floating dtype", lambda: f(pred.long(), t, mask)),
        (ValueError, "pred must be", lambda: f(torch.randn(2, 6, 7), t, mask)),
        (ValueError, r"pred must be \(N, M, D\)", lambda: f(pred, t, idx)),
        (ValueError, "rows but the mask marks", lambda: f(torch.randn(11, 8), t, mask)),
        (ValueError, "mask must be", lambda: f(pred, t, torch.ones(2, 5, dtype=torch.bool))),
        (ValueError, "mask must be", lambda: f(pred, t, torch.ones(3, 6, dtype=torch.long))),
        (ValueError, "mask must be bool", lambda: f(pred, t, mask.float())),
        (ValueError, r"indices must lie in \[0, L\)",
         lambda: f(torch.randn(2, 2, 8), t, torch.tensor([[0, 6], [1, 2]]))),
        (ValueError, r"indices must lie in \[0, L\)",
         lambda: f(torch.randn(2, 2, 8), t, torch.tensor([[0, -1], [1, 2]]))),
        (ValueError, "loss", lambda: f(pred, t, mask, loss="huber")),
        (ValueError, "beta", lambda: f(pred, t, mask, beta=0)),
        (ValueError, "eps", lambda: f(pred, t, mask, eps=-1e-5)),
        (ValueError, "dim_scale", lambda: f(pred, t, mask, dim_scale=0.0)),
        (TypeError, "dim_scale", lambda: f(pred, t, mask, dim_scale="D")),
        (TypeError, "layer_norm", lambda: f(pred, t, mask, layer_norm="yes")),
        (ValueError, "L >= 1", lambda: f(torch.randn(2, 0, 8), torch.randn(2, 0, 8),
                                         torch.ones(2, 0, dtype=torch.bool),
                                         instance_norm=True)),
        (ValueError, "D >= 1", lambda: f(torch.randn(2, 6, 0), torch.randn(2, 6, 0), mask)),
        (ValueError, "is on meta", lambda: f(pred, t.to("meta"), mask)),
        (ValueError, "mask is on meta", lambda: f(pred, t, mask.to("meta"))),
    ]
    for err, match, call in cases:
        with pytest.raises(err, match=match):
            call()
