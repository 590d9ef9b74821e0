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

One pass over K in column chunks gives q_j (an online softmax that rescales its running
sums as the maximum moves) and LSE_i; the backward recomputes both softmaxes chunk by chunk:

    dL/ds_i = (a_i sum_k softmax_ik w_k - r_i) / tau_s,     a_i = sum_j g_ij,  r_i = sum_j g_ij q_j
    dL/dw_k = (sum_i a_i softmax_ik s_i - sum_j p_jk h_j) / tau_s,            h_j = sum_i g_ij s_i

with g_ij the weight of pair (i, j) in the loss. Memory O((rows + K) x D + rows x chunk).
``center_stat`` = mean_j t_j . v_k (the batch statistic DINO's centre follows) is V @ mean_j t_j.
"""
import torch

from fastssl import _checks

CHUNK = None  # prototypes per chunk; None: about 2^21 scores per chunk


def _chunk(rows):
    return CHUNK or int(max(64, 2 ** 21 // max(rows, 1)))


def _pairs(student_rows, teacher_rows, pairing, student_crops, teacher_crops, weights, device,
           dtype):
    """The (student row, teacher row, weight) triples of the loss, as index tensors."""
    if pairing == "rows":
        idx = torch.arange(student_rows, device=device)
        return idx, idx, weights.to(device=device, dtype=dtype)
    B = teacher_rows // teacher_crops
    si, tj = [], []
    for v in range(student_crops):
        for u in range(teacher_crops):
            if u == v:
                continue
            si.append(torch.arange(v * B, (v + 1) * B, device=device))
            tj.append(torch.arange(u * B, (u + 1) * B, device=device))
    n_pairs = len(si)
    si, tj = torch.cat(si), torch.cat(tj)
    return si, tj, torch.full((len(si),), 1.0 / (n_pairs * B), device=device, dtype=dtype)


def _teacher_pass(t, V, W, center, tau_t, chunk):
    """(q (rows_t, D): sum_k p_jk w_k, lse_t (rows_t,): teacher log-partition at tau_t)."""
    m_run = torch.full((t.shape[0],), -float("inf"), dtype=t.dtype, device=t.device)
    z = torch.zeros_like(m_run)
    q = torch.zeros(t.shape[0], W.shape[1], dtype=t.dtype, device=t.device)
    for k0 in range(0, V.shape[0], chunk):
        x = t @ V[k0:k0 + chunk].T
        if center is not None:
            x -= center[k0:k0 + chunk]
        x /= tau_t
        m_new = torch.maximum(m_run, x.amax(1))
        scale = torch.exp(m_run - m_new)
        x = torch.exp(x - m_new[:, None])
        z = z * scale + x.sum(1)
        q = q * scale[:, None] + x @ W[k0:k0 + chunk]
        m_run = m_new
    return q / z[:, None], m_run + torch.log(z)


def _student_lse(s, W, tau_s, chunk):
    m_run = torch.full((s.shape[0],), -float("inf"), dtype=s.dtype, device=s.device)
    z = torch.zeros_like(m_run)
    for k0 in range(0, W.shape[0], chunk):
        x = (s @ W[k0:k0 + chunk].T) / tau_s
        m_new = torch.maximum(m_run, x.amax(1))
        z = z * torch.exp(m_run - m_new) + torch.exp(x - m_new[:, None]).sum(1)
        m_run = m_new
    return m_run + torch.log(z)


class _PrototypeCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, W, t, V, center, si, tj, w, tau_s, tau_t):
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        s_, W_, t_, V_ = (x.detach().to(acc) for x in (s, W, t, V))
        c_ = None if center is None else center.detach().to(acc)
        chunk = _chunk(max(s.shape[0], t.shape[0]))
        q, lse_t = _teacher_pass(t_, V_, W_, c_, tau_t, chunk)
        lse_s = _student_lse(s_, W_, tau_s, chunk)
        ce = lse_s[si] - (s_[si] * q[tj]).sum(1) / tau_s
        loss = (w.to(acc) * ce).sum()
        ctx.save_for_backward(s, W, t, V, center, si, tj, w, q, lse_t, lse_s)
        ctx.taus = (tau_s, tau_t)
        return loss.to(s.dtype)

    @staticmethod
    def backward(ctx, grad):
        s, W, t, V, center, si, tj, w, q, lse_t, lse_s = ctx.saved_tensors
        tau_s, tau_t = ctx.taus
        acc = q.dtype
        s_, W_, t_, V_ = (x.detach().to(acc) for x in (s, W, t, V))
        g = w.to(acc) * grad.to(acc)
        a = torch.zeros(s.shape[0], dtype=acc, device=s.device).index_add_(0, si, g)
        r = torch.zeros_like(s_).index_add_(0, si, g[:, None] * q[tj])
        h = torch.zeros(t.shape[0], s.shape[1], dtype=acc, device=s.device).index_add_(
            0, tj, g[:, None] * s_[si])
        ds = -r
        dW = torch.empty_like(W_)
        chunk = _chunk(max(s.shape[0], t.shape[0]))
        for k0 in range(0, W.shape[0], chunk):
            Wc = W_[k0:k0 + chunk]
            ps = torch.exp((s_ @ Wc.T) / tau_s - lse_s[:, None]) * a[:, None]
            x = t_ @ V_[k0:k0 + chunk].T
            if center is not None:
                x -= center[k0:k0 + chunk].to(acc)
            pt = torch.exp(x / tau_t - lse_t[:, None])
            ds += ps @ Wc
            dW[k0:k0 + chunk] = ps.T @ s_ - pt.T @ h
        ds /= tau_s
        dW /= tau_s
        return (ds.to(s.dtype), dW.to(W.dtype), None, None, None, None, None, None, None,
                None)


def prototype_cross_entropy(student, teacher, student_prototypes, teacher_prototypes=None,
                            student_temp=0.1, teacher_temp=0.04, center=None, pairing="dino",
                            student_crops=None, teacher_crops=2, weights=None,
                            return_center_stat=False):
    """The DINO / iBOT cross-entropy of student rows against the teacher's distribution over
    K prototypes, never storing a (rows x K) matrix (see the module docstring).

    ``student`` (S*B, D) and ``teacher`` (T*B, D), crop-major; ``student_prototypes`` (K, D)
    and ``teacher_prototypes`` (K, D; default: the student's, detached); ``center`` (K,) is
    subtracted from the teacher's scores before ``teacher_temp``. Gradients reach the student
    rows and the student prototypes only. With ``return_center_stat`` also returns
    mean_j teacher_j . v_k, the batch statistic for the centre's momentum update.
    """
    for x, name in ((student, "student"), (teacher, "teacher"),
                    (student_prototypes, "student_prototypes")):
        _checks.floating(x, name)
        if x.dim() != 2:
            raise _checks.ShapeError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    V = student_prototypes if teacher_prototypes is None else teacher_prototypes
    _checks.floating(V, "teacher_prototypes")
    D, K = student.shape[1], student_prototypes.shape[0]
    if teacher.shape[1] != D or student_prototypes.shape[1] != D or V.shape != (K, D):
        raise _checks.ShapeError(
            f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, prototypes "
            f"{tuple(student_prototypes.shape)} / {tuple(V.shape)}: need a common D and K")
    if K == 0 or D == 0:
        raise _checks.ShapeError(f"need K >= 1 prototypes and D >= 1, got K={K}, D={D}")
    tau_s = _checks.number(student_temp, "student_temp", lo=0.0, lo_open=True)
    tau_t = _checks.number(teacher_temp, "teacher_temp", lo=0.0, lo_open=True)
    if center is not None:
        _checks.floating(center, "center")
        if center.shape not in ((K,), (1, K)):
            raise _checks.ShapeError(f"center must have shape ({K},), got {tuple(center.shape)}")
        center = center.reshape(K)
    pairing = _checks.choice(pairing, "pairing", ("dino", "rows"))
    if pairing == "rows":
        if student.shape[0] != teacher.shape[0]:
            raise _checks.ShapeError(f"pairing='rows' needs as many student as teacher rows, "
                                     f"got {student.shape[0]} and {teacher.shape[0]}")
        if weights is None:
            weights = torch.full((student.shape[0],), 1.0 / max(student.shape[0], 1))
        if weights.shape != (student.shape[0],):
            raise _checks.ShapeError(f"weights must have shape ({student.shape[0]},), got "
                                     f"{tuple(weights.shape)}")
    else:
        teacher_crops = _checks.integer(teacher_crops, "teacher_crops", lo=1)
        if teacher.shape[0] % teacher_crops:
            raise _checks.ShapeError(f"teacher has {teacher.shape[0]} rows, not a multiple of "
                                     f"teacher_crops={teacher_crops}")
        B = teacher.shape[0] // teacher_crops
        if student_crops is None:
            if B == 0 or student.shape[0] % B:
                raise _checks.ShapeError(f"student has {student.shape[0]} rows, not a multiple "
                                         f"of the batch {B}")
            student_crops = student.shape[0] // B
        student_crops = _checks.integer(student_crops, "student_crops", lo=1)
        if student.shape[0] != student_crops * B:
            raise _checks.ShapeError(f"student must have {student_crops} x {B} rows, got "
                                     f"{student.shape[0]}")
        if student_crops == 1 and teacher_crops == 1:
            raise ValueError("one student crop and one teacher crop of the same view make no "
                             "pair: DINO pairs different views")
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    si, tj, w = _pairs(student.shape[0], teacher.shape[0], pairing, student_crops,
                       teacher_crops, weights, student.device, acc)
    loss = _PrototypeCE.apply(student, student_prototypes, teacher.detach(), V.detach(),
                              None if center is None else center.detach(), si, tj, w, tau_s,
                              tau_t)
    if not return_center_stat:
        return loss
    with torch.no_grad():
        stat = V.detach().to(acc) @ teacher.detach().to(acc).mean(0)
    return loss, stat


def koleo(x, p=2, eps=1e-8):
    """KoLeo (DINOv2's spreading regulariser): rows normalised, each row's nearest other row
    by cosine, loss = -mean_i log(||x_i - x_nn(i) + eps||_p + eps); the gradient flows
    through the chosen pairs. Nearest neighbours are found in row chunks (no N x N matrix).
    """
    _checks.floating(x, "x")
    if x.dim() != 2:
        raise _checks.ShapeError(f"x must be 2-D (n, D), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 rows (a nearest neighbour), got {x.shape[0]}")
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
            dots[rows - i0, rows] = -float("inf")  # not itself
            nearest[i0:i0 + chunk] = dots.argmax(1)
    d = torch.nn.functional.pairwise_distance(z, z[nearest], p=p, eps=eps)
    return -torch.log(d + eps).mean()
