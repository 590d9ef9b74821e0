"""fastssl's per-token prototype losses (``fastssl.losses.tokens``) against lightly 1.6.0's
IBOTPlusPlusPatchLoss, CAPILoss and ``capi_loss.sinkhorn_knopp``: values and gradients at
least as close to the float64 formula as lightly's own (the precision rule of
``test_lightly.py``), the same centre after several steps (value, shape and dtype), the same
exception types on lightly's documented errors.

For float64 inputs lightly rounds iBOT++'s teacher temperature to float32
(``torch.tensor(teacher_temp)``), ~1e-8 relative, which shows as a ~1e-9 error of its loss;
fastssl uses the temperature as given.
"""
import pytest
import torch

from ._peers import need
from .test_lightly import DTYPES, Sweep, as_close, compare, raised, randn

lightly = need("lightly")
from lightly.loss import CAPILoss  # noqa: E402
from lightly.loss.capi_loss import sinkhorn_knopp as lightly_sinkhorn  # noqa: E402
from lightly.loss.ibot_loss import IBOTPlusPlusPatchLoss  # noqa: E402

from fastssl.losses import tokens  # noqa: E402
from test_token_losses import ref_capi, ref_ibotpp, ref_sinkhorn, token_mask  # noqa: E402

STEPS = 3


# ----------------------------------------------------------------------------- iBOT++

IBOT_CASES = [  # B, N, K, tau_t, mask kind (None: no mask), visible_loss_weight, rank
    (3, 5, 7, 0.04, "random", 1.0, 3), (4, 6, 1000, 0.01, "random", 0.5, 2),
    (2, 4, 65, 0.04, None, 1.0, 3), (1, 1, 1, 0.04, "all", 1.0, 2),
    (3, 4, 9, 0.07, "none", 0.3, 3), (2, 3, 5, 0.04, "all", 0.0, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,tau_t,kind,vlw,rank", IBOT_CASES)
def test_ibotpp_over_steps(B, N, K, tau_t, kind, vlw, rank, dtype):
    """Three steps on fresh logits and masks: loss, student gradient and the centre (its
    dtype too: both promote a float32 centre to float64 on float64 logits)."""
    ours = tokens.IBOTPlusPlusPatchLoss(K, teacher_temp=tau_t)
    theirs = IBOTPlusPlusPatchLoss(K, teacher_temp=tau_t)
    sweep, centre = Sweep(dtype), Sweep(dtype)
    c64 = torch.zeros(1, K, dtype=torch.float64)
    for step in range(STEPS):
        mask = None if kind is None else token_mask(B, N, step, kind)
        t = randn(B, N, K, seed=step + K) * 2
        s = randn(B, N, K, seed=step + K + 99) * 2
        shape = (B * N, K) if rank == 2 else (B, N, K)
        c = theirs.center.value.reshape(-1).detach().double()
        compare(f"IBOTPlusPlusPatchLoss step {step}",
                lambda x, y: ours(x, y, mask, visible_loss_weight=vlw),
                lambda x, y: theirs(x, y, mask, visible_loss_weight=vlw),
                lambda x, y: ref_ibotpp(x.reshape(B, N, K), y.reshape(B, N, K), mask, c,
                                        tau_t, 0.1, vlw),
                [t.reshape(shape), s.reshape(shape)], dtype, wrt=[1], sweep=sweep)
        c64 = 0.9 * c64 + 0.1 * t.to(dtype).double().reshape(-1, K).mean(0, keepdim=True)
        assert ours.center.value.shape == theirs.center.value.shape == (1, K)
        assert ours.center.value.dtype == theirs.center.value.dtype
        centre.add(f"centre step {step}", ours.center.value, theirs.center.value, c64)
    sweep.check()
    centre.check()


def test_ibotpp_forward_teacher_temp_and_image_masks():
    """A (B, H, W) mask on (B * N, K) rows, the forward's teacher_temp, a float mask."""
    B, H, W, K = 3, 2, 4, 12
    mask = token_mask(B, H * W, 7).reshape(B, H, W)
    t, s = randn(B * H * W, K, seed=1), randn(B * H * W, K, seed=2)
    ref = lambda x, y: ref_ibotpp(x.reshape(B, -1, K), y.reshape(B, -1, K),  # noqa: E731
                                  mask.flatten(1), 0.0, 0.06, 0.1, 0.8)
    compare("iBOT++ (B, H, W) mask",
            lambda x, y: tokens.IBOTPlusPlusPatchLoss(K)(x, y, mask, 0.06, 0.8),
            lambda x, y: IBOTPlusPlusPatchLoss(K)(x, y, mask, 0.06, 0.8), ref,
            [t, s], torch.float32, wrt=[1])
    m = torch.rand(B, H * W, generator=torch.Generator().manual_seed(3))
    compare("iBOT++ float mask", lambda x, y: tokens.IBOTPlusPlusPatchLoss(K)(x, y, m),
            lambda x, y: IBOTPlusPlusPatchLoss(K)(x, y, m),
            lambda x, y: ref_ibotpp(x.reshape(B, -1, K), y.reshape(B, -1, K), m.double(),
                                    0.0, 0.04, 0.1, 1.0), [t, s], torch.float32, wrt=[1])


def test_ibotpp_teacher_gets_no_gradient_on_purpose():
    """The one difference in gradients: lightly's loss backpropagates into a teacher_out
    that requires grad; fastssl's teacher is a target (detached), and the student's gradient
    is lightly's."""
    t = randn(2, 3, 5, seed=1).float().requires_grad_()
    s = randn(2, 3, 5, seed=2).float().requires_grad_()
    g_t, g_s = torch.autograd.grad(IBOTPlusPlusPatchLoss(5)(t, s), [t, s])
    assert g_t.abs().sum() > 0
    ours = tokens.IBOTPlusPlusPatchLoss(5)(t, s)
    assert ours.grad_fn is not None
    g_ours, g_t_ours = torch.autograd.grad(ours, [s, t], allow_unused=True)
    assert g_t_ours is None
    torch.testing.assert_close(g_ours, g_s, rtol=1e-5, atol=1e-7)


def test_ibotpp_state_dict_is_lightlys():
    """The centre is the same buffer under the same name: checkpoints load both ways."""
    ours, theirs = tokens.IBOTPlusPlusPatchLoss(6), IBOTPlusPlusPatchLoss(6)
    theirs(randn(2, 3, 6, seed=1).float(), randn(2, 3, 6, seed=2).float())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.center.value, theirs.center.value)


# ----------------------------------------------------------------------------- CAPI

CAPI_CASES = [  # B, N_t, N_p (None: aligned), K, teacher_temp, student_temp, iterations
    (4, 5, None, 32, 0.06, 0.12, 3), (3, 6, 3, 257, 0.06, 0.12, 3), (2, 1, None, 1, 0.06, 0.12, 3),
    (8, 4, None, 16, 0.1, 0.2, 1), (6, 7, 5, 64, 0.03, 0.1, 5), (1, 3, 2, 9, 0.06, 0.12, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Nt,Np,K,tau_t,tau_s,iters", CAPI_CASES)
def test_capi(B, Nt, Np, K, tau_t, tau_s, iters, dtype):
    ours = tokens.CAPILoss(tau_t, tau_s, iters)
    theirs = CAPILoss(tau_t, tau_s, iters)
    sweep = Sweep(dtype)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        index = None if Np is None else torch.randint(0, Nt, (B, Np), generator=g)
        t = randn(B, Nt, K, seed=seed, scale=2.0)
        s = randn(B, Nt if Np is None else Np, K, seed=seed + 50, scale=2.0)
        compare("CAPILoss", lambda x, y: ours(x, y, index), lambda x, y: theirs(x, y, index),
                lambda x, y: ref_capi(x, y, index, tau_t, tau_s, iters), [t, s], dtype,
                wrt=[1], sweep=sweep)
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_positionwise_sinkhorn_knopp(scale, dtype):
    """lightly's ``capi_loss.sinkhorn_knopp``, also where exp(logits) overflows (scale 30:
    logits to ~+-150, shifted by the batch maximum in both)."""
    for seed in range(3):
        x = randn(5, 4, 11, seed=seed, scale=scale).to(dtype)
        as_close("sinkhorn_knopp", tokens.positionwise_sinkhorn_knopp(x, 3),
                 lightly_sinkhorn(x, 3), ref_sinkhorn(x.double(), 3), dtype)


# ----------------------------------------------------------------------------- errors

def r32(*shape):
    return torch.randn(*shape)


ERRORS = {
    "iBOT++ shapes differ": lambda L: L.IBOTPlusPlusPatchLoss(4)(r32(2, 5, 4), r32(2, 6, 4)),
    "iBOT++ rank 4": lambda L: L.IBOTPlusPlusPatchLoss(4)(r32(2, 5, 3, 4), r32(2, 5, 3, 4)),
    "iBOT++ rank 1": lambda L: L.IBOTPlusPlusPatchLoss(4)(r32(4), r32(4)),
    "iBOT++ rank 2 without mask": lambda L: L.IBOTPlusPlusPatchLoss(4)(r32(10, 4), r32(10, 4)),
    "iBOT++ rows not divisible": lambda L: L.IBOTPlusPlusPatchLoss(4)(
        r32(7, 4), r32(7, 4), torch.zeros(3, 2, dtype=torch.bool)),
    "iBOT++ mask of the wrong size": lambda L: L.IBOTPlusPlusPatchLoss(4)(
        r32(2, 3, 4), r32(2, 3, 4), torch.zeros(2, 4, dtype=torch.bool)),
    "iBOT++ unknown center_mode": lambda L: L.IBOTPlusPlusPatchLoss(4, center_mode="max"),
    "CAPI shapes differ": lambda L: L.CAPILoss()(r32(2, 3, 8), r32(2, 4, 8)),
    "CAPI index out of range": lambda L: L.CAPILoss()(r32(2, 6, 8), r32(2, 3, 8),
                                                      torch.full((2, 3), 6)),
}


class _Lightly:
    IBOTPlusPlusPatchLoss, CAPILoss = IBOTPlusPlusPatchLoss, CAPILoss


@pytest.mark.parametrize("case", list(ERRORS))
def test_same_exception_types_as_lightly(case):
    theirs = raised(lambda: ERRORS[case](_Lightly))
    assert theirs is not None, f"{case}: lightly raised nothing (the case is wrong)"
    ours = raised(lambda: ERRORS[case](tokens))
    assert ours is not None, f"{case}: lightly raises {type(theirs).__name__}, fastssl nothing"
    assert isinstance(ours, type(theirs)), \
        f"{case}: lightly raises {type(theirs).__name__}, fastssl {type(ours).__name__}: {ours}"


def test_capi_gather_distributed_without_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    assert isinstance(raised(lambda: CAPILoss(gather_distributed=True)), ValueError)
    assert isinstance(raised(lambda: tokens.CAPILoss(gather_distributed=True)), ValueError)
