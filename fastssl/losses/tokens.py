"""Per-token prototype cross-entropies on given logits, with lightly's class names and
signatures: iBOT++'s patch loss over every patch token (TIPSv2) and CAPI's loss against a
positionwise Sinkhorn-Knopp target.

Both are a cross-entropy per token r between a teacher distribution q_r over K prototypes
and the student's log-softmax, summed with per-token weights w_r:

    L = sum_r w_r CE_r,      CE_r = -sum_k q_rk log softmax_k(s_r / tau_s).

The (tokens x K) log-softmax is never formed: the student's per-token maximum and partition
are gathered in column chunks and the cross-entropy is summed chunk by chunk; the backward
recomputes each chunk of the softmax from those statistics,

    dL/ds_rk = w_r (a_r softmax_k(s_r / tau_s) - q_rk) / tau_s,     a_r = sum_k q_rk,

so the only (tokens x K) tensors are the gradient itself and, for CAPI, its Sinkhorn
target (iBOT++'s teacher softmax is recomputed per chunk as well: ``prototype._LogitsCE``,
the fused path of ``DINOLoss`` and ``IBOTPatchLoss``).

Arithmetic: float64 inputs compute in float64; float32, bfloat16 and float16 inputs compute
in float32, and the loss is returned in the input dtype. Shape errors raise
``fastssl._checks.ShapeError`` (a ValueError, an AssertionError and a RuntimeError at once),
so code written against lightly's ValueError (or torch's RuntimeError) catches it.
"""
import torch
from torch import Tensor, nn

from fastssl import _checks, distributed
from fastssl._checks import ShapeError
from fastssl.prototype import IBOTPatchLoss, _chunk, _LogitsCE, _scaled, _softmax_stats

from ._common import _gather_flag

__all__ = ["IBOTPlusPlusPatchLoss", "CAPILoss", "positionwise_sinkhorn_knopp"]


def _acc(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ----------------------------------------------------------------------------- iBOT++

class IBOTPlusPlusPatchLoss(IBOTPatchLoss):
    """iBOT++'s patch loss (TIPSv2, 2026): iBOT's self-distillation on every patch token,
    masked and visible; lightly's signature (``IBOTPatchLoss``'s constructor and centre).

    ``forward(teacher_out, student_out, mask=None, teacher_temp=None,
    visible_loss_weight=1.0)`` on full patch logits (B, N, K), or (B * N, K) with a mask
    that gives B. With c the centre (``center.value``, (1, K)) and tau_t = ``teacher_temp``
    (the constructor's when None), per token (b, n)

        CE_bn = -sum_k softmax_k((t_bn - c) / tau_t) log softmax_k(s_bn / tau_s).

    With a mask (B, H, W) or (B, N) (True / 1 = masked; any numeric values m_bn act as
    weights), M_b = max(1, sum_n m_bn) and V_b = max(1, sum_n (1 - m_bn)):

        L = 1/B sum_b [ sum_n m_bn CE_bn / M_b
                        + visible_loss_weight * sum_n (1 - m_bn) CE_bn / V_b ],

    so ``visible_loss_weight=0`` is iBOT's masked-token loss and a masked or visible set
    that is empty contributes 0; with no mask, L = mean over every token of CE_bn. After
    each call the centre moves towards the mean teacher logit over all B * N tokens,
    c <- m c + (1 - m) mean_r t_r (m = ``center_momentum``; over every rank under
    torch.distributed), and, as lightly's, takes the wider dtype of itself and the inputs
    (a float32 centre fed float64 logits becomes float64).

    Computed by ``prototype._LogitsCE`` (column chunks; no (tokens x K) softmax). Errors as
    lightly's: ValueError (``ShapeError``) for shapes that differ, a rank other than 2 or
    3, rank 2 without a mask, or B * N not divisible by the mask's B; also ``ShapeError``
    for K != output_dim, a mask without B * N entries, or no token at all (lightly
    broadcasts or fails later there). Deliberate differences: the teacher's logits get no
    gradient (as in fastssl's ``IBOTPatchLoss`` and ``DINOLoss``; lightly's backpropagates
    through the teacher softmax when ``teacher_out`` requires grad), and float64 inputs use
    ``teacher_temp`` as given, where lightly rounds it to float32 (~1e-8 relative).
    """

    def forward(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor = None,
                teacher_temp: float = None, visible_loss_weight: float = 1.0) -> Tensor:
        tau_t = self.teacher_temp if teacher_temp is None else _checks.number(
            teacher_temp, "teacher_temp", lo=0.0, lo_open=True)
        vlw = _checks.number(visible_loss_weight, "visible_loss_weight")
        t, s, B = self._flat_inputs(teacher_out, student_out, mask)
        N = t.shape[0] // B
        weights = _token_weights(mask, B, N, vlw, s.device)
        idx = torch.arange(t.shape[0], device=s.device)
        loss = _LogitsCE.apply(s, t.detach(), self.center.value.detach().reshape(-1).clone(),
                               idx, idx, weights.to(_acc(s)), self.student_temp, tau_t)
        self._update_center(t)
        return loss

    def _flat_inputs(self, teacher_out, student_out, mask):
        """(teacher (B*N, K), student (B*N, K), B), checked in lightly's order."""
        _checks.floating(teacher_out, "teacher_out")
        _checks.floating(student_out, "student_out")
        if teacher_out.shape != student_out.shape:
            raise ShapeError(f"teacher_out and student_out must have the same shape but got "
                             f"{tuple(teacher_out.shape)} and {tuple(student_out.shape)}.")
        if teacher_out.dim() not in (2, 3):
            raise ShapeError(f"teacher_out must be rank 2 or 3 but got rank "
                             f"{teacher_out.dim()}.")
        if mask is not None:
            _checks.tensor(mask, "mask")
            if mask.dim() < 1:
                raise ShapeError("mask must be (B, H, W) or (B, N), got a 0-d tensor")
        if teacher_out.dim() == 3:
            B = teacher_out.shape[0]
        elif mask is None:
            raise ValueError("mask is required when teacher_out has rank 2 so that the batch "
                             "size B can be inferred.")
        else:
            B = mask.shape[0]
            if B == 0 or teacher_out.shape[0] % B:
                raise ShapeError(f"teacher_out length {teacher_out.shape[0]} is not divisible "
                                 f"by batch size {B} inferred from mask.")
        t, s = teacher_out.reshape(-1, teacher_out.shape[-1]), \
            student_out.reshape(-1, student_out.shape[-1])
        if t.shape[1] != self.output_dim:
            raise ShapeError(f"teacher_out and student_out must have output_dim="
                             f"{self.output_dim} logits per token, got shape "
                             f"{tuple(teacher_out.shape)}")
        if t.shape[0] == 0:
            raise ShapeError(f"no token to average over: inputs of shape "
                             f"{tuple(teacher_out.shape)}")
        if mask is not None and mask.numel() != t.shape[0]:
            raise ShapeError(f"mask {tuple(mask.shape)} must have one entry per token: "
                             f"{B} x {t.shape[0] // B}")
        if t.device != s.device:
            raise ValueError(f"teacher_out is on {t.device}, student_out on {s.device}")
        return t, s, B

    @torch.no_grad()
    def _update_center(self, teacher):
        dtype = torch.promote_types(self.center.center.dtype, teacher.dtype)
        if dtype != self.center.center.dtype:
            self.center.center = self.center.center.to(dtype)
        self.center.update(teacher)


def _token_weights(mask, B, N, vlw, device):
    """(B*N,) float64 weights w with L = sum_r w_r CE_r (the class docstring's formula)."""
    if mask is None:
        return torch.full((B * N,), 1.0 / (B * N), dtype=torch.float64, device=device)
    m = mask.detach().reshape(B, N).to(device=device, dtype=torch.float64)
    masked = m.sum(1, keepdim=True).clamp(min=1.0)
    visible = (1.0 - m).sum(1, keepdim=True).clamp(min=1.0)
    return ((m / masked + vlw * (1.0 - m) / visible) / B).reshape(-1)


# ----------------------------------------------------------------------------- CAPI

def _sinkhorn(scaled, iterations, active, eps):
    """Positionwise Sinkhorn-Knopp on ``scaled`` (B, N, K) in its dtype, in place (the
    caller's own temporary). Returns q (B, N, K)."""
    shift = scaled.amax(0, keepdim=True)  # per (position, prototype): exp never overflows
    if active:
        torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX)
    q = scaled.sub_(shift).exp_()
    for _ in range(iterations):
        col = q.sum(0, keepdim=True)  # over the batch, at each position
        if active:
            torch.distributed.all_reduce(col)
        q.div_(col.add_(eps))
        q.div_(q.sum(2, keepdim=True).add_(eps))
    return q


def _sinkhorn_args(logits, iterations, gather_distributed, epsilon):
    _checks.floating(logits, "logits")
    if logits.dim() != 3:
        raise ShapeError(f"logits must be (batch_size, sequence_length, num_clusters), got "
                         f"shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ShapeError(f"logits has no sample: shape {tuple(logits.shape)}")
    iterations = _checks.integer(iterations, "iterations", lo=0)
    eps = _checks.number(epsilon, "epsilon", lo=0.0)
    active = _checks.flag(gather_distributed, "gather_distributed") and \
        distributed.is_distributed()
    return iterations, active, eps


@torch.no_grad()
def positionwise_sinkhorn_knopp(logits: Tensor, iterations: int = 3,
                                gather_distributed: bool = False,
                                epsilon: float = 1e-8) -> Tensor:
    """CAPI's Sinkhorn-Knopp of cluster logits (B, N, K), each position n on its own
    (lightly's ``capi_loss.sinkhorn_knopp``):

        Q_bnk = exp(l_bnk - max_b' l_b'nk),   then ``iterations`` times
        Q_bnk <- Q_bnk / (sum_b' Q_b'nk + epsilon)     (each prototype's mass over the batch)
        Q_bnk <- Q_bnk / (sum_k' Q_bnk' + epsilon)     (each token a distribution over K)

    The shift by the batch maximum (all-reduced with ``gather_distributed`` under
    torch.distributed, as are the batch sums) keeps exp from overflowing and cancels in the
    first normalisation up to ``epsilon``. Computed in float32 (float64 for float64 logits),
    returned in the logits' dtype; no gradient."""
    iterations, active, eps = _sinkhorn_args(logits, iterations, gather_distributed, epsilon)
    scaled = logits.detach().to(_acc(logits), copy=True)
    return _sinkhorn(scaled, iterations, active, eps).to(logits.dtype)


class _TargetCE(torch.autograd.Function):
    """mean_r -sum_k q_rk log softmax_k(s_r / tau) for given targets q (rows, K) in the
    arithmetic dtype (no gradient), in column chunks; gradient to s only."""

    @staticmethod
    def forward(ctx, s, q, tau):
        acc, rows = q.dtype, s.shape[0]
        chunk = _chunk(rows)
        m, logz, _ = _softmax_stats(s, None, tau, chunk, acc)
        ce = torch.zeros(rows, dtype=acc, device=s.device)
        for k0 in range(0, s.shape[1], chunk):
            logp = (_scaled(s, k0, k0 + chunk, None, tau, acc) - m[:, None]) - logz[:, None]
            ce -= (q[:, k0:k0 + chunk] * logp).sum(1)
        ctx.save_for_backward(s, q, m, logz)
        ctx.tau = tau
        return ce.mean().to(s.dtype)

    @staticmethod
    def backward(ctx, grad):
        s, q, m, logz = ctx.saved_tensors
        tau, acc, rows = ctx.tau, q.dtype, s.shape[0]
        g = grad.to(acc) / rows
        a = q.sum(1, keepdim=True) * g
        ds = torch.empty_like(s)
        chunk = _chunk(rows)
        for k0 in range(0, s.shape[1], chunk):
            k1 = k0 + chunk
            sm = torch.exp((_scaled(s, k0, k1, None, tau, acc) - m[:, None]) - logz[:, None])
            ds[:, k0:k1] = (sm * a - q[:, k0:k1] * g) / tau
        return ds, None, None


class CAPILoss(nn.Module):
    """CAPI's loss (Darcet et al., 2025); lightly's signature and defaults.

    ``forward(teacher_logits, student_logits, teacher_index=None)``: teacher cluster logits
    (B, N_t, K), student logits of the predicted tokens (B, N_p, K). The target is the
    positionwise Sinkhorn-Knopp of the teacher's logits over all N_t tokens,
    Q = ``positionwise_sinkhorn_knopp(teacher_logits / teacher_temperature,
    sinkhorn_iterations)`` (no gradient), gathered at the predicted positions
    Q_b,idx[b,j] when ``teacher_index`` (B, N_p) is given (else N_t = N_p, aligned):

        L = 1 / (B N_p) sum_{b,j} -sum_k Q_bjk log softmax_k(s_bj / student_temperature).

    With ``gather_distributed`` the Sinkhorn's batch maxima and sums run over every rank
    (lightly's rule: ValueError at construction if torch.distributed is not available).

    Memory: the float32 target (one (tokens x K) tensor, normalised in place) and the
    gradient; the student's log-softmax is formed in column chunks (``_TargetCE``).
    Differences from lightly: the logits must have equal shapes without ``teacher_index``
    and ``teacher_index`` must be (B, N_p) (lightly broadcasts mismatched shapes), any
    integer index dtype is taken, and 16-bit logits compute in float32.
    """

    def __init__(self, teacher_temperature: float = 0.06, student_temperature: float = 0.12,
                 sinkhorn_iterations: int = 3, gather_distributed: bool = False) -> None:
        super().__init__()
        self.teacher_temperature = _checks.number(teacher_temperature, "teacher_temperature",
                                                  lo=0.0, lo_open=True)
        self.student_temperature = _checks.number(student_temperature, "student_temperature",
                                                  lo=0.0, lo_open=True)
        self.sinkhorn_iterations = _checks.integer(sinkhorn_iterations, "sinkhorn_iterations",
                                                   lo=0)
        self.gather_distributed = _gather_flag(gather_distributed, "CAPILoss")

    def forward(self, teacher_logits: Tensor, student_logits: Tensor,
                teacher_index: Tensor = None) -> Tensor:
        _check_capi(teacher_logits, student_logits, teacher_index)
        acc = _acc(teacher_logits, student_logits)
        K = student_logits.shape[-1]
        with torch.no_grad():
            scaled = teacher_logits.detach().to(acc) / self.teacher_temperature
            iterations, active, eps = _sinkhorn_args(scaled, self.sinkhorn_iterations,
                                                     self.gather_distributed, 1e-8)
            q = _sinkhorn(scaled, iterations, active, eps)
            if teacher_index is not None:
                index = teacher_index.to(device=q.device, dtype=torch.long)
                q = torch.gather(q, 1, index.unsqueeze(-1).expand(-1, -1, K))
        loss = _TargetCE.apply(student_logits.reshape(-1, K), q.reshape(-1, K),
                               self.student_temperature)
        return loss


def _check_capi(teacher, student, index):
    _checks.floating(teacher, "teacher_logits")
    _checks.floating(student, "student_logits")
    for x, name in ((teacher, "teacher_logits"), (student, "student_logits")):
        if x.dim() != 3:
            raise ShapeError(f"{name} must be (batch_size, tokens, num_clusters), got shape "
                             f"{tuple(x.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits is on {teacher.device}, student_logits on "
                         f"{student.device}")
    if index is None:
        if teacher.shape != student.shape:
            raise ShapeError(f"without teacher_index, teacher_logits {tuple(teacher.shape)} "
                             f"and student_logits {tuple(student.shape)} must have one shape")
    else:
        _checks.tensor(index, "teacher_index")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError(f"teacher_index must hold integers, got {index.dtype}")
        if index.shape != student.shape[:2] or teacher.shape[::2] != student.shape[::2]:
            raise ShapeError(f"teacher_logits {tuple(teacher.shape)}, student_logits "
                             f"{tuple(student.shape)}, teacher_index {tuple(index.shape)}: "
                             "need (B, N_t, K), (B, N_p, K) and (B, N_p)")
    if student.numel() == 0 or teacher.numel() == 0:
        raise ShapeError(f"no token to average over: teacher_logits {tuple(teacher.shape)}, "
                         f"student_logits {tuple(student.shape)}")
