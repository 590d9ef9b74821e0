"""fastssl's lightly drop-ins against lightly itself (1.6.0): values and gradients at least
as close to float64 as lightly's own, the same state after several steps (banks, centres),
the same exception types on lightly's documented errors.

The precision rule, for float32 inputs: fastssl's relative error against the textbook
formula in float64 (written plainly below, on the same rounded inputs) is at most twice
lightly's, plus ``FLOOR``: four roundings of a float32 result (4 * 2**-24). An output
within a few roundings of float64 is as accurate as float32 can be, and lightly's error can
be zero by chance (a loss that happens to round exactly). For float64 inputs the reference
is itself float64, so only gross errors show: the floor is 1e4 roundings of float64.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as tF

from ._peers import need, rel

lightly = need("lightly")
from lightly.loss import (BarlowTwinsLoss, DINOLoss, IBOTPatchLoss, KoLeoLoss,  # noqa: E402
                          NegativeCosineSimilarity, NTXentLoss, SwaVLoss, VICRegLoss)
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn  # noqa: E402
from lightly.models.modules.memory_bank import MemoryBankModule  # noqa: E402
from lightly.models.utils import update_momentum as lightly_update_momentum  # noqa: E402
from lightly.utils.scheduler import cosine_schedule as lightly_cosine_schedule  # noqa: E402

import fastssl  # noqa: E402

DTYPES = [torch.float32, torch.float64]
FLOOR = {torch.float32: 4 * 2.0 ** -24, torch.float64: 1e4 * 2.0 ** -53}


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


class Sweep:
    """Relative errors against float64 gathered over the steps or draws of one test; the
    precision rule (module docstring) is checked on their root mean square, since a single
    float32 scalar's error is a draw of a few roundings, whose ratio between two libraries
    swings by more than 2 from draw to draw."""

    def __init__(self, dtype):
        self.dtype, self.errors = dtype, {}

    def add(self, what, ours, theirs, ref):
        assert ours.dtype == theirs.dtype, f"{what}: fastssl {ours.dtype}, lightly {theirs.dtype}"
        assert torch.isfinite(ours).all(), f"{what}: fastssl gives non-finite values"
        self.errors.setdefault(what, []).append((rel(ours, ref), rel(theirs, ref)))

    def check(self):
        for what, pairs in self.errors.items():
            e_ours = math.sqrt(sum(a * a for a, _ in pairs) / len(pairs))
            e_theirs = math.sqrt(sum(b * b for _, b in pairs) / len(pairs))
            assert e_ours <= 2 * e_theirs + FLOOR[self.dtype], \
                f"{what}: fastssl is {e_ours:.3g} from float64, lightly {e_theirs:.3g}" + \
                (f" (rms over {len(pairs)})" if len(pairs) > 1 else "")


def as_close(what, ours, theirs, ref, dtype):
    """The precision rule for one output."""
    sweep = Sweep(dtype)
    sweep.add(what, ours, theirs, ref)
    sweep.check()


def run(fn, inputs, wrt):
    """(loss, gradients) of fn(*inputs) with respect to the inputs numbered ``wrt``."""
    leaves = [x.detach().clone().requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, [leaves[i] for i in wrt])


def compare(what, ours_fn, theirs_fn, ref_fn, inputs, dtype, wrt=None, sweep=None):
    """Loss and input gradients (of the inputs numbered ``wrt``, default all) of fastssl and
    lightly against the float64 formula; checked now, or added to ``sweep``."""
    wrt = list(range(len(inputs))) if wrt is None else wrt
    xs = [x.to(dtype) for x in inputs]
    lo, go = run(ours_fn, xs, wrt)
    lt, gt = run(theirs_fn, xs, wrt)
    lr, gr = run(ref_fn, [x.double() for x in xs], wrt)
    own = sweep is None
    sweep = Sweep(dtype) if own else sweep
    sweep.add(f"{what} loss", lo.reshape(()), lt.reshape(()), lr.reshape(()))
    for i, a, b, r in zip(wrt, go, gt, gr):
        sweep.add(f"{what} grad[{i}]", a, b, r)
    if own:
        sweep.check()
    return lo, lt


# ----------------------------------------------------------------------------- references

def ref_nt_xent(a, b, T):
    z = tF.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    logits = z @ z.T / T
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return tF.cross_entropy(logits, (torch.arange(2 * n) + n) % (2 * n))


def ref_bank(a, b, bank, T):
    za, zb = tF.normalize(a, dim=1), tF.normalize(b, dim=1)
    logits = torch.cat([(za * zb).sum(1, keepdim=True), za @ bank.double().T], 1) / T
    return tF.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long))


def ref_barlow(a, b, lam):
    def std(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    c = std(a).T @ std(b) / a.shape[0]
    off = c - torch.diag(torch.diagonal(c))
    return ((1 - torch.diagonal(c)) ** 2).sum() + lam * (off ** 2).sum()


def ref_vicreg(a, b, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    def var(z):
        return torch.relu(1 - torch.sqrt(z.var(0) + eps)).mean()

    def cov(z):
        z = z - z.mean(0)
        c = torch.einsum("b...i,b...j->...ij", z, z) / (z.shape[0] - 1)
        d = c.shape[-1]
        off = c - torch.diag_embed(torch.diagonal(c, dim1=-2, dim2=-1))
        return ((off ** 2).sum((-2, -1)) / d).mean()
    return lam * ((a - b) ** 2).mean() + mu * 0.5 * (var(a) + var(b)) + nu * (cov(a) + cov(b))


def ref_negcos(a, b, dim, eps):
    na = a.norm(dim=dim).clamp_min(eps)
    nb = b.norm(dim=dim).clamp_min(eps)
    return -((a * b).sum(dim) / (na * nb)).mean()


def ref_dino(t, s, c, tau_t, tau_s):
    """t (T, B, K), s (S, B, K): mean over the (teacher u, student v != u) pairs and rows of
    -softmax((t_u - c) / tau_t) . log_softmax(s_v / tau_s)."""
    p = torch.softmax((t - c) / tau_t, -1)
    q = torch.log_softmax(s / tau_s, -1)
    terms = [-(p[u] * q[v]).sum(-1).mean() for u in range(t.shape[0])
             for v in range(s.shape[0]) if u != v]
    return sum(terms) / len(terms)


def ref_ibot(t, s, mask, c, tau_t, tau_s):
    ce = -(torch.softmax((t - c) / tau_t, -1) * torch.log_softmax(s / tau_s, -1)).sum(-1)
    per_image = mask.flatten(1).sum(1).clamp(min=1).double()
    w = (1.0 / per_image)[:, None].expand(mask.shape[0], mask[0].numel())[mask.flatten(1)]
    return (ce * w).sum() / mask.shape[0]


def ref_koleo(x, p, eps):
    z = tF.normalize(x, dim=-1, eps=eps)
    cos = z @ z.T
    cos = cos.masked_fill(torch.eye(x.shape[0], dtype=torch.bool), -2.0)
    nn_ = cos.argmax(1)
    d = ((z - z[nn_] + eps).abs() ** p).sum(-1) ** (1.0 / p)
    return -torch.log(d + eps).mean()


def ref_sinkhorn(out, iterations, eps):
    """SwAV's Sinkhorn-Knopp in float64: Q = exp(out / eps)^T / total, then ``iterations``
    times prototype rows to 1 / K and sample columns to 1 / B; B * Q^T."""
    q = torch.exp(out / eps).T
    q = q / q.sum()
    K, B = q.shape
    for _ in range(iterations):
        q = q / q.sum(1, keepdim=True) / K
        q = q / q.sum(0, keepdim=True) / B
    return (q * B).T


def ref_swav(high, low, queue, temp, iterations, eps):
    crops = list(high) + list(low)
    loss = 0.0
    for i, h in enumerate(high):
        scores = h.detach() if queue is None else torch.cat([h.detach(), queue[i].double()])
        q = ref_sinkhorn(scores, iterations, eps)[:h.shape[0]]
        sub = sum(-(q * torch.log_softmax(crops[v] / temp, 1)).sum(1).mean()
                  for v in range(len(crops)) if v != i)
        loss = loss + sub / (len(crops) - 1)
    return loss / len(high)


# ----------------------------------------------------------------------------- joint embedding

SHAPES = [(1, 3), (2, 1), (5, 7), (33, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0.5, 0.1, 0.02])
@pytest.mark.parametrize("n,D", SHAPES)
def test_nt_xent(n, D, T, dtype):
    a = randn(n, D, seed=n * 131 + D) * torch.exp(randn(n, 1, seed=7))
    b = randn(n, D, seed=n * 131 + D + 1)
    compare("NTXentLoss", fastssl.NTXentLoss(T), NTXentLoss(T),
            lambda x, y: ref_nt_xent(x, y, T), [a, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", [5e-3, 0.1])
@pytest.mark.parametrize("n,D", [(3, 1), (2, 4), (16, 130), (64, 8)])
def test_barlow_twins(n, D, lam, dtype):
    """Two rows standardise to +-1 in every feature, so with one feature the loss is
    (1 - C_11)^2 ~ (eps_bn / var)^2 alone, a difference far below float32's resolution of
    C (both libraries lose every digit there): (2, 4) keeps the off-diagonal terms."""
    a = randn(n, D, seed=n + 10 * D) * torch.exp(randn(1, D, seed=1))
    b = a + 0.5 * randn(n, D, seed=n + 10 * D + 1)
    compare("BarlowTwinsLoss", fastssl.BarlowTwinsLoss(lam), BarlowTwinsLoss(lam),
            lambda x, y: ref_barlow(x, y, lam), [a, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1), (3, 5), (16, 130), (4, 3, 8)])
def test_vicreg(shape, dtype):
    a = randn(*shape, seed=sum(shape)) * torch.exp(randn(shape[-1], seed=2))
    b = a + 0.3 * randn(*shape, seed=sum(shape) + 1)
    compare("VICRegLoss", fastssl.VICRegLoss(), VICRegLoss(), ref_vicreg, [a, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((1, 3), 1), ((5, 7), 1), ((33, 130), -1),
                                       ((3, 4, 5), 0), ((3, 4, 5), 1)])
def test_negative_cosine_similarity(shape, dim, dtype):
    a, b = randn(*shape, seed=len(shape) + dim), randn(*shape, seed=9 + dim)
    compare("NegativeCosineSimilarity", fastssl.NegativeCosineSimilarity(dim),
            NegativeCosineSimilarity(dim), lambda x, y: ref_negcos(x, y, dim, 1e-8), [a, b],
            dtype)


# ----------------------------------------------------------------------------- memory bank

def seeded(cls, seed, *args, **kw):
    torch.manual_seed(seed)
    return cls(*args, **kw)


@pytest.mark.parametrize("K,n,T", [(10, 4, 0.1), (16, 4, 0.5), (7, 3, 0.02)])
def test_nt_xent_memory_bank_over_steps(K, n, T):
    """The same initial bank from the same seed (lightly: randn((K, D)) then normalised),
    then several steps, K not always a multiple of the batch (lightly fills the tail and
    drops the rest of that batch): the same bank and pointer after each step, the loss and
    gradients against the float64 formula on the bank as it was before the step."""
    D = 6
    ours = seeded(fastssl.NTXentLoss, 3, T, memory_bank_size=(K, D))
    theirs = seeded(NTXentLoss, 3, T, memory_bank_size=(K, D))
    same = dict(rtol=2 * 2.0 ** -23, atol=2 * 2.0 ** -24)
    torch.testing.assert_close(ours.bank, theirs.memory_bank.bank, **same)
    sweep = Sweep(torch.float32)
    for step in range(6):
        before = theirs.memory_bank.bank.clone()
        a, b = randn(n, D, seed=100 + step), randn(n, D, seed=200 + step)
        compare("NTXentLoss(memory_bank_size)", ours, theirs,
                lambda x, y: ref_bank(x, y, before, T), [a, b], torch.float32, sweep=sweep)
        assert int(ours.bank_ptr) == int(theirs.memory_bank.bank_ptr), step
        torch.testing.assert_close(ours.bank, theirs.memory_bank.bank, **same)
    sweep.check()


def test_nt_xent_memory_bank_float64():
    """lightly's float32 bank cannot score float64 embeddings (einsum of Double and Float);
    fastssl scores them in float64. It normalises the bank's rows like the embeddings, so
    against float64 the bank is its float32 unit rows normalised again (they move by about
    one float32 rounding: invisible in float32, where the test above follows lightly)."""
    a, b = randn(4, 6, seed=1), randn(4, 6, seed=2)
    theirs = seeded(NTXentLoss, 3, 0.1, memory_bank_size=(10, 6))
    assert isinstance(raised(lambda: theirs(a, b)), RuntimeError)
    ours = seeded(fastssl.NTXentLoss, 3, 0.1, memory_bank_size=(10, 6))
    bank = tF.normalize(ours.bank.double(), dim=1)
    lo, go = run(ours, [a, b], [0, 1])
    lr, gr = run(lambda x, y: ref_bank(x, y, bank, 0.1), [a, b], [0, 1])
    assert lo.dtype == torch.float64
    for x, r in zip([lo] + list(go), [lr] + list(gr)):
        assert rel(x, r) <= FLOOR[torch.float64]


def test_memory_bank_is_not_updated_without_grad():
    ours = seeded(fastssl.NTXentLoss, 5, 0.2, memory_bank_size=(8, 4))
    theirs = seeded(NTXentLoss, 5, 0.2, memory_bank_size=(8, 4))
    a, b = randn(3, 4, seed=1).float(), randn(3, 4, seed=2).float()
    before = ours.bank.clone()
    lo, lt = ours(a, b), theirs(a, b)
    assert torch.equal(ours.bank, before) and int(ours.bank_ptr) == 0
    assert int(theirs.memory_bank.bank_ptr) == 0
    torch.testing.assert_close(lo, lt, rtol=1e-6, atol=0)


def test_moco_queue_against_lightly_memory_bank():
    """fastssl.MoCoQueue is a ring buffer; lightly's MemoryBankModule drops the part of a
    batch past the end. With batches that divide the size the two are the same bank (the
    same seeded start, the same entries after each enqueue); a batch crossing the end
    wraps around in fastssl (documented) where lightly drops it."""
    K, D = 12, 5
    torch.manual_seed(11)
    bank = MemoryBankModule((K, D), feature_dim_first=False)
    torch.manual_seed(11)
    queue = fastssl.MoCoQueue(D, K)
    torch.testing.assert_close(queue.negatives(), bank.bank, rtol=2 * 2.0 ** -23, atol=0)
    for step in range(5):
        keys = tF.normalize(randn(4, D, seed=step).float(), dim=1)
        _, negatives = bank(keys, update=True)
        queue.enqueue(keys)
        torch.testing.assert_close(queue.negatives(), bank.bank, rtol=2 * 2.0 ** -23, atol=0)
    keys = tF.normalize(randn(6, D, seed=9).float(), dim=1)  # at ptr 8: 4 fit, 2 past the end
    bank(keys, update=True)
    queue.enqueue(keys)
    assert torch.equal(bank.bank[8:], keys[:4]) and torch.equal(queue.negatives()[8:], keys[:4])
    assert torch.equal(queue.negatives()[:2], keys[4:])          # fastssl wraps around
    assert not torch.equal(bank.bank[:2], keys[4:])              # lightly drops them


# ----------------------------------------------------------------------------- prototype heads

DINO_CASES = [(3, 4, 0.01, 2, 2), (1, 7, 0.04, 2, 4), (16, 1000, 0.01, 2, 2),
              (8, 4096, 0.04, 2, 3), (5, 257, 0.01, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,tau_t,n_t,n_s", DINO_CASES)
def test_dino_loss_over_steps(B, K, tau_t, n_t, n_s, dtype):
    """Three steps (the centre moves): loss and student gradients against float64 on
    lightly's centre before each step, and the centres of both after it. The teacher's
    scores are a target: fastssl detaches them (lightly passes them a gradient when they
    require one, which a momentum teacher's never do)."""
    ours = fastssl.DINOLoss(K, teacher_temp=tau_t).to(dtype)
    theirs = DINOLoss(K, teacher_temp=tau_t).to(dtype)
    c64 = torch.zeros(K, dtype=torch.float64)
    sweep = Sweep(dtype)
    for step in range(3):
        t = randn(n_t, B, K, seed=step * 7 + K) * 2
        s = randn(n_s, B, K, seed=step * 7 + K + 1) * 2
        c = theirs.center.reshape(-1).detach().double()
        compare(f"DINOLoss step {step}", lambda x, y: ours(list(x), list(y)),
                lambda x, y: theirs(list(x), list(y)),
                lambda x, y: ref_dino(x, y, c, tau_t, 0.1), [t, s], dtype, wrt=[1],
                sweep=sweep)
        c64 = 0.9 * c64 + 0.1 * t.to(dtype).double().mean((0, 1))
        sweep.add("DINOLoss centre", ours.center.reshape(-1), theirs.center.reshape(-1), c64)
    sweep.check()


def test_dino_temperature_schedule_and_update_center():
    """The teacher temperature warms up by epoch as lightly's (linspace over the warmup
    epochs, then teacher_temp); ``update_center`` on a (views, B, K) stack and on a 2-D
    (B, K) tensor gives lightly's centre."""
    K = 6
    kw = dict(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.07,
              warmup_teacher_temp_epochs=5)
    ours, theirs = fastssl.DINOLoss(**kw), DINOLoss(**kw)
    sweep = Sweep(torch.float32)
    for epoch in [0, 2, 4, 5, 9]:
        tau_t = 0.04 + 0.03 * min(epoch / 4, 1.0)
        t, s = randn(2, 3, K, seed=epoch), randn(2, 3, K, seed=epoch + 50)
        c = theirs.center.reshape(-1).detach().double()
        compare("DINOLoss(epoch=...)", lambda x, y: ours(list(x), list(y), epoch=epoch),
                lambda x, y: theirs(list(x), list(y), epoch=epoch),
                lambda x, y: ref_dino(x, y, c, tau_t, 0.1), [t, s], torch.float32, wrt=[1],
                sweep=sweep)
    sweep.check()
    for x in (randn(2, 4, K, seed=1).float(), randn(4, K, seed=2).float()):
        ours.update_center(x)
        theirs.update_center(x)
        torch.testing.assert_close(ours.center.reshape(-1), theirs.center.reshape(-1),
                                   rtol=2 * 2.0 ** -23, atol=2 * 2.0 ** -24,
                                   msg=f"update_center on shape {tuple(x.shape)}")


IBOT_CASES = [(2, 3, 3, 4, 0.01), (3, 4, 5, 1000, 0.01), (1, 2, 2, 7, 0.04), (4, 2, 3, 65, 0.04)]


def ibot_mask(B, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, W, generator=g) < 0.5
    mask[0, 0, 0] = True
    if B > 2:
        mask[-1] = False  # an image with no masked token
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,W,K,tau_t", IBOT_CASES)
def test_ibot_patch_loss_over_steps(B, H, W, K, tau_t, dtype):
    ours = fastssl.IBOTPatchLoss(K, teacher_temp=tau_t).to(dtype)
    theirs = IBOTPatchLoss(K, teacher_temp=tau_t).to(dtype)
    sweep = Sweep(dtype)
    for step in range(3):
        mask = ibot_mask(B, H, W, step)
        M = int(mask.sum())
        t, s = randn(M, K, seed=step + K) * 2, randn(M, K, seed=step + K + 9) * 2
        c = theirs.center.value.reshape(-1).detach().double()
        compare(f"IBOTPatchLoss step {step}", lambda x, y: ours(x, y, mask),
                lambda x, y: theirs(x, y, mask),
                lambda x, y: ref_ibot(x, y, mask, c, tau_t, 0.1), [t, s], dtype, wrt=[1],
                sweep=sweep)
    sweep.check()


def test_ibot_patch_loss_centre_is_lightly_center_module():
    """lightly's ``IBOTPatchLoss.center`` is a ``Center`` module (``.center.value``); code
    that reads it reads fastssl's the same way, with the same value after several steps."""
    K = 9
    ours, theirs = fastssl.IBOTPatchLoss(K), IBOTPatchLoss(K)
    c64 = torch.zeros(1, K, dtype=torch.float64)
    for step in range(3):
        mask = ibot_mask(2, 3, 3, step + 20)
        M = int(mask.sum())
        t, s = randn(M, K, seed=step).float(), randn(M, K, seed=step + 1).float()
        ours(t, s, mask)
        theirs(t, s, mask)
        c64 = 0.9 * c64 + 0.1 * t.double().mean(0, keepdim=True)
        assert ours.center.value.shape == theirs.center.value.shape
        as_close(f"IBOT centre step {step}", ours.center.value, theirs.center.value, c64,
                 torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("n,D", [(1, 8), (2, 3), (7, 16), (64, 32)])
def test_koleo(n, D, p, dtype):
    x = randn(n, D, seed=n * 3 + D)
    z = tF.normalize(x.to(dtype).double(), dim=1)
    cos = (z @ z.T).masked_fill(torch.eye(n, dtype=torch.bool), -2.0)
    zf = tF.normalize(x.to(dtype), dim=1)
    assert torch.equal(cos.argmax(1), (zf @ zf.T).fill_diagonal_(-2).argmax(1)), \
        "inputs with a near-tie of neighbours: choose another seed"
    compare("KoLeoLoss", fastssl.KoLeoLoss(p), KoLeoLoss(p),
            lambda v: ref_koleo(v, p, 1e-8), [x], dtype)


def prototype_scores(n, K, seed, scale=1.0):
    """Cosine scores of unit features against unit prototypes (SwAV's), times ``scale``."""
    f = tF.normalize(randn(n, 16, seed=seed), dim=1)
    w = tF.normalize(randn(K, 16, seed=seed + 1), dim=1)
    return scale * f @ w.T


SWAV_CASES = [(4, 3, 0, None, 0.1), (8, 16, 2, 12, 0.1), (1, 5, 2, None, 0.05),
              (32, 100, 4, 32, 0.1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,n_low,Q,temp", SWAV_CASES)
def test_swav_loss(B, K, n_low, Q, temp, dtype):
    high = [prototype_scores(B, K, seed=i) for i in range(2)]
    low = [prototype_scores(B, K, seed=10 + i) for i in range(n_low)]
    queue = None if Q is None else [prototype_scores(Q, K, seed=20 + i).to(dtype)
                                    for i in range(2)]

    def call(loss):
        return lambda *x: loss(list(x[:2]), list(x[2:]), queue)
    compare("SwaVLoss", call(fastssl.SwaVLoss(temp)), call(SwaVLoss(temp)),
            lambda *x: ref_swav(x[:2], x[2:], queue, temp, 3, 0.05), high + low, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("iterations", [1, 3, 5])
@pytest.mark.parametrize("B,K,eps", [(1, 4, 0.05), (6, 3, 0.05), (64, 300, 0.05), (17, 9, 0.5)])
def test_sinkhorn(B, K, eps, iterations, dtype):
    """lightly's ``sinkhorn(out, iterations, epsilon, gather_distributed)`` on scores."""
    out = prototype_scores(B, K, seed=B + K).to(dtype)
    ours = fastssl.sinkhorn(out, iterations, eps)
    theirs = lightly_sinkhorn(out, iterations, eps)
    as_close("sinkhorn", ours, theirs, ref_sinkhorn(out.double(), iterations, eps), dtype)
    ours = fastssl.sinkhorn(out, iterations=iterations, epsilon=eps, gather_distributed=True)
    theirs = lightly_sinkhorn(out, iterations=iterations, epsilon=eps, gather_distributed=True)
    as_close("sinkhorn(gather_distributed=True) outside a group", ours, theirs,
             ref_sinkhorn(out.double(), iterations, eps), dtype)


def test_sinkhorn_beyond_float32_exp_range():
    """Scores / epsilon past float32's exp range (here 5 + a cosine, over 0.05: about 100 to
    112): lightly's exp overflows to inf and its codes are NaN; fastssl's, shifted by the
    largest score (the factor cancels in the first normalisation), are the float64 codes to
    float32 rounding: the exponent's argument (|x| <= 24 after the shift) rounds to a
    relative error of |x| ulps in the exponential, and each of the 3 iterations divides by
    two sums of at most 8 terms (a few ulps each): 64 ulps bound both."""
    out = (5.0 + prototype_scores(8, 6, seed=3)).float()
    assert out.max() / 0.05 > 89 and (out.max() - out.min()) / 0.05 < 24
    assert torch.isnan(lightly_sinkhorn(out, 3, 0.05)).all()
    ours = fastssl.sinkhorn(out, 3, 0.05)
    ref = ref_sinkhorn(out.double() - out.double().max(), 3, 0.05)
    assert rel(ours, ref) <= 64 * 2.0 ** -24


# ----------------------------------------------------------------------------- EMA

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7),
                                        torch.nn.ReLU(), torch.nn.Linear(7, 3))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [0.5, 0.9, 0.996])
def test_update_momentum(m, dtype):
    """Parameters only (buffers left alone, as lightly's), several steps, the student
    moving in between: against the float64 recurrence, as close as lightly's."""
    torch.manual_seed(0)
    student = Net().to(dtype)
    ema_ours, ema_theirs = copy.deepcopy(student), copy.deepcopy(student)
    ref = [p.detach().double().clone() for p in student.parameters()]
    student(torch.randn(4, 5, dtype=dtype))  # BatchNorm statistics move in the student only
    for step in range(4):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        fastssl.update_momentum(student, ema_ours, m)
        lightly_update_momentum(student, ema_theirs, m)
        ref = [m * r + (1 - m) * p.detach().double() for r, p in zip(ref, student.parameters())]
    for i, (a, b, r) in enumerate(zip(ema_ours.parameters(), ema_theirs.parameters(), ref)):
        as_close(f"update_momentum parameter {i}", a.detach(), b.detach(), r, dtype)
    for a, b in zip(ema_ours.buffers(), ema_theirs.buffers()):
        assert torch.equal(a, b)


def test_cosine_schedule():
    """lightly's values (its numpy cosine and fastssl's math.cos agree to a rounding) and
    its special cases: max_steps <= 1, the last step and beyond, a period."""
    cases = [(s, M, a, b, p) for M in (0, 1, 2, 7, 100) for s in (0, 1, 3, 6, 7, 50, 99, 150)
             for a, b in ((0.996, 1.0), (1.0, 0.0), (-2.0, 3.5)) for p in (None, 1, 4, 33)
             if not (p is None and s > M)]
    for s, M, a, b, p in cases:
        ours = fastssl.cosine_schedule(s, M, a, b, p)
        theirs = lightly_cosine_schedule(s, M, a, b, p)
        assert isinstance(ours, float)
        assert math.isclose(ours, theirs, rel_tol=4 * 2.0 ** -53,
                            abs_tol=4 * 2.0 ** -53 * abs(a - b)), (s, M, a, b, p, ours, theirs)
    with warnings.catch_warnings(record=True) as w_ours:
        warnings.simplefilter("always")
        ours = fastssl.cosine_schedule(12, 10, 0.99, 1.0)
    with warnings.catch_warnings(record=True) as w_theirs:
        warnings.simplefilter("always")
        theirs = lightly_cosine_schedule(12, 10, 0.99, 1.0)
    assert ours == theirs
    assert [w.category for w in w_ours] == [w.category for w in w_theirs] == [RuntimeWarning]


# ----------------------------------------------------------------------------- errors

def raised(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001  (the type is what is compared)
        return e
    return None


def r32(*shape):
    return torch.randn(*shape)


ERRORS = {
    "NTXentLoss temperature 0": lambda L: L.NTXentLoss(temperature=0.0),
    "NTXentLoss temperature 1e-9": lambda L: L.NTXentLoss(temperature=1e-9),
    "NTXentLoss temperature -1e-9": lambda L: L.NTXentLoss(temperature=-1e-9),
    "NTXentLoss bank size negative": lambda L: L.NTXentLoss(memory_bank_size=(-1, 4)),
    "NTXentLoss bank size of 3 numbers": lambda L: L.NTXentLoss(memory_bank_size=(4, 4, 4)),
    "VICRegLoss batch 1": lambda L: L.VICRegLoss()(r32(1, 8), r32(1, 8)),
    "VICRegLoss shapes differ": lambda L: L.VICRegLoss()(r32(4, 8), r32(4, 6)),
    "VICRegLoss batch sizes differ": lambda L: L.VICRegLoss()(r32(4, 8), r32(3, 8)),
    "NTXentLoss shapes differ": lambda L: L.NTXentLoss()(r32(4, 8), r32(4, 6)),
    "BarlowTwinsLoss shapes differ": lambda L: L.BarlowTwinsLoss()(r32(4, 8), r32(4, 6)),
    "NegativeCosineSimilarity shapes differ": lambda L: L.NegativeCosineSimilarity()(
        r32(4, 8), r32(4, 6)),
    "DINOLoss one view": lambda L: L.DINOLoss(5)([r32(3, 5)], [r32(3, 5)]),
    "DINOLoss unknown center_mode": lambda L: L.DINOLoss(5, center_mode="max"),
    "IBOTPatchLoss unknown center_mode": lambda L: L.IBOTPatchLoss(5, center_mode="max"),
    "cosine_schedule negative step": lambda L: L.cosine_schedule(-1, 10, 1.0, 0.0),
    "cosine_schedule negative max_steps": lambda L: L.cosine_schedule(1, -10, 1.0, 0.0),
    "cosine_schedule period 0": lambda L: L.cosine_schedule(1, 10, 1.0, 0.0, 0),
}


class _Lightly:
    """lightly's names in one namespace, as the ERRORS cases call them."""
    NTXentLoss, VICRegLoss, BarlowTwinsLoss = NTXentLoss, VICRegLoss, BarlowTwinsLoss
    NegativeCosineSimilarity, DINOLoss, IBOTPatchLoss = (NegativeCosineSimilarity, DINOLoss,
                                                         IBOTPatchLoss)
    cosine_schedule = staticmethod(lightly_cosine_schedule)


@pytest.mark.parametrize("case", list(ERRORS))
def test_same_exception_types_as_lightly(case):
    """Where lightly raises, fastssl raises an instance of lightly's exception type."""
    theirs = raised(lambda: ERRORS[case](_Lightly))
    assert theirs is not None, f"{case}: lightly raised nothing (the case is wrong)"
    ours = raised(lambda: ERRORS[case](fastssl))
    assert ours is not None, f"{case}: lightly raises {type(theirs).__name__}, fastssl nothing"
    assert isinstance(ours, type(theirs)), \
        f"{case}: lightly raises {type(theirs).__name__}, fastssl {type(ours).__name__}: {ours}"


def test_bank_size_without_dim_is_accepted_on_purpose():
    """lightly 1.6 rejects a bare K > 0 (it cannot guess the width); fastssl takes the width
    from the first batch (documented in NTXentLoss)."""
    assert isinstance(raised(lambda: NTXentLoss(memory_bank_size=8)), ValueError)
    loss = fastssl.NTXentLoss(memory_bank_size=8)
    loss(r32(3, 5).requires_grad_(), r32(3, 5))
    assert loss.bank.shape == (8, 5)


@pytest.mark.parametrize("make", [
    lambda L, flag: L.NTXentLoss(gather_distributed=flag),
    lambda L, flag: L.BarlowTwinsLoss(gather_distributed=flag),
    lambda L, flag: L.VICRegLoss(gather_distributed=flag),
    lambda L, flag: L.SwaVLoss(sinkhorn_gather_distributed=flag),
], ids=["NTXentLoss", "BarlowTwinsLoss", "VICRegLoss", "SwaVLoss"])
def test_gather_distributed_without_torch_distributed(make, monkeypatch):
    """lightly raises ValueError at construction when torch.distributed is not available."""
    lightly_ns = type("L", (), {"NTXentLoss": NTXentLoss, "BarlowTwinsLoss": BarlowTwinsLoss,
                                "VICRegLoss": VICRegLoss, "SwaVLoss": SwaVLoss})
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    theirs = raised(lambda: make(lightly_ns, True))
    assert isinstance(theirs, ValueError)
    ours = raised(lambda: make(fastssl, True))
    assert isinstance(ours, ValueError), f"fastssl raised {ours!r}"
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    make(fastssl, True)
