"""Prototype cross-entropy (DINO pairing, iBOT row weights) against the textbook float64
formula with the (rows x K) matrices materialised; chunk sizes forced small so that every
case crosses several chunks."""
import math
import pytest
import torch
import torch.nn.functional as tF

from fastssl import ShapeError, _reference
from fastssl import prototype as PR


def reference(s, W, t, V, c, tau_s, tau_t, pairs):
    """mean / weighted sum over (student row, teacher row, weight) of -p_t . log softmax_s."""
    ls = torch.log_softmax(s @ W.T / tau_s, 1)
    pt = torch.softmax((t @ V.T - (0 if c is None else c)) / tau_t, 1)
    return sum(w * -(pt[j] * ls[i]).sum() for i, j, w in pairs)


def dino_pairs(S, T, B):
    n = sum(1 for v in range(S) for u in range(T) if u != v)
    return [(v * B + b, u * B + b, 1.0 / (n * B)) for v in range(S) for u in range(T) if u != v
            for b in range(B)]


def data(rows_s, rows_t, K, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: tF.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)  # noqa: E731
    return mk(rows_s), mk(rows_t), mk(K), mk(K), 0.1 * torch.randn(K, generator=g,
                                                                   dtype=torch.float64)


def check(loss, grads, ref, ref_grads, dtype, scales=(0.0, 0.0)):
    """Relative errors within the dtype's tolerance. ``scales``: the norms of the terms whose
    difference a gradient is (the prototypes' gradient is the student's softmax term minus
    the teacher's, each rounded to the operand dtype in the tile matmuls), the error's scale
    where the gradient itself cancels (K = 1: exactly zero)."""
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2,
           torch.float16: 5e-3}[dtype]
    assert loss.dtype == dtype
    assert abs(loss.double().item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    for g, r, sc in zip(grads, ref_grads, scales):
        assert g.dtype == dtype
        assert (g.double() - r).norm() <= tol * max(r.norm().item(), sc, 1e-3), \
            ((g.double() - r).norm().item(), r.norm().item(), sc)


@pytest.mark.parametrize("S,T,B,K,D", [(2, 2, 5, 7, 3), (6, 2, 3, 1000, 257), (4, 2, 1, 1, 1),
                                       (3, 1, 4, 130, 16), (2, 2, 1, 65, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tau_t", [0.01, 0.04, 0.1])
def test_dino_pairing_matches_float64(backend, device, S, T, B, K, D, dtype, tau_t,
                                      monkeypatch):
    monkeypatch.setattr(_reference, "BLOCK", 17)
    s, t, W, V, c = (x.to(device) for x in data(S * B, T * B, K, D, dtype, seed=S * 100 + K))
    s_, W_ = s.to(dtype).requires_grad_(), W.to(dtype).requires_grad_()
    loss = PR.prototype_cross_entropy(s_, t.to(dtype), W_, V.to(dtype), 0.1, tau_t,
                                      c.to(dtype), teacher_crops=T)
    grads = torch.autograd.grad(loss, (s_, W_))
    # The reference sees the same (rounded) inputs, in float64.
    s64, W64 = s_.detach().double().requires_grad_(), W_.detach().double().requires_grad_()
    ref = reference(s64, W64, t.to(dtype).double(), V.to(dtype).double(),
                    c.to(dtype).double(), 0.1, tau_t, dino_pairs(S, T, B))
    ref_grads = torch.autograd.grad(ref, (s64, W64))
    lse = torch.logsumexp(s64 @ W64.T / 0.1, 1)
    term = torch.autograd.grad(sum(w * lse[i] for i, _, w in dino_pairs(S, T, B)), W64)[0]
    check(loss, grads, ref, ref_grads, dtype, (0.0, term.norm().item()))


@pytest.mark.parametrize("rows,K,D", [(1, 5, 4), (37, 300, 33)])
def test_row_pairing_with_weights(backend, device, rows, K, D, monkeypatch):
    """iBOT: row r against teacher row r, weight 1 / masked tokens of its image / images."""
    monkeypatch.setattr(_reference, "BLOCK", 64)
    s, t, W, V, c = (x.to(device) for x in data(rows, rows, K, D, torch.float64, seed=rows))
    image = torch.arange(rows, device=device) % 3
    counts = torch.bincount(image).double()
    w = 1.0 / counts[image] / len(counts)
    s_, W_ = s.clone().requires_grad_(), W.clone().requires_grad_()
    loss = PR.prototype_cross_entropy(s_, t, W_, V, 0.1, 0.05, c, pairing="rows", weights=w)
    ref = reference(s_, W_, t, V, c, 0.1, 0.05, [(r, r, w[r]) for r in range(rows)])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(torch.autograd.grad(loss, (s_, W_), retain_graph=True),
                    torch.autograd.grad(ref, (s_, W_))):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_center_statistic_and_teacher_gets_no_gradient(backend):
    s, t, W, V, c = data(8, 4, 50, 6, torch.float64, seed=3)
    t, V = t.requires_grad_(), V.requires_grad_()
    loss, stat = PR.prototype_cross_entropy(s, t, W, V, center=c, return_center_stat=True)
    torch.testing.assert_close(stat, (t @ V.T).mean(0).detach())
    assert not loss.requires_grad  # nothing on the student side requires grad here


def test_sharp_teacher_is_finite(backend):
    s, t, W, V, _ = data(4, 4, 2000, 8, torch.float64, seed=5)
    t = t * 1e3  # scores of 1e3 at tau_t = 0.01: exp(1e5) overflows a naive softmax
    loss = PR.prototype_cross_entropy(s.float(), t.float(), W.float(), V.float(), 0.1, 0.01)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(student=torch.ones(4, 3), teacher=torch.ones(4, 2)), ShapeError, "common D"),
    (dict(teacher=torch.ones(5, 3)), ShapeError, "not a multiple of teacher_crops"),
    (dict(student=torch.ones(5, 3)), ShapeError, "not a multiple of the batch"),
    (dict(student_temp=0.0), ValueError, "student_temp must be > 0"),
    (dict(teacher_temp=-1.0), ValueError, "teacher_temp must be > 0"),
    (dict(center=torch.ones(3)), ShapeError, "center must have shape"),
    (dict(pairing="swav"), ValueError, "pairing"),
    (dict(student=torch.ones(2, 3), teacher=torch.ones(2, 3), teacher_crops=1), ValueError,
     "make no pair"),
    (dict(pairing="rows", student=torch.ones(3, 3)), ShapeError, "as many student as teacher"),
    (dict(student=torch.ones(4, 3, dtype=torch.long)), ValueError, "floating dtype"),
])
def test_bad_inputs(kwargs, error, match):
    args = dict(student=torch.ones(4, 3), teacher=torch.ones(4, 3),
                student_prototypes=torch.ones(5, 3), teacher_crops=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        PR.prototype_cross_entropy(**args)


def test_memory_is_linear_in_rows_and_k(backend):
    """No (rows x K) buffer: the saved tensors are O((rows + K) D + rows)."""
    s, t, W, V, c = data(64, 32, 4096, 16, torch.float32, seed=1)
    s = s.float().requires_grad_()
    loss = PR.prototype_cross_entropy(s, t.float(), W.float(), V.float())
    saved = loss.grad_fn.saved_tensors
    assert max(x.numel() for x in saved if x is not None) <= 4096 * 16


def koleo_dense(x, p=2, eps=1e-8):
    """The textbook KoLeo: the whole n x n similarity matrix, diagonal excluded."""
    z = tF.normalize(x, p=2, dim=-1, eps=eps)
    dots = z @ z.T
    dots.fill_diagonal_(-2.0)
    nearest = dots.argmax(1)
    return -torch.log(tF.pairwise_distance(z, z[nearest], p=p, eps=eps) + eps).mean()


@pytest.mark.parametrize("n,D", [(2, 1), (3, 5), (130, 17), (257, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_koleo_matches_the_dense_formula(n, D, dtype, monkeypatch):
    monkeypatch.setattr(PR, "CHUNK", 16)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    loss = PR.koleo(x)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    ref = koleo_dense(x64)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert abs(loss.double().item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    assert (grad.double() - ref_grad).norm() <= tol * max(ref_grad.norm().item(), 1e-6)


@pytest.mark.parametrize("D,p", [(1, 2), (5, 2), (3, 1)])
def test_koleo_on_one_row_is_its_own_neighbour(D, p):
    """DINOv2's and lightly's value: ||x - x + eps||_p = eps D^(1/p), the gradient zero."""
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(D), dtype=torch.float64)
    x.requires_grad_()
    loss = PR.KoLeoLoss(p=p, eps=1e-8)(x)
    assert loss.item() == pytest.approx(-math.log(1e-8 * D ** (1 / p) + 1e-8), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_koleo_errors():
    with pytest.raises(ValueError, match="at least one row"):
        PR.koleo(torch.randn(0, 3))
    with pytest.raises(ShapeError, match="2-D"):
        PR.koleo(torch.ones(3))


def dino_textbook(teacher, student, center, tau_t, tau_s):
    """The DINO loss as written in the papers' code: softmax, log-softmax, einsum."""
    t = torch.softmax((torch.stack(teacher) - center) / tau_t, -1)
    s = torch.log_softmax(torch.stack(student) / tau_s, -1)
    loss = -torch.einsum("tbk,sbk->tsb", t, s)
    n = min(len(teacher), len(student))
    loss[range(n), range(n)] = 0
    return loss.sum() / ((len(teacher) * len(student) - n) * t.shape[1])


@pytest.mark.parametrize("T,S,B,K", [(2, 2, 4, 9), (2, 10, 3, 300), (1, 3, 5, 65), (2, 1, 2, 7)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dino_loss_module_matches_the_textbook(T, S, B, K, dtype, monkeypatch):
    monkeypatch.setattr(PR, "CHUNK", 32)
    g = torch.Generator().manual_seed(K)
    teacher = [torch.randn(B, K, generator=g, dtype=torch.float64).to(dtype) for _ in range(T)]
    student = [torch.randn(B, K, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
               for _ in range(S)]
    crit = PR.DINOLoss(output_dim=K, warmup_teacher_temp=0.02, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=5)
    crit.center.copy_(0.3 * torch.randn(1, K, generator=g, dtype=torch.float64))
    center0 = crit.center.clone()
    loss = crit(teacher, student, epoch=2)
    grads = torch.autograd.grad(loss, student)
    s64 = [x.detach().double().requires_grad_() for x in student]
    tau = 0.02 + (0.07 - 0.02) * 2 / 4
    ref = dino_textbook([x.double() for x in teacher], s64, center0.double(), tau, 0.1)
    ref_grads = torch.autograd.grad(ref, s64)
    check(loss, list(grads), ref, list(ref_grads), dtype)
    # The centre moved towards the batch mean of the teacher's scores.
    expected = 0.9 * center0 + 0.1 * torch.stack(teacher).double().reshape(-1, K).mean(0)
    torch.testing.assert_close(crit.center.double(), expected.to(crit.center.dtype).double(),
                               rtol=1e-5, atol=1e-6)


def test_dino_loss_temperatures_and_errors():
    crit = PR.DINOLoss(output_dim=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=30)
    assert crit.temperature(epoch=0) == 0.04 and crit.temperature(epoch=29) == pytest.approx(0.07)
    assert crit.temperature(epoch=100) == 0.07 and crit.temperature(teacher_temp=0.5) == 0.5
    assert crit.temperature() == 0.07
    with pytest.raises(ValueError, match="at least two views"):
        crit([torch.ones(2, 4)], [torch.ones(2, 4)])
    with pytest.raises(ShapeError, match="output_dim=4"):
        crit([torch.ones(2, 5)] * 2, [torch.ones(2, 5)] * 2)
    with pytest.raises(ShapeError, match="every crop must be"):
        crit([torch.ones(2, 4), torch.ones(3, 4)], [torch.ones(2, 4)] * 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ibot_patch_loss_matches_the_textbook(dtype, monkeypatch):
    monkeypatch.setattr(PR, "CHUNK", 16)
    g = torch.Generator().manual_seed(0)
    B, H, W, K = 3, 4, 5, 70
    mask = torch.rand(B, H, W, generator=g) < 0.4
    mask[2] = False  # an image with no masked token
    rows = int(mask.sum())
    teacher = torch.randn(rows, K, generator=g, dtype=torch.float64).to(dtype)
    student = torch.randn(rows, K, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    crit = PR.IBOTPatchLoss(output_dim=K, teacher_temp=0.05)
    crit.center.center.copy_(0.2 * torch.randn(1, K, generator=g, dtype=torch.float64))
    center0 = crit.center.value.clone().double()
    loss = crit(teacher, student, mask)
    (grad,) = torch.autograd.grad(loss, student)
    s64 = student.detach().double().requires_grad_()
    per_token = -(torch.softmax((teacher.double() - center0) / 0.05, -1)
                  * torch.log_softmax(s64 / 0.1, -1)).sum(-1)
    counts = mask.flatten(1).sum(1).clamp(min=1).double()
    weight = (1 / counts)[:, None].expand(B, H * W)[mask.flatten(1)]
    ref = (per_token * weight).sum() / B
    (ref_grad,) = torch.autograd.grad(ref, s64)
    check(loss, [grad], ref, [ref_grad], dtype)
    torch.testing.assert_close(crit.center.value.double(),
                               (0.9 * center0 + 0.1 * teacher.double().mean(0)).to(
                                   crit.center.value.dtype).double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ShapeError, match="masked tokens"):
        crit(teacher[1:], student[1:], mask)


def sinkhorn_loops(scores, epsilon, iterations):
    """SwAV's Sinkhorn on exp(scores / epsilon), written element by element in float64."""
    Q = torch.exp(scores.double() / epsilon).t().clone()
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(iterations):
        for k in range(K):
            Q[k] /= Q[k].sum() * K
        for b in range(B):
            Q[:, b] /= Q[:, b].sum() * B
    return (Q * B).t()


@pytest.mark.parametrize("B,K,it", [(1, 3, 3), (7, 5, 1), (16, 30, 3), (4, 1, 2)])
def test_sinkhorn_matches_the_loops(B, K, it):
    g = torch.Generator().manual_seed(B + K)
    x = torch.randn(B, K, generator=g, dtype=torch.float64)
    q = PR.sinkhorn(x, it, 0.5)
    torch.testing.assert_close(q, sinkhorn_loops(x, 0.5, it), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(q.sum(1), torch.ones(B, dtype=torch.float64))


@pytest.mark.parametrize("n_high,n_low,queue", [(2, 0, False), (2, 4, False), (2, 2, True)])
def test_swav_loss_matches_the_textbook(n_high, n_low, queue):
    g = torch.Generator().manual_seed(n_low)
    B, K = 6, 20
    mk = lambda: tF.normalize(torch.randn(B, K, generator=g, dtype=torch.float64), dim=1)  # noqa: E731
    high = [mk().requires_grad_() for _ in range(n_high)]
    low = [mk().requires_grad_() for _ in range(n_low)]
    queue_out = [torch.randn(12, K, generator=g, dtype=torch.float64) for _ in range(n_high)] \
        if queue else None
    loss = PR.SwaVLoss()(high, low, queue_out)
    grads = torch.autograd.grad(loss, high + low)
    crops, total = high + low, 0.0
    for i in range(n_high):
        scores = high[i].detach() if not queue else torch.cat([high[i].detach(), queue_out[i]])
        codes = sinkhorn_loops(scores, 0.05, 3)[:B]
        sub = 0.0
        for v in range(len(crops)):
            if v != i:
                sub = sub - (codes * torch.log(torch.softmax(crops[v] / 0.1, 1))).sum(1).mean()
        total = total + sub / (len(crops) - 1)
    ref = total / n_high
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(ref, high + low)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_swav_errors():
    with pytest.raises(ValueError, match="two crops"):
        PR.SwaVLoss()([torch.ones(2, 3)], [])
    with pytest.raises(ValueError, match="one tensor per high-resolution crop"):
        PR.SwaVLoss()([torch.ones(2, 3)] * 2, [], [torch.ones(4, 3)])
    with pytest.raises(ValueError, match="sinkhorn_epsilon must be > 0"):
        PR.SwaVLoss(sinkhorn_epsilon=0)


# ----------------------------------------------------------------------------- the two passes

@pytest.mark.parametrize("n,K,D,E", [(1, 1, 1, 1), (3, 130, 257, 257), (70, 65, 16, 3),
                                     (129, 200, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_rows_and_cols_passes_match_float64(backend, device, n, K, D, E, dtype, bias):
    """lse, the softmax-weighted values (rows) and the transposed sums (cols) against the
    dense float64 softmax, on the operands rounded to ``dtype``."""
    from fastssl import _dispatch
    g = torch.Generator().manual_seed(n + K + D)
    x = (torch.randn(n, D, generator=g) / D ** 0.5).to(device, dtype)  # scores ~ `scale`
    P = torch.randn(K, D, generator=g).to(device, dtype)
    U = torch.randn(K, E, generator=g).to(device, dtype)
    c = torch.randn(K, generator=g).to(device) if bias else None
    Y = torch.randn(n, E, generator=g).to(device)
    scale = 7.0
    impl = _dispatch.implementation("prototype", x)[1]
    st, out = impl.rows(x, P, U, c, scale)
    S = (x.double() @ P.double().T - (0 if c is None else c.double())) * scale
    ref_lse = torch.logsumexp(S, 1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    # the statistics: the largest product m_i and l_i, lse_i = scale m_i + l_i
    torch.testing.assert_close(st[:, 0].double(), S.amax(1) / scale, **tol)
    torch.testing.assert_close(scale * st[:, 0].double() + st[:, 1].double(), ref_lse, **tol)
    torch.testing.assert_close(out.double(), torch.softmax(S, 1) @ U.double(), **tol)
    st_only, none = impl.rows(x, P, None, c, scale)
    assert none is None and torch.equal(st_only, st)
    cols = impl.cols(x, P, c, scale, st, Y)
    want = torch.exp(S - ref_lse[:, None]).T @ Y.to(dtype).double()
    # Y is rounded to the operand dtype in the tile matmul: compare against that rounding,
    # relative to the norm (the sums cancel).
    rel = 1e-5 if dtype == torch.float32 else 3e-3
    assert (cols.double() - want).norm() <= rel * want.norm()
    # accumulating into a given float32 buffer: out += alpha * sum
    base = torch.linspace(-1, 1, K * E, device=device).reshape(K, E)
    acc = impl.cols(x, P, c, scale, st, Y, out=base.clone(), alpha=-0.5)
    assert (acc.double() - (base.double() - 0.5 * want)).norm() <= rel * want.norm() + 1e-6


def test_bitwise_reproducible(backend):
    s, t, W, V, c = data(40, 20, 300, 24, torch.float32, seed=9)
    runs = []
    for _ in range(2):
        s_, W_ = s.bfloat16().requires_grad_(), W.bfloat16().requires_grad_()
        loss = PR.prototype_cross_entropy(s_, t.bfloat16(), W_, V.bfloat16(), 0.1, 0.04,
                                          c.float())
        runs.append((loss, *torch.autograd.grad(loss, (s_, W_))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharp_teacher_16bit_is_stable(backend, dtype):
    """tau_t = 0.01 on 16-bit unit features: finite values and gradients close to float64."""
    s, t, W, V, c = data(24, 12, 500, 32, torch.float64, seed=2)
    s_, W_ = s.to(dtype).requires_grad_(), W.to(dtype).requires_grad_()
    loss = PR.prototype_cross_entropy(s_, t.to(dtype), W_, V.to(dtype), 0.1, 0.01,
                                      c.to(dtype), teacher_crops=2)
    gs, gw = torch.autograd.grad(loss, (s_, W_))
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gw).all()
    s64, W64 = s_.detach().double().requires_grad_(), W_.detach().double().requires_grad_()
    ref = reference(s64, W64, t.to(dtype).double(), V.to(dtype).double(), c.to(dtype).double(),
                    0.1, 0.01, dino_pairs(4, 2, 6))
    assert abs(loss.double().item() - ref.item()) <= 2e-2 * abs(ref.item())


# ----------------------------------------------------------------------------- Sinkhorn-Knopp

@pytest.mark.parametrize("B,K,D,it", [(1, 1, 1, 1), (7, 130, 9, 3), (64, 33, 257, 5),
                                      (200, 70, 16, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sinkhorn_knopp_factored_equals_the_dense_codes(backend, device, B, K, D, it, dtype):
    g = torch.Generator().manual_seed(B * K)
    f = tF.normalize(torch.randn(B, D, generator=g), dim=1).to(device, dtype)
    P = tF.normalize(torch.randn(K, D, generator=g), dim=1).to(device, dtype)
    eps = 0.05
    c = PR.sinkhorn_knopp(f, P, eps, it)
    scores = f.double() @ P.double().T
    codes = torch.softmax((scores - c.double()) / eps, 1)
    want = PR.sinkhorn(scores, it, eps)
    tol = 1e-9 if dtype == torch.float64 else 2e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(codes, want, rtol=tol, atol=tol)


def test_sinkhorn_target_inside_the_loss(backend):
    s, t, W, V, _ = data(12, 6, 90, 10, torch.float64, seed=4)
    s_ = s.clone().requires_grad_()
    loss = PR.prototype_cross_entropy(s_, t, W, V, 0.1, 0.05, teacher_target="sinkhorn",
                                      teacher_crops=2, sinkhorn_iterations=3)
    ls = torch.log_softmax(s_ @ W.T / 0.1, 1)
    q = PR.sinkhorn(t @ V.T, 3, 0.05)
    ref = sum(w * -(q[j] * ls[i]).sum() for i, j, w in dino_pairs(4, 2, 3))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, s_, retain_graph=True)[0],
                               torch.autograd.grad(ref, s_)[0])
    with pytest.raises(ValueError, match="pass center=None"):
        PR.prototype_cross_entropy(s, t, W, V, center=torch.zeros(90),
                                   teacher_target="sinkhorn")


def test_sinkhorn_knopp_errors():
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        PR.sinkhorn_knopp(torch.ones(3, 2), torch.ones(4, 2), iterations=0)
    with pytest.raises(ShapeError, match="common D"):
        PR.sinkhorn_knopp(torch.ones(3, 2), torch.ones(4, 3))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        PR.sinkhorn_knopp(torch.ones(3, 2), torch.ones(4, 2), epsilon=0)
    with pytest.raises(ValueError, match="at least one row"):
        PR.sinkhorn_knopp(torch.ones(0, 2), torch.ones(4, 2))


# ----------------------------------------------------------------------------- modules

def test_prototype_cross_entropy_module_tracks_the_centre(backend):
    s, t, W, V, _ = data(12, 8, 40, 6, torch.float64, seed=8)
    mod = PR.PrototypeCrossEntropy(output_dim=40, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                   warmup_teacher_temp_epochs=3, center_momentum=0.8)
    center = torch.zeros(40, dtype=torch.float64)
    for epoch in range(4):
        tau_t = [0.04, 0.055, 0.07, 0.07][epoch]
        s_ = s.clone().requires_grad_()
        loss = mod(s_, t, W, V, epoch=epoch)
        ref = reference(s_, W, t, V, center, 0.1, tau_t, dino_pairs(3, 2, 4))
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        # the backward (after the centre moved) uses the centre of the forward
        torch.testing.assert_close(torch.autograd.grad(loss, s_)[0],
                                   torch.autograd.grad(ref, s_)[0], rtol=1e-5, atol=1e-7)
        center = 0.8 * center + 0.2 * (t @ V.T).mean(0)
        torch.testing.assert_close(mod.center.reshape(-1).double(), center, rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ShapeError, match="output_dim=40"):
        mod(s, t, W[:30], V[:30])


def test_centres_are_lightlys_modules_and_buffers():
    """lightly's state: DINOLoss.center a (1, 1, K) buffer, IBOTPatchLoss.center a Center
    module (key ``center.center``, (1, K)); a state dict of that layout loads."""
    K = 6
    dino, ibot = PR.DINOLoss(output_dim=K), PR.IBOTPatchLoss(output_dim=K)
    assert list(dino.state_dict()) == ["center"] and dino.center.shape == (1, 1, K)
    assert list(ibot.state_dict()) == ["center.center"] and ibot.center.value.shape == (1, K)
    g = torch.Generator().manual_seed(3)
    state = {"center": torch.randn(1, 1, K, generator=g)}
    dino.load_state_dict(state)
    assert torch.equal(dino.center, state["center"])
    state = {"center.center": torch.randn(1, K, generator=g)}
    ibot.load_state_dict(state)
    assert torch.equal(ibot.center.value, state["center.center"])
    with pytest.raises(ValueError, match="Unknown mode"):
        PR.Center((1, K), mode="median")


def test_center_update_means_over_the_size_one_dims():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    c = PR.Center((1, 3, 1), momentum=0.25)
    c.center.copy_(torch.randn(1, 3, 1, generator=g))
    want = c.value.double() * 0.25 + x.mean(dim=(0, 2), keepdim=True) * 0.75
    c.update(x)
    torch.testing.assert_close(c.value.double(), want.float().double())


def test_dino_update_center_on_a_2d_tensor_is_lightlys():
    """lightly means over dims (0, 1): a (crops, B, K) stack per prototype, a 2-D (B, K)
    tensor over every entry (one number for every prototype)."""
    g = torch.Generator().manual_seed(5)
    crit = PR.DINOLoss(output_dim=8, center_momentum=0.9)
    x = torch.rand(4, 8, generator=g, dtype=torch.float64)
    crit.update_center(x.float())
    torch.testing.assert_close(crit.center.double(),
                               (0.1 * x.mean()).expand(1, 1, 8).float().double())
    stack = torch.rand(2, 4, 8, generator=g, dtype=torch.float64)
    before = crit.center.double().clone()
    crit.update_center(stack.float())
    torch.testing.assert_close(crit.center.double(),
                               (0.9 * before + 0.1 * stack.mean((0, 1))).float().double())


def test_swav_gather_flag_asks_torch_distributed_once(monkeypatch):
    import torch.distributed as dist
    calls = []

    def available(value):
        def is_available():
            calls.append(1)
            return value
        return is_available

    monkeypatch.setattr(dist, "is_available", available(True))
    PR.SwaVLoss(sinkhorn_gather_distributed=True)
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(dist, "is_available", available(False))
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        PR.SwaVLoss(sinkhorn_gather_distributed=True)
    assert len(calls) == 1


def test_sinkhorn_gathers_only_under_an_initialised_group():
    """lightly's sinkhorn: gather_distributed=True without a process group is one rank."""
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(PR.sinkhorn(x, 3, 0.1, gather_distributed=True),
                               sinkhorn_loops(x, 0.1, 3), rtol=1e-12, atol=1e-14)


def test_centre_stays_without_masked_tokens():
    """A deliberate difference: lightly's Center takes the mean of no rows (NaN); fastssl's
    centre stays where it was (the loss of no tokens is 0)."""
    crit = PR.IBOTPatchLoss(output_dim=5)
    before = torch.randn(1, 5, generator=torch.Generator().manual_seed(7))
    crit.center.center.copy_(before)
    loss = crit(torch.randn(0, 5), torch.randn(0, 5), torch.zeros(2, 3, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and torch.equal(crit.center.value, before)


def test_sinkhorn_of_large_scores_does_not_overflow():
    """A deliberate difference: lightly's exp(out / epsilon) overflows float32 beyond
    out / epsilon = 88 (inf / inf = NaN codes); fastssl shifts by the maximum first."""
    g = torch.Generator().manual_seed(8)
    x = 100 + 0.5 * torch.randn(6, 9, generator=g, dtype=torch.float64)  # x / 0.5 ~ 200
    q = PR.sinkhorn(x.float(), 3, 0.5)
    want = sinkhorn_loops(x.float().double() - x.float().double().max(), 0.5, 3)
    torch.testing.assert_close(q.double(), want, rtol=1e-4, atol=1e-6)


def test_koleo_loss_module():
    x = torch.randn(33, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(PR.KoLeoLoss(p=2, eps=1e-8)(x), koleo_dense(x))
    torch.testing.assert_close(PR.KoLeoLoss(p=1)(x), koleo_dense(x, p=1))
    with pytest.raises(ValueError, match="p must be > 0"):
        PR.KoLeoLoss(p=0)


# ----------------------------------------------------------------------------- bad inputs

BAD = [("list", lambda n: [[1.0, 2.0, 3.0]], TypeError, "Tensor"),
       ("ndarray", lambda n: __import__("numpy").ones((n, 3), dtype="float32"), TypeError,
        "Tensor"),
       ("None", lambda n: None, TypeError, "Tensor"),
       ("int64", lambda n: torch.ones(n, 3, dtype=torch.int64), ValueError, "floating"),
       ("bool", lambda n: torch.ones(n, 3, dtype=torch.bool), ValueError, "floating"),
       ("complex", lambda n: torch.ones(n, 3, dtype=torch.complex64), ValueError, "floating"),
       ("1-D", lambda n: torch.ones(3), ShapeError, ""),
       ("3-D", lambda n: torch.ones(n, 3, 2), ShapeError, ""),
       ("width differs", lambda n: torch.ones(n, 2), ShapeError, ""),
       ("no columns", lambda n: torch.ones(n, 0), ShapeError, ""),
       ("device differs", lambda n: torch.empty(n, 3, device="meta"), ValueError, "device")]


@pytest.mark.parametrize("arg", ["student", "teacher", "student_prototypes",
                                 "teacher_prototypes"])
@pytest.mark.parametrize("what,make,error,word", BAD, ids=[b[0] for b in BAD])
def test_every_tensor_argument_is_checked(backend, arg, what, make, error, word):
    """Each tensor argument of prototype_cross_entropy, replaced by a bad value, raises the
    library's error naming it (None for teacher_prototypes means: the student's)."""
    args = dict(student=torch.randn(4, 3), teacher=torch.randn(4, 3),
                student_prototypes=torch.randn(5, 3), teacher_prototypes=torch.randn(5, 3),
                teacher_crops=2)
    bad = make(5 if arg.endswith("prototypes") else 4)
    if arg == "teacher_prototypes" and bad is None:
        PR.prototype_cross_entropy(**dict(args, teacher_prototypes=None))  # legal
        return
    args[arg] = bad
    with pytest.raises(error) as e:
        PR.prototype_cross_entropy(**args)
    assert arg in str(e.value) or what in ("width differs", "no columns")
    assert word.lower() in str(e.value).lower()


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float16)])
def test_mixed_dtypes_compute_in_the_feature_dtype(backend, dtypes):
    """16-bit features with float32 prototypes (a head under autocast): the prototypes are
    cast to the features' dtype for the tile matmuls; gradients come back in each input's
    dtype."""
    feat, proto = dtypes
    s, t, W, V, c = data(6, 6, 40, 8, torch.float64, seed=12)
    s_, W_ = s.to(feat).requires_grad_(), W.to(proto).requires_grad_()
    loss = PR.prototype_cross_entropy(s_, t.to(feat), W_, V.to(proto), center=c.float())
    gs, gw = torch.autograd.grad(loss, (s_, W_))
    assert loss.dtype == feat and gs.dtype == feat and gw.dtype == proto
    ref = reference(s_.detach().double(), W_.detach().to(feat).double(), t.to(feat).double(),
                    V.to(proto).to(feat).double(), c.float().double(), 0.1, 0.04,
                    dino_pairs(2, 2, 3))
    assert abs(loss.double().item() - ref.item()) <= 2e-2 * abs(ref.item())


@pytest.mark.parametrize("op", ["dino", "ibot"])
def test_bench_formulations_agree(op, monkeypatch):
    """The benchmark's eager formulations (lightly's) and fastssl's compute the same loss
    and gradients (float64, small K)."""
    from fastssl import bench
    monkeypatch.setattr(bench.formulations, "PROTOTYPES", 97)
    s, W = bench.make_inputs(op, 170, 12, torch.float64, "cpu")
    want = bench.IMPLS[op]["eager"](s, W)
    got = bench.IMPLS[op]["fastssl"](s, W)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (s, W)), torch.autograd.grad(want, (s, W))):
        torch.testing.assert_close(a, b)
