"""One table-driven sweep of bad and unusual inputs over the whole public API.

Every case runs on both paths (the portable PyTorch path and the Triton kernels, which run
in the interpreter on CPU) and must give the same outcome on both: either the same
exception type and message, the message naming the argument, or a value that matches a
float64 formula written here or in the per-op tests (the textbook forms). A loss whose
float64 value lies beyond float32's range must come back as inf, never NaN.

Classes (README, "Errors and edge cases"): wrong types and values of tensors, scalars given
as numbers, numpy scalars or tensors, constructor arguments, scale-safe numerics at any
magnitude, float64 everywhere, augmentation inputs, nothing half-written on an error, the
command line and the environment. The distributed classes are in test_distributed.py.
"""
import math
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as tF

import fastssl
from fastssl import augment as A
from fastssl import cli
from fastssl._checks import ShapeError
from test_barlow import ref_barlow, ref_vicreg
from test_infonce import ref_clip, ref_info_nce, ref_nt_xent
from test_siglip import ref_siglip

FMAX = torch.finfo(torch.float32).max
NAN, INF = float("nan"), float("inf")


@dataclass
class Case:
    """``call(*make())`` on both paths. Expect ``raises`` (with ``words`` in the message) or,
    with ``ref``, the value ``ref(*float64 copies of the inputs)`` (and its input gradients
    where inputs require grad), in float32 unless the inputs are float64."""
    id: str
    call: Callable
    make: Callable = tuple
    raises: type = None
    words: tuple = ()
    ref: Callable = None
    grads: bool = True
    tol: float = 1e-5


CASES = []


def add(*cases):
    for c in cases:
        CASES.append(c)


def rnd(n, D, seed, scale=1.0, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x.requires_grad_(grad) if dtype.is_floating_point else x


def pair(n=5, D=7, seed=0, scale=1.0, dtype=torch.float32):
    return lambda: (rnd(n, D, seed, scale, dtype), rnd(n, D, seed + 1, scale, dtype))


# ----------------------------------------------------------------------------- entry points

# name -> (call(a, b), argument names, float64 reference, takes only 2-D, min batch)
def _bank(a, b):
    return fastssl.NTXentLoss(memory_bank_size=8)(a, b)


LOSSES = {
    "nt_xent": (lambda a, b: fastssl.nt_xent(a, b, 0.3), ("z0", "z1"),
                lambda a, b: ref_nt_xent(a, b, 0.3), True, 1),
    "NTXentLoss": (lambda a, b: fastssl.NTXentLoss(0.3)(a, b), ("out0", "out1"),
                   lambda a, b: ref_nt_xent(a, b, 0.3), True, 1),
    "NTXentLoss(bank)": (_bank, ("out0", "out1"), None, True, 1),
    "info_nce": (lambda a, b: fastssl.info_nce(a, b, 0.2), ("query", "key"),
                 lambda a, b: ref_info_nce(a, b, 0.2), True, 1),
    "InfoNCELoss(symmetric)": (lambda a, b: fastssl.InfoNCELoss(0.2, symmetric=True)(a, b),
                               ("query", "key"),
                               lambda a, b: ref_info_nce(a, b, 0.2, symmetric=True), True, 1),
    "clip_loss": (lambda a, b: fastssl.clip_loss(a, b, 3.0), ("image_features", "text_features"),
                  lambda a, b: ref_clip(a, b, 3.0), True, 1),
    "ClipLoss": (lambda a, b: fastssl.ClipLoss()(a, b, 3.0), ("image_features", "text_features"),
                 lambda a, b: ref_clip(a, b, 3.0), True, 1),
    "siglip_loss": (lambda a, b: fastssl.siglip_loss(a, b, 3.0, -1.0),
                    ("image_features", "text_features"),
                    lambda a, b: ref_siglip(a, b, 3.0, -1.0), True, 1),
    "SigLipLoss": (lambda a, b: fastssl.SigLipLoss()(a, b, 3.0, -1.0),
                   ("image_features", "text_features"),
                   lambda a, b: ref_siglip(a, b, 3.0, -1.0), True, 1),
    "barlow_twins": (lambda a, b: fastssl.barlow_twins(a, b, 0.01), ("z_a", "z_b"),
                     lambda a, b: ref_barlow(a, b, 0.01), True, 2),
    "BarlowTwinsLoss(dxd)": (lambda a, b: fastssl.BarlowTwinsLoss(0.01, formulation="dxd")(a, b),
                             ("z_a", "z_b"), lambda a, b: ref_barlow(a, b, 0.01), True, 2),
    "vicreg": (lambda a, b: fastssl.vicreg(a, b), ("z_a", "z_b"), ref_vicreg, False, 2),
    "VICRegLoss(gram)": (lambda a, b: fastssl.VICRegLoss(formulation="gram")(a, b),
                         ("z_a", "z_b"), ref_vicreg, False, 2),
    "negative_cosine_similarity": (
        fastssl.negative_cosine_similarity, ("x0", "x1"),
        lambda a, b: -tF.cosine_similarity(a, b, dim=1, eps=1e-8).mean(), False, 1),
    "NegativeCosineSimilarity": (
        lambda a, b: fastssl.NegativeCosineSimilarity()(a, b), ("x0", "x1"),
        lambda a, b: -tF.cosine_similarity(a, b, dim=1, eps=1e-8).mean(), False, 1),
}

META = torch.device("meta")


def bad_tensors(name, two_d, min_rows):
    """(id, replacement for the argument, exception type, words) for one tensor argument."""
    out = [("list", [[1.0, 2.0]], TypeError, (name, "Tensor")),
           ("ndarray", np.ones((3, 7), dtype=np.float32), TypeError, (name, "Tensor")),
           ("None", None, TypeError, (name,)),
           ("int64", torch.ones(5, 7, dtype=torch.int64), ValueError, (name, "floating")),
           ("bool", torch.ones(5, 7, dtype=torch.bool), ValueError, (name, "floating")),
           ("complex", torch.ones(5, 7, dtype=torch.complex64), ValueError, (name, "floating")),
           ("1-D", torch.randn(7), ShapeError, (name,)),
           ("no rows", torch.randn(0, 7), ShapeError, (name,)),
           ("no columns", torch.randn(5, 0), ShapeError, (name,)),
           ("rows differ", torch.randn(4, 7), ShapeError, (name, "shape")),
           ("width differs", torch.randn(5, 6), ShapeError, (name, "shape")),
           ("dtype differs", torch.randn(5, 7, dtype=torch.bfloat16), ValueError, (name,)),
           ("device differs", torch.empty(5, 7, device=META), ValueError, (name,))]
    if two_d:
        out.append(("3-D", torch.randn(5, 7, 2), ShapeError, (name,)))
    if min_rows > 1:
        out.append(("batch of 1", torch.randn(1, 7), ShapeError, (name,)))
    return out


for loss, (call, names, ref, two_d, min_rows) in LOSSES.items():
    for pos, name in enumerate(names):
        for what, bad, kind, words in bad_tensors(name, two_d, min_rows):
            if what == "batch of 1" and pos == 1:
                continue  # a shape mismatch then: covered by "rows differ"
            if what in ("rows differ", "width differs", "dtype differs", "device differs") \
                    or (what == "batch of 1"):
                # Both arguments of that shape: one of them is named.
                def make(bad=bad, pos=pos, what=what):
                    good = torch.randn(5, 7)
                    if what == "batch of 1":
                        return (bad, bad.clone())
                    return (bad, good) if pos == 0 else (good, bad)
                add(Case(f"{loss}: {name} {what}", call, make, kind,
                         words=(name, "shape") if what in ("rows differ", "width differs")
                         else (name,)))
                continue

            def make(bad=bad, pos=pos):
                good = torch.randn(5, 7)
                return (bad, good) if pos == 0 else (good, bad)
            add(Case(f"{loss}: {name} {what}", call, make, kind, words))


# Unusual but valid inputs: values and gradients against the float64 formulas.
def valid(loss, what, make, expect_inf=False, tol=1e-5):
    call, _, ref, _, _ = LOSSES[loss]
    if ref is None:
        return
    add(Case(f"{loss}: {what}", call, make, ref=ref, grads=not expect_inf, tol=tol))


for loss in LOSSES:
    valid(loss, "float64", pair(5, 7, seed=3, dtype=torch.float64), tol=1e-10)
    valid(loss, "float64, batch 2 and D 1", pair(2, 1, seed=4, dtype=torch.float64), tol=1e-10)
    valid(loss, "fp32 non-contiguous (transposed)",
          lambda: tuple(rnd(7, 5, s).T for s in (5, 6)))
    valid(loss, "fp32 stride-0 rows (one row expanded)", lambda: (
        rnd(1, 7, 7).expand(5, 7), rnd(5, 7, 8)))
    for scale in (1e-30, 1e-19, 1e19, 1e30, 1e37):
        # Scale-invariant losses keep their value; the others grow with the scale and are
        # inf exactly where float64 says the value leaves float32's range.
        valid(loss, f"fp32 scaled by {scale:g}", pair(5, 7, seed=9, scale=scale),
              tol=1e-4)


def _scaled_clip():
    a, b = rnd(5, 7, 21, 1e25), rnd(5, 7, 22, 1e25)
    return a, b


add(Case("clip_loss: features 1e25, logit_scale 1e-38 (true logits ~1e12)",
         lambda a, b: fastssl.clip_loss(a, b, 1e-38), _scaled_clip,
         ref=lambda a, b: ref_clip(a, b, 1e-38), tol=1e-4),
    Case("siglip_loss: features 1e25, logit_scale 1e-38",
         lambda a, b: fastssl.siglip_loss(a, b, 1e-38, -1.0), _scaled_clip,
         ref=lambda a, b: ref_siglip(a, b, 1e-38, -1.0), tol=1e-4),
    Case("info_nce: a queue of norm 1e30", lambda q, k, n: fastssl.info_nce(q, k, 0.2, n),
         lambda: (rnd(4, 6, 30), rnd(4, 6, 31), rnd(9, 6, 32, 1e30, grad=False)),
         ref=lambda q, k, n: ref_info_nce(q, k, 0.2, n), tol=1e-4),
    Case("info_nce: a float64 queue with float64 embeddings",
         lambda q, k, n: fastssl.info_nce(q, k, 0.2, n, symmetric=True),
         lambda: (rnd(4, 6, 33, dtype=torch.float64), rnd(4, 6, 34, dtype=torch.float64),
                  rnd(9, 6, 35, dtype=torch.float64, grad=False)),
         ref=lambda q, k, n: ref_info_nce(q, k, 0.2, n, symmetric=True), tol=1e-10),
    Case("nt_xent: temperature 1e-40 (1/T beyond float32: inf, not NaN)",
         lambda a, b: fastssl.nt_xent(a, b, 1e-40), pair(4, 5, seed=40),
         ref=lambda a, b: ref_nt_xent(a, b, 1e-40), grads=False),
    Case("nt_xent: temperature 1e38", lambda a, b: fastssl.nt_xent(a, b, 1e38),
         pair(4, 5, seed=41), ref=lambda a, b: ref_nt_xent(a, b, 1e38)),
    Case("nt_xent: negative temperature", lambda a, b: fastssl.nt_xent(a, b, -0.5),
         pair(4, 5, seed=42), ref=lambda a, b: ref_nt_xent(a, b, -0.5)),
    Case("clip_loss: logit_scale 0", lambda a, b: fastssl.clip_loss(a, b, 0.0),
         pair(4, 5, seed=43), ref=lambda a, b: ref_clip(a, b, 0.0)),
    Case("nt_xent: a zero row", lambda a, b: fastssl.nt_xent(a, b, 0.5),
         lambda: (torch.cat([rnd(3, 5, 44, grad=False), torch.zeros(1, 5)]).requires_grad_(),
                  rnd(4, 5, 45)),
         # The documented rule: a zero row gets a zero gradient (not d / 1e-12).
         ref=lambda a, b: ref_nt_xent(torch.cat([a[:3], a[3:].detach()]), b, 0.5)),
    Case("barlow_twins: a constant feature",
         lambda a, b: fastssl.barlow_twins(a, b), lambda: (
             torch.cat([rnd(6, 3, 46, grad=False), torch.full((6, 1), 7.0)], 1).requires_grad_(),
             rnd(6, 4, 47)), ref=lambda a, b: ref_barlow(a, b, 5e-3)),
    Case("vicreg: (N, L, D) float64", lambda a, b: fastssl.vicreg(a, b),
         lambda: (torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator()
                              .manual_seed(48)).requires_grad_(),
                  torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator()
                              .manual_seed(49)).requires_grad_()),
         ref=ref_vicreg, tol=1e-10),
    Case("vicreg: every weight 0", lambda a, b: fastssl.vicreg(a, b, 0.0, 0.0, 0.0),
         pair(4, 5, seed=50, scale=1e30), ref=lambda a, b: 0.0 * ref_vicreg(a, b) ** 0))


# ----------------------------------------------------------------------------- scalars

def scalar_values(name, nonzero=True, optional=False):
    """(id, value, exception type or None for valid) for a scalar argument."""
    out = [("nan", NAN, ValueError), ("inf", INF, ValueError), ("-inf", -INF, ValueError),
           ("str", "0.5", TypeError), ("list", [0.5], TypeError), ("bool", True, TypeError),
           ("tensor nan", torch.tensor(NAN), ValueError),
           ("tensor inf", torch.tensor(INF), ValueError),
           ("2-element tensor", torch.tensor([0.5, 0.6]), ValueError),
           ("bool tensor", torch.tensor(True), TypeError),
           ("np.float32", np.float32(0.25), None), ("np.float64", np.float64(0.25), None),
           ("float64 tensor", torch.tensor(0.25, dtype=torch.float64), None),
           ("int tensor", torch.tensor(2), None), ("1-element 1-D tensor", torch.tensor([0.25]),
                                                  None)]
    if nonzero:
        out += [("0", 0.0, ValueError), ("tensor 0", torch.tensor(0.0), ValueError),
                ("int 0", 0, ValueError)]
    if not optional:
        out.append(("None", None, TypeError))
    return out


def _num(v):
    return float(v) if not isinstance(v, torch.Tensor) else float(v.reshape(()))


SCALAR_USES = {
    "nt_xent temperature": (lambda v: lambda a, b: fastssl.nt_xent(a, b, v), "temperature",
                            lambda v: lambda a, b: ref_nt_xent(a, b, _num(v)), True, False),
    "info_nce temperature": (lambda v: lambda a, b: fastssl.info_nce(a, b, v), "temperature",
                             lambda v: lambda a, b: ref_info_nce(a, b, _num(v)), True, False),
    "NTXentLoss temperature": (lambda v: lambda a, b: fastssl.NTXentLoss(v)(a, b),
                               "temperature",
                               lambda v: lambda a, b: ref_nt_xent(a, b, _num(v)), True, False),
    "InfoNCELoss temperature": (lambda v: lambda a, b: fastssl.InfoNCELoss(v)(a, b),
                                "temperature",
                                lambda v: lambda a, b: ref_info_nce(a, b, _num(v)), True, False),
    "clip_loss logit_scale": (lambda v: lambda a, b: fastssl.clip_loss(a, b, v), "logit_scale",
                              lambda v: lambda a, b: ref_clip(a, b, _num(v)), False, False),
    "ClipLoss logit_bias": (lambda v: lambda a, b: fastssl.ClipLoss()(a, b, 2.0, v), "logit_bias",
                            lambda v: lambda a, b: ref_clip(a, b, 2.0), False, True),
    "siglip_loss logit_scale": (lambda v: lambda a, b: fastssl.siglip_loss(a, b, v, -1.0),
                                "logit_scale",
                                lambda v: lambda a, b: ref_siglip(a, b, _num(v), -1.0),
                                False, False),
    "SigLipLoss logit_bias": (lambda v: lambda a, b: fastssl.SigLipLoss()(a, b, 2.0, v),
                              "logit_bias",
                              lambda v: lambda a, b: ref_siglip(a, b, 2.0, _num(v)), False, True),
}

for use, (call_for, name, ref_for, nonzero, optional) in SCALAR_USES.items():
    for what, value, kind in scalar_values(name, nonzero, optional):
        if kind is None:
            add(Case(f"{use}: {what}", call_for(value), pair(4, 5, seed=60), ref=ref_for(value)))
        else:
            add(Case(f"{use}: {what}", call_for(value), pair(4, 5, seed=60), kind, (name,)))

add(Case("NTXentLoss temperature 1e-9 (lightly's rule)", lambda: fastssl.NTXentLoss(1e-9),
         raises=ValueError, words=("temperature", "1e-8")),
    Case("NTXentLoss(torch.tensor(0.))", lambda: fastssl.NTXentLoss(torch.tensor(0.0)),
         raises=ValueError, words=("temperature",)),
    Case("clip_loss: logit_bias tuple", lambda a, b: fastssl.clip_loss(a, b, 2.0, (1.0, 2.0)),
         pair(3, 4), TypeError, ("logit_bias",)),
    Case("clip_loss: logit_bias tensor requiring grad gets a zero gradient",
         lambda a, b: fastssl.clip_loss(a, b, 2.0, torch.tensor(0.7)), pair(3, 4, seed=61),
         ref=lambda a, b: ref_clip(a, b, 2.0)))


# Momenta and schedules: the value against the float64 formula, or the error.
def _nets():
    torch.manual_seed(70)
    return torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)


def _momentum_case(use, what, fn, value, kind):
    def call():
        s, t = _nets()
        fn(s, t, value)
        return torch.cat([p.detach().double().flatten() for p in t.parameters()])

    def ref():
        s, t = _nets()
        m = _num(value)
        return torch.cat([(m * pt.detach().double() + (1 - m) * ps.detach().double()).flatten()
                          for ps, pt in zip(s.parameters(), t.parameters())])
    if kind is None:
        add(Case(f"{use}: {what}", call, ref=ref, grads=False, tol=1e-6))
    else:
        add(Case(f"{use}: {what}", call, raises=kind, words=("momentum",)))


MOMENTUM_USES = {
    "update_momentum": lambda s, t, m: fastssl.update_momentum(s, t, m),
    "ema_": lambda s, t, m: fastssl.ema_([p.data for p in t.parameters()],
                                         [p.data for p in s.parameters()], m),
}
for use, fn in MOMENTUM_USES.items():
    for what, value, kind in [("1.5", 1.5, ValueError), ("-1", -1.0, ValueError),
                              ("nan", NAN, ValueError), ("str", "0.9", TypeError),
                              ("tensor 1.5", torch.tensor(1.5), ValueError),
                              ("tensor -1", torch.tensor(-1.0), ValueError),
                              ("tensor nan", torch.tensor(NAN), ValueError),
                              ("2-element tensor", torch.tensor([0.5, 0.5]), ValueError),
                              ("np.float32 0.9", np.float32(0.9), None),
                              ("tensor 0.9", torch.tensor(0.9), None), ("0", 0, None),
                              ("1", 1, None),
                              ("meta tensor (no value) for real tensors",
                               torch.empty((), device=META), ValueError)]:
        _momentum_case(use, what, fn, value, kind)


# Mixed precision: the update runs in the wider dtype (at least float32), rounded once to the
# teacher's dtype, so a float64 teacher keeps steps far below a float32 ulp.
def _mixed_case(use, fn, teacher, student, m, label):
    def nets():
        torch.manual_seed(71)
        s, t = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        with torch.no_grad():  # the student a little away from the teacher
            for ps, pt in zip(s.parameters(), t.parameters()):
                ps.copy_(pt + 1e-3 * torch.randn_like(pt))
        return s.to(student), t.to(teacher)

    def call():
        s, t = nets()
        fn(s, t, m)
        return torch.cat([p.detach().double().flatten() for p in t.parameters()])

    def ref():
        s, t = nets()
        mv = _num(m)
        return torch.cat([(mv * pt.detach().double() + (1 - mv) * ps.detach().double())
                          .to(teacher).double().flatten()
                          for ps, pt in zip(s.parameters(), t.parameters())])
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    add(Case(f"{use}: {name(teacher)} teacher, {name(student)} student, m={label}", call,
             ref=ref, grads=False, tol=1e-15))


for use, fn in MOMENTUM_USES.items():
    for teacher, student in ((torch.float64, torch.float32), (torch.float64, torch.bfloat16),
                             (torch.float64, torch.float16), (torch.float32, torch.float64),
                             (torch.bfloat16, torch.float64), (torch.float16, torch.float64)):
        for m, label in ((1 - 1e-9, "1 - 1e-9"),
                         (torch.tensor(1 - 1e-9, dtype=torch.float64), "float64 tensor")):
            _mixed_case(use, fn, teacher, student, m, label)


# Meta tensors (shape inference): no values to read, but shapes, dtypes and devices are still
# checked, with the same errors as real tensors.
def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device=META, dtype=dtype)


META_CASES = [
    ("nt_xent: meta z1 rows differ", lambda: fastssl.nt_xent(_meta(5, 7), _meta(4, 7)),
     ShapeError, ("z1", "shape")),
    ("info_nce: meta int64 key", lambda: fastssl.info_nce(_meta(5, 7), _meta(5, 7,
                                                                              dtype=torch.long)),
     ValueError, ("key", "floating")),
    ("siglip_loss: meta 1-D text_features", lambda: fastssl.siglip_loss(
        _meta(5, 7), _meta(7), 3.0, -1.0), ShapeError, ("text_features",)),
    ("clip_loss: CPU features, meta logit_scale", lambda: fastssl.clip_loss(
        torch.randn(3, 4), torch.randn(3, 4), _meta(())), ValueError, ("logit_scale",)),
    ("barlow_twins: meta batch of 1", lambda: fastssl.barlow_twins(_meta(1, 7), _meta(1, 7)),
     ShapeError, ("z_a",)),
    ("ema_: meta shapes differ", lambda: fastssl.ema_([_meta(2)], [_meta(3)], 0.9), ShapeError,
     ("shape",)),
    ("ema_: meta tensors, momentum 1.5", lambda: fastssl.ema_([_meta(2)], [_meta(2)],
                                                                 1.5), ValueError, ("momentum",)),
    ("MoCoQueue.enqueue: meta keys of the wrong width", lambda: fastssl.MoCoQueue(
        3, 4, device=META).enqueue(_meta(2, 5)), ShapeError, ("keys",)),
    ("NTXentLoss(bank): meta out0 of the wrong width", lambda: fastssl.NTXentLoss(
        memory_bank_size=(6, 3)).to(META)(_meta(2, 4), _meta(2, 4)), ShapeError, ("bank",)),
    ("IBOTPatchLoss: meta float mask", lambda: fastssl.IBOTPatchLoss(output_dim=4).to(META)(
        _meta(3, 4), _meta(3, 4), _meta(2, 3, 3)), ValueError, ("mask",)),
    ("koleo: meta 3-D x", lambda: fastssl.koleo(_meta(2, 3, 4)), ShapeError, ("x",)),
    ("sinkhorn_knopp: meta widths differ", lambda: fastssl.sinkhorn_knopp(
        _meta(4, 3), _meta(5, 2)), ShapeError, ("D",)),
]
for what, fn, kind, words in META_CASES:
    add(Case(what, fn, raises=kind, words=words))


def _cos(step, max_steps, start, end, period=None):
    if period is not None:
        return end - (end - start) * (math.cos(2 * math.pi * step / period) + 1) / 2
    if max_steps <= 1 or step >= max_steps - 1:
        return end
    return end - (end - start) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2


for what, args, kind, words in [
        ("step nan", (NAN, 10, 0.9, 1.0), ValueError, ("step",)),
        ("max_steps nan", (3, NAN, 0.9, 1.0), ValueError, ("max_steps",)),
        ("max_steps inf", (3, INF, 0.9, 1.0), ValueError, ("max_steps",)),
        ("start_value nan", (3, 10, NAN, 1.0), ValueError, ("start_value",)),
        ("end_value str", (3, 10, 0.9, "1"), TypeError, ("end_value",)),
        ("period nan", (3, 10, 0.9, 1.0, NAN), ValueError, ("period",)),
        ("period 0", (3, 10, 0.9, 1.0, 0), ValueError, ("Period",)),
        ("step -1", (-1, 10, 0.9, 1.0), ValueError, ("step",)),
        ("step str", ("3", 10, 0.9, 1.0), TypeError, ("step",)),
        ("step tensor", (torch.tensor(3), 10, 0.9, 1.0), None, ()),
        ("numpy max_steps", (3, np.int64(10), 0.9, 1.0), None, ()),
        ("period", (3, 10, 0.9, 1.0, 4), None, ())]:
    if kind is None:
        add(Case(f"cosine_schedule: {what}", lambda args=args: torch.tensor(
            fastssl.cosine_schedule(*args), dtype=torch.float64),
            ref=lambda args=args: _cos(*(_num(a) for a in args[:4]),
                                       *(args[4:] and [float(args[4])])),
            grads=False, tol=1e-12))
    else:
        add(Case(f"cosine_schedule: {what}", lambda args=args: fastssl.cosine_schedule(*args),
                 raises=kind, words=words))


# ----------------------------------------------------------------------------- constructors

CONSTRUCTORS = [
    ("RandomResizedCrop(2.5)", lambda: A.RandomResizedCrop(2.5), TypeError, "size"),
    ("RandomResizedCrop((8,))", lambda: A.RandomResizedCrop((8,)), ValueError, "size"),
    ("RandomResizedCrop((8, 0))", lambda: A.RandomResizedCrop((8, 0)), ValueError, "size"),
    ("RandomResizedCrop('8')", lambda: A.RandomResizedCrop("8"), TypeError, "size"),
    ("RandomResizedCrop(-1)", lambda: A.RandomResizedCrop(-1), ValueError, "size"),
    ("RandomResizedCrop scale decreasing", lambda: A.RandomResizedCrop(8, scale=(0.9, 0.1)),
     ValueError, "scale"),
    ("RandomResizedCrop scale nan", lambda: A.RandomResizedCrop(8, scale=(NAN, 1)),
     ValueError, "scale"),
    ("RandomResizedCrop scale 0.5", lambda: A.RandomResizedCrop(8, scale=0.5), TypeError,
     "scale"),
    ("RandomResizedCrop ratio 0", lambda: A.RandomResizedCrop(8, ratio=(0, 1)), ValueError,
     "ratio"),
    ("RandomHorizontalFlip(p=2)", lambda: A.RandomHorizontalFlip(p=2), ValueError, "p"),
    ("RandomHorizontalFlip(p='x')", lambda: A.RandomHorizontalFlip(p="x"), TypeError, "p"),
    ("RandomResizedCrop interpolation nearest", lambda: A.RandomResizedCrop(
        8, interpolation="nearest"), ValueError, "interpolation"),
    ("RandomResizedCrop antialias False", lambda: A.RandomResizedCrop(8, antialias=False),
     ValueError, "antialias"),
    ("RandomResizedCrop((8, 9, 10))", lambda: A.RandomResizedCrop((8, 9, 10)), ValueError,
     "size"),
    ("ColorJitter brightness pair decreasing", lambda: A.ColorJitter(brightness=(1.4, 0.6)),
     ValueError, "brightness"),
    ("ColorJitter brightness pair negative", lambda: A.ColorJitter(brightness=(-0.1, 1.0)),
     ValueError, "brightness"),
    ("ColorJitter brightness -0.1", lambda: A.ColorJitter(brightness=-0.1), ValueError,
     "brightness"),
    ("ColorJitter hue pair beyond 0.5", lambda: A.ColorJitter(hue=(-0.6, 0.1)), ValueError,
     "hue"),
    ("ColorJitter contrast 3 values", lambda: A.ColorJitter(contrast=(0.5, 1, 2)), ValueError,
     "contrast"),
    ("ColorJitter saturation str", lambda: A.ColorJitter(saturation="0.4"), TypeError,
     "saturation"),
    ("GaussianBlur kernel_size (5, 4)", lambda: A.GaussianBlur(kernel_size=(5, 4)), ValueError,
     "kernel_size"),
    ("GaussianBlur kernel_size (5,)", lambda: A.GaussianBlur(kernel_size=(5,)), ValueError,
     "kernel_size"),
    ("GaussianBlur sigma -1", lambda: A.GaussianBlur(sigma=-1.0), ValueError, "sigma"),
    ("RandomSolarize threshold 128", lambda: A.RandomSolarize(128), ValueError, "threshold"),
    ("Normalize inplace 'no'", lambda: A.Normalize(inplace="no"), TypeError, "inplace"),
    ("GaussianBlur(kernel_size=2.5)", lambda: A.GaussianBlur(kernel_size=2.5), TypeError,
     "kernel_size"),
    ("GaussianBlur(kernel_size=4)", lambda: A.GaussianBlur(kernel_size=4), ValueError,
     "kernel_size"),
    ("GaussianBlur(kernel_size=0)", lambda: A.GaussianBlur(kernel_size=0), ValueError,
     "kernel_size"),
    ("GaussianBlur sigma 0", lambda: A.GaussianBlur(sigma=(0, 1)), ValueError, "sigma"),
    ("GaussianBlur sigma decreasing", lambda: A.GaussianBlur(sigma=(2, 1)), ValueError, "sigma"),
    ("GaussianBlur sigma str", lambda: A.GaussianBlur(sigma="1"), TypeError, "sigma"),
    ("GaussianBlur p -0.1", lambda: A.GaussianBlur(p=-0.1), ValueError, "p"),
    ("Normalize(mean=(.5, .5))", lambda: A.Normalize(mean=(.5, .5)), ValueError, "mean"),
    ("Normalize(mean=0.5)", lambda: A.Normalize(mean=0.5), TypeError, "mean"),
    ("Normalize std 0", lambda: A.Normalize(std=(1, 0, 1)), ValueError, "std"),
    ("Normalize std nan", lambda: A.Normalize(std=(1, NAN, 1)), ValueError, "std"),
    ("Augment()", lambda: A.Augment(), ValueError, "op"),
    ("Augment of a list of sizes without a crop first", lambda: A.Augment(
        A.ColorJitter(0.4), A.RandomResizedCrop(8))([torch.zeros(3, 8, 8, dtype=torch.uint8),
                                                     torch.zeros(3, 9, 8, dtype=torch.uint8)]),
     ValueError, "RandomResizedCrop"),
    ("Augment(nn.Sequential(crop, 'x'))", lambda: A.Augment(torch.nn.Sequential(
        A.RandomResizedCrop(8), torch.nn.Identity())), TypeError, "Identity"),
    ("Augment(crop, 'x')", lambda: A.Augment(A.RandomResizedCrop(8), "x"), TypeError, "op 1"),
    ("Augment dtype int8", lambda: A.Augment(A.RandomResizedCrop(8), dtype=torch.int8),
     ValueError, "dtype"),
    ("Augment channels_last 'yes'", lambda: A.Augment(A.RandomResizedCrop(8),
                                                      channels_last="yes"), TypeError,
     "channels_last"),
    ("ColorJitter(brightness=nan)", lambda: A.ColorJitter(brightness=NAN), ValueError,
     "brightness"),
    ("ColorJitter(contrast=-1)", lambda: A.ColorJitter(contrast=-1), ValueError, "contrast"),
    ("ColorJitter(saturation='x')", lambda: A.ColorJitter(saturation="x"), TypeError,
     "saturation"),
    ("ColorJitter(hue=0.7)", lambda: A.ColorJitter(hue=0.7), ValueError, "hue"),
    ("ColorJitter(hue=nan)", lambda: A.ColorJitter(hue=NAN), ValueError, "hue"),
    ("ColorJitter(p=1.5)", lambda: A.ColorJitter(p=1.5), ValueError, "p"),
    ("RandomGrayscale(1.5)", lambda: A.RandomGrayscale(1.5), ValueError, "p"),
    ("RandomGrayscale(nan)", lambda: A.RandomGrayscale(NAN), ValueError, "p"),
    ("RandomSolarize(threshold=nan)", lambda: A.RandomSolarize(threshold=NAN), ValueError,
     "threshold"),
    ("RandomSolarize(threshold=2)", lambda: A.RandomSolarize(threshold=2), ValueError,
     "threshold"),
    ("SimCLRAugment(blur_p=-1)", lambda: A.SimCLRAugment(blur_p=-1), ValueError, "blur_p"),
    ("SimCLRAugment(size=0)", lambda: A.SimCLRAugment(size=0), ValueError, "size"),
    ("SimCLRAugment(jitter=(1, 2))", lambda: A.SimCLRAugment(jitter=(1, 2)), ValueError,
     "jitter"),
    ("SimCLRAugment(normalize='no')", lambda: A.SimCLRAugment(normalize="no"), TypeError,
     "normalize"),
    ("BYOLAugment(size=2.5)", lambda: A.BYOLAugment(size=2.5), TypeError, "size"),
    ("MoCoV2Augment(blur_p=nan)", lambda: A.MoCoV2Augment(blur_p=NAN), ValueError, "blur_p"),
    ("DINOAugment(n_local=-1)", lambda: A.DINOAugment(n_local=-1), ValueError, "n_local"),
    ("DINOAugment(n_local=2.5)", lambda: A.DINOAugment(n_local=2.5), TypeError, "n_local"),
    ("DINOAugment(local_size=0)", lambda: A.DINOAugment(local_size=0), ValueError, "size"),
    ("MultiView(['x'])", lambda: A.MultiView(["x"]), TypeError, "view 0"),
    ("MoCoQueue(dim=2.5)", lambda: fastssl.MoCoQueue(dim=2.5, size=4), TypeError, "dim"),
    ("MoCoQueue(dim=0)", lambda: fastssl.MoCoQueue(dim=0, size=4), ValueError, "dim"),
    ("MoCoQueue(size='4')", lambda: fastssl.MoCoQueue(dim=3, size="4"), TypeError, "size"),
    ("MoCoQueue(size=0)", lambda: fastssl.MoCoQueue(dim=3, size=0), ValueError, "size"),
    ("MoCoQueue(dtype=int64)", lambda: fastssl.MoCoQueue(3, 4, dtype=torch.int64), ValueError,
     "dtype"),
    ("MoCoQueue(dtype='float32')", lambda: fastssl.MoCoQueue(3, 4, dtype="float32"), TypeError,
     "dtype"),
    ("MoCoQueue(gather_distributed='yes')",
     lambda: fastssl.MoCoQueue(3, 4, gather_distributed="yes"), TypeError, "gather_distributed"),
    ("NTXentLoss(memory_bank_size=4.5)", lambda: fastssl.NTXentLoss(memory_bank_size=4.5),
     TypeError, "memory_bank_size"),
    ("NTXentLoss(memory_bank_size='16')", lambda: fastssl.NTXentLoss(memory_bank_size="16"),
     TypeError, "memory_bank_size"),
    ("NTXentLoss(memory_bank_size=(4, 0))",
     lambda: fastssl.NTXentLoss(memory_bank_size=(4, 0)), ValueError, "memory_bank_size"),
    ("NTXentLoss(memory_bank_size=(4, 4, 4))",
     lambda: fastssl.NTXentLoss(memory_bank_size=(4, 4, 4)), ValueError, "memory_bank_size"),
    ("NTXentLoss(memory_bank_size=-1)", lambda: fastssl.NTXentLoss(memory_bank_size=-1),
     ValueError, "memory_bank_size"),
    ("NTXentLoss(memory_bank_size=(4,))", lambda: fastssl.NTXentLoss(memory_bank_size=(4,)),
     ValueError, "memory_bank_size"),  # lightly's error for a sequence that is not (K, dim)
    ("NTXentLoss(memory_bank_size=(4.5, 8))",
     lambda: fastssl.NTXentLoss(memory_bank_size=(4.5, 8)), TypeError, "memory_bank_size"),
    ("NTXentLoss(gather_distributed='yes')",
     lambda: fastssl.NTXentLoss(gather_distributed="yes"), TypeError, "gather_distributed"),
    ("InfoNCELoss(symmetric='yes')", lambda: fastssl.InfoNCELoss(symmetric="yes"), TypeError,
     "symmetric"),
    ("ClipLoss(rank=-1)", lambda: fastssl.ClipLoss(rank=-1), ValueError, "rank"),
    ("ClipLoss(world_size=0)", lambda: fastssl.ClipLoss(world_size=0), ValueError, "world_size"),
    ("ClipLoss(rank=2, world_size=2)", lambda: fastssl.ClipLoss(rank=2, world_size=2),
     ValueError, "rank"),
    ("ClipLoss(rank=1.5)", lambda: fastssl.ClipLoss(rank=1.5), TypeError, "rank"),
    ("ClipLoss(local_loss='x')", lambda: fastssl.ClipLoss(local_loss="x"), TypeError,
     "local_loss"),
    ("SigLipLoss(dist_impl='x')", lambda: fastssl.SigLipLoss(dist_impl="x"), ValueError,
     "dist_impl"),
    ("SigLipLoss(world_size=2.0)", lambda: fastssl.SigLipLoss(world_size=2.0), TypeError,
     "world_size"),
    ("BarlowTwinsLoss(lambda_param=nan)", lambda: fastssl.BarlowTwinsLoss(lambda_param=NAN),
     ValueError, "lambda_param"),
    ("BarlowTwinsLoss(lambda_param='x')", lambda: fastssl.BarlowTwinsLoss(lambda_param="x"),
     TypeError, "lambda_param"),
    ("BarlowTwinsLoss(normalize='x')", lambda: fastssl.BarlowTwinsLoss(normalize="x"),
     ValueError, "normalize"),
    ("BarlowTwinsLoss(formulation='x')", lambda: fastssl.BarlowTwinsLoss(formulation="x"),
     ValueError, "formulation"),
    ("VICRegLoss(eps=-1)", lambda: fastssl.VICRegLoss(eps=-1), ValueError, "eps"),
    ("VICRegLoss(nu_param=nan)", lambda: fastssl.VICRegLoss(nu_param=NAN), ValueError,
     "nu_param"),
    ("VICRegLoss(mu_param=inf)", lambda: fastssl.VICRegLoss(mu_param=INF), ValueError,
     "mu_param"),
    ("NegativeCosineSimilarity(dim=1.5)", lambda: fastssl.NegativeCosineSimilarity(dim=1.5),
     TypeError, "dim"),
    ("NegativeCosineSimilarity(eps=-1)", lambda: fastssl.NegativeCosineSimilarity(eps=-1),
     ValueError, "eps"),
    ("negative_cosine_similarity dim out of range",
     lambda: fastssl.negative_cosine_similarity(torch.randn(3, 4), torch.randn(3, 4), dim=2),
     ValueError, "dim"),
    ("EMA(momentum='0.9')", lambda: fastssl.EMA(torch.nn.Linear(2, 2), momentum="0.9"),
     TypeError, "momentum"),
    ("EMA(momentum=1.5)", lambda: fastssl.EMA(torch.nn.Linear(2, 2), momentum=1.5), ValueError,
     "momentum"),
    ("EMA(momentum=nan)", lambda: fastssl.EMA(torch.nn.Linear(2, 2), momentum=NAN), ValueError,
     "momentum"),
    ("EMA(final_momentum=2)", lambda: fastssl.EMA(torch.nn.Linear(2, 2), final_momentum=2),
     ValueError, "final_momentum"),
    ("EMA(schedule='x')", lambda: fastssl.EMA(torch.nn.Linear(2, 2), schedule="x"), ValueError,
     "schedule"),
    ("EMA('model')", lambda: fastssl.EMA("model"), TypeError, "model"),
    ("EMA(include_buffers='x')", lambda: fastssl.EMA(torch.nn.Linear(2, 2),
                                                    include_buffers="x"), TypeError,
     "include_buffers"),
    ("EMA.update(step) without max_steps", lambda: fastssl.EMA(torch.nn.Linear(2, 2)).update(3),
     ValueError, "max_steps"),
    ("ema_([1.0], [2.0])", lambda: fastssl.ema_([1.0], [2.0], 0.9), TypeError, "ema[0]"),
    ("ema_(tensor, tensor)", lambda: fastssl.ema_(torch.ones(2), torch.ones(2), 0.9), TypeError,
     "ema"),
    ("ema_ lengths differ", lambda: fastssl.ema_([torch.ones(2)], [], 0.9), ShapeError,
     "tensors"),
    ("ema_ shapes differ", lambda: fastssl.ema_([torch.ones(2)], [torch.ones(3)], 0.9),
     ShapeError, "shape"),
    ("ema_ int tensors", lambda: fastssl.ema_([torch.ones(2, dtype=torch.long)],
                                              [torch.ones(2, dtype=torch.long)], 0.9),
     ValueError, "floating"),
    ("update_momentum('a', model)", lambda: fastssl.update_momentum("a", torch.nn.Linear(2, 2),
                                                                     0.9), TypeError, "model"),
    ("MoCoQueue.enqueue(list)", lambda: fastssl.MoCoQueue(3, 4).enqueue([[1.0, 2.0, 3.0]]),
     TypeError, "keys"),
    ("MoCoQueue.enqueue wrong width", lambda: fastssl.MoCoQueue(3, 4).enqueue(torch.ones(2, 5)),
     ShapeError, "keys"),
    ("MoCoQueue.enqueue int keys", lambda: fastssl.MoCoQueue(3, 4).enqueue(
        torch.ones(2, 3, dtype=torch.long)), ValueError, "keys"),
    ("MoCoQueue.enqueue keys on another device",
     lambda: fastssl.MoCoQueue(3, 4).enqueue(torch.empty(2, 3, device=META)), ValueError, "keys"),
    ("info_nce negatives list", lambda: fastssl.info_nce(torch.randn(3, 4), torch.randn(3, 4),
                                                         negatives=[[1.0] * 4]), TypeError,
     "negatives"),
    ("info_nce negatives wrong width", lambda: fastssl.info_nce(
        torch.randn(3, 4), torch.randn(3, 4), negatives=torch.randn(5, 3)), ShapeError,
     "negatives"),
    ("info_nce negatives requiring grad", lambda: fastssl.info_nce(
        torch.randn(3, 4), torch.randn(3, 4), negatives=torch.randn(5, 4, requires_grad=True)),
     ValueError, "negatives"),
    ("nt_xent gather_distributed='yes'", lambda: fastssl.nt_xent(
        torch.randn(3, 4), torch.randn(3, 4), gather_distributed="yes"), TypeError,
     "gather_distributed"),
    ("ClipLoss(world_size=2) without a process group", lambda: fastssl.ClipLoss(
        rank=0, world_size=2)(torch.randn(2, 3), torch.randn(2, 3), 1.0), ValueError,
     "world_size"),
    ("SigLipLoss(world_size=2) without a process group", lambda: fastssl.SigLipLoss(
        rank=1, world_size=2)(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.0), ValueError,
     "world_size"),
]
for what, fn, kind, word in CONSTRUCTORS:
    add(Case(what, fn, raises=kind, words=(word,) if isinstance(word, str) else word))


# ----------------------------------------------------------------------------- augmentation

def uint8(n=2, h=9, w=7, c=3, seed=80):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def floats(n=2, h=9, w=7, seed=81, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, 3, h, w, generator=g)


def with_pixel(value):
    x = floats()
    x[1, 2, 4, 3] = value
    return x


IMAGE_INPUTS = [
    ("float images in 0..255", lambda: floats(hi=255.0), ValueError, ("[0, 1]", "uint8", "255")),
    ("float images below 0", lambda: floats(lo=-0.5), ValueError, ("[0, 1]",)),
    ("a NaN pixel", lambda: with_pixel(NAN), ValueError, ("NaN",)),
    ("an inf pixel", lambda: with_pixel(INF), ValueError, ("[0, 1]",)),
    ("NHWC without the flag", lambda: uint8().permute(0, 2, 3, 1).contiguous(), ValueError,
     ("channels_last_input=True",)),
    ("2 channels", lambda: uint8(c=2), ValueError, ("channels",)),
    ("int32 images", lambda: uint8().int(), ValueError, ("uint8",)),
    ("bool images", lambda: uint8() > 100, ValueError, ("uint8",)),
    ("empty batch", lambda: uint8(n=0), ValueError, ("non-empty",)),
    ("0x0 image in a list", lambda: [uint8(1)[0], torch.zeros(3, 0, 0, dtype=torch.uint8)],
     ValueError, ("image 1",)),
    ("float image in a list outside [0, 1]", lambda: [uint8(1)[0], floats(1, hi=2.0)[0]],
     ValueError, ("image 1", "[0, 1]")),
    ("images on two devices", lambda: [uint8(1)[0], torch.empty(3, 4, 4, dtype=torch.uint8,
                                                                device=META)],
     ValueError, ("image 1",)),
    ("empty list", lambda: [], ValueError, ("empty",)),
    ("a string", lambda: "images", ValueError, ("images",)),
]
PIPELINES = {
    "SimCLRAugment": lambda x, **kw: A.SimCLRAugment(size=5)(x, **kw),
    "BYOLAugment": lambda x, **kw: A.BYOLAugment(size=5)(x, **kw),
    "MoCoV2Augment": lambda x, **kw: A.MoCoV2Augment(size=5)(x, **kw),
    "DINOAugment": lambda x, **kw: A.DINOAugment(global_size=6, local_size=3, n_local=2)(x, **kw),
    "Augment": lambda x, **kw: A.Augment(A.RandomResizedCrop(5), A.ColorJitter(),
                                         A.GaussianBlur(p=1.0))(x, **kw),
}
for pipe, fn in PIPELINES.items():
    for what, make, kind, words in IMAGE_INPUTS:
        add(Case(f"{pipe}: {what}", lambda x, fn=fn: fn(x), lambda make=make: (make(),), kind,
                 words))
    add(Case(f"{pipe}: generator 'x'", lambda x, fn=fn: fn(x, generator="x"),
             lambda: (uint8(),), TypeError, ("generator",)),
        Case(f"{pipe}: channels_last_input 'yes'",
             lambda x, fn=fn: fn(x, channels_last_input="yes"), lambda: (uint8(),), TypeError,
             ("channels_last_input",)))


# ----------------------------------------------------------------------------- the sweep

def outcome(case, backend, monkeypatch):
    """The case on one path: ("raise", type, message) or ("value", output), its value and
    gradients checked on the same path."""
    monkeypatch.setenv("FASTSSL_BACKEND", backend)
    inputs = case.make()
    try:
        out = case.call(*inputs)
    except Exception as e:  # noqa: BLE001 - the outcome is what is compared
        return ("raise", type(e), str(e))
    if case.ref is not None:
        check_value(case, out, inputs)
    return ("value", out)


def check_value(case, got, inputs):
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    copies = [x.detach().double().requires_grad_(x.requires_grad)
              if isinstance(x, torch.Tensor) else x for x in inputs]
    want = case.ref(*copies)
    want_t = want if isinstance(want, torch.Tensor) else torch.tensor(want, dtype=torch.float64)
    got_t = got.detach().double() if isinstance(got, torch.Tensor) else torch.tensor(got)
    in64 = any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in inputs)
    if isinstance(got, torch.Tensor) and inputs and got.dim() == 0:
        assert got.dtype == (torch.float64 if in64 else got.dtype)
    limit = math.inf if in64 else FMAX
    beyond = want_t.detach().abs() > limit
    expect = torch.where(beyond, torch.sign(want_t.detach()) * math.inf, want_t.detach())
    assert not torch.isnan(got_t).any(), f"NaN where float64 gives {want_t}"
    assert torch.equal(torch.isinf(got_t), torch.isinf(expect)), (got_t, want_t)
    fin = torch.isfinite(expect)
    err = ((got_t - expect)[fin].abs() / expect[fin].abs().clamp_min(1e-30)).max() \
        if fin.any() else torch.tensor(0.0)
    assert err <= case.tol or (got_t - expect)[fin].abs().max() <= 1e-30, \
        f"value {got_t} vs float64 {want_t}: relative error {err:.3g}"
    if case.grads and leaves and isinstance(want, torch.Tensor) and want.requires_grad \
            and torch.isfinite(expect).all():
        got_g = torch.autograd.grad(got, leaves, allow_unused=True)
        want_g = torch.autograd.grad(want, [c for c in copies
                                           if isinstance(c, torch.Tensor) and c.requires_grad],
                                     allow_unused=True)
        for i, (g, w) in enumerate(zip(got_g, want_g)):
            w = torch.zeros_like(leaves[i], dtype=torch.float64) if w is None else w
            g = torch.zeros_like(w) if g is None else g.double()
            assert torch.isfinite(g).all(), f"gradient {i} not finite"
            # Measured against the gradient's natural size |loss| / max |x| as a floor: a
            # gradient that is exactly 0 in exact arithmetic (D = 1 after normalisation)
            # leaves rounding noise in float64 as well.
            natural = want_t.abs().clamp_min(1.0).item() / leaves[i].detach().abs().max().clamp_min(
                1e-30).item()
            e = (g - w).norm().item() / max(w.norm().item(), 1e-3 * natural)
            assert e <= max(case.tol, 1e-4) * 10, f"gradient {i}: relative error {e:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sweep(case, monkeypatch):
    results = {b: outcome(case, b, monkeypatch) for b in ("torch", "triton")}
    torch_out, triton_out = results["torch"], results["triton"]
    if case.raises is not None:
        for backend, out in results.items():
            assert out[0] == "raise", f"{backend}: no error, got {out[1]!r}"
            assert out[1] is case.raises, f"{backend}: {out[1].__name__}: {out[2]}"
            for word in case.words:
                assert word in out[2], f"{backend}: {word!r} not in {out[2]!r}"
        assert torch_out[1:] == triton_out[1:], "the two paths raise differently"
        return
    for backend, out in results.items():
        assert out[0] == "value", f"{backend}: {out[1].__name__}: {out[2]}"
    a, b = (torch.as_tensor(out[1]).detach().double() for out in (torch_out, triton_out))
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(
        torch.nan_to_num(a), torch.nan_to_num(b), rtol=2 * case.tol, atol=1e-30), \
        f"the two paths disagree: {a} and {b}"


def test_sweep_size():
    """The table covers every class and keeps its breadth."""
    assert len(CASES) >= 700
    ids = " ".join(c.id for c in CASES)
    for entry in list(LOSSES) + list(PIPELINES) + ["EMA", "ema_", "update_momentum",
                                                   "cosine_schedule", "MoCoQueue", "Normalize",
                                                   "GaussianBlur", "RandomResizedCrop"]:
        assert entry in ids, entry


# ----------------------------------------------------------------------------- nothing half-written

def _student_teacher():
    torch.manual_seed(90)
    s = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    return s, fastssl.EMA(s, momentum=0.5, schedule=None)


def _extra_buffer(ema):
    ema.module.register_buffer("extra", torch.zeros(2))


def _reshaped_buffer(ema):
    ema.module[1].running_mean = torch.zeros(5)


def _extra_parameter(ema):
    ema.module.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))


def _reshaped_parameter(ema):
    ema.module[0].bias = torch.nn.Parameter(torch.zeros(5))


@pytest.mark.parametrize("breakage", [_extra_buffer, _reshaped_buffer, _extra_parameter,
                                      _reshaped_parameter], ids=lambda f: f.__name__[1:])
def test_ema_update_checks_everything_before_writing(breakage):
    student, ema = _student_teacher()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.add_(3.0)
    breakage(ema)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with pytest.raises(ValueError):
        ema.update()
    after = ema.module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} was written before the error"


def test_queue_and_bank_untouched_by_bad_input():
    q = fastssl.MoCoQueue(3, 4)
    before = (q.queue.clone(), q.ptr.clone(), q.filled.clone())
    with pytest.raises(ValueError):
        q.enqueue(torch.ones(2, 5))
    assert all(torch.equal(a, b) for a, b in zip(before, (q.queue, q.ptr, q.filled)))
    loss = fastssl.NTXentLoss(memory_bank_size=(6, 3))
    bank, ptr = loss.bank.clone(), loss.bank_ptr.clone()
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4, requires_grad=True), torch.randn(2, 4))
    assert torch.equal(bank, loss.bank) and torch.equal(ptr, loss.bank_ptr)


# ----------------------------------------------------------------------------- command line

CLI_ERRORS = [
    (["bench", "--sizes", "-8"], "--sizes"), (["bench", "--sizes", "0"], "--sizes"),
    (["bench", "--dims", "0"], "--dims"), (["bench", "barlow", "--sizes", "1"], "--sizes"),
    (["bench", "vicreg", "--sizes", "1"], "--sizes"), (["bench", "augment", "--sizes", "0"],
                                                       "--sizes"),
    (["bench", "--sizes", "3"], "even"), (["bench", "all", "--sizes", "1"], "--sizes"),
    (["bench", "--dtypes", "int8"], "--dtypes"), (["bench", "--sizes", ","], "--sizes"),
    (["bench", "--sizes", "x"], "--sizes"),
    (["pretrain", "--method", "simclr", "--data", "/no/such/folder"], "--data"),
    (["pretrain", "--method", "simclr", "--scale", "0.9", "0.1"], "--scale"),
    (["pretrain", "--method", "simclr", "--epochs", "0"], "--epochs"),
    (["pretrain", "--method", "simclr", "--lr", "nan"], "--lr"),
]


@pytest.mark.parametrize("argv,word", CLI_ERRORS, ids=[" ".join(a) for a, _ in CLI_ERRORS])
def test_cli_rejects_bad_values_with_its_own_usage(argv, word, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + (["--out", str(tmp_path)] if argv[0] == "bench" else []))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"usage: fastssl {argv[0]}" in err and word in err, err
    assert not list(tmp_path.iterdir()), "a rejected run wrote files"


def test_bench_whose_every_case_failed_writes_nothing_and_fails(tmp_path, monkeypatch, capsys):
    from fastssl import bench
    monkeypatch.setattr(bench.timing, "cpu_case", lambda *a, **k: {"error": "MemoryError: boom"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["bench", "barlow", "--sizes", "4", "--dims", "8", "--out", str(tmp_path)])
    assert code == 1 and "every one of the 3 cases failed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- environment

def test_forced_triton_without_interpreter_says_what_to_set():
    code = ("import torch, fastssl\n"
            "fastssl.nt_xent(torch.randn(3, 4), torch.randn(3, 4))\n")
    import os
    env = dict(os.environ, FASTSSL_BACKEND="triton", TRITON_INTERPRET="0",
               CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode != 0 and "TRITON_INTERPRET=1" in out.stderr, out.stderr[-2000:]
    assert "active drivers" not in out.stderr


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTSSL_BACKEND"):
        fastssl.nt_xent(torch.randn(3, 4), torch.randn(3, 4))
