"""The InfoNCE family as modules: NT-Xent (SimCLR, MoCo with a bank), InfoNCE, CLIP,
SigLIP and the MoCo queue."""
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from fastssl import _checks, distributed
from fastssl import functional as F

from ._common import _bank_size, _check_world, _gather_flag, _temperature, _world_args


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent loss, or MoCo's InfoNCE with a memory bank; lightly's signature.

    Args:
        temperature: logits are divided by it; |temperature| < 1e-8 is an error. Negative
            values are allowed (as in lightly). A number or a one-element tensor.
        memory_bank_size: 0 for SimCLR (in-batch negatives). K > 0 (or a tuple (K, dim))
            keeps a FIFO bank of the last K normalised ``out1`` embeddings (float32, random
            unit vectors until filled); each row of ``out0`` is then scored against its own
            ``out1`` (the positive) and the K bank entries only. The bank is read before it
            is updated, and updated only when ``out0`` requires grad. When a batch does not
            fit in the space left before the end of the bank, the tail is filled and the
            rest of that batch is dropped (lightly's rule).
        gather_distributed: inside an initialised process group, score the local rows
            against both views of the global batch (gathered with gradient; see
            ``fastssl.distributed``); with a memory bank, enqueue the gathered ``out1``.

    ``forward(out0, out1)`` takes two (n, D) batches and returns the scalar loss.
    """

    def __init__(self, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = _temperature(temperature)
        self.gather_distributed = _gather_flag(gather_distributed, "NTXentLoss")
        size = _bank_size(memory_bank_size)
        self.memory_bank_size = size[0]
        self.register_buffer("bank", torch.empty(0), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(size) == 2 and self.memory_bank_size > 0:
            self._init_bank(size[1])

    @torch.no_grad()
    def _init_bank(self, dim):
        bank = torch.randn(self.memory_bank_size, dim, device=self.bank.device)
        self.bank = F.normalize(bank)
        self.bank_ptr.zero_()

    @torch.no_grad()
    def _enqueue(self, batch, sizes):
        if sizes is not None:
            batch, _ = distributed.gather(batch.detach(), with_grad=False, sizes=sizes)
        batch = batch.detach().to(self.bank.dtype)
        if not _checks.has_values(self.bank_ptr, batch):
            return  # shape inference: no pointer to read, nothing to move
        size, ptr = self.memory_bank_size, int(self.bank_ptr)
        if ptr + batch.shape[0] >= size:
            self.bank[ptr:] = batch[:size - ptr]
            self.bank_ptr[0] = 0
        else:
            self.bank[ptr:ptr + batch.shape[0]] = batch
            self.bank_ptr[0] = ptr + batch.shape[0]

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank_size == 0:
            return F.nt_xent(out0, out1, self.temperature, self.gather_distributed,
                             _what="NTXentLoss", _names=("out0", "out1"))
        active = F._gathering(self.gather_distributed)
        enqueue = isinstance(out0, Tensor) and out0.requires_grad
        with distributed.agree("NTXentLoss", active, settings={"enqueue (out0 requires grad)":
                                                                enqueue},
                               out0=out0, out1=out1) as world:
            F.check_embeddings(allow_empty=active, out0=out0, out1=out1)
            if self.bank.dim() == 2 and self.bank.shape[1] != out0.shape[1]:
                raise _checks.ShapeError(f"the memory bank holds {self.bank.shape[1]}-d embeddings, "
                                 f"got out0 of width {out0.shape[1]}")
        if self.bank.dim() != 2:
            self._init_bank(out0.shape[1])
        # float64 embeddings are scored in float64 against the (float32) bank
        wide = torch.promote_types(self.bank.dtype, out0.dtype)
        negatives = self.bank.to(out0.device, wide).clone()
        if enqueue:
            self._enqueue(F.normalize(out1.detach()), world.sizes["out1"] if active else None)
        loss = F._info_nce_positive_only(out0, out1, negatives, self.temperature)
        return loss.to(out0.dtype)


class InfoNCELoss(nn.Module):
    """InfoNCE over in-batch negatives plus optional extra negatives (e.g. a MoCoQueue).

    ``forward(query, key, negatives=None)``: see ``fastssl.functional.info_nce``. With
    ``gather_distributed`` the keys (and, when symmetric, the queries) are gathered from
    every rank with gradient.
    """

    def __init__(self, temperature: float = 0.1, symmetric: bool = False,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = _checks.scalar(temperature, "temperature", nonzero=True)
        self.symmetric = _checks.flag(symmetric, "symmetric")
        self.gather_distributed = _gather_flag(gather_distributed, "InfoNCELoss")

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor = None) -> Tensor:
        return F.info_nce(query, key, self.temperature, negatives, self.symmetric,
                          self.gather_distributed)


class ClipLoss(nn.Module):
    """CLIP's symmetric contrastive loss with open_clip's signature.

    ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` returns the loss, or ``{"contrastive_loss": loss}`` with
    ``output_dict=True``. Labels are never materialised, so ``cache_labels`` has nothing to
    cache. With ``world_size > 1`` (matching the initialised process group) features are
    gathered as open_clip does: with gradient if ``gather_with_grad``; ``local_loss=True``
    scores local rows against global columns (the option that scales).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.local_loss = _checks.flag(local_loss, "local_loss")
        self.gather_with_grad = _checks.flag(gather_with_grad, "gather_with_grad")
        self.cache_labels = _checks.flag(cache_labels, "cache_labels")
        self.rank, self.world_size = _world_args("ClipLoss", rank, world_size)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        loss = F.clip_loss(image_features, text_features, logit_scale, logit_bias,
                           local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                           gather_distributed=self.world_size > 1, _what="ClipLoss",
                           _check=lambda: _check_world("ClipLoss", self.rank, self.world_size))
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss with open_clip's signature.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``;
    see ``fastssl.functional.siglip_loss``. With ``world_size > 1`` the local images are
    scored against every rank's texts (gathered with gradient); ``dist_impl`` is accepted
    for compatibility: every open_clip variant has this value and gradient.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str = "bidir"):
        super().__init__()
        self.dist_impl = _checks.choice(dist_impl, "dist_impl", ("bidir", "shift", "reduce",
                                                                 "gather"))
        self.cache_labels = _checks.flag(cache_labels, "cache_labels")
        self.rank, self.world_size = _world_args("SigLipLoss", rank, world_size)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        loss = F.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                             gather_distributed=self.world_size > 1, _what="SigLipLoss",
                             _check=lambda: _check_world("SigLipLoss", self.rank,
                                                         self.world_size))
        return {"contrastive_loss": loss} if output_dict else loss


class MoCoQueue(nn.Module):
    """A FIFO ring buffer of keys on the device, for MoCo's negatives.

    ``enqueue(keys)`` after a step writes the (detached) keys at the write pointer, wrapping
    around; with ``gather_distributed`` the keys of every rank are enqueued, in rank order,
    so the queue is identical on all ranks (a rank may pass no keys). ``negatives()``
    returns the (size, dim) queue for ``info_nce(..., negatives=queue.negatives())``, which
    reads it in place. The queue starts as random unit vectors (as in MoCo) until filled;
    ``filled`` counts the real keys. The queue and the pointer are buffers: saved in
    ``state_dict``, moved by ``.to()``.
    """

    def __init__(self, dim: int, size: int, dtype=torch.float32, device=None,
                 gather_distributed: bool = False):
        super().__init__()
        dim = _checks.integer(dim, "dim", lo=1)
        size = _checks.integer(size, "size", lo=1)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"MoCoQueue dtype must be floating point, got {dtype}")
        self.gather_distributed = _gather_flag(gather_distributed, "MoCoQueue")
        init = F.normalize(torch.randn(size, dim, device=device)).to(dtype)
        self.register_buffer("queue", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))

    @property
    def size(self):
        return self.queue.shape[0]

    def negatives(self) -> Tensor:
        return self.queue

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        active = F._gathering(self.gather_distributed)
        with distributed.agree("MoCoQueue.enqueue", active, min_total=0, keys=keys) as world:
            _checks.floating(keys, "keys")
            if keys.dim() != 2 or keys.shape[1] != self.queue.shape[1]:
                raise _checks.ShapeError(f"keys must have shape (n, {self.queue.shape[1]}), "
                                 f"got {tuple(keys.shape)}")
            if keys.device != self.queue.device:
                raise ValueError(f"keys are on {keys.device} but the queue is on "
                                 f"{self.queue.device}")
        if active:
            keys, _ = distributed.gather(keys.detach(), with_grad=False,
                                         sizes=world.sizes["keys"])
        n = keys.shape[0]
        if n == 0:
            return
        # Sequential FIFO writes of all n keys; when n > size only the last `size` survive.
        kept = keys.detach().to(self.queue.dtype)[-self.size:]
        start = self.ptr + (n - kept.shape[0])
        idx = (start + torch.arange(kept.shape[0], device=self.queue.device)) % self.size
        self.queue.index_copy_(0, idx, kept)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
