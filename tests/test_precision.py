"""Precision sweep: for every loss, fastssl's error against float64 is at most twice the error
of the eager formulation it replaces (the code the incumbent runs, in the input dtype), plus a
floor of a few roundings, for the value and for every input gradient, on both paths.

Each family below has one ``eager`` function: the formula as lightly / open_clip / DINOv2
write it, run once in the input dtype (the incumbent's error) and once on the same inputs
cast to float64 (the reference). Errors are ||out - ref|| / ||ref|| (absolute where the
reference is zero). Inputs are fresh random tensors per case: rows 1, 2, 3, 65; widths 1, 4,
130 (1,000 on the portable path); temperatures 0.01, 0.04, 0.1, 0.5; logits scaled up where
the loss takes logits.

The floor: a result rounded once to float32 carries up to u = 2^-24 = 6e-8 relative error,
and a sum evaluated in another order than the eager one (tiles, chunks, a fused pass) may
differ from it by a few u even when both are as accurate as the arithmetic allows; where the
eager result happens to land within one u of float64, "twice its error" alone would demand
less than one rounding. FLOOR[float32] = 4u = 2.4e-7 admits those few roundings and nothing
that grows with the temperature or the width (the defects this sweep guards against were
1e-6 to 1e-4). For bfloat16 the outputs themselves are rounded to bfloat16: 4u = 2^-6.
Run as a script (``python tests/test_precision.py``) it prints the worst case per family.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as tF

import fastssl
from fastssl import prototype as PR

U = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}
FLOOR = {dt: 4 * u for dt, u in U.items()}
TEMPS = (0.01, 0.04, 0.1, 0.5)
ROWS = (1, 2, 3, 65)
WIDTHS = (1, 4, 130)


def cases(rows=ROWS, widths=WIDTHS, big=1000, backend="torch", min_rows=1):
    """(rows, width, temperature) covering every rows x width pair (temperatures in turn)
    and every temperature at the widest interpreter shape; width ``big`` on the portable
    path only (the interpreter is slow)."""
    rows = [r for r in rows if r >= min_rows]
    if backend != "torch":  # the interpreter: fewer, still tiny, odd and 65-row cases
        rows = [r for r in rows if r != 2] or rows
    out = [(r, w, TEMPS[i % len(TEMPS)])
           for i, (r, w) in enumerate(itertools.product(rows, widths))]
    out += [(rows[-1], widths[-1], t) for t in TEMPS if (rows[-1], widths[-1], t) not in out]
    if backend == "torch" and big:
        out += [(rows[-1], big, t) for t in (TEMPS[0], TEMPS[-1])]
    return out


def err(x, ref):
    """Relative error (absolute where ref is zero); inf where x is not finite."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    d = (x - ref).norm().item()
    r = ref.norm().item()
    return d / r if r > 0 else d


def run(fn, inputs, grad_on, dtype):
    """fn's value and the gradients of the inputs named in grad_on, inputs cast to dtype."""
    xs = [x.to(dtype).requires_grad_(i in grad_on) if torch.is_tensor(x) else x
          for i, x in enumerate(inputs)]
    out = fn(*xs)
    want = [xs[i] for i in grad_on]
    grads = torch.autograd.grad(out, want, allow_unused=True) if want else []
    return out.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, want)]


def compare(fast, eager, inputs, grad_on, dtype, label, table, floor, condition=None):
    """Errors of fastssl and of the eager code against float64; appends the failures. With
    ``condition`` (the family's condition numbers of its outputs, see CONDITION) the floor
    of an output is at least CONDITIONED roundings of its terms' magnitude."""
    base = [x.to(dtype) if torch.is_tensor(x) else x for x in inputs]  # the given data
    ref = run(eager, base, grad_on, torch.float64)
    e = run(eager, base, grad_on, dtype)
    f = run(fast, base, grad_on, dtype)
    kappa = [1.0] * (1 + len(grad_on)) if condition is None else condition(
        *[x.double() if torch.is_tensor(x) else x for x in base])
    bad = []
    for what, (fo, eo, ro), k in zip(["value"] + [f"grad {i}" for i in grad_on],
                                     zip([f[0]] + f[1], [e[0]] + e[1], [ref[0]] + ref[1]),
                                     kappa):
        ef, ee = err(fo, ro), err(eo, ro)
        table.append((label, what, ef, ee))
        if not ef <= 2 * ee + max(floor, CONDITIONED * U[dtype] * k):  # NaN fails
            bad.append(f"{label} {what}: fastssl {ef:.2e} vs eager {ee:.2e} "
                       f"(condition {k:.1f})")
    return bad


def sweep(family, backend, dtype=torch.float32, table=None, floor=None, **kw):
    table = [] if table is None else table
    floor = FLOOR[dtype] if floor is None else floor
    kw = {**SHAPES.get(family, {}), **kw}
    make, fast, eager, grad_on = FAMILIES[family]
    bad = []
    for seed, (n, d, tau) in enumerate(cases(backend=backend, **kw)):
        g = torch.Generator().manual_seed(1000 * seed + n * 7 + d)
        inputs = make(n, d, tau, g)
        bad += compare(fast, eager, inputs, grad_on, dtype, f"{family} n={n} d={d} tau={tau}",
                       table, floor, CONDITION.get(family))
    return bad


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def unit(g, *shape):
    return tF.normalize(randn(g, *shape), dim=-1)


def T(value):
    """A scalar input that takes a gradient (a logit scale or bias); temperatures are floats."""
    return torch.tensor(value, dtype=torch.float64)


# ----------------------------------------------------------------------------- eager code

def eager_nt_xent(z0, z1, tau):  # lightly's NTXentLoss without a memory bank
    z = tF.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    logits = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return tF.cross_entropy(logits, (torch.arange(2 * n) + n) % (2 * n))


def eager_info_nce(q, k, neg, tau):  # InfoNCE with in-batch and extra negatives
    q, k, neg = (tF.normalize(x, dim=1) for x in (q, k, neg))
    logits = torch.cat([q @ k.T, q @ neg.T], 1) / tau
    return tF.cross_entropy(logits, torch.arange(q.shape[0]))


def eager_bank(out0, out1, bank, tau):  # lightly's NTXentLoss with a memory bank
    a, b = tF.normalize(out0, dim=1), tF.normalize(out1, dim=1)
    logits = torch.cat([(a * b).sum(1, keepdim=True), a @ bank.T], 1) / tau
    return tF.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long))


def fast_bank(out0, out1, bank, tau):
    crit = fastssl.NTXentLoss(tau, memory_bank_size=tuple(bank.shape))
    crit.bank.copy_(bank.detach())
    return crit(out0, out1)


def eager_clip(img, txt, scale):  # open_clip's ClipLoss, one rank
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (tF.cross_entropy(logits, labels) + tF.cross_entropy(logits.T, labels)) / 2


def eager_siglip(img, txt, scale, bias):  # open_clip's SigLipLoss, one rank
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(img.shape[0], dtype=logits.dtype) - 1
    return -tF.logsigmoid(labels * logits).sum() / img.shape[0]


def siglip_condition(img, txt, scale, bias):
    """Condition numbers (float64) of SigLIP's value and gradients as sums of their terms:
    ||sum |terms| || / ||sum terms||, with d_ij = dL/dlogit_ij. The gradients are sums over
    every pair in which positives and negatives pull opposite ways (the scale's
    sum_ij d_ij x_ij is the worst); no summation order guarantees less than about one
    rounding of each term, u ||sum |terms| ||, so the sweep holds these outputs to
    CONDITIONED roundings of that magnitude where it exceeds FLOOR, not to the eager
    code's error in its order, which may land below that by chance (0.3 roundings at n = 3)."""
    x = img @ txt.T
    logits = (scale * x + bias).requires_grad_(True)
    labels = 2 * torch.eye(img.shape[0], dtype=logits.dtype) - 1
    d, = torch.autograd.grad(-tF.logsigmoid(labels * logits).sum() / img.shape[0], logits)
    d = d.detach()

    def kappa(terms_abs, total):
        n = total.norm().item()
        return terms_abs.norm().item() / n if n > 0 else 1.0
    return [1.0, kappa(d.abs() @ (scale.abs() * txt.abs()), d @ (scale * txt)),
            kappa(d.abs().T @ (scale.abs() * img.abs()), d.T @ (scale * img)),
            kappa((d * x).abs().sum(), (d * x).sum()), kappa(d.abs().sum(), d.sum())]


def eager_barlow(za, zb):  # lightly's BarlowTwinsLoss
    a = tF.batch_norm(za, None, None, training=True)
    b = tF.batch_norm(zb, None, None, training=True)
    c = a.T @ b / za.shape[0]
    off = c.flatten()[:-1].view(c.shape[0] - 1, c.shape[0] + 1)[:, 1:].flatten()
    return (torch.diagonal(c) - 1).pow(2).sum() + 5e-3 * off.pow(2).sum()


def eager_vicreg(za, zb):  # lightly's VICRegLoss
    def var(x):
        return torch.mean(tF.relu(1.0 - torch.sqrt(x.var(dim=0) + 1e-4)))

    def cov(x):
        x = x - x.mean(dim=0)
        c = x.T @ x / (x.shape[0] - 1)
        return c[~torch.eye(x.shape[1], dtype=torch.bool)].pow(2).sum() / x.shape[1]
    return 25 * tF.mse_loss(za, zb) + 25 * 0.5 * (var(za) + var(zb)) + cov(za) + cov(zb)


def eager_negcos(x0, x1):  # lightly's NegativeCosineSimilarity
    return -tF.cosine_similarity(x0, x1, dim=1, eps=1e-8).mean()


def eager_sinkhorn(out, eps, iterations=3):
    """lightly's sinkhorn, its exponentials shifted by the maximum (exp(out / eps) overflows
    float32 beyond out / eps = 88: the shifted form is the stronger baseline)."""
    Q = torch.exp((out - out.max()) / eps).t()
    Q = Q / Q.sum()
    B = Q.shape[1]
    for _ in range(iterations):
        Q = Q / Q.sum(1, keepdim=True)
        Q = Q / Q.sum(0, keepdim=True) / B
    return (Q * B).t()


def dino_pairs_loss(p_t, logp_s, S, T_):
    """lightly's DINO reduction: every (teacher crop, student crop) pair but the diagonal."""
    B = p_t.shape[0] // T_
    loss = -torch.einsum("tbk,sbk->ts", p_t.view(T_, B, -1), logp_s.view(S, B, -1))
    loss = loss * (1 - torch.eye(T_, S, dtype=loss.dtype))
    return loss.sum() / ((T_ * S - min(T_, S)) * B)


def eager_proto(s, t, W, V, c, tau_t, target="softmax", pairing="dino"):
    """DINO's head as written: scores materialised, log-softmax, softmax (or Sinkhorn)."""
    logp_s = torch.log_softmax(s @ W.T / 0.1, -1)
    scores = t @ V.T
    if target == "sinkhorn":
        p_t = eager_sinkhorn(scores, tau_t)
    else:
        p_t = torch.softmax((scores - c) / tau_t, -1)
    if pairing == "rows":
        return -(p_t * logp_s).sum(1).mean()
    return dino_pairs_loss(p_t, logp_s, 2, 2)


def proto_condition(s, t, W, V, c, tau_t, target="softmax", pairing="dino"):
    """The prototype losses' floors where a float64 gradient is exactly zero (elsewhere 1:
    the plain relative bound). With logits l = s W^T / tau_s and targets R, dL/dl = (sum R)
    softmax(l) - R per pair: the surrogate with log p replaced by -(lse(l) + l) has the
    gradient (sum R) softmax(l) + R, the terms' magnitudes, so |dL/dl| W / tau_s and
    |dL/dl|^T s / tau_s bound the terms of the two gradients. One prototype (K = 1) makes
    every gradient exactly zero, (sum R) softmax - R = 1 - 1 per entry, so there the bound is
    absolute: CONDITIONED roundings of the terms' magnitude (``compare``'s zero-reference
    branch measures absolute errors)."""
    s, W = s.clone().requires_grad_(True), W.clone().requires_grad_(True)
    l = s @ W.T / 0.1
    with torch.no_grad():
        scores = t @ V.T
        p_t = eager_sinkhorn(scores, tau_t) if target == "sinkhorn" else \
            torch.softmax((scores - c) / tau_t, -1)
    surrogate = -(l.logsumexp(-1, keepdim=True) + l)
    total = -(p_t * surrogate).sum(1).mean() if pairing == "rows" else \
        dino_pairs_loss(p_t, surrogate, 2, 2)
    g_l, = torch.autograd.grad(total, l)
    ref = torch.autograd.grad(eager_proto(s, t, W, V, c, tau_t, target, pairing), (s, W))

    def kappa(terms_abs, exact):  # the relative bound unchanged where the reference is not 0
        n = exact.norm().item()
        return 1.0 if n > 0 else terms_abs.norm().item()
    return [1.0, kappa(g_l.abs() @ W.abs() / 0.1, ref[0]),
            kappa(g_l.abs().T @ s.detach().abs() / 0.1, ref[1])]


def fast_proto(s, t, W, V, c, tau_t, target="softmax", pairing="dino"):
    return fastssl.prototype_cross_entropy(
        s, t, W, V, 0.1, tau_t, center=None if target == "sinkhorn" else c,
        pairing=pairing, teacher_crops=2, teacher_target=target)


def eager_dino(t, s, c, tau_t):  # lightly's DINOLoss, two crops each
    p_t = torch.softmax((t - c) / tau_t, -1)
    return dino_pairs_loss(p_t, torch.log_softmax(s / 0.1, -1), 2, 2)


def fast_dino(t, s, c, tau_t):
    crit = fastssl.DINOLoss(t.shape[1], teacher_temp=tau_t)
    crit.center.copy_(c.detach().reshape(crit.center.shape))
    B = t.shape[0] // 2
    return crit([t[:B], t[B:]], [s[:B], s[B:]])


def ibot_weights(n):
    """Two images with n masked tokens between them (the first gets the odd one)."""
    return torch.tensor([1 / ((n + 1) // 2)] * ((n + 1) // 2) + [1 / max(n // 2, 1)] * (n // 2)) / 2


def eager_ibot(t, s, c, tau_t):  # lightly's IBOTPatchLoss on masked tokens
    per_token = -torch.sum(torch.softmax((t - c) / tau_t, -1)
                           * torch.log_softmax(s / 0.1, -1), dim=-1)
    return (per_token * ibot_weights(t.shape[0]).to(per_token.dtype)).sum()


def fast_ibot(t, s, c, tau_t):
    n = t.shape[0]
    mask = torch.zeros(2, 1, max(n, 1), dtype=torch.bool)
    mask[0, 0, :(n + 1) // 2] = True
    mask[1, 0, :n // 2] = True
    crit = fastssl.IBOTPatchLoss(t.shape[1], teacher_temp=tau_t)
    crit.center.center.copy_(c.detach().reshape(1, -1))
    return crit(t, s, mask)


def eager_swav(h0, h1, low, tau):  # lightly's SwaVLoss, two high- and one low-res crop
    crops = [h0, h1, low]
    loss = 0
    for i, h in enumerate((h0, h1)):
        with torch.no_grad():
            q = eager_sinkhorn(h.detach(), 0.05)
        sub = sum(-torch.mean(torch.sum(q * torch.log_softmax(z / tau, 1), 1))
                  for v, z in enumerate(crops) if v != i)
        loss = loss + sub / 2
    return loss / 2


def fast_swav(h0, h1, low, tau):
    return fastssl.SwaVLoss(temperature=tau)([h0, h1], [low])


def eager_koleo(x):  # DINOv2's / lightly's KoLeoLoss
    x = tF.normalize(x, p=2, dim=-1, eps=1e-8)
    dots = x @ x.t()
    dots.fill_diagonal_(-2)
    d = tF.pairwise_distance(x, x[dots.argmax(1)], p=2, eps=1e-8)
    return -(d + 1e-8).log().mean()


def eager_knopp(f, P, eps):  # the Sinkhorn codes as SwAV computes them
    return eager_sinkhorn(f @ P.T, eps)


def fast_knopp(f, P, eps):
    """The codes as fastssl's passes form them from the scalings (a ``rows`` pass whose
    values are the identity: out_j = softmax_k((f_j . p_k - c_k) / eps)), the scores
    rounded as the scalings saw them."""
    from fastssl import _ops
    c = fastssl.sinkhorn_knopp(f, P, eps, 3)
    eye = torch.eye(P.shape[0], dtype=f.dtype)
    return _ops._prototype_impl(f, P).rows(f, P, eye, c, 1.0 / eps)[1]


# ----------------------------------------------------------------------------- families

def _proto_inputs(n, d, tau, g, D=16):
    """2 crops of n rows of unit bottleneck features, d unit prototypes, a small centre."""
    return [unit(g, 2 * n, D), unit(g, 2 * n, D), unit(g, d, D), unit(g, d, D),
            0.05 * randn(g, d), tau]


def _logit_inputs(n, d, tau, g, scale=3.0):
    """teacher and student logits of 2 crops (scaled up: |logit| ~ 3 / tau_s ~ 30 / 0.1)."""
    return [scale * randn(g, 2 * n, d), scale * randn(g, 2 * n, d), 0.3 * randn(g, d), tau]


FAMILIES = {  # name: (inputs(rows, width, tau, g), fastssl, eager, inputs with gradient)
    "nt_xent": (lambda n, d, tau, g: [randn(g, n, d), randn(g, n, d), tau],
                lambda a, b, t: fastssl.nt_xent(a, b, t), eager_nt_xent, (0, 1)),
    "info_nce+negatives": (
        lambda n, d, tau, g: [randn(g, n, d), randn(g, n, d), randn(g, 2 * n + 3, d), tau],
        lambda q, k, neg, t: fastssl.info_nce(q, k, t, negatives=neg),
        eager_info_nce, (0, 1)),
    "NTXentLoss+bank": (
        lambda n, d, tau, g: [randn(g, n, d), randn(g, n, d), unit(g, 2 * n + 3, d), tau],
        fast_bank, eager_bank, (0, 1)),
    "clip": (lambda n, d, tau, g: [unit(g, n, d), unit(g, n, d), T(1 / tau)],
             fastssl.clip_loss, eager_clip, (0, 1, 2)),
    "siglip": (lambda n, d, tau, g: [unit(g, n, d), unit(g, n, d), T(1 / tau),
                                     T(-0.5 / tau)],
               fastssl.siglip_loss, eager_siglip, (0, 1, 2, 3)),
    "barlow_twins": (lambda n, d, tau, g: [randn(g, n, d), randn(g, n, d) + randn(g, n, d)],
                     fastssl.barlow_twins, eager_barlow, (0, 1)),
    "vicreg": (lambda n, d, tau, g: [randn(g, n, d) / tau, randn(g, n, d)],
               fastssl.vicreg, eager_vicreg, (0, 1)),
    "negative_cosine": (lambda n, d, tau, g: [randn(g, n, d), randn(g, n, d) / tau],
                        fastssl.negative_cosine_similarity, eager_negcos, (0, 1)),
    "proto dino softmax": (_proto_inputs, fast_proto, eager_proto, (0, 2)),
    "proto dino sinkhorn": (_proto_inputs, lambda *a: fast_proto(*a, target="sinkhorn"),
                            lambda *a: eager_proto(*a, target="sinkhorn"), (0, 2)),
    "proto rows softmax": (_proto_inputs, lambda *a: fast_proto(*a, pairing="rows"),
                           lambda *a: eager_proto(*a, pairing="rows"), (0, 2)),
    "sinkhorn_knopp": (lambda n, d, tau, g: [unit(g, n, 16), unit(g, d, 16), tau],
                       fast_knopp, eager_knopp, ()),
    "DINOLoss": (_logit_inputs, fast_dino, eager_dino, (1,)),
    "IBOTPatchLoss": (lambda n, d, tau, g: [x[:n] if i < 2 else x for i, x in
                                            enumerate(_logit_inputs(n, d, tau, g))],
                      fast_ibot, eager_ibot, (1,)),
    "SwaVLoss": (lambda n, d, tau, g: [3 * randn(g, n, d) for _ in range(3)] + [tau],
                 fast_swav, eager_swav, (0, 1, 2)),
    "sinkhorn": (lambda n, d, tau, g: [randn(g, n, d), tau],
                 lambda x, t: fastssl.sinkhorn(x, 3, t),
                 lambda x, t: eager_sinkhorn(x, t), ()),
    "KoLeoLoss": (lambda n, d, tau, g: [randn(g, n, d)], fastssl.KoLeoLoss(), eager_koleo,
                  (0,)),
}
KERNELS = ["nt_xent", "info_nce+negatives", "NTXentLoss+bank", "clip", "siglip",
           "barlow_twins", "vicreg", "proto dino softmax", "proto dino sinkhorn",
           "proto rows softmax", "sinkhorn_knopp"]
# At 2 rows a standardised column is +-1 whatever the input: Barlow Twins' gradient is
# O(eps / variance) of its scale, rounding noise; 3 rows is the first meaningful batch.
SHAPES = {"barlow_twins": dict(min_rows=3), "vicreg": dict(min_rows=2)}
# Outputs that are ill-conditioned sums (their floors follow their condition numbers).
CONDITION = {"siglip": siglip_condition, "proto dino softmax": proto_condition,
             "proto dino sinkhorn": lambda *a: proto_condition(*a, target="sinkhorn"),
             "proto rows softmax": lambda *a: proto_condition(*a, pairing="rows")}
CONDITIONED = 4
# The one known shortfall left, measured with this sweep (fastssl vs eager error against
# float64), held to 2x eager + OPEN_FLOOR (32 float32 roundings, 1.9e-6 relative) so that
# any regression beyond it still fails: SigLIP's Triton image gradient at D = 1, n = 65,
# tau 0.1: 3.6e-7 vs 4.0e-8. At D = 1 every score is +-1, so a row's ~32 large terms are one
# and the same value: the kernel's d_ij and its row sums a_i are within one rounding of
# float64, but the tile matmul (numpy's float32 matmul under the interpreter, a 128 x 128
# tile) adds the equal terms with correlated roundings, up to 10 roundings on a row, where
# the eager (65 x 65) @ (65 x 1) product lands within one. A sum's error grows with its
# length in any fixed order; no bound short of that length holds here.
OPEN = {("siglip", "triton"): "D = 1, n = 65: image gradient 3.6e-7 vs 4.0e-8"}
OPEN_FLOOR = 32 * U[torch.float32]
BF16 = ["nt_xent", "clip", "proto dino softmax", "DINOLoss"]


@pytest.mark.parametrize("family", KERNELS)
def test_kernel_families_are_as_accurate_as_eager(family, backend):
    bad = sweep(family, backend, floor=OPEN_FLOOR if (family, backend) in OPEN else None)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in KERNELS])
def test_logit_families_are_as_accurate_as_eager(family):
    bad = sweep(family, "torch")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("family", BF16)
def test_bfloat16_is_as_accurate_as_eager(family, backend):
    bad = sweep(family, backend, torch.bfloat16, rows=(2, 65), widths=(4, 130), big=0)
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    import os
    import sys
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for be in ("torch", "triton"):
        os.environ["FASTSSL_BACKEND"] = be
        for fam in FAMILIES:
            if be == "triton" and fam not in KERNELS:
                continue
            table = []
            bad = sweep(fam, be, table=table)
            worst = max(table, key=lambda r: r[2] / (2 * r[3] + FLOOR[torch.float32]))
            print(f"{be:6s} {worst[0]:45s} {worst[1]:7s} fastssl {worst[2]:.2e} "
                  f"eager {worst[3]:.2e} {'FAIL ' + str(len(bad)) if bad else 'ok'}")
            sys.stdout.flush()
