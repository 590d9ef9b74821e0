"""Autograd-aware collectives on torch.distributed (NCCL on GPU, gloo on CPU).

Gradient convention. Each rank computes a loss L_r over its local rows against the gathered
(global) columns; the single-process objective on the concatenated global batch is
L = mean_r L_r. ``gather`` sends back to each rank the SUM over ranks of the gradients of
its slice, so a rank's input gradient is world_size * dL/dx_local, and DDP's gradient
averaging then yields exactly dL/dθ: training matches one process on the global batch.
(A gather without gradient, or a raw all_reduce, would leave the parameters' gradient too
small by a factor of world_size.)

Agreement before the first collective. Every distributed entry point runs its argument
checks inside ``agree(...)``: one small all_gather then exchanges each rank's outcome (an
error and its message, or success) with the shapes, dtypes and settings it was called
with, and every rank evaluates the same cross-rank rules on the same data. A bad input on
one rank therefore raises the same exception, with a message naming that rank, on every
rank, instead of leaving the others blocked in a collective. A rank may hold zero rows: it
contributes none to the global batch (see the README, "Errors and edge cases").
"""
from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor

from fastssl._checks import ShapeError

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_KINDS = [None, ValueError, TypeError, ShapeError]
_MSG_BYTES = 512
_DIMS = 4


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def require_distributed(what):
    if not dist.is_available():
        raise ValueError(f"{what}: torch.distributed is not available in this build of torch")


def _device(group):
    """Where the agreement tensor lives: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _meta(t):
    """[is a tensor, dtype code (-1: not floating), ndim, shape (up to 4 dims)]."""
    if not isinstance(t, Tensor):
        return [0, -1, 0] + [0] * _DIMS
    code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1
    shape = list(t.shape[:_DIMS]) + [0] * (_DIMS - min(t.dim(), _DIMS))
    return [1, code, t.dim()] + shape


def _describe(meta):
    if not meta[0]:
        return "no tensor"
    shape = tuple(meta[3:3 + min(meta[2], _DIMS)])
    dtype = str(_DTYPES[meta[1]]).replace("torch.", "") if meta[1] >= 0 else "a non-float dtype"
    return f"{shape} {dtype}"


class Agreement:
    """What ``agree`` learnt: per-rank row counts of each named tensor (``sizes[name]``),
    the global row count of the first one (``total``), this rank and the world size."""

    def __init__(self, names, world, rank_):
        self.names, self.world, self.rank = names, world, rank_
        self.sizes = {name: [0] for name in names}
        self.total = 0

    def offset(self, name):
        return sum(self.sizes[name][:self.rank])


class agree:
    """Context manager around an entry point's argument checks.

    ``with agree("nt_xent", active, z0=z0, z1=z1) as world: <checks>``. Outside a process
    group (``active`` false) it does nothing and local errors propagate as raised. Inside,
    ValueError/TypeError raised by the checks are held back; every rank then exchanges its
    outcome and metadata in one all_gather and raises the same error, naming the rank:

    - a check failed on some rank -> that exception type with that rank's message;
    - the named tensors differ between ranks in dtype, dimensions or width (every dim but
      the first) -> ValueError;
    - ``settings`` (values that decide which collectives run: a bool, or ``(value, choices)``
      for one of a fixed tuple of choices) differ -> ValueError;
    - a rank holds fewer than ``min_each`` rows, or all ranks together fewer than
      ``min_total``, of the first named tensor -> ValueError.
    """

    def __init__(self, what, active, min_total=1, min_each=0, settings=None, group=None,
                 **tensors):
        self.what, self.active, self.group = what, active, group
        self.min_total, self.min_each = min_total, min_each
        self.settings = {name: v if isinstance(v, tuple) else (v, (False, True))
                         for name, v in (settings or {}).items()}
        self.tensors = tensors
        world, me = (world_size(), rank()) if active else (1, 0)
        self.result = Agreement(list(tensors), world, me)

    def __enter__(self):
        return self.result

    def __exit__(self, exc_type, exc, tb):
        if not self.active:
            return False
        if exc_type is not None and not issubclass(exc_type, (ValueError, TypeError)):
            return False  # not an argument error: nothing to agree on
        kind, message = self._exchange(exc)
        if kind is not None:
            raise kind(message) from exc
        return False

    def _exchange(self, exc):
        kind = 0 if exc is None else next(i for i in range(len(_KINDS) - 1, 0, -1)
                                           if isinstance(exc, _KINDS[i]))
        text = str(exc).encode("utf-8")[:_MSG_BYTES] if exc is not None else b""
        head = [kind, len(text)] + [_code(v, choices) for v, choices in self.settings.values()]
        for t in self.tensors.values():
            head += _meta(t)
        body = bytearray(_MSG_BYTES)
        body[:len(text)] = text
        local = torch.cat([torch.tensor(head, dtype=torch.int64),
                           torch.frombuffer(body, dtype=torch.int64)]).to(_device(self.group))
        parts = [torch.empty_like(local) for _ in range(self.result.world)]
        dist.all_gather(parts, local, group=self.group)
        rows = [p.cpu() for p in parts]
        return self._verdict([r[:len(head)].tolist() for r in rows],
                             [bytes(r[len(head):].numpy().view("uint8")) for r in rows])

    def _verdict(self, heads, bodies):
        """The same (exception type, message) on every rank, or (None, None)."""
        what = self.what
        failed = [r for r, h in enumerate(heads) if h[0]]
        if failed:
            r = failed[0]
            text = bodies[r][:heads[r][1]].decode("utf-8", "replace")
            also = f" (the check failed on ranks {failed} in all)" if len(failed) > 1 else ""
            return _KINDS[heads[r][0]], f"{what}: on rank {r}: {text}{also}"
        n_set = len(self.settings)
        for i, (name, (_, choices)) in enumerate(self.settings.items()):
            codes = [h[2 + i] for h in heads]
            r, want = _odd_one(codes)
            if r is not None:
                shown = [choices[c] if c >= 0 else "<invalid>" for c in codes]
                return ValueError, (
                    f"{what}: rank {r} has {name}={shown[r]!r} but other ranks "
                    f"{choices[want] if want >= 0 else '<invalid>'!r}; every rank must use the "
                    f"same {name} (per rank: {shown})")
        width = 3 + _DIMS
        metas = {name: [h[2 + n_set + i * width:2 + n_set + (i + 1) * width] for h in heads]
                 for i, name in enumerate(self.tensors)}
        for name, per_rank in metas.items():
            shapes = [(m[1], m[2], tuple(m[4:3 + min(m[2], _DIMS)])) for m in per_rank]
            r, want = _odd_one(shapes)
            if r is not None:
                kind = ValueError if shapes[r][0] != want[0] else ShapeError  # dtype or shape
                return kind, (
                    f"{what}: rank {r} passed {name} of {_describe(per_rank[r])}, unlike the "
                    f"other ranks; every rank needs the same dtype and the same size in "
                    f"every dimension but the first (per rank: "
                    f"{[_describe(m) for m in per_rank]})")
            self.result.sizes[name] = [m[3] for m in per_rank]
        if self.tensors:
            first = next(iter(self.tensors))
            sizes = self.result.sizes[first]
            self.result.total = sum(sizes)
            small = [r for r, n in enumerate(sizes) if n < self.min_each]
            if small:
                return ShapeError, (f"{what}: rank {small[0]} has {sizes[small[0]]} rows of "
                                    f"{first}; every rank needs at least {self.min_each} "
                                    f"(rows per rank: {sizes})")
            if self.result.total < self.min_total:
                return ShapeError, (f"{what}: the ranks hold {self.result.total} rows of "
                                    f"{first} in all; at least {self.min_total} needed "
                                    f"(rows per rank: {sizes})")
        return None, None


def _code(value, choices):
    """The index of ``value`` in ``choices`` (exact type for bools), -1 if absent."""
    for i, c in enumerate(choices):
        if type(c) is type(value) and c == value:
            return i
    return -1


def _odd_one(values):
    """(first rank whose value differs from the most common one, that value), or (None, None).
    Ties go to rank 0's value."""
    counts = Counter(values)
    top = max(counts.values())
    want = next(v for v in values if counts[v] == top)
    for r, v in enumerate(values):
        if v != want:
            return r, want
    return None, None


def _gather_padded(x, sizes, group):
    top = max(sizes)
    padded = x if x.shape[0] == top else torch.cat(
        [x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([t[:s] for t, s in zip(out, sizes)])


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        r = dist.get_rank(ctx.group)
        start = sum(ctx.sizes[:r])
        return grad[start:start + ctx.sizes[r]], None, None


class _AllReduce(torch.autograd.Function):
    """Sum over ranks; every rank's output depends on every rank's input, so the gradient
    is the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone().contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _all_reduce_sum(x, group=None):
    """Differentiable sum of ``x`` over the ranks (``x`` itself outside a process group).
    Only after an ``agree`` that fixed ``x``'s shape on every rank."""
    return _AllReduce.apply(x, group) if is_distributed() else x


def _all_reduce_max(x, group=None):
    """Elementwise max over the ranks, without gradient (after an ``agree``, as above)."""
    if not is_distributed():
        return x
    out = x.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def gather(x, group=None, with_grad=True, sizes=None):
    """Concatenate ``x`` (rows may differ per rank, zero included) from every rank in rank
    order.

    Returns (global tensor, offsets) where offsets[r] is the first row of rank r. With
    ``with_grad`` the result is differentiable (sum convention above); without, the other
    ranks' rows are constants and the local slice is ``x`` itself (keeps its gradient).
    ``sizes`` (every rank's row count, from an ``agree`` already run) skips the agreement;
    without it ``gather`` checks first that every rank passed a 2-D floating tensor of the
    same width and dtype, and raises the same ValueError on every rank otherwise.
    Outside an initialised process group it returns ``x`` and [0].
    """
    if not is_distributed():
        return x, [0]
    if sizes is None:
        with agree("gather", True, min_total=0, group=group, x=x) as world:
            if not isinstance(x, Tensor):
                raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
            if x.dtype not in _DTYPES:
                raise ValueError(f"x must be a floating tensor, got {x.dtype}")
            if x.dim() != 2:
                raise ShapeError(f"x must be 2-D, got shape {tuple(x.shape)}")
        sizes = world.sizes["x"]
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    if with_grad:
        return _Gather.apply(x, sizes, group), offsets
    with torch.no_grad():
        full = _gather_padded(x.detach(), sizes, group)
    r = dist.get_rank(group)
    parts = [full[:offsets[r]], x, full[offsets[r] + sizes[r]:]]
    return torch.cat(parts), offsets
