"""Regularizers added to a self-supervised loss: CO2 (consistency of the similarity
distributions of the two views) and DSE (dense structure estimate), lightly's signatures."""
import math

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from fastssl import _checks, _ops
from fastssl import functional as F
from fastssl._checks import ShapeError

from ._common import _bank_size


class CO2Regularizer(nn.Module):
    """CO2 consistency regularizer (Wei et al., 2021), lightly's signature
    ``CO2Regularizer(alpha=1, t_consistency=0.05, memory_bank_size=0)``,
    ``forward(out0, out1)`` on two (N, D) batches.

    With u_i = normalize(out0_i), v_i = normalize(out1_i), temperature t and negatives
    n_1..n_K (the memory bank as it was before this call; without a bank, the other rows
    of the batch: u's negatives are v_j, v's are u_j, j != i):

        P_i = log_softmax([u_i.v_i, u_i.n_1, ..., u_i.n_K] / t)
        Q_i = log_softmax([v_i.u_i, v_i.n_1, ..., v_i.n_K] / t)
        loss = alpha / 2 * 1/N sum_i [ KL(Q_i || P_i) + KL(P_i || Q_i) ]
             = alpha / (2N) sum_ik (exp P_ik - exp Q_ik)(P_ik - Q_ik)

    (without a bank: S = u v^T / t, P = log_softmax(S, 1), Q = log_softmax(S, 0)^T).

    Deliberate fix: lightly returns ``torch.tensor(value)``, a new leaf with no gradient,
    so its regularizer never trains anything; this one is differentiable with respect to
    both inputs (the bank entries are constants).

    Memory bank (lightly's ``MemoryBankModule`` semantics, held here as two buffers):
    ``bank`` (K, dim) float32, random unit rows drawn with ``torch.randn`` at construction
    when ``dim`` is given (on first use otherwise), and ``bank_ptr``. Every call reads the
    bank, then writes the normalised ``out1`` (detached) at ``bank_ptr``, whether or not
    the inputs require grad (lightly's CO2 always updates); a batch that reaches the end
    of the bank fills the tail, the rest of it is dropped and the pointer returns to 0.
    float64 inputs are scored in float64 against the bank (lightly raises there); 16-bit
    inputs are computed in float32 and the result returned in their dtype.
    """

    def __init__(self, alpha: float = 1, t_consistency: float = 0.05, memory_bank_size=0):
        super().__init__()
        self.alpha = _checks.number(alpha, "alpha")
        self.t_consistency = _checks.number(t_consistency, "t_consistency", nonzero=True)
        size = _bank_size(memory_bank_size)
        self.memory_bank_size = size[0]
        self.register_buffer("bank", torch.empty(0), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(size) == 2 and self.memory_bank_size > 0:
            self._init_bank(size[1])

    @torch.no_grad()
    def _init_bank(self, dim):
        bank = torch.randn(self.memory_bank_size, dim).to(self.bank.device)
        self.bank = tF.normalize(bank, dim=1)
        self.bank_ptr.zero_()

    @torch.no_grad()
    def _enqueue(self, batch):
        if not _checks.has_values(self.bank_ptr, batch):
            return
        size, ptr, n = self.memory_bank_size, int(self.bank_ptr), batch.shape[0]
        batch = batch.detach().to(self.bank.device, self.bank.dtype)
        if ptr + n >= size:
            self.bank[ptr:] = batch[:size - ptr]
            self.bank_ptr[0] = 0
        else:
            self.bank[ptr:ptr + n] = batch
            self.bank_ptr[0] = ptr + n

    def _log_probs(self, u, v):
        """(P, Q) above, logits in u's dtype."""
        t = self.t_consistency
        if self.memory_bank_size == 0:
            s = (u @ v.T) / t
            return torch.log_softmax(s, 1), torch.log_softmax(s, 0).T
        if self.bank.dim() != 2:
            self._init_bank(u.shape[1])
        if self.bank.shape[1] != u.shape[1]:
            raise ShapeError(f"the memory bank holds {self.bank.shape[1]}-d embeddings, got "
                             f"out0 of width {u.shape[1]}")
        negatives = self.bank.to(u.device, u.dtype).clone()  # read before the update
        pos = (u * v).sum(1, keepdim=True)
        p = torch.log_softmax(torch.cat([pos, u @ negatives.T], 1) / t, 1)
        q = torch.log_softmax(torch.cat([pos, v @ negatives.T], 1) / t, 1)
        return p, q

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        F.check_embeddings(out0=out0, out1=out1)
        acc = _ops.acc_dtype(out0)
        u, v = F.normalize(out0.to(acc)), F.normalize(out1.to(acc))
        p, q = self._log_probs(u, v)
        if self.memory_bank_size > 0:
            self._enqueue(v)
        div = ((p.exp() - q.exp()) * (p - q)).sum() / out0.shape[0]
        return (self.alpha * 0.5 * div).to(out0.dtype)


def _kmeans_pp(x: Tensor, k: int) -> Tensor:
    """k-means++ seeds for each of the G problems in x (G, P, D) at once: the first row
    uniformly, each next one with probability proportional to the squared distance to the
    nearest seed so far (uniformly if that is 0 everywhere). Global RNG (torch.randint,
    torch.multinomial); G = 1 draws what lightly's per-problem code draws."""
    G, P, _ = x.shape
    rows = torch.arange(G, device=x.device)
    pick = torch.randint(P, (G,), device=x.device)
    seeds = [x[rows, pick]]
    best = torch.cdist(x, seeds[0][:, None])[..., 0]
    for _ in range(k - 1):  # sequential by definition; vectorised over the G problems
        w = best.square()
        w = w / (w.sum(1, keepdim=True) + 1e-12)
        w = torch.where(w.sum(1, keepdim=True) == 0, torch.full_like(w, 1.0 / P), w)
        pick = torch.multinomial(w, 1)[:, 0]
        seeds.append(x[rows, pick])
        best = torch.minimum(best, torch.cdist(x, seeds[-1][:, None])[..., 0])
    return torch.stack(seeds, 1)


def _cluster_rows(x: Tensor, labels: Tensor, k: int):
    """The rows of each cluster, padded: (G, k, W, D) rows and a (G, k, W) mask of the real
    ones, W the largest cluster. Built by indexing (differentiable in x); no loop."""
    G, P, _ = x.shape
    onehot = tF.one_hot(labels, k)                                  # (G, P, k)
    slot = (onehot.cumsum(1) - 1).gather(2, labels[..., None])[..., 0]  # rank in cluster
    width = max(int(onehot.sum(1).max()), 1)
    g = torch.arange(G, device=x.device)[:, None].expand(G, P)
    src = torch.zeros(G, k, width, dtype=torch.long, device=x.device)
    src[g, labels, slot] = torch.arange(P, device=x.device).expand(G, P)
    mask = torch.zeros(G, k, width, dtype=torch.bool, device=x.device)
    mask[g, labels, slot] = True
    return x[torch.arange(G, device=x.device)[:, None, None], src], mask


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of values[valid]; 0 (in values' dtype) when nothing is valid."""
    if not bool(valid.any()):
        return values.new_zeros(())
    return values[valid].mean()


class DSERegularizer(nn.Module):
    """Dense Structure Estimator regularizer (arXiv 2510.17299), lightly's signature
    ``DSERegularizer(weight=1.0, normalize=True, local_clusters=3, global_clusters=24,
    max_kmeans_iters=20, tol=1e-4)``, ``forward(representations)`` on dense features
    (B, N, D) (B images, N tokens). Returns ``-weight * DSE`` (higher DSE: better
    structure), in the input's dtype (16-bit inputs are computed in float32).

    Tokens x_bn (unit rows when ``normalize``), a = mean_bn ||x_bn - mean(x)||, and for a
    set C of rows R(C) = sum of the singular values of (C - mean C) / sqrt(max(|C| - 1, D)):

        intra_image = mean_b  mean_{c : |c| > 1} R(c)    k-means (local_clusters) per image
        groups: m = max(global_clusters // local_clusters, 1) consecutive images; k-means
            (global_clusters) on each group's tokens, centroids mu_c, labels c(i):
        inter       = mean_groups mean_i min_{c != c(i)} ||x_i - mu_c||   (groups with k > 1)
        intra_batch = mean over every group's clusters with |c| > 1 of R(c)
        ED          = exp(H(s / sum s)) / min(BN, D),  s the singular values of all BN tokens
        DSE         = inter / a + ED - (intra_batch / a + intra_image / a) / 2

    (a + 1e-12 in each division; clusters are taken on detached features, the terms are
    differentiable). k-means: k = min(clusters, rows), k-means++ seeds (squared-distance
    sampling), Lloyd iterations until the centroids move by less than ``tol`` (Frobenius
    norm) or ``max_kmeans_iters``, an emptied cluster re-seeded at a random row, then a
    final assignment; lightly's rules. Unlike lightly (a Python loop per image, per group
    and per cluster), every image's problem runs in one batched k-means, every group's in
    another (plus one for a last, smaller group), each problem stopping on its own ``tol``,
    and the per-cluster terms come from one batched SVD of the zero-padded clusters. From
    the same seeds the clusterings and the value are lightly's; the seeds come from the
    global RNG in another order, so ``torch.manual_seed(s)`` reproduces lightly's value
    only for one image forming one group (B = 1).
    """

    def __init__(self, weight: float = 1.0, normalize: bool = True, local_clusters: int = 3,
                 global_clusters: int = 24, max_kmeans_iters: int = 20, tol: float = 1e-4):
        super().__init__()
        self.weight = _checks.number(weight, "weight", lo=0.0)
        self.normalize = _checks.flag(normalize, "normalize")
        self.local_clusters = _checks.integer(local_clusters, "local_clusters", lo=1)
        self.global_clusters = _checks.integer(global_clusters, "global_clusters", lo=1)
        self.max_kmeans_iters = _checks.integer(max_kmeans_iters, "max_kmeans_iters", lo=1)
        self.tol = _checks.number(tol, "tol", lo=0.0, lo_open=True)

    def forward(self, representations: Tensor) -> Tensor:
        x = _checks.floating(representations, "representations")
        if x.dim() != 3:
            raise ShapeError("representations must have shape (batch_size, num_tokens, dim), "
                             f"got {tuple(x.shape)}")
        if min(x.shape) == 0:
            raise ShapeError("representations must have non-empty batch, token and feature "
                             f"dimensions, got {tuple(x.shape)}")
        if self.weight == 0:
            return x.new_zeros(())
        B, N, D = x.shape
        x = x.to(_ops.acc_dtype(x))
        if self.normalize:
            x = F.normalize(x.reshape(B * N, D)).reshape(B, N, D)
        a = torch.linalg.vector_norm(x - x.mean((0, 1), keepdim=True), dim=-1).mean() + 1e-12
        intra_image = self._intra_image_structure(x)
        inter, intra_batch = self._batch_structure(x)
        ed = self._effective_dimensionality(x.reshape(B * N, D))
        dse = inter / a + ed - 0.5 * (intra_batch / a + intra_image / a)
        return (-self.weight * dse).to(representations.dtype)

    def _group_terms(self, groups: Tensor, num_clusters: int):
        """k-means of each of the G problems (G, P, D), then R(c) of every cluster:
        (centroids (G, k, D), labels (G, P), R (G, k), |c| > 1 (G, k))."""
        centroids, labels = self._kmeans(groups.detach(), num_clusters)
        rows, mask = _cluster_rows(groups, labels, centroids.shape[1])
        valid = mask.sum(-1) > 1
        r = torch.where(valid, self._centered_singular_sum(rows, mask), 0.0)
        return centroids, labels, r, valid

    def _intra_image_structure(self, x: Tensor) -> Tensor:
        _, _, r, valid = self._group_terms(x, self.local_clusters)
        per_image = r.sum(1) / valid.sum(1).clamp_min(1).to(r.dtype)
        return _masked_mean(per_image, valid.any(1))

    def _batch_structure(self, x: Tensor):
        """(inter, intra_batch) over groups of m consecutive images."""
        B, N, D = x.shape
        m = max(self.global_clusters // self.local_clusters, 1)
        full = (B // m) * m
        chunks = ([x[:full].reshape(B // m, m * N, D)] if full else []) + \
                 ([x[full:].reshape(1, (B - full) * N, D)] if full < B else [])
        inter, intra = [], []
        for groups in chunks:  # at most two batched problems: the full groups, the rest
            centroids, labels, r, valid = self._group_terms(groups, self.global_clusters)
            k = centroids.shape[1]
            if k > 1:
                d = torch.cdist(groups, centroids)
                d = d.masked_fill(tF.one_hot(labels, k).bool(), math.inf)
                inter.append(d.min(2).values.mean(1))
            intra.append(r[valid])
        inter = torch.cat(inter).mean() if inter else x.new_zeros(())
        intra = torch.cat(intra)
        return inter, (intra.mean() if intra.numel() else x.new_zeros(()))

    def _effective_dimensionality(self, x: Tensor) -> Tensor:
        """exp(entropy of the normalised singular values) / min(rows, D) of x (M, D)."""
        s = torch.linalg.svdvals(x)
        p = s / (s.sum() + 1e-12)
        return torch.exp(-(p * torch.log(p + 1e-12)).sum()) / min(x.shape)

    def _centered_singular_sum(self, x: Tensor, mask: Tensor = None) -> Tensor:
        """R(C) of the rows of x (..., W, D); with ``mask`` (..., W) only the rows marked
        True belong to C (the others are zeroed, which leaves the singular values as
        they are)."""
        D = x.shape[-1]
        if mask is None:
            n = torch.full(x.shape[:-2], x.shape[-2], dtype=x.dtype, device=x.device)
            centered = x - x.mean(-2, keepdim=True)
        else:
            w = mask[..., None].to(x.dtype)
            n = w.sum((-2, -1))
            mean = (x * w).sum(-2, keepdim=True) / n.clamp_min(1)[..., None, None]
            centered = (x - mean) * w
        return torch.linalg.svdvals(centered).sum(-1) / torch.sqrt((n - 1).clamp_min(D))

    @torch.no_grad()
    def _kmeans_plus_plus_init(self, x: Tensor, num_clusters: int) -> Tensor:
        """(G, k, D) seeds for x (G, P, D); see ``_kmeans_pp``."""
        return _kmeans_pp(x, num_clusters)

    @torch.no_grad()
    def _kmeans(self, x: Tensor, num_clusters: int):
        """Lloyd's k-means of each problem in x (G, P, D) (or one (P, D)): (centroids
        (G, k, D), labels (G, P)) with k = min(num_clusters, P)."""
        if x.dim() == 2:
            c, labels = self._kmeans(x[None], num_clusters)
            return c[0], labels[0]
        G, P, _ = x.shape
        k = min(num_clusters, P)
        c = self._kmeans_plus_plus_init(x, k)
        done = torch.zeros(G, dtype=torch.bool, device=x.device)
        for _ in range(self.max_kmeans_iters):
            onehot = tF.one_hot(torch.cdist(x, c).argmin(2), k).to(x.dtype)  # (G, P, k)
            counts = onehot.sum(1)
            new = (onehot.transpose(1, 2) @ x) / counts.clamp_min(1)[..., None]
            empty = (counts == 0) & ~done[:, None]
            if bool(empty.any()):  # lightly: a random row, drawn per emptied cluster
                g, j = empty.nonzero(as_tuple=True)
                new[g, j] = x[g, torch.randint(P, (g.numel(),), device=x.device)]
            shift = (new - c).square().sum((1, 2)).sqrt()
            c = torch.where(done[:, None, None], c, new)
            done = done | (shift < self.tol)
            if bool(done.all()):
                break
        return c, torch.cdist(x, c).argmin(2)
