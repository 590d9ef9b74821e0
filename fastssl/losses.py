"""nn.Module losses with the incumbents' signatures. They hold state only (the memory
bank); the math is in ``fastssl.functional``."""
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from fastssl import functional as F

_GATHER = ("multi-process gathering of negatives (torch.distributed) is not implemented in "
           "this version of fastssl; it arrives with the distributed scale-out work")


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent loss, or MoCo's InfoNCE with a memory bank; lightly's signature.

    Args:
        temperature: logits are divided by it; |temperature| < 1e-8 is an error. Negative
            values are allowed (as in lightly).
        memory_bank_size: 0 for SimCLR (in-batch negatives). K > 0 (or a tuple (K, dim))
            keeps a FIFO bank of the last K normalised ``out1`` embeddings (float32, random
            unit vectors until filled); each row of ``out0`` is then scored against its own
            ``out1`` (the positive) and the K bank entries only. The bank is read before it
            is updated, and updated only when ``out0`` requires grad. When a batch does not
            fit in the space left before the end of the bank, the tail is filled and the
            rest of that batch is dropped (lightly's rule).
        gather_distributed: not supported yet; raises NotImplementedError.

    ``forward(out0, out1)`` takes two (n, D) batches and returns the scalar loss.
    """

    def __init__(self, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        if isinstance(temperature, (int, float)) and abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        if gather_distributed:
            raise NotImplementedError(f"NTXentLoss(gather_distributed=True): {_GATHER}")
        size = (memory_bank_size,) if isinstance(memory_bank_size, int) \
            else tuple(memory_bank_size)
        if len(size) not in (1, 2) or any(int(v) < 0 for v in size):
            raise ValueError(f"memory_bank_size must be K >= 0 or (K, dim), got {memory_bank_size}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.memory_bank_size = int(size[0])
        self.register_buffer("bank", torch.empty(0), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(size) == 2 and self.memory_bank_size > 0:
            self._init_bank(int(size[1]))

    @torch.no_grad()
    def _init_bank(self, dim):
        bank = torch.randn(self.memory_bank_size, dim, device=self.bank.device)
        self.bank = F.normalize(bank)
        self.bank_ptr.zero_()

    @torch.no_grad()
    def _enqueue(self, batch):
        size, ptr = self.memory_bank_size, int(self.bank_ptr)
        batch = batch.detach().to(self.bank.dtype)
        if ptr + batch.shape[0] >= size:
            self.bank[ptr:] = batch[:size - ptr]
            self.bank_ptr[0] = 0
        else:
            self.bank[ptr:ptr + batch.shape[0]] = batch
            self.bank_ptr[0] = ptr + batch.shape[0]

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank_size == 0:
            return F.nt_xent(out0, out1, self.temperature)
        F.check_embeddings(out0=out0, out1=out1)
        if self.bank.dim() != 2:
            self._init_bank(out0.shape[1])
        if self.bank.shape[1] != out0.shape[1]:
            raise ValueError(f"the memory bank holds {self.bank.shape[1]}-d embeddings, "
                             f"got {out0.shape[1]}-d")
        negatives = self.bank.to(out0.device).clone()
        if out0.requires_grad:
            self._enqueue(F.normalize(out1.detach()))
        loss = F._info_nce_positive_only(out0, out1, negatives, self.temperature)
        return loss.to(out0.dtype)


class InfoNCELoss(nn.Module):
    """InfoNCE over in-batch negatives plus optional extra negatives.

    ``forward(query, key, negatives=None)``: see ``fastssl.functional.info_nce``.
    """

    def __init__(self, temperature: float = 0.1, symmetric: bool = False,
                 gather_distributed: bool = False):
        super().__init__()
        if isinstance(temperature, (int, float)) and temperature == 0:
            raise ValueError("temperature must be non-zero")
        if gather_distributed:
            raise NotImplementedError(f"InfoNCELoss(gather_distributed=True): {_GATHER}")
        self.temperature = temperature
        self.symmetric = symmetric

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor = None) -> Tensor:
        return F.info_nce(query, key, self.temperature, negatives, self.symmetric)


class ClipLoss(nn.Module):
    """CLIP's symmetric contrastive loss with open_clip's signature.

    ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` returns the loss, or ``{"contrastive_loss": loss}`` with
    ``output_dict=True``. Labels are never materialised, so ``cache_labels`` has nothing to
    cache. ``world_size > 1`` is not supported yet and raises NotImplementedError.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        if world_size > 1:
            raise NotImplementedError(f"ClipLoss(world_size={world_size}): {_GATHER}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        loss = F.clip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss
