"""Prototype cross-entropy (DINO, iBOT) without the (rows x K) score matrix.

Student rows s_i and teacher rows t_j (bottleneck features, (rows, D), normalised by the
caller as DINO's head does), student prototypes W (K, D) and teacher prototypes V (K, D):

    student log-probabilities   log softmax_k(s_i . w_k / tau_s)
    teacher distribution        p_jk = softmax_k((t_j . v_k - c_k) / tau_t)     (no gradient)
    cross-entropy of a pair     CE(i, j) = LSE_k(s_i . w_k / tau_s) - s_i . q_j / tau_s,
                                q_j = sum_k p_jk w_k                             (a D-vector)

so the cross term is one D-vector per teacher row. ``pairing="dino"``: rows are crop-major
((crops x B, D)); every student crop v is paired with every teacher crop u != v of the same
sample, and the loss is the mean over pairs and samples (lightly's DINOLoss).
``pairing="rows"``: student row r against teacher row r with ``weights`` (iBOT's masked
tokens: 1 / masked count of the row's image / images), loss = sum_r w_r CE(r, r).

The forward is two ``rows`` passes over K (``kernels/prototype.py``: an online softmax
that rescales its running sums as the maximum moves) giving the log-partitions of the
student and teacher rows, then one ``pairs`` pass that forms, for each student row i and its
target R_ik = sum_j g_ij p_jk (g_ij the weight of pair (i, j) in the loss, the paired
teacher rows gathered in the tile), the cross-entropy -sum_k R_ik log softmax_ik entry by
entry as the eager code rounds it. The backward is two more ``pairs`` passes over the same
tiles, with d_ik = a_i softmax_ik - R_ik (a_i = sum_j g_ij) formed entry by entry:

    dL/ds_i = sum_k d_ik w_k / tau_s            dL/dw_k = sum_i d_ik s_i / tau_s

-- the probabilities are subtracted before the sum over K, as in the eager code, so the
gradient does not cancel where student and teacher agree (a difference of two softmax
averages, sum_k softmax_ik w_k - sum_k R_ik w_k, loses ~1/(1 - agreement) roundings there).
The centre and the Sinkhorn scalings are subtracted as a float32 pair with a two-sum
(``kernels/prototype.py``). Memory O((rows + K) x D). CUDA tensors take the Triton
kernels, others the chunked PyTorch twin (``fastssl._dispatch``). ``center_stat`` =
mean_j t_j . v_k (the batch statistic DINO's centre follows) is V @ mean_j t_j.

The losses on given logits (``DINOLoss``, ``IBOTPatchLoss``, ``SwaVLoss``) keep lightly's
signatures and compute in column chunks (no log-softmax tensor); ``koleo`` finds nearest
neighbours in row chunks.
"""
import math

import torch

from fastssl import _checks, _ops

CHUNK = None  # prototypes per chunk; None: about 2^21 scores per chunk


def _chunk(rows):
    return CHUNK or int(max(64, 2 ** 21 // max(rows, 1)))


def _pair_table(student_rows, teacher_rows, pairing, student_crops, teacher_crops, weights,
                device, dtype):
    """The loss's pairs as a table: (pidx (rows, P) int32, pw (rows, P)), student row i
    paired with teacher rows pidx[i] at weights pw[i] (slots past a row's pairs: weight 0).
    ``rows``: P = 1; ``dino``: student crop v of sample b against the teacher crops u != v
    of b, each pair weighted 1 / (pairs x B) as lightly's DINOLoss averages."""
    if pairing == "rows":
        idx = torch.arange(student_rows, device=device, dtype=torch.int32)[:, None]
        return idx, weights.to(device=device, dtype=dtype).reshape(-1, 1).contiguous()
    B = teacher_rows // teacher_crops
    slots = [[u for u in range(teacher_crops) if u != v] for v in range(student_crops)]
    P = max(len(u) for u in slots)
    n_pairs = sum(len(u) for u in slots)
    crop = torch.tensor([u + [0] * (P - len(u)) for u in slots], dtype=torch.int32)
    live = torch.tensor([[1.0] * len(u) + [0.0] * (P - len(u)) for u in slots], dtype=dtype)
    b = torch.arange(B, dtype=torch.int32)
    pidx = (crop[:, None, :] * B + b[None, :, None]).reshape(student_rows, P)
    pw = (live[:, None, :] / (n_pairs * B)).expand(student_crops, B, P).reshape(student_rows, P)
    return pidx.to(device).contiguous(), pw.to(device).contiguous()


def _pairs(student_rows, teacher_rows, student_crops, teacher_crops, device, dtype):
    """DINO's pairs as (student row, teacher row, weight) index triples: the live slots of
    ``_pair_table``."""
    pidx, pw = _pair_table(student_rows, teacher_rows, "dino", student_crops, teacher_crops,
                           None, "cpu", dtype)  # on the host: the pattern is known there
    live = pw > 0
    rows = torch.arange(student_rows)[:, None].expand_as(pidx)
    return (rows[live].to(device), pidx[live].long().to(device), pw[live].to(device))


def prototype_cross_entropy(student, teacher, student_prototypes, teacher_prototypes=None,
                            student_temp=0.1, teacher_temp=0.04, center=None, pairing="dino",
                            student_crops=None, teacher_crops=2, weights=None,
                            return_center_stat=False, teacher_target="softmax",
                            sinkhorn_iterations=3, gather_distributed=False):
    """The DINO / iBOT cross-entropy of student rows against the teacher's distribution over
    K prototypes, never storing a (rows x K) matrix (see the module docstring).

    ``student`` (S*B, D) and ``teacher`` (T*B, D), crop-major; ``student_prototypes`` (K, D)
    and ``teacher_prototypes`` (K, D; default: the student's, detached); ``center`` (K,) is
    subtracted from the teacher's scores before ``teacher_temp``. Gradients reach the student
    rows and the student prototypes only. With ``return_center_stat`` also returns
    mean_j teacher_j . v_k, the batch statistic for the centre's momentum update (over every
    rank's rows with ``gather_distributed`` under torch.distributed).

    ``teacher_target="sinkhorn"``: the teacher's distribution is instead its Sinkhorn-Knopp
    codes at epsilon = ``teacher_temp`` (``sinkhorn_knopp``, ``sinkhorn_iterations``, the
    column sums all-reduced with ``gather_distributed``; DINOv2's and SwAV's target);
    ``center`` must then be None.
    """
    V = _checked_tensors(student, teacher, student_prototypes, teacher_prototypes)
    K = V.shape[0]
    tau_s = _checks.number(student_temp, "student_temp", lo=0.0, lo_open=True)
    tau_t = _checks.number(teacher_temp, "teacher_temp", lo=0.0, lo_open=True)
    if center is not None:
        _checks.floating(center, "center")
        if center.shape not in ((K,), (1, K)):
            raise _checks.ShapeError(f"center must have shape ({K},), got {tuple(center.shape)}")
        center = center.reshape(K)
    pairing = _checks.choice(pairing, "pairing", ("dino", "rows"))
    teacher_target = _checks.choice(teacher_target, "teacher_target", ("softmax", "sinkhorn"))
    gather_distributed = _checks.flag(gather_distributed, "gather_distributed")
    student_crops, teacher_crops, weights = _checked_pairing(
        student.shape[0], teacher.shape[0], pairing, student_crops, teacher_crops, weights)
    if teacher_target == "sinkhorn":
        if center is not None:
            raise ValueError("teacher_target='sinkhorn' computes its own centre: pass "
                             "center=None")
        center = sinkhorn_knopp(teacher, V, tau_t, sinkhorn_iterations, gather_distributed)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    pidx, pw = _pair_table(student.shape[0], teacher.shape[0], pairing, student_crops,
                           teacher_crops, weights, student.device, acc)
    # a copy: a caller's centre buffer may move before the backward reads it; a float64
    # centre (the Sinkhorn scalings) stays float64 (the passes subtract it as a pair)
    c = None if center is None else center.detach().to(
        torch.float64 if center.dtype == torch.float64 else acc, copy=True).contiguous()
    loss = _ops.prototype_ce(student, student_prototypes, teacher.detach(), V.detach(), c,
                             pidx, pw, float(tau_s), float(tau_t))[0].to(student.dtype)
    if not return_center_stat:
        return loss
    return loss, _center_stat(teacher, V, acc, gather_distributed)


def _checked_tensors(student, teacher, student_prototypes, teacher_prototypes):
    """The teacher's prototypes (default: the student's) once every tensor is floating, 2-D,
    of one D and K >= 1, on one device."""
    for x, name in ((student, "student"), (teacher, "teacher"),
                    (student_prototypes, "student_prototypes")):
        _checks.floating(x, name)
        if x.dim() != 2:
            raise _checks.ShapeError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    V = student_prototypes if teacher_prototypes is None else teacher_prototypes
    _checks.floating(V, "teacher_prototypes")
    if V.shape != student_prototypes.shape:
        raise _checks.ShapeError(f"teacher_prototypes must have the student_prototypes' shape "
                                 f"{tuple(student_prototypes.shape)}, got {tuple(V.shape)}")
    D, K = student.shape[1], student_prototypes.shape[0]
    if teacher.shape[1] != D or student_prototypes.shape[1] != D or V.shape != (K, D):
        raise _checks.ShapeError(
            f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, prototypes "
            f"{tuple(student_prototypes.shape)} / {tuple(V.shape)}: need a common D and K")
    if K == 0 or D == 0:
        raise _checks.ShapeError(f"need K >= 1 prototypes and D >= 1, got K={K}, D={D}")
    for x, name in ((teacher, "teacher"), (student_prototypes, "student_prototypes"),
                    (V, "teacher_prototypes")):
        if x.device != student.device:
            raise ValueError(f"{name} is on {x.device}, student on {student.device}: every "
                             "tensor must be on one device")
    return V


def _checked_pairing(n_student, n_teacher, pairing, student_crops, teacher_crops, weights):
    """(student_crops, teacher_crops, weights) checked against the row counts: ``"rows"``
    pairs row i with row i (weights default 1/rows); ``"dino"`` pairs every student crop with
    every other teacher crop of the same image (crop-major rows, student_crops inferred)."""
    if pairing == "rows":
        if n_student != n_teacher:
            raise _checks.ShapeError(f"pairing='rows' needs as many student as teacher rows, "
                                     f"got {n_student} and {n_teacher}")
        if weights is None:
            weights = torch.full((n_student,), 1.0 / max(n_student, 1))
        if weights.shape != (n_student,):
            raise _checks.ShapeError(f"weights must have shape ({n_student},), got "
                                     f"{tuple(weights.shape)}")
        return student_crops, teacher_crops, weights
    teacher_crops = _checks.integer(teacher_crops, "teacher_crops", lo=1)
    if n_teacher % teacher_crops:
        raise _checks.ShapeError(f"teacher has {n_teacher} rows, not a multiple of "
                                 f"teacher_crops={teacher_crops}")
    B = n_teacher // teacher_crops
    if student_crops is None:
        if B == 0 or n_student % B:
            raise _checks.ShapeError(f"student has {n_student} rows, not a multiple "
                                     f"of the batch {B}")
        student_crops = n_student // B
    student_crops = _checks.integer(student_crops, "student_crops", lo=1)
    if n_student != student_crops * B:
        raise _checks.ShapeError(f"student must have {student_crops} x {B} rows, got "
                                 f"{n_student}")
    if student_crops == 1 and teacher_crops == 1:
        raise ValueError("one student crop and one teacher crop of the same view make no "
                         "pair: DINO pairs different views")
    return student_crops, teacher_crops, weights


def _center_stat(teacher, V, acc, gather_distributed):
    """mean_j t_j . v_k over every rank's teacher rows: v_k . (mean_j t_j), one (K x D)
    product, no gradient."""
    from fastssl import distributed
    with torch.no_grad():
        total = teacher.detach().to(acc).sum(0)
        count = torch.tensor(float(teacher.shape[0]), dtype=acc, device=total.device)
        if gather_distributed and distributed.is_distributed():
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        return V.detach().to(acc) @ (total / count)


class PrototypeCrossEntropy(torch.nn.Module):
    """The fused DINO / iBOT / DINOv2 head loss as a module: ``prototype_cross_entropy`` with
    DINOLoss's state. ``forward(student, teacher, prototypes, teacher_prototypes=None,
    teacher_temp=None, epoch=None, weights=None)`` on bottleneck features (crop-major rows)
    and (K, D) prototypes; the teacher temperature warms up as in ``DINOLoss``; with
    ``teacher_target="softmax"`` the centre (DINOLoss's (1, 1, K) buffer) follows the mean teacher score
    with ``center_momentum`` after each call (over every rank under torch.distributed), and
    with ``"sinkhorn"`` the target is the Sinkhorn-Knopp codes (no centre)."""

    def __init__(self, output_dim=65536, warmup_teacher_temp=0.04, teacher_temp=0.04,
                 warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9,
                 teacher_crops=2, pairing="dino", teacher_target="softmax",
                 sinkhorn_iterations=3):
        super().__init__()
        self.schedule = DINOLoss(output_dim, warmup_teacher_temp, teacher_temp,
                                 warmup_teacher_temp_epochs, student_temp, center_momentum)
        self.teacher_crops = _checks.integer(teacher_crops, "teacher_crops", lo=1)
        self.pairing = _checks.choice(pairing, "pairing", ("dino", "rows"))
        self.teacher_target = _checks.choice(teacher_target, "teacher_target",
                                             ("softmax", "sinkhorn"))
        self.sinkhorn_iterations = _checks.integer(sinkhorn_iterations, "sinkhorn_iterations",
                                                   lo=1)

    @property
    def center(self):
        return self.schedule.center

    def forward(self, student, teacher, prototypes, teacher_prototypes=None, teacher_temp=None,
                epoch=None, weights=None):
        sched = self.schedule
        tau_t = sched.temperature(teacher_temp, epoch)
        if prototypes.dim() == 2 and prototypes.shape[0] != sched.output_dim:
            raise _checks.ShapeError(f"prototypes must be (output_dim={sched.output_dim}, D), "
                                     f"got {tuple(prototypes.shape)}")
        sink = self.teacher_target == "sinkhorn"
        out = prototype_cross_entropy(
            student, teacher, prototypes, teacher_prototypes, sched.student_temp, tau_t,
            None if sink else sched.center.reshape(-1), self.pairing, None, self.teacher_crops, weights,
            return_center_stat=not sink, teacher_target=self.teacher_target,
            sinkhorn_iterations=self.sinkhorn_iterations, gather_distributed=True)
        if sink:
            return out
        loss, stat = out
        with torch.no_grad():
            m = sched.center_momentum
            sched.center.copy_(sched.center * m + stat.to(sched.center.dtype).reshape(
                sched.center.shape) * (1 - m))
        return loss


@torch.no_grad()
def sinkhorn_knopp(features, prototypes, epsilon=0.05, iterations=3, gather_distributed=False):
    """SwAV's / DINOv2's Sinkhorn-Knopp codes in factored form, with no (rows x K) matrix.

    Q_jk proportional to exp(features_j . prototypes_k / epsilon), scaled ``iterations``
    times so that each prototype's column sums to 1 / K (sums all-reduced across ranks with
    ``gather_distributed``) and then each row to 1 / B (B the global batch). The prototype
    scalings exp(-c_k / epsilon) are all that is kept: returns ``c`` (K,) float64 such that
    the codes are

        Q_jk = softmax_k((features_j . prototypes_k - c_k) / epsilon)

    -- the teacher's target of ``prototype_cross_entropy(..., center=c,
    teacher_temp=epsilon)``, which ``teacher_target="sinkhorn"`` there computes itself.
    Each iteration is a pass over the rows (their log-partitions) and a pass over the
    prototypes (their column sums), both tiled (kernels/prototype.py). The first column pass
    uses one shift for every row (the total's normalisation, as SwAV's), so the result is
    SwAV's: ``sinkhorn(scores, iterations, epsilon)`` row by row. c is defined up to one
    constant (the row softmax removes it); after each iteration it is centred,
    max c + min c = 0, so that the log-domain scalings stay as small as the score range
    allows. c is kept in float64 whatever the inputs: one float32 rounding of c would be
    |c| / epsilon roundings of a code (100 at epsilon = 0.01), where SwAV's multiplicative
    scalings round relatively; the passes subtract it as a float32 pair with a two-sum, so
    the codes are as accurate as the float32 scores allow. Form them as
    softmax((scores - c) / epsilon) with the float32 scores promoted to c's float64.
    """
    from fastssl import distributed
    for x, name in ((features, "features"), (prototypes, "prototypes")):
        _checks.floating(x, name)
        if x.dim() != 2:
            raise _checks.ShapeError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if features.shape[1] != prototypes.shape[1]:
        raise _checks.ShapeError(f"features {tuple(features.shape)} and prototypes "
                                 f"{tuple(prototypes.shape)} need a common D")
    if prototypes.shape[0] == 0:
        raise _checks.ShapeError("need at least one prototype")
    eps = _checks.number(epsilon, "epsilon", lo=0.0, lo_open=True)
    iterations = _checks.integer(iterations, "iterations", lo=1)
    active = _checks.flag(gather_distributed, "gather_distributed") and \
        distributed.is_distributed()
    impl = _ops._prototype_impl(features, prototypes)
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    K = prototypes.shape[0]
    c = torch.zeros(K, dtype=torch.float64, device=features.device)
    n = torch.tensor(float(features.shape[0]), dtype=acc, device=features.device)
    st, _ = impl.rows(features, prototypes, None, None, 1.0 / eps)
    top = st[:, 0].amax().reshape(1) if st.numel() else st.new_full((1,), -float("inf"))
    if active:
        torch.distributed.all_reduce(n)
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    if _checks.has_values(n) and (not torch.isfinite(n) or n.item() == 0):
        raise ValueError("sinkhorn_knopp needs at least one row (on some rank)")
    # the first pass: one shift for every row (the largest product), as Q / sum(Q)
    st = torch.stack([top.expand(st.shape[0]), torch.zeros_like(st[:, 1])], 1)
    for _ in range(iterations):
        col = impl.cols(features, prototypes, c, 1.0 / eps, st,
                        torch.ones(features.shape[0], 1, dtype=acc, device=features.device))
        col = col[:, 0].to(torch.float64)
        if active:
            torch.distributed.all_reduce(col)
        # prototype k's column to 1 / K: exp(-c_k / eps) *= 1 / (K * colsum_k), up to one
        # factor for all k (the row softmax removes it). An empty column (every row's
        # exponential underflowed) takes the smallest normal sum: a large boost, not inf.
        c = c + eps * torch.log(col.clamp(min=torch.finfo(acc).tiny) * K)
        c = c - (c.amax() + c.amin()) / 2  # the codes do not change
        st = impl.rows(features, prototypes, None, c, 1.0 / eps)[0]
    return c

def koleo(x, p=2, eps=1e-8):
    """KoLeo (DINOv2's spreading regulariser): rows normalised, each row's nearest other row
    by cosine, loss = -mean_i log(||x_i - x_nn(i) + eps||_p + eps); the gradient flows
    through the chosen pairs. Nearest neighbours are found in row chunks (no N x N matrix).

    A single row is its own neighbour, as in DINOv2's and lightly's code: the distance is
    ||eps||_p = eps D^(1/p), the loss -log(eps D^(1/p) + eps) (17.7275 for D = 1 at
    eps = 1e-8) and the gradient zero (x_i - x_i does not depend on x).
    """
    _checks.floating(x, "x")
    if x.dim() != 2:
        raise _checks.ShapeError(f"x must be 2-D (n, D), got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError("KoLeo needs at least one row")
    p = _checks.number(p, "p", lo=0.0, lo_open=True)
    eps = _checks.number(eps, "eps", lo=0.0)
    z = torch.nn.functional.normalize(x, p=2, dim=-1, eps=eps)
    n = z.shape[0]
    nearest = torch.empty(n, dtype=torch.long, device=x.device)
    chunk = _chunk(n)
    with torch.no_grad():
        zd = z.detach()
        for i0 in range(0, n, chunk):
            dots = zd[i0:i0 + chunk] @ zd.T
            rows = torch.arange(i0, min(i0 + chunk, n), device=x.device)
            if n > 1:
                dots[rows - i0, rows] = -float("inf")  # not itself
            nearest[i0:i0 + chunk] = dots.argmax(1)
    d = torch.nn.functional.pairwise_distance(z, z[nearest], p=p, eps=eps)
    return -torch.log(d + eps).mean()



class KoLeoLoss(torch.nn.Module):
    """lightly's KoLeoLoss: ``KoLeoLoss(p=2, eps=1e-8)``, ``forward(x)`` on (n, D) rows
    (``koleo``: nearest neighbours by a chunked max, no n x n matrix)."""

    def __init__(self, p=2, eps=1e-8):
        super().__init__()
        self.p = _checks.number(p, "p", lo=0.0, lo_open=True)
        self.eps = _checks.number(eps, "eps", lo=0.0)

    def forward(self, x):
        return koleo(x, self.p, self.eps)

def _scaled(x, k0, k1, shift, tau, acc):
    """Columns k0:k1 of (x - shift) / tau in ``acc``: one formula for every pass, so that each
    pass sees the same rounded scores (a division, as the eager formulation writes it)."""
    y = x[:, k0:k1].to(acc)
    if shift is not None:
        y = y - shift[k0:k1].to(acc)
    return y / tau


def _softmax_stats(x, shift, tau, chunk, acc):
    """(m, log z) per row of y = (x - shift) / tau, in column chunks: m = max_k y_k and
    z = sum_k exp(y_k - m), kept apart. y - m is exact (Sterbenz) and log z lies in
    [0, log K], so log softmax = (y - m) - log z never rounds at the scale of |m|, which
    reaches hundreds at sharp temperatures (m + log z would lose ~1e-5 there)."""
    m = torch.full((x.shape[0],), -float("inf"), dtype=acc, device=x.device)
    for k0 in range(0, x.shape[1], chunk):
        m = torch.maximum(m, _scaled(x, k0, k0 + chunk, shift, tau, acc).amax(1))
    z = torch.zeros_like(m)
    for k0 in range(0, x.shape[1], chunk):
        z += torch.exp(_scaled(x, k0, k0 + chunk, shift, tau, acc) - m[:, None]).sum(1)
    return m, torch.log(z), z


class _LogitsCE(torch.autograd.Function):
    """sum_pairs w * (-softmax_t(teacher_j) . log_softmax(student_i / tau_s)) on given
    logits, with (rows x chunk) temporaries only; gradient to the student logits.

    With y = s / tau_s, u = (t - c) / tau_t, per-row maxima m and partitions z (kept apart,
    ``_softmax_stats``), p = exp(u - m_t) / z_t and the pair's cross-entropy is

        CE(i, j) = -sum_k p_jk ((y_ik - m_i) - log z_i)

    -- the eager formulation's rounding (no difference of two large numbers), summed in
    column chunks. The backward is dL/ds_i = (a_i softmax(y_i) - sum_j g_ij p_j) / tau_s."""

    @staticmethod
    def forward(ctx, s, t, center, si, tj, w, tau_s, tau_t):
        chunk = _chunk(max(s.shape[0], t.shape[0]))
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        m_s, logz_s, _ = _softmax_stats(s, None, tau_s, chunk, acc)
        m_t, _, z_t = _softmax_stats(t, center, tau_t, chunk, acc)
        ce = torch.zeros(len(si), dtype=acc, device=s.device)
        for k0 in range(0, s.shape[1], chunk):
            k1 = k0 + chunk
            logp_s = (_scaled(s, k0, k1, None, tau_s, acc) - m_s[:, None]) - logz_s[:, None]
            p_t = torch.exp(_scaled(t, k0, k1, center, tau_t, acc) - m_t[:, None]) / z_t[:, None]
            ce -= (p_t[tj] * logp_s[si]).sum(1)
        loss = (w.to(acc) * ce).sum()
        ctx.save_for_backward(s, t, center, si, tj, w, m_s, logz_s, m_t, z_t)
        ctx.taus = (tau_s, tau_t)
        return loss.to(s.dtype)

    @staticmethod
    def backward(ctx, grad):
        s, t, center, si, tj, w, m_s, logz_s, m_t, z_t = ctx.saved_tensors
        tau_s, tau_t = ctx.taus
        acc = m_s.dtype
        g = w.to(acc) * grad.to(acc)
        a = torch.zeros(s.shape[0], dtype=acc, device=s.device).index_add_(0, si, g)
        ds = torch.empty_like(s)
        chunk = _chunk(max(s.shape[0], t.shape[0]))
        for k0 in range(0, s.shape[1], chunk):
            k1 = min(k0 + chunk, s.shape[1])
            sm = torch.exp((_scaled(s, k0, k1, None, tau_s, acc) - m_s[:, None])
                           - logz_s[:, None])
            p_t = torch.exp(_scaled(t, k0, k1, center, tau_t, acc) - m_t[:, None]) / z_t[:, None]
            d = (sm * a[:, None]).index_add_(0, si, -g[:, None] * p_t[tj])
            ds[:, k0:k1] = d / tau_s
        return ds, None, None, None, None, None, None, None


class DINOLoss(torch.nn.Module):
    """lightly's DINOLoss on given prototype scores: ``forward(teacher_out, student_out,
    teacher_temp=None, epoch=None)`` with lists of (B, K) tensors, crop-major; the teacher
    temperature warms up linearly from ``warmup_teacher_temp`` over
    ``warmup_teacher_temp_epochs`` epochs when ``epoch`` is given; the centre follows the
    mean teacher score with ``center_momentum`` after each call. The cross-entropy is computed in column chunks (no log-softmax tensor).

    The centre is lightly's buffer ``center`` of shape (1, 1, output_dim) (a lightly
    checkpoint loads), and ``update_center(x)`` takes the mean over x's first two dimensions
    as lightly's does: over crops and samples of a (crops, B, K) stack, and over every entry
    of a 2-D (B, K) tensor (a scalar that moves every prototype's centre alike)."""

    def __init__(self, output_dim=65536, warmup_teacher_temp=0.04, teacher_temp=0.04,
                 warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9,
                 center_mode="mean"):
        super().__init__()
        self.center_mode = _center_mode(center_mode)
        self.output_dim = _checks.integer(output_dim, "output_dim", lo=1)
        self.warmup_teacher_temp = _checks.number(warmup_teacher_temp, "warmup_teacher_temp",
                                                  lo=0.0, lo_open=True)
        self.teacher_temp = _checks.number(teacher_temp, "teacher_temp", lo=0.0, lo_open=True)
        self.warmup_teacher_temp_epochs = _checks.integer(warmup_teacher_temp_epochs,
                                                          "warmup_teacher_temp_epochs", lo=0)
        self.student_temp = _checks.number(student_temp, "student_temp", lo=0.0, lo_open=True)
        self.center_momentum = _checks.number(center_momentum, "center_momentum", lo=0.0,
                                              hi=1.0)
        self.register_buffer("center", torch.zeros(1, 1, self.output_dim))

    def temperature(self, teacher_temp=None, epoch=None):
        if teacher_temp is not None:
            return _checks.number(teacher_temp, "teacher_temp", lo=0.0, lo_open=True)
        if epoch is not None:
            epoch = _checks.integer(epoch, "epoch", lo=0)
            n = self.warmup_teacher_temp_epochs
            if epoch < n:
                return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) \
                    * (epoch / (n - 1) if n > 1 else 0.0)
        return self.teacher_temp

    def forward(self, teacher_out, student_out, teacher_temp=None, epoch=None):
        tau_t = self.temperature(teacher_temp, epoch)
        t, s = _stack(teacher_out, "teacher_out"), _stack(student_out, "student_out")
        if t.shape[1:] != s.shape[1:] or t.shape[2] != self.output_dim:
            raise _checks.ShapeError(f"teacher crops {tuple(t.shape[1:])} and student crops "
                                     f"{tuple(s.shape[1:])} must be (B, output_dim="
                                     f"{self.output_dim})")
        T, S, B = t.shape[0], s.shape[0], t.shape[1]
        if T * S - min(T, S) == 0:
            raise ValueError("DINOLoss needs at least two views: one teacher and one student "
                             "crop of the same view make no pair")
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        si, tj, w = _pairs(S * B, T * B, S, T, s.device, acc)
        loss = _LogitsCE.apply(s.reshape(S * B, -1), t.detach().reshape(T * B, -1),
                               self.center.detach().reshape(-1).clone(), si, tj, w,
                               self.student_temp, tau_t)  # a copy: the centre moves next
        self.update_center(t)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out):
        """centre <- momentum centre + (1 - momentum) mean over teacher_out's dims 0 and 1
        (every rank's entries under torch.distributed)."""
        _move_center(self.center, teacher_out, (0, 1), self.center_momentum)


def _center_mode(mode):
    if mode not in ("mean",):
        raise ValueError(f"Unknown mode '{mode}'. Valid modes are ['mean'].")
    return mode


@torch.no_grad()
def _move_center(center, x, dims, momentum):
    """In place: center <- center * momentum + mean_dims(x) * (1 - momentum), the mean over
    the entries of every rank (sums and counts all-reduced: ranks may hold different
    counts). With no entries anywhere the centre stays (a mean of nothing is undefined)."""
    from fastssl import distributed
    x = x.detach()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    total = x.to(acc).sum(dim=dims, keepdim=True)
    count = torch.tensor(float(math.prod(x.shape[d] for d in dims)), dtype=acc,
                         device=x.device)
    if distributed.is_distributed():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    if _checks.has_values(count) and count.item() == 0:
        return
    mean = (total / count).to(center.dtype)
    center.copy_(center * momentum + mean * (1 - momentum))


class Center(torch.nn.Module):
    """lightly's ``Center(size, mode="mean", momentum=0.9)``: a buffer ``center`` of shape
    ``size`` (``value``), moved by ``update(x)`` towards the mean of x over the dimensions
    where ``size`` is 1 (across ranks under torch.distributed, ``_move_center``)."""

    def __init__(self, size, mode="mean", momentum=0.9):
        super().__init__()
        self.mode = _center_mode(mode)
        self.size = tuple(size)
        self.dim = tuple(i for i, s in enumerate(self.size) if s == 1)
        self.momentum = _checks.number(momentum, "momentum", lo=0.0, hi=1.0)
        self.register_buffer("center", torch.zeros(self.size))

    @property
    def value(self):
        return self.center

    @torch.no_grad()
    def update(self, x):
        _move_center(self.center, x, self.dim, self.momentum)


def _stack(crops, name):
    if isinstance(crops, torch.Tensor):
        crops = [crops]
    if not isinstance(crops, (list, tuple)) or not crops:
        raise TypeError(f"{name} must be a non-empty list of (B, K) tensors")
    for i, c in enumerate(crops):
        _checks.floating(c, f"{name}[{i}]")
        if c.dim() != 2 or c.shape != crops[0].shape:
            raise _checks.ShapeError(f"{name}[{i}] has shape {tuple(c.shape)}; every crop must "
                                     f"be (B, K) like {name}[0] {tuple(crops[0].shape)}")
    return torch.stack(list(crops))


class IBOTPatchLoss(torch.nn.Module):
    """lightly's IBOTPatchLoss on given scores of the masked patch tokens:
    ``forward(teacher_out, student_out, mask, teacher_temp=None)``, scores (B*N, K) in the
    order of ``mask`` (B, H, W) bool's True entries; each token's cross-entropy weighs
    1 / (masked tokens of its image, at least 1), summed and divided by B. The centre is
    lightly's ``Center`` module (``center.value``, shape (1, output_dim)): it follows the
    mean teacher score after each call. With no masked token on any rank the centre stays
    where lightly's becomes NaN (the mean of no rows)."""

    def __init__(self, output_dim=65536, teacher_temp=0.04, student_temp=0.1,
                 center_mode="mean", center_momentum=0.9):
        super().__init__()
        self.output_dim = _checks.integer(output_dim, "output_dim", lo=1)
        self.teacher_temp = _checks.number(teacher_temp, "teacher_temp", lo=0.0, lo_open=True)
        self.student_temp = _checks.number(student_temp, "student_temp", lo=0.0, lo_open=True)
        self.center = Center((1, self.output_dim), center_mode, center_momentum)

    def forward(self, teacher_out, student_out, mask, teacher_temp=None):
        tau_t = self.teacher_temp if teacher_temp is None else _checks.number(
            teacher_temp, "teacher_temp", lo=0.0, lo_open=True)
        _checks.floating(teacher_out, "teacher_out")
        _checks.floating(student_out, "student_out")
        _checks.tensor(mask, "mask")
        if mask.dtype != torch.bool or mask.dim() < 2:
            raise ValueError(f"mask must be a bool tensor (B, H, W), got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        rows = int(mask.sum()) if _checks.has_values(mask) else teacher_out.shape[0]
        for x, name in ((teacher_out, "teacher_out"), (student_out, "student_out")):
            if x.shape != (rows, self.output_dim):
                raise _checks.ShapeError(f"{name} must be (masked tokens = {rows}, output_dim="
                                         f"{self.output_dim}), got {tuple(x.shape)}")
        flat = mask.reshape(mask.shape[0], -1)
        per_image = flat.sum(1, keepdim=True).clamp(min=1).to(torch.float64)
        acc = torch.float64 if student_out.dtype == torch.float64 else torch.float32
        weights = torch.repeat_interleave((1.0 / per_image / mask.shape[0])[:, 0], flat.sum(1),
                                          output_size=rows).to(acc)  # in the mask's order
        idx = torch.arange(rows, device=student_out.device)
        loss = _LogitsCE.apply(student_out, teacher_out.detach(),
                               self.center.value.detach().reshape(-1).clone(), idx, idx,
                               weights.to(student_out.device), self.student_temp, tau_t)
        self.center.update(teacher_out)
        return loss


@torch.no_grad()
def sinkhorn(out, iterations=3, epsilon=0.05, gather_distributed=False):
    """lightly's / SwAV's Sinkhorn-Knopp codes of (B, K) prototype scores ``out``:
    Q = exp(out / epsilon)^T / its total; ``iterations`` times, each prototype's row divided
    by its sum (all-reduced across ranks with ``gather_distributed`` under an initialised
    torch.distributed) and each sample's column normalised to 1 / B_global; returns
    B_global * Q^T (each sample's code sums to 1), in out's dtype.

    The exponentials are exp((out - max) / epsilon) (the global maximum over every rank): the
    factor exp(-max / epsilon) cancels in the first normalisation, and no score overflows
    where exp(out / epsilon) would (out / epsilon > 88 in float32). Computed in float32
    (float64 for float64 scores)."""
    from fastssl import distributed
    _checks.floating(out, "out")
    if out.dim() != 2:
        raise _checks.ShapeError(f"out must be (B, K), got {tuple(out.shape)}")
    iterations = _checks.integer(iterations, "iterations", lo=0)
    eps = _checks.number(epsilon, "epsilon", lo=0.0, lo_open=True)
    active = _checks.flag(gather_distributed, "gather_distributed") and \
        distributed.is_distributed()
    world = distributed.world_size() if active else 1
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    scores = out.detach().to(acc)
    top = scores.amax().reshape(1) if scores.numel() else scores.new_zeros(1)
    if active:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    q = torch.exp((scores - top) / eps).t()

    def summed(x):
        if active:
            torch.distributed.all_reduce(x)
        return x
    q = q / summed(q.sum())
    n = q.shape[1] * world
    for _ in range(iterations):
        q = q / summed(q.sum(1, keepdim=True))
        q = q / q.sum(0, keepdim=True) / n
    return (q * n).t().to(out.dtype)


class SwaVLoss(torch.nn.Module):
    """lightly's SwaVLoss: ``forward(high_resolution_outputs, low_resolution_outputs,
    queue_outputs=None)`` with lists of (B, K) prototype scores; each high-resolution crop's
    Sinkhorn codes (of exp(scores / sinkhorn_epsilon), the queue's scores appended when
    given) are predicted from every other crop's softmax at ``temperature``."""

    def __init__(self, temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05,
                 sinkhorn_gather_distributed=False):
        super().__init__()
        self.temperature = _checks.number(temperature, "temperature", lo=0.0, lo_open=True)
        self.sinkhorn_iterations = _checks.integer(sinkhorn_iterations, "sinkhorn_iterations",
                                                   lo=0)
        self.sinkhorn_epsilon = _checks.number(sinkhorn_epsilon, "sinkhorn_epsilon", lo=0.0,
                                               lo_open=True)
        self.sinkhorn_gather_distributed = _checks.flag(sinkhorn_gather_distributed,
                                                        "sinkhorn_gather_distributed")
        if self.sinkhorn_gather_distributed:  # lightly's rule: ask torch.distributed once
            from fastssl import distributed
            distributed.require_distributed("SwaVLoss(sinkhorn_gather_distributed=True)")

    def subloss(self, z, q):
        return -(q * torch.log_softmax(z / self.temperature, dim=1)).sum(1).mean()

    def forward(self, high_resolution_outputs, low_resolution_outputs, queue_outputs=None):
        high = list(high_resolution_outputs)
        crops = high + list(low_resolution_outputs)
        if not high or len(crops) < 2:
            raise ValueError("SwaVLoss needs at least one high-resolution crop and two crops")
        _stack(crops, "outputs")
        if queue_outputs is not None and len(queue_outputs) != len(high):
            raise ValueError(f"queue_outputs must hold one tensor per high-resolution crop "
                             f"({len(high)}), got {len(queue_outputs)}")
        loss = 0.0
        for i, h in enumerate(high):
            with torch.no_grad():
                scores = h.detach()
                if queue_outputs is not None:
                    scores = torch.cat([scores, queue_outputs[i].detach()])
                codes = sinkhorn(scores, self.sinkhorn_iterations, self.sinkhorn_epsilon,
                                 self.sinkhorn_gather_distributed)[:len(h)]
            sub = sum(self.subloss(crops[v], codes) for v in range(len(crops)) if v != i)
            loss = loss + sub / (len(crops) - 1)
        return loss / len(high)
