"""fastssl's HypersphereLoss, DirectCLRLoss, CO2Regularizer and DSERegularizer against
lightly 1.6.0's classes on the same inputs: values and gradients under the precision rule
of ``test_lightly.py`` (fastssl's error against float64 at most twice lightly's plus a few
float32 roundings), the same memory bank after several steps, the same exception types on
lightly's documented errors, and the deliberate differences asserted as such (CO2's
gradient above all). SymNegCosineSimilarityLoss is not in the 1.6.0 wheel: the main suite
checks it against float64 only (and this file against lightly once a release has it).

The float64 references are the main suite's (tests/test_similarity_losses.py)."""
import warnings

import pytest
import torch
import torch.nn.functional as tF

from ._peers import need, rel

lightly = need("lightly")
from lightly.loss import DirectCLRLoss  # noqa: E402
from lightly.loss.hypersphere_loss import HypersphereLoss  # noqa: E402
from lightly.loss.regularizer import CO2Regularizer, DSERegularizer  # noqa: E402

from fastssl.losses import regularizers, similarity  # noqa: E402
from test_similarity_losses import (first_rows_init, ref_co2, ref_directclr,  # noqa: E402
                                    ref_dse, ref_hypersphere, ref_symneg)

from .test_lightly import (FLOOR, Sweep, as_close, compare, randn, raised, run,  # noqa: E402
                           seeded)

DTYPES = [torch.float32, torch.float64]


# ----------------------------------------------------------------------------- HypersphereLoss

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,lam,alpha", [(1.0, 1.0, 2.0), (2.0, 0.5, 1.5)])
@pytest.mark.parametrize("n,D", [(2, 1), (5, 7), (33, 130)])
def test_hypersphere(n, D, t, lam, alpha, dtype):
    a = randn(n, D, seed=n * 17 + D) * torch.exp(randn(n, 1, seed=3))
    b = randn(n, D, seed=n * 17 + D + 1)
    # D = 1: unit rows are +-1 and the gradients vanish; the float64 formula's are rounding
    # noise (0 or 2^-52 by machine), so only the value is compared, the gradients asserted ~0
    ours, theirs = similarity.HypersphereLoss(t, lam, alpha), HypersphereLoss(t, lam, alpha)
    ref = lambda x, y: ref_hypersphere(x, y, t, lam, alpha)  # noqa: E731
    if D > 1:
        compare("HypersphereLoss", ours, theirs, ref, [a, b], dtype)
        return
    x, y = a.to(dtype), b.to(dtype)
    as_close("HypersphereLoss loss", ours(x, y), theirs(x, y), ref(x.double(), y.double()), dtype)
    _, grads = run(ours, [x, y], [0, 1])
    assert all(float(g.abs().max()) <= 4 * torch.finfo(dtype).eps for g in grads)


def test_hypersphere_large_t_where_lightly_underflows():
    """log(mean(exp(-t d^2))) in float32 underflows once t d^2 > ~103 for every pair:
    lightly's value goes to -inf; the log-sum-exp stays within float32 rounding of float64."""
    a, b = randn(8, 16, seed=1).float(), randn(8, 16, seed=2).float()
    ref = ref_hypersphere(a.double(), b.double(), 200.0, 1.0, 2.0)
    theirs = HypersphereLoss(t=200.0)(a, b)
    ours = similarity.HypersphereLoss(t=200.0)(a, b)
    assert torch.isneginf(theirs)
    assert rel(ours, ref) <= 64 * 2.0 ** -24


def test_hypersphere_single_row_raises_where_lightly_gives_nan():
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    assert torch.isnan(HypersphereLoss()(a, b))
    assert isinstance(raised(lambda: similarity.HypersphereLoss()(a, b)), ValueError)


# ----------------------------------------------------------------------------- DirectCLRLoss

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0.5, 0.1])
@pytest.mark.parametrize("shape,loss_dim", [((1, 5), 3), ((5, 7), 4), ((33, 130), 64),
                                            ((4, 3, 5), 7), ((6, 2), 64)])
def test_directclr(shape, loss_dim, T, dtype):
    a = randn(*shape, seed=sum(shape) + loss_dim) * 3
    b = randn(*shape, seed=sum(shape) + loss_dim + 1)
    compare("DirectCLRLoss", similarity.DirectCLRLoss(loss_dim, T), DirectCLRLoss(loss_dim, T),
            lambda x, y: ref_directclr(x, y, loss_dim, T), [a, b], dtype)


def test_directclr_memory_bank_over_steps():
    """The same seeded (K, loss_dim) bank, then the same bank and pointer after each step
    (updated only when out0 requires grad, as NTXentLoss)."""
    K, loss_dim, T = 10, 4, 0.2
    ours = seeded(similarity.DirectCLRLoss, 4, loss_dim, T, memory_bank_size=(K, loss_dim))
    theirs = seeded(DirectCLRLoss, 4, loss_dim, T, memory_bank_size=(K, loss_dim))
    same = dict(rtol=2 * 2.0 ** -23, atol=2 * 2.0 ** -24)
    torch.testing.assert_close(ours.bank, theirs.memory_bank.bank, **same)
    sweep = Sweep(torch.float32)
    for step in range(4):
        before = theirs.memory_bank.bank.clone()

        def ref(x, y):
            x, y = tF.normalize(x[:, :loss_dim], dim=1), tF.normalize(y[:, :loss_dim], dim=1)
            logits = torch.cat([(x * y).sum(1, keepdim=True), x @ before.double().T], 1) / T
            return tF.cross_entropy(logits, torch.zeros(x.shape[0], dtype=torch.long))
        a, b = randn(3, 9, seed=60 + step), randn(3, 9, seed=70 + step)
        compare("DirectCLRLoss(memory_bank_size)", ours, theirs, ref, [a, b], torch.float32,
                sweep=sweep)
        assert int(ours.bank_ptr) == int(theirs.memory_bank.bank_ptr), step
        torch.testing.assert_close(ours.bank, theirs.memory_bank.bank, **same)
    sweep.check()


# ----------------------------------------------------------------------------- CO2Regularizer

def lightly_value(fn, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lightly's torch.tensor(tensor)
        return fn(*inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,D", [(1, 3), (4, 2), (5, 7), (33, 130)])
def test_co2_value_equals_lightly_and_gradient_is_the_fix(n, D, dtype):
    """The value is lightly's (precision rule); lightly's result is a new leaf without
    grad_fn (``torch.tensor(...)``), fastssl's has the float64 formula's gradients."""
    a = (randn(n, D, seed=n + 5 * D) * 2).to(dtype).requires_grad_()
    b = randn(n, D, seed=n + 5 * D + 1).to(dtype).requires_grad_()
    alpha, t = 1.0, 0.05
    theirs = lightly_value(CO2Regularizer(alpha, t), a, b)
    assert theirs.grad_fn is None and not theirs.requires_grad  # lightly: no gradient
    lo, go = run(regularizers.CO2Regularizer(alpha, t), [a, b], [0, 1])
    lr, gr = run(lambda x, y: ref_co2(x, y, alpha, t), [a.double(), b.double()], [0, 1])
    sweep = Sweep(dtype)
    sweep.add("CO2Regularizer loss", lo.reshape(()), theirs.detach().reshape(()), lr.reshape(()))
    sweep.check()
    for g, r in zip(go, gr):
        assert g.dtype == dtype and rel(g, r) <= 64 * FLOOR[dtype]
    if n > 1:
        assert any(float(g.abs().sum()) > 0 for g in go)


def test_co2_memory_bank_over_steps():
    """lightly's bank (float32 random unit rows from torch.randn, FIFO of normalised out1,
    updated on every call, the tail filled and the rest dropped): the same bank and
    pointer after each step, the value against float64 on the bank before the step."""
    K, D, n, t = 10, 6, 4, 0.1
    ours = seeded(regularizers.CO2Regularizer, 2, 1.0, t, memory_bank_size=(K, D))
    theirs = seeded(CO2Regularizer, 2, 1.0, t, memory_bank_size=(K, D))
    same = dict(rtol=2 * 2.0 ** -23, atol=2 * 2.0 ** -24)
    torch.testing.assert_close(ours.bank, theirs.memory_bank.bank, **same)
    sweep = Sweep(torch.float32)
    for step in range(5):
        a, b = randn(n, D, seed=80 + step).float(), randn(n, D, seed=90 + step).float()
        before = theirs.memory_bank.bank.clone()
        ref = ref_co2(a.double(), b.double(), 1.0, t, before)
        grad = step % 2 == 0  # lightly's CO2 updates its bank with or without grad
        x, y = a.clone().requires_grad_(grad), b.clone().requires_grad_(grad)
        sweep.add("CO2Regularizer(memory_bank_size)", ours(x, y).detach(),
                  lightly_value(theirs, x, y).detach(), ref)
        assert int(ours.bank_ptr) == int(theirs.memory_bank.bank_ptr), step
        torch.testing.assert_close(ours.bank, theirs.memory_bank.bank, **same)
    sweep.check()


def test_co2_float64_with_bank_and_bank_size_without_dim():
    """lightly's float32 bank cannot score float64 inputs (einsum of Double and Float) and
    its MemoryBankModule rejects a bare K; fastssl scores float64 against the bank and takes
    the width from the first batch (both documented)."""
    a, b = randn(3, 6, seed=1), randn(3, 6, seed=2)
    theirs = seeded(CO2Regularizer, 3, memory_bank_size=(8, 6))
    assert isinstance(raised(lambda: lightly_value(theirs, a, b)), RuntimeError)
    ours = seeded(regularizers.CO2Regularizer, 3, memory_bank_size=(8, 6))
    bank = ours.bank.clone()
    assert rel(ours(a, b), ref_co2(a, b, 1.0, 0.05, bank)) <= 1e4 * FLOOR[torch.float64]
    assert isinstance(raised(lambda: CO2Regularizer(memory_bank_size=8)), ValueError)
    lazy = regularizers.CO2Regularizer(memory_bank_size=8)
    lazy(a.float(), b.float())
    assert lazy.bank.shape == (8, 6)


# ----------------------------------------------------------------------------- DSERegularizer

KW = dict(local_clusters=2, global_clusters=4, max_kmeans_iters=5)


def lightly_first_rows(reg):
    reg._kmeans_plus_plus_init = lambda x, k: x[:k].clone()
    return reg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 9, 4), (2, 8, 6), (5, 8, 6), (3, 17, 33)])
def test_dse_from_the_same_seeds(shape, dtype):
    """Both from the first k rows of each problem (no RNG): lightly's value and gradient
    within the precision rule (the clusterings are the same)."""
    x = randn(*shape, seed=sum(shape))
    compare("DSERegularizer", first_rows_init(regularizers.DSERegularizer(weight=0.5, **KW)),
            lightly_first_rows(DSERegularizer(weight=0.5, **KW)),
            lambda r: ref_dse(r, 0.5, True, 2, 4, 5, 1e-4), [x], dtype)


@pytest.mark.parametrize("shape", [(1, 16, 5), (1, 30, 8)])
def test_dse_seeded_single_image_equals_lightly(shape):
    """One image forming one group: the k-means++ draws from the global RNG are lightly's,
    so the same torch.manual_seed gives lightly's clusterings and value."""
    x = randn(*shape, seed=7).float()
    kw = dict(local_clusters=3, global_clusters=6, max_kmeans_iters=10)
    for seed in range(3):
        torch.manual_seed(seed)
        lo, go = run(regularizers.DSERegularizer(**kw), [x], [0])
        torch.manual_seed(seed)
        lt, gt = run(DSERegularizer(**kw), [x], [0])
        assert rel(lo, lt) <= 1e-5 and rel(go[0], gt[0]) <= 1e-4, seed


def test_dse_weight_zero_and_helpers_equal_lightly():
    x = torch.randn(3, 5, 4)
    assert regularizers.DSERegularizer(weight=0.0)(x).item() == DSERegularizer(weight=0.0)(x).item()
    m = torch.randn(16, 8)
    ours, theirs = regularizers.DSERegularizer(), DSERegularizer()
    torch.testing.assert_close(ours._effective_dimensionality(m),
                               theirs._effective_dimensionality(m))
    torch.testing.assert_close(ours._centered_singular_sum(m), theirs._centered_singular_sum(m))


# ----------------------------------------------------------------------------- SymNegCosine

def test_sym_neg_cosine_similarity_if_lightly_has_it():
    theirs = getattr(lightly.loss, "SymNegCosineSimilarityLoss", None)
    if theirs is None:
        pytest.skip("lightly 1.6.0 has no SymNegCosineSimilarityLoss (repository head only): "
                    "tests/test_similarity_losses.py checks it against float64")
    z0, p0, z1, p1 = (randn(5, 7, seed=i) for i in range(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = theirs()
    ours = similarity.SymNegCosineSimilarityLoss()
    compare("SymNegCosineSimilarityLoss", lambda a, b, c, d: ours((a, b), (c, d)),
            lambda a, b, c, d: loss((a, b), (c, d)), ref_symneg, [z0, p0, z1, p1],
            torch.float32, wrt=[1, 3])


# ----------------------------------------------------------------------------- errors

def r32(*shape):
    return torch.randn(*shape)


ERRORS = {
    "DirectCLRLoss temperature 0": lambda L: L.DirectCLRLoss(temperature=0.0),
    "DirectCLRLoss bank size negative": lambda L: L.DirectCLRLoss(memory_bank_size=(-1, 4)),
    "DirectCLRLoss shapes differ": lambda L: L.DirectCLRLoss(loss_dim=8)(r32(4, 8), r32(4, 6)),
    "CO2Regularizer bank size negative": lambda L: L.CO2Regularizer(memory_bank_size=(-1, 4)),
    "CO2Regularizer bank size of 3 numbers": lambda L: L.CO2Regularizer(
        memory_bank_size=(4, 4, 4)),
    "CO2Regularizer bank width differs": lambda L: L.CO2Regularizer(
        memory_bank_size=(8, 5))(r32(3, 4), r32(3, 4)),
    "CO2Regularizer shapes differ": lambda L: L.CO2Regularizer()(r32(4, 8), r32(4, 6)),
    "HypersphereLoss shapes differ": lambda L: L.HypersphereLoss()(r32(4, 8), r32(4, 6)),
    "DSERegularizer weight < 0": lambda L: L.DSERegularizer(weight=-1.0),
    "DSERegularizer local_clusters 0": lambda L: L.DSERegularizer(local_clusters=0),
    "DSERegularizer global_clusters 0": lambda L: L.DSERegularizer(global_clusters=0),
    "DSERegularizer max_kmeans_iters 0": lambda L: L.DSERegularizer(max_kmeans_iters=0),
    "DSERegularizer tol 0": lambda L: L.DSERegularizer(tol=0.0),
    "DSERegularizer 2-D input": lambda L: L.DSERegularizer()(r32(4, 6)),
    "DSERegularizer empty input": lambda L: L.DSERegularizer()(r32(4, 0, 6)),
}


class _Lightly:
    DirectCLRLoss, HypersphereLoss = DirectCLRLoss, HypersphereLoss
    CO2Regularizer, DSERegularizer = CO2Regularizer, DSERegularizer


class _Fastssl:
    DirectCLRLoss, HypersphereLoss = similarity.DirectCLRLoss, similarity.HypersphereLoss
    CO2Regularizer, DSERegularizer = regularizers.CO2Regularizer, regularizers.DSERegularizer


@pytest.mark.parametrize("case", list(ERRORS))
def test_same_exception_types_as_lightly(case):
    """Where lightly raises, fastssl raises an instance of lightly's exception type."""
    theirs = raised(lambda: lightly_value(ERRORS[case], _Lightly))
    assert theirs is not None, f"{case}: lightly raised nothing (the case is wrong)"
    ours = raised(lambda: ERRORS[case](_Fastssl))
    assert ours is not None, f"{case}: lightly raises {type(theirs).__name__}, fastssl nothing"
    assert isinstance(ours, type(theirs)), \
        f"{case}: lightly raises {type(theirs).__name__}, fastssl {type(ours).__name__}: {ours}"
