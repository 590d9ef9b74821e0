"""Autograd-aware collectives on torch.distributed (NCCL on GPU, gloo on CPU).

Gradient convention. Each rank computes a loss L_r over its local rows against the gathered
(global) columns; the single-process objective on the concatenated global batch is
L = mean_r L_r. ``gather`` sends back to each rank the SUM over ranks of the gradients of
its slice, so a rank's input gradient is world_size * dL/dx_local, and DDP's gradient
averaging then yields exactly dL/dθ: training matches one process on the global batch.
(A gather without gradient, or a raw all_reduce, would leave the parameters' gradient too
small by a factor of world_size.)
"""
import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def require_distributed(what):
    if not dist.is_available():
        raise ValueError(f"{what}: torch.distributed is not available in this build of torch")


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _sizes(x, group):
    """Every rank's row count, from one small all_gather that also checks that all ranks
    agree on the width and dtype (a mismatch would otherwise hang or corrupt the gather)."""
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"gather takes 2-D floating tensors, got {x.dim()}-D {x.dtype}")
    meta = torch.tensor([x.shape[0], x.shape[1], _DTYPES.index(x.dtype)], device=x.device,
                        dtype=torch.long)
    metas = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(metas, meta, group=group)
    widths = {tuple(m[1:].tolist()) for m in metas}
    if len(widths) != 1:
        raise ValueError("gather: ranks passed embeddings of different widths or dtypes "
                         f"(width, dtype index per rank: {[m[1:].tolist() for m in metas]})")
    return [int(m[0]) for m in metas]


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


def gather(x, group=None, with_grad=True):
    """Concatenate ``x`` (rows may differ per rank) from every rank in rank order.

    Returns (global tensor, offsets) where offsets[r] is the first row of rank r. With
    ``with_grad`` the result is differentiable (sum convention above); without, the other
    ranks' rows are constants and the local slice is ``x`` itself (keeps its gradient).
    Outside an initialised process group it returns ``x`` and [0].
    """
    if not is_distributed():
        return x, [0]
    sizes = _sizes(x, group)
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    if with_grad:
        return _Gather.apply(x, sizes, group), offsets
    with torch.no_grad():
        full = _gather_padded(x.detach(), sizes, group)
    r = dist.get_rank(group)
    parts = [full[:offsets[r]], x, full[offsets[r] + sizes[r]:]]
    return torch.cat(parts), offsets
