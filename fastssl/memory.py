"""Memory banks with lightly's interface, and a nearest-neighbour search that never holds
the (N x K) similarity matrix.

- ``MemoryBankModule(size, gather_distributed=False, feature_dim_first=True)``: lightly
  1.6.0's FIFO bank of past embeddings (the negatives of NTXent-with-a-bank, the support set
  of NNCLR). ``forward(output, labels=None, update=False)`` returns ``(output, bank)``: the
  output unchanged and a snapshot of the bank taken *before* this call's update. A batch
  that does not fit in the space left before the end of the bank fills that space and the
  rest of it is dropped (lightly's rule; ``fastssl.MoCoQueue`` is the ring buffer that wraps
  around instead).
- ``NNMemoryBankModule(size)``: lightly 1.6.0's NNCLR support set. ``forward(output,
  update=False)`` returns, for every row of ``output``, the bank entry of largest cosine
  similarity (as stored, not normalised), looked up before the bank is updated.
- ``nearest_neighbours(x, bank, k=1)``: the k entries of ``bank`` of largest cosine
  similarity to each row of ``x``, ties to the lowest index. k = 1 runs
  ``fastssl.clustering.assign`` (one tiled pass: a Triton kernel on CUDA, the chunked
  portable twin elsewhere); k > 1 merges a running top-k over (row chunk x bank chunk) tiles
  of about 2^21 scores.

Both modules keep lightly's buffers and attributes: ``bank`` (num_features, dim) float32,
``bank_ptr`` (1,) int64, both non-persistent (not in ``state_dict``, as in lightly), moved by
``.to()``; ``size`` (the size tuple), ``gather_distributed``, ``feature_dim_first``.
"""
import contextlib
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from fastssl import _checks, clustering, distributed
from fastssl import functional as F

__all__ = ["MemoryBankModule", "NNMemoryBankModule", "nearest_neighbours", "Neighbours"]

TILE = 2 ** 21  # scores per (row chunk x bank chunk) tile of the top-k search
COLS = 4096     # bank rows per tile of the top-k search (at most)


class Neighbours(NamedTuple):
    values: Tensor   # (N, k) cosine similarities, descending; float32 (float64 for float64)
    indices: Tensor  # (N, k) int64 rows of the bank


# ----------------------------------------------------------------------------- the search

def _search_args(x, bank, k):
    for t, name in ((x, "x"), (bank, "bank")):
        _checks.floating(t, name)
        if t.dim() != 2:
            raise _checks.ShapeError(f"{name} must be 2-D (rows, dim), got shape "
                                     f"{tuple(t.shape)}")
    if bank.shape[1] != x.shape[1]:
        raise _checks.ShapeError(f"bank rows have dim {bank.shape[1]}, x rows {x.shape[1]}: "
                                 "they must be equal")
    if bank.shape[0] == 0:
        raise _checks.ShapeError("bank must hold at least one row, got shape "
                                 f"{tuple(bank.shape)}")
    if bank.device != x.device:
        raise ValueError(f"bank is on {bank.device}, x on {x.device}: they must be on the "
                         "same device")
    k = _checks.integer(k, "k", lo=1)
    if k > bank.shape[0]:
        raise ValueError(f"k = {k} exceeds the {bank.shape[0]} rows of bank")
    return k


def _merge(best_v, best_i, scores, ids, k):
    """The top k of [running best, this tile] per row: a stable descending sort keeps equal
    scores in index order (the running entries all precede the tile's), so ties go to the
    lowest index."""
    v = torch.cat([best_v, scores], 1)
    i = torch.cat([best_i, ids], 1)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return v.gather(1, order), i.gather(1, order)


def _topk_tiles(xn, bn, k):
    """(values, indices) (N, k) of the largest xn . bn_j, in tiles of about TILE scores.

    Each tile's products are accumulated in float64 and rounded to the arithmetic dtype:
    for float32 rows the products are exact in float64 and the sums differ between
    summation orders only far below float32's rounding, so identical bank rows score
    identically wherever they sit in a tile (a GEMM's edge columns may sum in another
    order) and the tie rule, not the GEMM's blocking, decides between them."""
    n, K = xn.shape[0], bn.shape[0]
    cols = min(K, COLS)
    rows = max(1, TILE // (cols + k))
    values = xn.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.int64, device=xn.device)
    for r0 in range(0, n, rows):
        xr = xn[r0:r0 + rows].to(torch.float64)
        best_v = xn.new_empty(xr.shape[0], 0)
        best_i = indices.new_empty(xr.shape[0], 0)
        for k0 in range(0, K, cols):
            s = torch.mm(xr, bn[k0:k0 + cols].to(torch.float64).T).to(xn.dtype)
            s.nan_to_num_(nan=-float("inf"))
            ids = torch.arange(k0, k0 + s.shape[1], device=xn.device).expand_as(s)
            best_v, best_i = _merge(best_v, best_i, s, ids, k)
        values[r0:r0 + rows], indices[r0:r0 + rows] = best_v, best_i
    return values, indices


@torch.no_grad()
def nearest_neighbours(x: Tensor, bank: Tensor, k: int = 1) -> Neighbours:
    """The ``k`` rows of ``bank`` (K, D) of largest cosine similarity to each row of ``x``
    (N, D): ``Neighbours(values, indices)``, both (N, k), in descending order of similarity,
    equal similarities in increasing index order (for k = 1 that is ``argmax``'s rule: the
    first maximum). Forward only (no gradient).

    Rows are normalised (scale-safe, a zero row stays zero and scores 0 against everything)
    and scored in float32, float64 when either input is float64, whatever the input dtypes
    (bfloat16 / float16 inputs are widened, not rounded further) and under autocast too.
    k = 1 is one tiled pass of ``fastssl.clustering.assign`` (a Triton kernel on CUDA:
    float32 products in three TF32 passes); k > 1 keeps a running top-k over tiles of
    about ``TILE`` scores (``COLS`` bank rows at a time; float32 tiles accumulated in
    float64 and rounded, so that duplicate bank rows tie exactly wherever they sit).
    Memory O((N + K) * D + TILE). Rows holding NaN get unspecified neighbours.

    Errors: TypeError / ValueError for non-tensors / non-floating dtypes, ``ShapeError``
    for shapes (not 2-D, different D, an empty bank), ValueError for a k outside [1, K] or
    tensors on different devices."""
    k = _search_args(x, bank, k)
    acc = torch.float64 if torch.float64 in (x.dtype, bank.dtype) else torch.float32
    n, D = x.shape
    if n == 0 or D == 0:  # no rows, or every similarity is 0: the first k rows
        idx = torch.arange(k, device=x.device).expand(n, k).contiguous()
        return Neighbours(torch.zeros(n, k, dtype=acc, device=x.device), idx)
    with _no_autocast(x.device):  # the scores stay in acc under autocast
        xn = F.normalize(x.detach().to(acc))
        bn = F.normalize(bank.detach().to(acc))
        if k > 1:
            return Neighbours(*_topk_tiles(xn, bn, k))
        idx, _ = clustering.assign(xn, bn, spherical=True)
        values = torch.linalg.vecdot(xn, bn.index_select(0, idx))
    return Neighbours(values[:, None], idx[:, None])


def _no_autocast(device):
    if device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the banks

def _size_entry(value, size):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"Illegal memory bank size {size!r}: size entries must be integers, "
                        f"got {type(value).__name__} {value!r}"[:200])
    return int(value)


def _parse_size(size):
    """lightly 1.6.0's rules for ``size``: 0 (or (0,)) disables the bank, otherwise a
    (num_features, dim) pair of non-negative integers; a bare integer > 0 is an error (the
    feature dimension cannot be guessed)."""
    bare = isinstance(size, numbers.Integral) and not isinstance(size, bool)
    if bare:
        entries = (int(size),)
    elif isinstance(size, (str, bytes, Tensor)) or not hasattr(size, "__iter__"):
        raise TypeError(f"size must be 0 or a (num_features, dim) pair of integers, got "
                        f"{type(size).__name__} {size!r}"[:200])
    else:
        entries = tuple(_size_entry(v, size) for v in size)
    if any(v < 0 for v in entries):
        raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
    if bare and entries[0] > 0:
        raise ValueError(f"Memory bank size 'size={size}' does not specify the feature "
                         f"dimension. Set it with 'size=({size}, dim)', or pass 'size=0' to "
                         "disable the memory bank.")
    if entries != (0,) and len(entries) != 2:
        raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) "
                         "tuple, or 'size=0' to disable the memory bank.")
    return entries


def _flag(value, name):
    value = _checks.flag(value, name)
    if value and name == "gather_distributed":
        distributed.require_distributed("MemoryBankModule(gather_distributed=True)")
    return value


class MemoryBankModule(nn.Module):
    """A FIFO bank of past embeddings with lightly 1.6.0's interface (a drop-in for
    ``lightly.models.modules.memory_bank.MemoryBankModule``).

    Args:
        size: ``(num_features, dim)``; ``0`` (or ``(0,)``, or ``(0, dim)``) disables the bank.
            A bare integer > 0, a negative entry or another length is a ValueError (lightly's
            messages); non-integer entries a TypeError.
        gather_distributed: inside an initialised process group of > 1 ranks, an update
            enqueues the batches of every rank, concatenated in rank order (so every rank
            holds the same bank; ranks may pass different batch sizes, zero included).
        feature_dim_first: return the bank as (dim, num_features) (lightly's default), else
            (num_features, dim).

    The bank starts as ``num_features`` random unit rows (``torch.randn`` from the global
    generator, then L2-normalised: lightly draws the same numbers, so the same seed gives
    the same bank), ``bank_ptr`` at 0.

    ``forward(output, labels=None, update=False)`` -> ``(output, bank)``:
        ``output`` is returned as it is (the same object); ``labels`` is ignored. With the
        bank disabled the result is ``(output, None)`` (only ``update`` is checked). Otherwise
        ``bank`` is a copy of the bank taken before this call's update, in the layout chosen
        by ``feature_dim_first``. With ``update``, the detached rows of ``output`` (n, dim)
        are then written at ``bank_ptr`` in order, cast to the bank's dtype: when
        ``bank_ptr + n >= num_features`` the rows up to the end of the bank are written, the
        rest of the batch is dropped and ``bank_ptr`` returns to 0; otherwise ``bank_ptr``
        advances by n. The write reads nothing back to the host (no device synchronisation).
        Before the first write ``output`` is checked (a floating tensor of shape (n, dim):
        TypeError, ValueError, ``ShapeError``); on error the bank is unchanged. Under
        ``gather_distributed`` only updating calls communicate (one small agreement and one
        gather), so a call with ``update=False`` may run on one rank alone.
    """

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        self.size = _parse_size(size)
        self.gather_distributed = _flag(gather_distributed, "gather_distributed")
        self.feature_dim_first = _flag(feature_dim_first, "feature_dim_first")
        self.bank: Tensor
        self.bank_ptr: Tensor
        self.register_buffer("bank", torch.empty(self.size, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(self.size) == 2:
            self._init_memory_bank(self.size)

    @torch.no_grad()
    def _init_memory_bank(self, size: Tuple[int, ...]) -> None:
        """Random unit rows (lightly's draw: ``torch.randn(size)`` in the default dtype, then
        cast and normalised), the pointer at 0."""
        rows = torch.randn(size).to(self.bank.dtype)
        self.bank = torch.nn.functional.normalize(rows, dim=-1).to(self.bank.device)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=self.bank.device)

    def _check_batch(self, output, what):
        _checks.floating(output, "output")
        if output.dim() != 2 or output.shape[1] != self.bank.shape[1]:
            raise _checks.ShapeError(f"{what}: output must have shape (n, "
                                     f"{self.bank.shape[1]}) to enter a bank of size "
                                     f"{self.size}, got {tuple(output.shape)}")

    def _snapshot(self) -> Tensor:
        bank = self.bank.detach().clone()
        return bank.transpose(0, -1) if self.feature_dim_first else bank

    def _update(self, output: Tensor) -> None:
        """Checks ``output`` (agreed between ranks under ``gather_distributed``), then
        enqueues it (gathered from every rank)."""
        what = type(self).__name__
        active = F._gathering(self.gather_distributed)
        with distributed.agree(f"{what}.forward(update=True)", active, min_total=0,
                               output=output) as world:
            self._check_batch(output, what)
        batch = output.detach()
        if active:
            batch, _ = distributed.gather(batch, with_grad=False, sizes=world.sizes["output"])
        self._dequeue_and_enqueue(batch)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        """Writes ``batch`` (n, dim) at the pointer; what does not fit before the end of
        the bank is dropped (class docstring). Only the first min(n, K) rows can land;
        those that do not are sent to their own (unchanged) rows below the pointer, so one
        ``index_copy_`` with distinct slots does the write without a host read."""
        K, n = self.size[0], batch.shape[0]
        m = min(n, K)
        if m == 0:
            return
        ptr = self.bank_ptr[0]
        pos = ptr + torch.arange(m, device=self.bank.device)
        keep = pos < K
        slots = torch.where(keep, pos, pos - K)  # dropped rows: slots 0 .. ptr + m - K - 1
        rows = batch[:m].to(device=self.bank.device, dtype=self.bank.dtype)
        src = torch.where(keep[:, None], rows, self.bank.index_select(0, slots))
        self.bank.index_copy_(0, slots, src)
        nxt = ptr + n
        self.bank_ptr.copy_((nxt * (nxt < K)).reshape(1))

    def forward(self, output: Tensor, labels: Optional[Tensor] = None,
                update: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """``(output, bank before the update)`` or ``(output, None)`` for a disabled bank;
        with ``update`` the batch is enqueued (class docstring)."""
        update = _checks.flag(update, "update")
        if self.size[0] == 0:
            return output, None
        bank = self._snapshot()
        if update:
            self._update(output)
        return output, bank


class NNMemoryBankModule(MemoryBankModule):
    """NNCLR's support set with lightly 1.6.0's interface (``NNMemoryBankModule(size)``,
    a drop-in for ``lightly.models.modules.NNMemoryBankModule``): a ``MemoryBankModule(size)``
    (``gather_distributed=False``, ``feature_dim_first=True``, as in lightly) whose forward
    returns nearest neighbours.

    ``forward(output, update=False)`` -> (n, dim) tensor: row i is the bank entry of largest
    cosine similarity to ``output[i]`` (``nearest_neighbours(output, bank, k=1)``: the first
    such entry among equals, as ``argmax``), exactly as stored in the bank (not normalised),
    in the bank's dtype and on ``output``'s device, without gradient. The lookup reads the
    bank before this call's update; with ``update`` the batch is then enqueued (FIFO,
    overflow dropped: ``MemoryBankModule``). The similarity matrix is never built: one tiled
    pass over the bank. ``output`` must be a floating (n, dim) tensor (TypeError,
    ValueError, ``ShapeError``); a disabled bank (``size=0``) raises ``ShapeError`` at the
    first forward (lightly fails an ``assert`` there; ``ShapeError`` is an AssertionError).
    """

    def __init__(self, size: Union[int, Sequence[int]]):
        super().__init__(size)

    def forward(self, output: Tensor, update: bool = False) -> Tensor:  # type: ignore[override]
        update = _checks.flag(update, "update")
        if self.size[0] == 0:
            raise _checks.ShapeError(
                f"NNMemoryBankModule(size={self.size}) has no bank to search: pass "
                "size=(num_features, dim) with num_features >= 1")
        self._check_batch(output, "NNMemoryBankModule")
        bank = self.bank.detach().to(output.device)
        idx = nearest_neighbours(output, bank, k=1).indices[:, 0]
        neighbours = bank.index_select(0, idx)
        if update:
            self._update(output)
        return neighbours
