"""Contrastive predictive coding (van den Oord et al.): InfoNCE of k-step predictions
against the true future latents, on the fused InfoNCE kernel (no B x B x K logits).

Latents z (B, T, ..., D) and contexts c (B, T, ..., C) run along axis 1 (time for signals,
the rows of a grid of patch embeddings for images, with the columns as a further axis).
For each step k = 1 .. K the prediction p_k = W_k(c_t) of every position t < T - k is
scored against every latent z_{t'+k} of the batch at that step (other sequences, other
positions and, for images, other columns: the negatives), with the true z_{t+k} as its
positive:

    L_k = mean over (b, t, ...) of  -log softmax_j(p_k . z_j)[its own z_{t+k}]
    L   = mean over k of L_k

Scores are the raw dot products (CPC's log-bilinear model; no normalisation and no
temperature unless given). Each L_k is one call of the InfoNCE kernel over the
B (T - k) ... rows of that step: memory O(rows x D), never the rows x rows logits.
"""
import torch
from torch import nn

from fastssl import _checks, _ops
from fastssl.functional import _product_safe, scale_tensor

__all__ = ["cpc_loss", "CPCLoss"]


def _flat(x, k0, k1):
    """x[:, k0:k1] with every axis but the last flattened into rows."""
    part = x[:, k0:k1]
    return part.reshape(-1, part.shape[-1])


def cpc_loss(context, latents, predictors, steps=None, temperature=1.0):
    """The CPC loss (module docstring). ``context`` (B, T, ..., C) and ``latents``
    (B, T, ..., D) share every axis but the last; ``predictors`` is a sequence of K
    callables mapping (rows, C) to (rows, D) (``nn.Linear(C, D)`` each, as CPC's W_k), or
    a (K, D, C) tensor of their weights; ``steps`` (default K) uses the first ``steps``
    predictors. ``temperature`` divides the scores. Gradients reach the contexts, the
    latents (positives and negatives) and the predictors."""
    for x, name in ((context, "context"), (latents, "latents")):
        _checks.floating(x, name)
        if x.dim() < 3:
            raise _checks.ShapeError(f"{name} must be (B, T, ..., features), got shape "
                                     f"{tuple(x.shape)}")
    if context.shape[:-1] != latents.shape[:-1]:
        raise _checks.ShapeError(f"context {tuple(context.shape)} and latents "
                                 f"{tuple(latents.shape)} must share every axis but the last")
    if isinstance(predictors, torch.Tensor):
        _checks.floating(predictors, "predictors")
        if predictors.dim() != 3 or predictors.shape[1:] != (latents.shape[-1],
                                                              context.shape[-1]):
            raise _checks.ShapeError(f"predictor weights must be (K, D = {latents.shape[-1]}, "
                                     f"C = {context.shape[-1]}), got "
                                     f"{tuple(predictors.shape)}")
        weights = predictors
        predictors = [lambda c, w=w: c @ w.T for w in weights]
    predictors = list(predictors)
    if not predictors or not all(callable(p) for p in predictors):
        raise TypeError("predictors must be a non-empty sequence of callables or a (K, D, C) "
                        "tensor")
    K = len(predictors) if steps is None else _checks.integer(steps, "steps", lo=1)
    T = latents.shape[1]
    if K > len(predictors):
        raise ValueError(f"steps = {K} but only {len(predictors)} predictors")
    if K >= T:
        raise ValueError(f"steps = {K} needs sequences longer than {K} along axis 1, got T = "
                         f"{T}")
    if latents.shape[0] == 0:
        raise ValueError("CPC needs at least one sequence")
    losses = []
    for k in range(1, K + 1):
        pred = predictors[k - 1](_flat(context, 0, T - k))
        if pred.shape[-1] != latents.shape[-1] or pred.dim() != 2:
            raise _checks.ShapeError(f"predictor {k - 1} gave shape {tuple(pred.shape)}, not "
                                     f"(rows, D = {latents.shape[-1]})")
        target = _flat(latents, k, T).to(pred.dtype)
        pos = torch.arange(pred.shape[0], device=pred.device)
        # raw products, scaled into float32's range where they could overflow (exact)
        rows, cols, s = _product_safe(pred, target, scale_tensor(temperature, pred,
                                                                 "temperature", invert=True))
        loss, _ = _ops.infonce(rows, cols, None, pos, None, s, False)
        losses.append(loss.to(torch.float64).mean())
    return (torch.stack(losses).mean()).to(latents.dtype)


class CPCLoss(nn.Module):
    """CPC as a module: ``CPCLoss(context_dim, latent_dim, steps)`` holds the K linear
    predictors W_k (no bias, as in CPC); ``forward(context, latents)`` is ``cpc_loss``."""

    def __init__(self, context_dim, latent_dim, steps=12, temperature=1.0):
        super().__init__()
        steps = _checks.integer(steps, "steps", lo=1)
        self.temperature = _checks.number(temperature, "temperature", lo=0.0, lo_open=True)
        self.predictors = nn.ModuleList(
            nn.Linear(_checks.integer(context_dim, "context_dim", lo=1),
                      _checks.integer(latent_dim, "latent_dim", lo=1), bias=False)
            for _ in range(steps))

    def forward(self, context, latents):
        return cpc_loss(context, latents, self.predictors, temperature=self.temperature)
