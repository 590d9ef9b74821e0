"""Momentum updates, schedules and the EMA teacher against float64 formulas; the CUDA
kernel against the foreach path where a GPU is present."""
import math

import pytest
import torch
from torch import nn

import fastssl
from fastssl import ema as ema_mod


def pairs(dtypes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (65536 + 3,), (1,), (2, 3, 4)]
    out = []
    for shape, (te, to) in zip(shapes, dtypes):
        out.append((torch.randn(shape, generator=g).to(device, te),
                    torch.randn(shape, generator=g).to(device, to)))
    return out


MIXES = [[(torch.float32, torch.float32)] * 5,
         [(torch.bfloat16, torch.bfloat16)] * 5,
         [(torch.float32, torch.bfloat16), (torch.float16, torch.float32),
          (torch.bfloat16, torch.float16), (torch.float32, torch.float16),
          (torch.float16, torch.float16)]]


@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("m", [0.0, 0.7, 0.996, 1.0, "tensor"])
def test_ema_matches_formula(mix, m):
    ps = pairs(MIXES[mix], seed=mix)
    want = []
    mv = 0.9 if m == "tensor" else m
    for e, o in ps:
        want.append((mv * e.double() + (1 - mv) * o.double()).to(e.dtype))
    fastssl.ema_([e for e, _ in ps], [o for _, o in ps], torch.tensor(0.9) if m == "tensor" else m)
    for (e, _), w in zip(ps, want):
        tol = 0 if e.dtype == torch.float32 else 2 * torch.finfo(e.dtype).eps
        torch.testing.assert_close(e.double(), w.double(), rtol=tol, atol=1e-6 if tol == 0 else tol)


def test_bad_input_changes_nothing():
    a, b = torch.randn(3), torch.randn(3)
    c, d = torch.randn(2), torch.randn(4)
    before = a.clone()
    with pytest.raises(ValueError, match="shape"):
        fastssl.ema_([a, c], [b, d], 0.5)
    assert torch.equal(a, before)
    with pytest.raises(ValueError, match="tensors"):
        fastssl.ema_([a], [b, d], 0.5)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="momentum"):
            fastssl.ema_([a], [b], bad)
    assert torch.equal(a, before)
    with pytest.raises(ValueError, match="floating"):
        fastssl.ema_([torch.zeros(2, dtype=torch.long)], [torch.zeros(2, dtype=torch.long)], 0.5)


def net():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_update_momentum_is_lightly_semantics():
    torch.manual_seed(0)
    student, teacher = net(), net()
    student(torch.randn(5, 4))  # moves BatchNorm statistics
    want = [0.8 * t.double() + 0.2 * s.double() for t, s in zip(teacher.parameters(), student.parameters())]
    buffers = [b.clone() for b in teacher.buffers()]
    fastssl.update_momentum(student, teacher, 0.8)
    for p, w in zip(teacher.parameters(), want):
        torch.testing.assert_close(p.double(), w, rtol=0, atol=1e-6)
    for b, w in zip(teacher.buffers(), buffers):
        assert torch.equal(b, w)  # parameters only


def test_cosine_schedule_is_lightly_semantics():
    cs = fastssl.cosine_schedule
    assert cs(0, 10, 0.996, 1.0) == pytest.approx(0.996)
    assert cs(9, 10, 0.996, 1.0) == 1.0 and cs(0, 1, 0.5, 1.0) == 1.0
    assert cs(5, 11, 0.0, 1.0) == pytest.approx(0.5)
    values = [cs(s, 100, 0.9, 1.0) for s in range(100)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert cs(3, 10, 0.0, 1.0, period=6) == pytest.approx(1 - (math.cos(math.pi) + 1) / 2)
    assert cs(6, 10, 0.2, 1.0, period=6) == pytest.approx(0.2)
    assert isinstance(cs(2, 10, 0, 1), float)
    with pytest.raises(ValueError):
        cs(-1, 10, 0, 1)
    with pytest.raises(ValueError):
        cs(1, -10, 0, 1)
    with pytest.raises(ValueError):
        cs(1, 10, 0, 1, period=0)
    with pytest.warns(RuntimeWarning):
        cs(11, 10, 0, 1)


def test_ema_teacher_schedule_buffers_and_state():
    torch.manual_seed(1)
    student = net()
    teacher = fastssl.EMA(student, momentum=0.9, final_momentum=1.0)
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert not any(n.startswith("_student") for n, _ in teacher.named_parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(6, 4))
    before = [p.double().clone() for p in teacher.module.parameters()]
    m = teacher.update(step=0, max_steps=10)
    assert m == pytest.approx(0.9)
    for t, b, s in zip(teacher.module.parameters(), before, student.parameters()):
        torch.testing.assert_close(t.double(), 0.9 * b + 0.1 * s.double(), rtol=0, atol=1e-6)
    for t, s in zip(teacher.module.buffers(), student.buffers()):
        assert torch.equal(t, s)
    assert teacher.update(step=9, max_steps=10) == 1.0
    state = teacher.state_dict()
    other = fastssl.EMA(net(), momentum=0.5, schedule=None)
    other.load_state_dict(state)
    assert other.momentum == 0.9 and other.schedule == "cosine"
    for a, b in zip(other.module.parameters(), teacher.module.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(3, 4)
    teacher.eval()
    assert torch.equal(teacher(x), teacher.module(x))


def test_ema_with_wrapped_students():
    torch.manual_seed(2)
    student = net()
    compiled = torch.compile(student, backend="eager")
    teacher = fastssl.EMA(compiled, momentum=0.5, schedule=None)
    assert type(teacher.module) is nn.Sequential
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3.0)
    before = [p.clone() for p in teacher.module.parameters()]
    teacher.update()
    for t, b, s in zip(teacher.module.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)
    wrapped = nn.DataParallel(student)
    fastssl.update_momentum(wrapped, teacher.module, 0.0)
    for t, s in zip(teacher.module.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_bad_ema_settings():
    with pytest.raises(ValueError, match="momentum"):
        fastssl.EMA(net(), momentum=1.2)
    with pytest.raises(ValueError, match="schedule"):
        fastssl.EMA(net(), schedule="linear")
    with pytest.raises(ValueError, match="max_steps"):
        fastssl.EMA(net()).update(step=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_cuda_kernel_matches_foreach(mix):
    ext = ema_mod._extension()
    assert ext is not None, f"the CUDA EMA kernel did not build: {ema_mod._EXT_ERROR}"
    many = [pairs(MIXES[mix], seed=s, device="cuda") for s in range(20)]  # > 48 tensors
    flat = [p for group in many for p in group]
    ref = [(e.clone(), o) for e, o in flat]
    fastssl.ema_([e for e, _ in flat], [o for _, o in flat], 0.97)
    for (e, _), (r, o) in zip(flat, ref):
        want = (0.97 * r.double() + 0.03 * o.double()).to(r.dtype)
        eps = torch.finfo(r.dtype).eps  # one rounding apart at most
        torch.testing.assert_close(e, want, rtol=2 * eps, atol=2 * eps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_with_tensor_momentum():
    e = [torch.randn(1000, device="cuda") for _ in range(3)]
    o = [torch.randn(1000, device="cuda") for _ in range(3)]
    m = torch.tensor(0.5, device="cuda")
    fastssl.ema_(e, o, m)  # build and warm up outside the capture
    start = [x.clone() for x in e]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fastssl.ema_(e, o, m)
    for x, s in zip(e, start):
        x.copy_(s)
    m.fill_(0.25)
    graph.replay()
    torch.cuda.synchronize()
    for x, s, y in zip(e, start, o):
        torch.testing.assert_close(x, 0.25 * s + 0.75 * y)
