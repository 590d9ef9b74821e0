"""SIGReg, LeJEPA and VISReg (fastssl.losses.sketch) against float64 formulas written out
here with the full (N x M x K) characteristic-function tensor and explicit sorts: the
characteristic-function sums on both paths (odd shapes, large arguments), the losses on
every dtype, with 2-D and 4-D inputs, 1 sample, D = 1 and 257, seeded directions equal to
a seeded draw, the custom op under opcheck and torch.compile, lightly's errors, and two
gloo ranks against one process on the global batch."""
import pytest
import torch

from fastssl import _ops
from fastssl._checks import ShapeError
from fastssl.losses import sketch
import _gloo
from test_multipositive import assert_as_close_as_eager

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def _unit(a):
    return a / a.norm(dim=0)


def ref_sums(x, t):
    """cos and sin sums over the samples of (V, N, M) at knots t: the full tensor."""
    xt = x.unsqueeze(-1) * t.to(x.dtype)
    return xt.cos().sum(1), xt.sin().sum(1)


def ref_sigreg(proj, a, knots=17, t_max=3.0):
    """The SIGReg statistic of proj (..., N, D) on directions a (D, M), in proj's dtype."""
    dt = proj.dtype
    t = torch.linspace(0, t_max, knots, dtype=torch.float64, device=proj.device)
    w = torch.full((knots,), 2 * t_max / (knots - 1), dtype=torch.float64, device=proj.device)
    w[[0, -1]] = t_max / (knots - 1)
    phi = torch.exp(-t ** 2 / 2)
    n = proj.shape[-2]
    x = (proj @ a.to(dt)).unsqueeze(-1) * t.to(dt)
    err = (x.cos().mean(-3) - phi.to(dt)) ** 2 + x.sin().mean(-3) ** 2
    return ((err * (w * phi).to(dt)).sum(-1) * n).mean()


def fixed(module, a):
    """``module`` drawing the directions ``a`` instead of random ones."""
    module._generate_unit_vectors = lambda device, dtype, num_features: a
    return module


# ----------------------------------------------------------------------------- the sums

@pytest.mark.parametrize("V,N,M,K", [(1, 1, 1, 2), (2, 37, 5, 17), (3, 70, 33, 4)])
def test_ecf_sums_and_gradient_as_close_as_eager(backend, device, V, N, M, K):
    x = _randn(V, N, M, seed=V * 100 + N + M, scale=3.0).to(device)
    t = torch.linspace(0, 3.0, K, dtype=torch.float64, device=device)
    gc, gs = _randn(V, M, K, seed=1).to(device), _randn(V, M, K, seed=2).to(device)

    def fused(x):
        c, s = _ops.ecf_sums(x.float() if x.dtype != torch.float64 else x, t.to(x.dtype))
        return (c.double() * gc).sum() + (s.double() * gs).sum()

    def formula(x):
        c, s = ref_sums(x, t.to(x.dtype))
        return (c.double() * gc).sum() + (s.double() * gs).sum()

    assert_as_close_as_eager(fused, formula, [x])
    c, s = _ops.ecf_sums(x, t)  # float64 stays float64
    rc, rs = ref_sums(x, t)
    assert c.dtype == torch.float64
    assert torch.allclose(c, rc, rtol=1e-12, atol=1e-12) and torch.allclose(s, rs, atol=1e-12)


def test_ecf_sums_at_large_arguments(backend, device):
    """|t x| up to ~300: the kernel's cos/sin reduce their arguments as torch's do."""
    x = _randn(1, 50, 7, seed=5, scale=100.0).to(device)
    t = torch.linspace(0, 3.0, 17, dtype=torch.float64, device=device)
    want = ref_sums(x, t)
    eager = ref_sums(x.float(), t.float())
    got = _ops.ecf_sums(x.float(), t.float())
    for g, e, w in zip(got, eager, want):
        assert float((g.double() - w).norm()) <= 2 * float((e.double() - w).norm()) + 1e-5


def test_ecf_sums_opcheck_and_compile():
    x = _randn(2, 9, 4, seed=0).float().requires_grad_()
    t = torch.linspace(0, 3.0, 5)
    torch.library.opcheck(_ops.ecf_sums.custom, (x, t))
    a = _unit(_randn(6, 8, seed=3)).float()
    proj = _randn(3, 10, 6, seed=4).float().requires_grad_()
    loss = fixed(sketch.SIGReg(num_vectors=8), a)
    eager = loss(proj)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(proj)
    assert torch.allclose(eager, compiled, rtol=1e-6, atol=1e-7)
    g1, = torch.autograd.grad(eager, proj)
    g2, = torch.autograd.grad(compiled, proj)
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- SIGReg

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,M,knots,t_max", [((1, 4), 3, 2, 1.0), ((40, 1), 8, 17, 3.0),
                                                 ((3, 33, 257), 16, 17, 3.0),
                                                 ((2, 2, 20, 7), 64, 5, 1.5)])
def test_sigreg_as_close_as_eager(backend, device, dtype, shape, M, knots, t_max):
    proj = _randn(*shape, seed=sum(shape) + M).to(device)
    a = _unit(_randn(shape[-1], M, seed=M)).to(device)
    loss = fixed(sketch.SIGReg(knots=knots, t_max=t_max, num_vectors=M), a)
    assert_as_close_as_eager(loss, lambda p: ref_sigreg(p, a, knots, t_max), [proj], dtype)


def test_sigreg_float64_and_seeded_directions():
    proj = _randn(2, 30, 9, seed=1)
    torch.manual_seed(7)
    got = sketch.SIGReg(num_vectors=20)(proj)
    torch.manual_seed(7)
    a = _unit(torch.randn(9, 20, dtype=torch.float64))
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref_sigreg(proj, a), rtol=1e-12)
    for dtype in DTYPES:  # drawn in the input dtype, as lightly draws them
        torch.manual_seed(7)
        a = _unit(torch.randn(9, 20, dtype=dtype).double())
        torch.manual_seed(7)
        got = sketch.SIGReg(num_vectors=20)(proj.to(dtype))
        assert got.dtype == torch.float32  # promoted with the float32 buffers, as lightly
        want = ref_sigreg(proj.to(dtype).double(), a)
        assert abs(float(got) - float(want)) <= 1e-5 * float(want)


def test_sigreg_is_small_for_gaussian_samples_and_large_for_collapse():
    torch.manual_seed(0)
    gaussian = sketch.SIGReg()(torch.randn(2048, 32))
    collapsed = sketch.SIGReg()(torch.zeros(2048, 32) + 0.01 * torch.randn(2048, 32))
    assert gaussian < 2.0 and collapsed > 100 * gaussian


def test_sigreg_errors():
    for kw in ({"knots": 1}, {"t_max": 0.0}, {"num_vectors": 0}):
        with pytest.raises(ValueError):
            sketch.SIGReg(**kw)
    with pytest.raises(TypeError):
        sketch.SIGReg(knots=2.5)
    loss = sketch.SIGReg(num_vectors=4)
    with pytest.raises(ShapeError):
        loss(torch.randn(5))
    with pytest.raises(ShapeError):
        loss(torch.randn(0, 5))
    with pytest.raises(ValueError):
        loss(torch.arange(10).reshape(5, 2))


# ----------------------------------------------------------------------------- LeJEPA

def ref_lejepa(local, glob, a, lam):
    all_proj = torch.cat([glob, local])
    inv = (glob.mean(0) - all_proj).square().mean()
    return lam * ref_sigreg(all_proj, a) + (1 - lam) * inv


@pytest.mark.parametrize("dtype", DTYPES)
def test_lejepa_as_close_as_eager(backend, dtype):
    local, glob = _randn(4, 21, 11, seed=1), _randn(2, 21, 11, seed=2)
    a = _unit(_randn(11, 32, seed=3))
    loss = sketch.LeJEPALoss(0.3, sigreg_num_vectors=32)
    fixed(loss.sigreg, a)
    assert_as_close_as_eager(lambda x, y: loss(local_proj=x, global_proj=y),
                             lambda x, y: ref_lejepa(x, y, a, 0.3), [local, glob], dtype)


def test_lejepa_errors_and_extremes():
    with pytest.raises(ValueError):
        sketch.LeJEPALoss(lambda_param=1.1)
    loss = sketch.LeJEPALoss()
    good = torch.randn(2, 8, 4)
    for local, glob in ((torch.randn(8, 4), good), (good, torch.randn(8, 4)),
                        (torch.randn(2, 7, 4), good), (torch.randn(2, 8, 3), good),
                        (torch.randn(0, 8, 4), good), (good, torch.randn(0, 8, 4))):
        with pytest.raises(ValueError):
            loss(local_proj=local, global_proj=glob)
    local, glob = torch.randn(3, 8, 4), torch.randn(2, 8, 4)
    inv = sketch.lejepa_invariance_loss(all_proj=torch.cat([glob, local]), global_proj=glob)
    assert torch.equal(sketch.LeJEPALoss(0.0)(local_proj=local, global_proj=glob), inv)
    torch.manual_seed(3)
    one = sketch.LeJEPALoss(1.0)(local_proj=local, global_proj=glob)
    torch.manual_seed(3)
    assert torch.equal(one, sketch.SIGReg()(torch.cat([glob, local])))


# ----------------------------------------------------------------------------- LeWM

def ref_distance(p, t, distance="l2", normalize=False):
    if normalize:
        p, t = (torch.nn.functional.layer_norm(x, (x.shape[-1],)) for x in (p, t))
    d = p - t.detach()
    return d.abs().mean() if distance == "l1" else d.square().mean()


def ref_lewm(pred, emb, a, lam=0.1, normalize=False):
    return ref_distance(pred, emb[:, 1:], normalize=normalize) + \
        lam * ref_sigreg(emb.transpose(0, 1), a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_lewm_as_close_as_eager(backend, dtype, normalize):
    emb, pred = _randn(7, 5, 9, seed=1), _randn(7, 4, 9, seed=2)
    a = _unit(_randn(9, 32, seed=3))
    loss = sketch.LeWMLoss(0.3, normalize, sigreg_num_vectors=32)
    fixed(loss.sigreg, a)
    # the target (emb[:, 1:]) is detached: emb's gradient is SIGReg's alone
    assert_as_close_as_eager(
        lambda p, e: loss(predicted=p, target=e[:, 1:], embeddings=e),
        lambda p, e: ref_lewm(p, e, a, 0.3, normalize), [pred, emb], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distance,normalize", [("l1", False), ("l1", True), ("l2", True)])
def test_latent_distance_as_close_as_eager(dtype, distance, normalize):
    p, t = _randn(3, 4, 257, seed=4), _randn(3, 4, 257, seed=5)
    assert_as_close_as_eager(
        lambda x, y: sketch.latent_distance(predicted=x, target=y, distance=distance,
                                            normalize=normalize),
        lambda x, y: ref_distance(x, y, distance, normalize), [p, t], dtype)


def test_lewm_errors():
    with pytest.raises(ValueError):
        sketch.LeWMLoss(lambda_param=-0.1)
    with pytest.raises(ValueError):
        sketch.latent_distance(predicted=torch.randn(2, 3), target=torch.randn(2, 3),
                               distance="cos")
    with pytest.raises(ValueError):
        sketch.latent_distance(predicted=torch.randn(2, 3), target=torch.randn(2, 4))
    loss = sketch.LeWMLoss()
    for pred, emb in ((torch.randn(4, 2, 5), torch.randn(4, 5)),
                      (torch.randn(3, 2, 5), torch.randn(4, 3, 5)),
                      (torch.randn(4, 2, 6), torch.randn(4, 3, 5))):
        with pytest.raises(ValueError):
            loss(predicted=pred, target=pred.detach(), embeddings=emb)


# ----------------------------------------------------------------------------- VISReg

def ref_shape(z, slices, eps=1e-4):
    n = z.shape[-2]
    std = z.std(dim=-2, unbiased=False, keepdim=True)
    zn = (z - z.mean(dim=-2, keepdim=True)) / (std.detach() + eps)
    q = torch.special.ndtri(torch.arange(1, n + 1, dtype=torch.float64) / (n + 1))
    p = (zn @ slices.to(z.dtype)).sort(dim=-2).values
    return (p - q.to(z.dtype)[:, None]).square().mean()


def ref_visreg(local, glob, slices, lam=0.9, ls=1.0, lsh=1.0, lc=1.0):
    proj = torch.cat([glob, local])
    pred = (glob.mean(0) - proj).square().mean()
    scale = (1 - proj.std(dim=-2, unbiased=False)).square().mean()
    center = proj.mean(dim=-2).square().mean()
    return (1 - lam) * pred + lam * (ls * scale + lsh * ref_shape(proj, slices) + lc * center)


def seeded(fn, seed):
    def call(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return call


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,S", [((2, 1), 3), ((33, 257), 40), ((3, 50, 6), 700)])
def test_visreg_shape_loss_as_close_as_eager(dtype, shape, S, monkeypatch):
    monkeypatch.setattr(sketch, "CHUNK", 64)  # several slice chunks at test sizes
    z = _randn(*shape, seed=S)
    torch.manual_seed(9)
    slices = _unit(torch.randn(shape[-1], S, dtype=dtype).double())
    assert_as_close_as_eager(seeded(lambda x: sketch.visreg_shape_loss(x, S), 9),
                             lambda x: ref_shape(x, slices), [z], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_visreg_loss_as_close_as_eager(dtype):
    local, glob = _randn(3, 17, 5, seed=1), _randn(2, 17, 5, seed=2)
    loss = sketch.VISRegLoss(lambda_param=0.6, num_slices=50, lambda_scale=0.5,
                             lambda_shape=2.0, lambda_center=1.5)
    torch.manual_seed(4)
    slices = _unit(torch.randn(5, 50, dtype=dtype).double())
    assert_as_close_as_eager(seeded(lambda x, y: loss(local_proj=x, global_proj=y), 4),
                             lambda x, y: ref_visreg(x, y, slices, 0.6, 0.5, 2.0, 1.5),
                             [local, glob], dtype)
    x, y = local.to(dtype), glob.to(dtype)
    parts = loss.forward_components(local_proj=x, global_proj=y)
    assert parts.total.dtype == dtype
    reg = 0.5 * parts.scale + 2.0 * parts.shape + 1.5 * parts.center
    assert torch.allclose(parts.total.double(), (0.4 * parts.pred + 0.6 * reg).double(),
                          rtol=4 * torch.finfo(dtype).eps)


def test_visreg_terms_and_errors():
    z = torch.randn(64, 8)
    assert sketch.visreg_center_loss(z - z.mean(0)) < 1e-12
    assert torch.allclose(sketch.visreg_scale_loss(torch.zeros(5, 3)), torch.tensor(1.0))
    collapsed = torch.ones(10, 4, requires_grad=True)
    sketch.visreg_shape_loss(collapsed, 16).backward()
    assert torch.isfinite(collapsed.grad).all()
    for kw in ({"lambda_param": -0.1}, {"num_slices": 0}, {"eps": 0.0}, {"lambda_scale": -1},
               {"lambda_shape": -1}, {"lambda_center": -1}):
        with pytest.raises(ValueError):
            sketch.VISRegLoss(**kw)
    with pytest.raises(ValueError):
        sketch.visreg_shape_loss(z, 0)
    with pytest.raises(ValueError):
        sketch.visreg_shape_loss(z, 4, eps=0)
    loss = sketch.VISRegLoss()
    with pytest.raises(ValueError):  # one sample: no spread to standardise
        loss(local_proj=torch.randn(2, 1, 4), global_proj=torch.randn(2, 1, 4))
    with pytest.raises(ValueError):
        loss(local_proj=torch.randn(2, 8, 4), global_proj=torch.randn(2, 8, 5))


# ----------------------------------------------------------------------------- 2 ranks

ROWS = (6, 4)  # SIGReg: unequal ranks; LeJEPA and VISReg use 5 and 5


def _batch():
    return _randn(3, 10, 6, seed=11).float(), _randn(2, 10, 6, seed=12).float()


def _rank_worker(rank, world):
    local, glob = _batch()
    out = {}
    lo = sum(ROWS[:rank])
    x = local[:, lo:lo + ROWS[rank]].clone().requires_grad_()
    torch.manual_seed(3 + rank)  # rank 0's directions are broadcast
    if rank == 0:
        torch.manual_seed(3)
    out["sig"] = sketch.SIGReg(num_vectors=16, gather_distributed=True)(x)
    out["dsig"], = torch.autograd.grad(out["sig"], x)
    half = slice(5 * rank, 5 * rank + 5)
    for name, cls, seed in (("lejepa", sketch.LeJEPALoss(0.4, True, sigreg_num_vectors=16),
                             5), ("visreg", sketch.VISRegLoss(0.7, 32, gather_distributed=True), 6)):
        x = local[:, half].clone().requires_grad_()
        y = glob[:, half].clone().requires_grad_()
        torch.manual_seed(seed)
        out[name] = cls(local_proj=x, global_proj=y)
        out["d" + name] = torch.autograd.grad(out[name], (x, y))
    try:  # rank 1's feature width differs: every rank must raise, none must hang
        sketch.SIGReg(num_vectors=4, gather_distributed=True)(torch.randn(5, 4 + rank))
        out["error"] = None
    except Exception as e:
        out["error"] = (type(e).__name__, str(e))
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _one_process():
    local, glob = _batch()
    x = local.clone().requires_grad_()
    torch.manual_seed(3)
    sig = sketch.SIGReg(num_vectors=16)(x)
    out = {"sig": sig, "dsig": torch.autograd.grad(sig, x)[0]}
    for name, cls, seed in (("lejepa", sketch.LeJEPALoss(0.4, sigreg_num_vectors=16), 5),
                            ("visreg", sketch.VISRegLoss(0.7, 32), 6)):
        x, y = local.clone().requires_grad_(), glob.clone().requires_grad_()
        torch.manual_seed(seed)
        out[name] = cls(local_proj=x, global_proj=y)
        out["d" + name] = torch.autograd.grad(out[name], (x, y))
    return out


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    """SIGReg on ranks of 6 and 4 samples is the one-process loss on all 10, on every rank;
    LeJEPA and VISReg (the regularisers on the global batch, the invariance term local):
    the mean of the ranks' losses is the one-process loss. Each rank's input gradient is
    world_size x the global gradient of its slice (the convention of fastssl.distributed)."""
    res = _gloo.run(_rank_worker, 2, timeout=120)
    ref = _one_process()
    for r in res:
        assert torch.allclose(r["sig"], ref["sig"], rtol=1e-5)
    got = torch.cat([res[0]["dsig"], res[1]["dsig"]], dim=1)
    assert torch.allclose(got, 2 * ref["dsig"], rtol=1e-4, atol=1e-7)
    for name in ("lejepa", "visreg"):
        assert torch.allclose((res[0][name] + res[1][name]) / 2, ref[name], rtol=1e-5)
        for k in range(2):
            got = torch.cat([res[0]["d" + name][k], res[1]["d" + name][k]], dim=1)
            assert torch.allclose(got, 2 * ref["d" + name][k], rtol=1e-4, atol=1e-7), name
    for r in res:
        assert r["error"][0] == "ShapeError" and "rank 1" in r["error"][1], r["error"]
