"""Momentum updates, schedules and the EMA teacher against float64 formulas; the CUDA
kernel against the foreach path where a GPU is present, and its arithmetic type read from
its PTX where nvcc is."""
import glob
import math
import os
import re
import shutil
import subprocess

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


F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
MIXES = [[(F32, F32)] * 5,
         [(BF16, BF16)] * 5,
         [(F32, BF16), (F16, F32), (BF16, F16), (F32, F16), (F16, F16)],
         [(F64, F32), (F32, F64), (F64, BF16), (F16, F64), (F64, F64)]]


@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("m", [0.0, 0.7, 0.996, 1.0, "tensor"])
def test_ema_matches_formula(mix, m):
    ps = pairs(MIXES[mix], seed=mix)
    want = []
    mv = float(torch.tensor(0.9)) if m == "tensor" else m  # the value the tensor holds
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


# ----------------------------------------------------------------------------- precision

def test_compute_dtype_is_the_wider_and_at_least_float32():
    cd = ema_mod.compute_dtype
    for pair_, want in (((F64, F32), F64), ((F32, F64), F64), ((F64, BF16), F64),
                        ((F16, F64), F64), ((F64, F64), F64), ((F32, F32), F32),
                        ((BF16, F32), F32), ((F16, BF16), F32), ((F16, F16), F32),
                        ((BF16, BF16), F32)):
        assert cd(*pair_) == want, pair_


def test_route_sends_every_cuda_pair_the_kernel_takes_to_it():
    """The routing of one group: float64 pairs go to the CUDA kernel like the others (it
    computes in float64, see the PTX test); CPU, meta, non-contiguous tensors, a dtype it
    does not take, or no built extension take torch's lerp in the same compute dtype."""
    route, cuda = ema_mod.route, torch.device("cuda", 0)
    for te in (F64, F32, F16, BF16):
        for to in (F64, F32, F16, BF16):
            assert route(cuda, te, to, True, True) == "kernel"
            assert route(cuda, te, to, True, False) == "foreach"
            assert route(cuda, te, to, False, True) == "foreach"
            for other in (torch.device("cpu"), torch.device("meta")):
                assert route(other, te, to, True, True) == "foreach"
    assert route(cuda, torch.float8_e4m3fn, F32, True, True) == "foreach"


def _trajectory(te, to, m, steps, seed):
    """A teacher (dtype te) and the students of ``steps`` updates (dtype to), each student a
    small move away from the teacher's start (so each step's change is far below a float32
    ulp of the teacher when m is close to 1)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(257, generator=g, dtype=F64)
    toward = start + 1e-2 * torch.randn(257, generator=g, dtype=F64)
    students = [(toward + 1e-3 * torch.randn(257, generator=g, dtype=F64)).to(to)
                for _ in range(steps)]
    return start.to(te), students


@pytest.mark.parametrize("student", [F32, BF16, F16])
@pytest.mark.parametrize("m", [1 - 1e-6, 0.999, "tensor"])
def test_float64_teacher_keeps_float64_over_1000_steps(student, m):
    teacher, students = _trajectory(F64, student, m, 1000, seed=3)
    mv = 0.9995 if m == "tensor" else m
    ref = teacher.clone()
    for o in students:
        ref = mv * ref + (1 - mv) * o.to(F64)  # the float64 recurrence, written plainly
        fastssl.ema_([teacher], [o], torch.tensor(mv, dtype=F64) if m == "tensor" else m)
    moved = (ref - _trajectory(F64, student, m, 1, seed=3)[0]).abs().max()
    assert moved > 1e-6  # far more than the tolerance below (float32 steps would be lost)
    assert teacher.dtype == F64
    torch.testing.assert_close(teacher, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("teacher_dtype", [F32, BF16, F16])
def test_float64_student_updates_a_narrow_teacher_with_one_rounding(teacher_dtype):
    """The reverse: the update runs in float64 and rounds once, so every step's teacher is
    the float64 value rounded to its dtype, bit for bit."""
    teacher, students = _trajectory(teacher_dtype, F64, 0.9, 1000, seed=4)
    for o in students:
        want = (0.9 * teacher.to(F64) + (1 - 0.9) * o).to(teacher_dtype)
        fastssl.ema_([teacher], [o], 0.9)
        assert torch.equal(teacher, want)


def test_ema_module_and_update_momentum_with_a_float64_teacher():
    torch.manual_seed(5)
    student = net()
    teacher = fastssl.EMA(student, momentum=1 - 1e-6, schedule=None, include_buffers=False)
    teacher.module.double()
    other = net().double()
    ref = [t.detach().clone() for t in teacher.module.parameters()]
    ref_other = [t.detach().clone() for t in other.parameters()]
    for _ in range(200):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        teacher.update()
        fastssl.update_momentum(student, other, torch.tensor(1 - 1e-6, dtype=F64))
        for r, r_o, s in zip(ref, ref_other, student.parameters()):
            r.mul_(1 - 1e-6).add_(s.detach().to(F64) * 1e-6)
            r_o.mul_(1 - 1e-6).add_(s.detach().to(F64) * 1e-6)
    for t, r in zip(list(teacher.module.parameters()) + list(other.parameters()),
                    ref + ref_other):
        assert t.dtype == F64
        torch.testing.assert_close(t, r, rtol=1e-12, atol=1e-13)


NVCC = shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda*/bin/nvcc")), None)
CU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "ema.cu")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_cuda_kernel_arithmetic_type_per_dtype_pair(tmp_path):
    """Every (teacher, student) instantiation of csrc/ema.cu, read from its sm_90 PTX: fp64
    fused multiply-adds (and no fp32 ones) where either dtype is float64, fp32 ones (and no
    fp64 arithmetic) otherwise; a float32 teacher of a float64 student rounds once (cvt)."""
    out = tmp_path / "ema.ptx"
    run = subprocess.run([NVCC, "-ptx", "-O3", "-arch=sm_90", CU, "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    names = {"f": "f32", "d": "f64", "6__half": "f16", "13__nv_bfloat16": "bf16"}
    kernels = {}
    for body in out.read_text().split(".entry ")[1:]:
        te, to = re.match(r"\S*ema_kernelI(d|f|6__half|13__nv_bfloat16)(d|f|6__half|"
                          r"13__nv_bfloat16|S1_)EEv", body).groups()
        kernels[(names[te], names[te] if to == "S1_" else names[to])] = body
    assert len(kernels) == 16
    for (te, to), body in kernels.items():
        if "f64" in (te, to):
            assert "fma.rn.f64" in body and "fma.rn.f32" not in body, (te, to)
        else:
            assert "fma.rn.f32" in body and "fma.rn.f64" not in body, (te, to)
            assert "mul.f64" not in body and "mul.rn.f64" not in body, (te, to)
    assert "cvt.rn.f32.f64" in kernels[("f32", "f64")]
