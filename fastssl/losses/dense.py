"""Dense (per-location) losses as modules, with lightly's class names and signatures:
VICRegL (VICReg on the global embeddings and on matched local features) and the patch
kernel alignment loss (CKA between per-image token kernels), with lightly's helpers
``nearest_neighbors`` (the matching VICRegL uses) and ``roi_resample_to_grid`` (ROI
alignment of two views' patch grids, in plain torch: no torchvision needed).

Arithmetic: float64 inputs compute in float64; float32, bfloat16 and float16 inputs compute
in float32, and the loss is returned in the dtype of the first input (VICRegL: the first
global view's global embedding; PKA: the student's). Shape errors raise
``fastssl._checks.ShapeError`` (a ValueError, an AssertionError and a RuntimeError).
"""
import math
from collections.abc import Sequence
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastssl import _checks, distributed
from fastssl._checks import ShapeError
from fastssl._ops import acc_dtype, pow2_bound
from fastssl._reference import scaled_std
from fastssl.functional import _gathering

from ._common import _gather_flag
from .redundancy import VICRegLoss

__all__ = ["VICRegLLoss", "PatchKernelAlignmentLoss", "nearest_neighbors",
           "roi_resample_to_grid"]


def _acc_of(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------- grouped VICReg

def _group_scale(x: Tensor) -> Tensor:
    """A power of two above max |x| of each group of the (G, N, D) stack, shape (G, 1, 1)."""
    return pow2_bound(x.flatten(1), 1)[..., None]


def _group_mse(x: Tensor, y: Tensor) -> Tensor:
    """mean over (N, D) of (x - y)^2 for each group of the (G, N, D) stacks: (G,)."""
    d = x - y
    f = _group_scale(d)
    return (d / f).square().mean((1, 2)) * f.reshape(-1).square()


def _group_var(x: Tensor, eps: float) -> Tensor:
    """mean_d relu(1 - sqrt(Var_unbiased over N + eps)) for each group: (G,)."""
    f = pow2_bound(x, 1)  # (G, 1, D): per feature, as fastssl.functional.vicreg
    var_y = (x / f).var(1, keepdim=True)
    return torch.relu(1.0 - scaled_std(var_y, f, eps)).mean((1, 2))


def _group_cov(x: Tensor) -> Tensor:
    """sum_{i != j} C_ij^2 / D with C = Xc^T Xc / (N - 1) for each group: (G,).

    From the N x N Gram matrices, ||Xc Xc^T||_F^2 - sum_i C_ii^2 (N - 1)^2, when 4N < 3D
    (C then has rank < N < D, so its off-diagonal part is not small next to the whole), else
    from the D x D matrices with the diagonal left out. Computed on x / f (f a power of two
    per group) and scaled back by f^4."""
    G, N, D = x.shape
    f = _group_scale(x)
    y = x / f
    yc = y - y.mean(1, keepdim=True)
    if 4 * N < 3 * D:
        gram = yc @ yc.mT
        off = gram.square().sum((1, 2)) - yc.square().sum(1).square().sum(1)
    else:
        eye = torch.eye(D, dtype=torch.bool, device=x.device)
        off = (yc.mT @ yc).masked_fill(eye, 0).square().sum((1, 2))
    term = off / ((N - 1) ** 2) / D
    f2 = f.reshape(G).square()
    return torch.where(term == 0, term, term * f2 * f2)


def _gather_rows(x: Tensor, sizes) -> Tensor:
    """(G, n, D) on each rank -> (G, sum n, D), rows in rank order, with gradient."""
    G, n, D = x.shape
    full = distributed.gather(x.transpose(0, 1).reshape(n, G * D), sizes=sizes)[0]
    return full.reshape(-1, G, D).transpose(0, 1)


# ----------------------------------------------------------------------------- matching

def _match(distances: Tensor, num_matches) -> Tuple[Tensor, Tensor]:
    """(input index, candidate index), both (B, K): every input row's nearest candidate,
    then the K input rows with the smallest such distance, in increasing distance (K =
    all rows when num_matches is None, -1 or more than there are). The same torch calls as
    lightly's matching, so that ties resolve alike."""
    n = distances.shape[1]
    k = n if num_matches is None or num_matches == -1 or num_matches > n else num_matches
    nearest, candidate = distances.topk(1, dim=2, largest=False)
    _, chosen = nearest.squeeze(-1).topk(k, dim=1, largest=False)
    return chosen, candidate.squeeze(-1).gather(1, chosen)


def nearest_neighbors(input_maps: Tensor, candidate_maps: Tensor, distances: Tensor,
                      num_matches: int) -> Tuple[Tensor, Tensor]:
    """lightly's ``nearest_neighbors`` (``lightly.models.utils``), VICRegL's matching.

    input_maps (B, n, D), candidate_maps (B, m, D), distances (B, n, m). For each input row
    i its nearest candidate c(i) = argmin_j distances[:, i, j]; the K rows with the smallest
    distances[:, i, c(i)] are kept (K = num_matches, or n when it is None, -1 or above n),
    sorted by that distance. Returns (input_maps[rows], candidate_maps[c(rows)]), each
    (B, K, D)."""
    for name, t in (("input_maps", input_maps), ("candidate_maps", candidate_maps)):
        _checks.tensor(t, name)
        if t.dim() != 3:
            raise ShapeError(f"{name} must be (B, n, D), got shape {tuple(t.shape)}")
    _checks.tensor(distances, "distances")
    want = (input_maps.shape[0], input_maps.shape[1], candidate_maps.shape[1])
    if tuple(distances.shape) != want or candidate_maps.shape[0] != want[0]:
        raise ShapeError(f"distances must have shape {want} for input_maps "
                         f"{tuple(input_maps.shape)} and candidate_maps "
                         f"{tuple(candidate_maps.shape)}, got {tuple(distances.shape)}")
    chosen, candidate = _match(distances, _num_match(num_matches, "num_matches"))
    rows = torch.arange(want[0], device=input_maps.device)[:, None]
    return input_maps[rows, chosen], candidate_maps[rows, candidate]


def _num_match(value, name):
    if value is None:
        return None
    value = _checks.integer(value, name)
    if value != -1 and value < 1:
        raise ValueError(f"{name} must be >= 1, -1 or None (all rows), got {value}")
    return value


# ----------------------------------------------------------------------------- VICRegL inputs

def _view_list(views, name):
    """A sequence of (global embedding, local feature map) pairs."""
    if isinstance(views, (Tensor, str, bytes)) or not isinstance(views, Sequence):
        raise TypeError(f"{name} must be a sequence of (global, local) feature pairs, got "
                        f"{type(views).__name__}")
    out = []
    for i, pair in enumerate(views):
        if isinstance(pair, (Tensor, str, bytes)) or not isinstance(pair, Sequence):
            raise TypeError(f"{name}[{i}] must be a pair (global_features, local_features), "
                            f"got {type(pair).__name__}")
        if len(pair) != 2:
            raise ValueError(f"{name}[{i}] must be a pair (global_features, local_features), "
                             f"got {len(pair)} items")
        out.append((_checks.floating(pair[0], f"{name}[{i}][0]"),
                    _checks.floating(pair[1], f"{name}[{i}][1]")))
    return out


def _grid_list(grids, name):
    if isinstance(grids, (Tensor, str, bytes)) or not isinstance(grids, Sequence):
        raise TypeError(f"{name} must be a sequence of grid tensors, got "
                        f"{type(grids).__name__}")
    return [_checks.floating(g, f"{name}[{i}]") for i, g in enumerate(grids)]


def _check_lengths(gvf, gvg, lvf, lvg):
    """lightly's checks, in lightly's order and words."""
    if len(gvf) != len(gvg):
        raise ValueError(f"global_view_features and global_view_grids must have same length "
                         f"but found {len(gvf)} and {len(gvg)}.")
    if lvf is not None and lvg is not None:
        if len(lvf) != len(lvg):
            raise ValueError(f"local_view_features and local_view_grids must have same "
                             f"length but found {len(lvf)} and {len(lvg)}.")
    elif lvf is not None or lvg is not None:
        raise ValueError(f"local_view_features and local_view_grids must either both be set "
                         f"or None but found {type(lvf)} and {type(lvg)}.")


class _Views:
    """Checked VICRegL inputs: V = G + L views (global views first), each with a global
    embedding (B, Dg), a local map flattened to (B, n_v, Dl) and, for the local loss, a grid
    flattened to (B, n_v, c)."""

    def __init__(self, gvf, lvf, gvg, lvg, min_batch):
        pairs = _view_list(gvf, "global_view_features")
        self.n_global = len(pairs)
        if lvf is not None:
            pairs += _view_list(lvf, "local_view_features")
        if not self.n_global:
            raise ShapeError("VICRegLLoss needs at least one global view, got none")
        names = [f"global_view_features[{i}]" for i in range(self.n_global)] + \
            [f"local_view_features[{i}]" for i in range(len(pairs) - self.n_global)]
        self.glob = [g for g, _ in pairs]
        self.maps = [m for _, m in pairs]
        self._check_glob(names, min_batch)
        self._check_maps(names)
        self.loc = [m.flatten(1, 2) for m in self.maps]
        self.grids = None
        if gvg is not None:
            grids = _grid_list(gvg, "global_view_grids")
            if lvg is not None:
                grids += _grid_list(lvg, "local_view_grids")
            self._check_grids(grids, names)
            acc = _acc_of(grids)
            self.grids = [g.flatten(1, 2).to(acc) for g in grids]

    def _check_glob(self, names, min_batch):
        g0 = self.glob[0]
        for name, g in zip(names, self.glob):
            if g.dim() != 2 or g.shape[1] == 0:
                raise ShapeError(f"{name}[0] must be (batch_size, dim) with dim >= 1, got "
                                 f"shape {tuple(g.shape)}")
            if g.shape != g0.shape:
                raise ShapeError(f"{name}[0] has shape {tuple(g.shape)} but "
                                 f"{names[0]}[0] has {tuple(g0.shape)}")
            if g.device != g0.device:
                raise ValueError(f"{name}[0] is on {g.device} but {names[0]}[0] on "
                                 f"{g0.device}")
        if g0.shape[0] < min_batch:
            raise ShapeError(f"VICRegLLoss needs a batch of at least {min_batch} samples, got "
                             f"{g0.shape[0]} ({names[0]}[0] has shape {tuple(g0.shape)})")

    def _check_maps(self, names):
        B, m0 = self.glob[0].shape[0], self.maps[0]
        for name, m in zip(names, self.maps):
            if m.dim() != 4 or any(s == 0 for s in m.shape[1:]):
                raise ShapeError(f"{name}[1] must be (batch_size, height, width, dim) with no "
                                 f"empty dimension, got shape {tuple(m.shape)}")
            if m.shape[0] != B or m.shape[3] != m0.shape[3]:
                raise ShapeError(f"{name}[1] has shape {tuple(m.shape)}; every local feature "
                                 f"map needs batch size {B} and dim {m0.shape[3]}")
            if m.device != self.glob[0].device:
                raise ValueError(f"{name}[1] is on {m.device} but the global features on "
                                 f"{self.glob[0].device}")

    def _check_grids(self, grids, names):
        for name, g, m in zip(names, grids, self.maps):
            grid = name.replace("features", "grids")
            if g.dim() != 4 or g.shape[:3] != m.shape[:3] or g.shape[3] == 0:
                raise ShapeError(f"{grid} must have shape (batch_size, height, width, c) = "
                                 f"{tuple(m.shape[:3])} + (c,) like {name}[1], got "
                                 f"{tuple(g.shape)}")
            if g.shape[3] != grids[0].shape[3]:
                raise ShapeError(f"{grid} has {g.shape[3]} coordinates per location but "
                                 f"global_view_grids[0] has {grids[0].shape[3]}")
            if g.device != m.device:
                raise ValueError(f"{grid} is on {g.device} but {name}[1] on {m.device}")

    def global_pairs(self):
        """lightly's count of (global view i, view j) pairs: j is any local view, or a global
        view whose embedding is not the same tensor object as view i's."""
        G = self.n_global
        return sum(len(self.glob) - sum(self.glob[j] is self.glob[i] for j in range(G))
                   for i in range(G))

    def local_pairs(self):
        """The (i, j) pairs of the local loss: global view i, and view j whose local map is
        not the same tensor object as view i's."""
        G = self.n_global
        return [(i, j) for i in range(G) for j in range(len(self.maps))
                if j >= G or self.maps[j] is not self.maps[i]]

    def descriptors(self, num_matches):
        """Shape-only tensors for the cross-rank agreement: views (B, G, L + 1), global
        (B, V, Dg) and local (B, groups, Dl) -- what the collectives will carry."""
        g0, m0 = self.glob[0], self.maps[0]
        B, G, V = g0.shape[0], self.n_global, len(self.glob)
        groups = 0
        for i, j in self.local_pairs():
            for p, q, k in ((i, j, num_matches[0]), (j, i, num_matches[1])):
                n = self.loc[p].shape[1]
                groups += 2 * (n if k is None or k == -1 or k > n else k)
        empty = g0.new_empty(())
        return {"views": empty.expand(B, G, V - G + 1), "global": empty.expand(B, V, g0.shape[1]),
                "local": m0.new_empty(()).expand(B, max(groups, 1), m0.shape[3])}


# ----------------------------------------------------------------------------- VICRegL

class VICRegLLoss(nn.Module):
    """VICRegL (Bardes et al., 2022); lightly's signature and values.

    ``forward(global_view_features, global_view_grids, local_view_features=None,
    local_view_grids=None)``: each view is a pair (y, z) of a global embedding y (B, Dg) and
    a local feature map z (B, h, w, Dl) with its grid of positions (B, h, w, c); there are G
    global and L local views (V = G + L). With var(x) = mean_d relu(1 - sqrt(Var_b x_d +
    eps)) and cov(x) = sum_{d != e} C_de^2 / D, C the (B - 1)-normalised covariance over the
    batch,

        global = lambda * mean_{(i, j)} mse(y_i, y_j) + mu * mean_v var(y_v)
                 + nu * mean_v cov(y_v),        i a global view, j != i any view;

        local  = mean_{(i, j)} [M_feat(i, j) + M_grid(i, j)],  i global, j != i any,
        M(i, j) = 1/2 [VR(z_i[S], z_j[c(S)]) + VR(z_j[S'], z_i[c'(S')])],

    where, for each image, c(s) is location s's nearest neighbour in the other map (L2
    distance between features for M_feat, between grid positions for M_grid) and S the
    num_matches[0] locations of z_i with the closest neighbours (S' the num_matches[1] of
    z_j), sorted by that distance; VR is VICReg on the (B, K, Dl) matches, its variance and
    covariance over the batch for each of the K match ranks and averaged over them, with
    lambda, mu and nu / 2 (``self.vicreg_loss``). Finally

        L = alpha * global + (1 - alpha) * local.

    "j != i" is lightly's rule: view j is skipped when it holds the same tensor object.
    Every VR term of one call is computed as one batched VICReg over all the matches (the
    nearest-neighbour searches are lightly's own torch calls, one per pair of views, so the
    matches and their order are lightly's), the covariance from the smaller of the N x N or
    D x D Gram matrices. With ``gather_distributed`` the variance and covariance terms use
    the global batch (gathered with gradient), the invariance terms and the matching stay
    per rank, as lightly's. Differences from lightly: the loss is a 0-d tensor (lightly's
    has shape (1,)); a call with no pair of views raises a ``ShapeError`` (lightly returns
    NaN); the ranks may hold different batch sizes.
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0,
                 nu_param: float = 1.0, alpha: float = 0.75, gather_distributed: bool = False,
                 eps: float = 0.0001, num_matches: Tuple[int, int] = (20, 4)):
        super().__init__()
        self.alpha = _checks.number(alpha, "alpha")
        if isinstance(num_matches, (str, bytes)) or not isinstance(num_matches, Sequence) \
                or len(num_matches) != 2:
            raise TypeError(f"num_matches must be a pair of integers, got {num_matches!r}"[:200])
        self.num_matches = tuple(_num_match(k, "num_matches") for k in num_matches)
        self.lambda_param = _checks.number(lambda_param, "lambda_param")
        self.mu_param = _checks.number(mu_param, "mu_param")
        self.nu_param = _checks.number(nu_param, "nu_param")
        self.eps = _checks.number(eps, "eps", lo=0.0)
        self.gather_distributed = _gather_flag(gather_distributed, "VICRegLLoss")
        # The local terms' weights: nu halved (VICRegL's covariance is half VICReg's).
        self.vicreg_loss = VICRegLoss(lambda_param=lambda_param, mu_param=mu_param,
                                      nu_param=0.5 * self.nu_param, eps=eps,
                                      gather_distributed=gather_distributed)

    def forward(self, global_view_features, global_view_grids, local_view_features=None,
                local_view_grids=None) -> Tensor:
        _check_lengths(global_view_features, global_view_grids, local_view_features,
                       local_view_grids)
        views, world = self._views(global_view_features, global_view_grids,
                                   local_view_features, local_view_grids)
        out_dtype = views.glob[0].dtype
        loss = self.alpha * self._global_term(views, world) + \
            (1 - self.alpha) * self._local_term(views, world)
        return loss.to(out_dtype)

    def _global_loss(self, global_view_features, local_view_features=None) -> Tensor:
        """lightly's global term alone (its tests call it)."""
        views, world = self._views(global_view_features, None, local_view_features, None)
        return self._global_term(views, world).to(views.glob[0].dtype)

    def _local_loss(self, global_view_features, global_view_grids, local_view_features=None,
                    local_view_grids=None) -> Tensor:
        """lightly's local term alone."""
        _check_lengths(global_view_features, global_view_grids, local_view_features,
                       local_view_grids)
        views, world = self._views(global_view_features, global_view_grids,
                                   local_view_features, local_view_grids)
        return self._local_term(views, world).to(views.glob[0].dtype)

    def _active(self):
        return (_gathering(self.gather_distributed),
                _gathering(self.vicreg_loss.gather_distributed))

    def _views(self, gvf, gvg, lvf, lvg):
        """The checked views, inside the cross-rank agreement when gathering."""
        active = any(self._active())
        ctx = distributed.agree("VICRegLLoss", active, min_total=2, min_each=1, views=None,
                                global_=None, local=None)
        with ctx as world:
            views = _Views(gvf, lvf, gvg, lvg, 1 if active else 2)
            if active:
                d = views.descriptors(self.num_matches)
                ctx.tensors.update(views=d["views"], global_=d["global"], local=d["local"])
        return views, world

    def _global_term(self, views: _Views, world) -> Tensor:
        count = views.global_pairs()
        if count == 0:
            raise ShapeError("VICRegLLoss needs two views or more: a global view and another "
                             "view whose global features are a different tensor (no pair to "
                             "compare)")
        acc = _acc_of(views.glob)
        y = torch.stack([g.to(acc) for g in views.glob])  # (V, B, Dg)
        V, B, D = y.shape
        G = views.n_global
        # sum over global i and every view j of ||y_i - y_j||^2 (the pair of a view with
        # itself adds exactly 0, as lightly's skipped pair), on u = y / (2P), P the power of
        # two above max |y|: every difference lies in (-1, 1), no square overflows.
        scale = 2 * pow2_bound(y)
        u = y / scale
        total = sum((u - u[i]).square().sum() for i in range(G))
        inv = total * scale.square() / (B * D * count)
        if self._active()[0]:
            y = _gather_rows(y, world.sizes["views"])
        var = _group_var(y, self.eps).mean()
        cov = _group_cov(y).mean()
        return self.lambda_param * inv + self.mu_param * var + self.nu_param * cov

    def _matches(self, views: _Views, table_offsets):
        """Token indices (B, groups) of both sides of every VR term and each group's weight
        1 / (2 * pairs * K) (K the matches of its call)."""
        pairs = views.local_pairs()
        if not pairs:
            raise ShapeError("VICRegLLoss needs two views or more with distinct local "
                             "feature maps: a global view and another view whose local "
                             "features are a different tensor (no pair to compare)")
        acc = _acc_of(views.loc)
        feats = [z.detach().to(acc) for z in views.loc]
        xs, ys, weights = [], [], []
        with torch.no_grad():
            for i, j in pairs:
                for points in (feats, views.grids):
                    for p, q, k in ((i, j, self.num_matches[0]), (j, i, self.num_matches[1])):
                        rows, nearest = _match(torch.cdist(points[p], points[q]), k)
                        xs.append(rows + table_offsets[p])
                        ys.append(nearest + table_offsets[q])
                        weights += [0.5 / (len(pairs) * rows.shape[1])] * rows.shape[1]
        return torch.cat(xs, 1), torch.cat(ys, 1), weights

    def _local_term(self, views: _Views, world) -> Tensor:
        offsets = [0]
        for z in views.loc:
            offsets.append(offsets[-1] + z.shape[1])
        rows, nearest, weights = self._matches(views, offsets)
        acc = _acc_of(views.loc)
        table = torch.cat([z.to(acc) for z in views.loc], 1)  # (B, sum n_v, Dl)
        batch = torch.arange(table.shape[0], device=table.device)[None, :]
        x, y = table[batch, rows.T], table[batch, nearest.T]  # (groups, B, Dl)
        vr = self.vicreg_loss
        terms = vr.lambda_param * _group_mse(x, y)
        if self._active()[1]:
            both = _gather_rows(torch.cat([x, y]), world.sizes["views"])
            x, y = both[:x.shape[0]], both[x.shape[0]:]
        if vr.mu_param != 0:
            terms = terms + vr.mu_param * 0.5 * (_group_var(x, vr.eps) + _group_var(y, vr.eps))
        if vr.nu_param != 0:
            terms = terms + vr.nu_param * (_group_cov(x) + _group_cov(y))
        w = torch.tensor(weights, dtype=terms.dtype, device=terms.device)
        return (w * terms).sum()


# ----------------------------------------------------------------------------- PKA

_PKA_EPS = 1e-6  # HSIC floor before the square roots (lightly's)


def _check_dense(student, teacher, mask):
    for name, t in (("student_features", student), ("teacher_features", teacher)):
        _checks.floating(t, name)
        if t.dim() != 3:
            raise ShapeError(f"{name} must have shape (B, N, D) but has shape "
                             f"{tuple(t.shape)}.")
    if student.shape != teacher.shape:
        raise ShapeError(f"student_features and teacher_features must have the same shape "
                         f"but have {tuple(student.shape)} and {tuple(teacher.shape)}.")
    if teacher.device != student.device:
        raise ValueError(f"teacher_features is on {teacher.device} but student_features on "
                         f"{student.device}")
    if mask is not None:
        _checks.tensor(mask, "mask")
        if tuple(mask.shape) != tuple(student.shape[:2]):
            raise ShapeError(f"mask must have shape {tuple(student.shape[:2])} but has shape "
                             f"{tuple(mask.shape)}.")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must have dtype torch.bool but has dtype {mask.dtype}.")


def _centred(z: Tensor, valid: Tensor):
    """(Zc / f, f): z's valid tokens minus their mean (the others 0), on z / f with f a
    power of two above each image's max |z| over valid tokens (shape (B, 1, 1)).
    Zc Zc^T = H K H for K = Z Z^T and H = I - 11^T / n on the n valid tokens."""
    keep = valid[..., None]
    z = torch.where(keep, z, torch.zeros((), dtype=z.dtype, device=z.device))
    f = pow2_bound(z.flatten(1), 1)[..., None]
    y = z / f
    n = valid.sum(1).clamp_min(1).to(z.dtype)[:, None, None]
    mean = y.sum(1, keepdim=True) / n
    return torch.where(keep, y - mean, torch.zeros((), dtype=z.dtype, device=z.device)), f


def _hsics(s: Tensor, t: Tensor, dxd: bool):
    """(HSIC(s, t), HSIC(s, s), HSIC(t, t)) per image from the centred features, with
    <A A^T, B B^T>_F = ||A^T B||_F^2: the D x D products when ``dxd``, else the N x N
    kernels (each formed once). The teacher's own term without gradient."""
    with torch.no_grad():
        kt = t.mT @ t if dxd else t @ t.mT
        h_tt = kt.square().sum((1, 2))
    if dxd:
        return (s.mT @ t).square().sum((1, 2)), (s.mT @ s).square().sum((1, 2)), h_tt
    ks = s @ s.mT
    return (ks * kt).sum((1, 2)), ks.square().sum((1, 2)), h_tt


class PatchKernelAlignmentLoss(nn.Module):
    """Patch kernel alignment (PaKa, 2025); lightly's signature and values.

    ``forward(student_features, teacher_features, mask=None)`` with dense features (B, N, D)
    (the teacher detached) and ``mask`` (B, N), True for tokens to ignore. Per image, on its
    n valid tokens, with K = Z Z^T (the linear kernel) and H = I - 11^T / n:

        HSIC(s, t) = <H K_s H, H K_t H>_F = ||Zc_s^T Zc_t||_F^2      (Zc = H Z, centred)
        CKA = HSIC(s, t) / (sqrt(max(HSIC(s, s), 1e-6)) * sqrt(max(HSIC(t, t), 1e-6)))
        L = mean over the images with n >= 2 of (1 - CKA)      (0, with gradient, if none).

    No N x N kernel is double-centred: the features are centred (exactly H K H) and the
    HSICs come from the D x D cross-products Zc^T Zc when 3D < 2N, else from the centred
    N x N kernels (whichever is cheaper; memory B min(N, D)^2). With ``max_tokens`` and
    N > max_tokens, each image keeps max_tokens tokens drawn as lightly draws them (valid
    ones first; ``torch.rand(B, N)`` on the default generator of the features' device), so
    a seeded call keeps lightly's tokens. Differences from lightly: float64 inputs compute
    in float64 (lightly: float32) and the loss has the student's dtype (lightly's is
    float32); ignored tokens are excluded exactly (a NaN there does not propagate).
    """

    def __init__(self, max_tokens: Optional[int] = None) -> None:
        super().__init__()
        if max_tokens is not None:
            max_tokens = _checks.integer(max_tokens, "max_tokens")
            if max_tokens < 2:
                raise ValueError(f"max_tokens must be >= 2 or None but is {max_tokens}.")
        self.max_tokens = max_tokens

    def _tokens(self, student, teacher, valid):
        """lightly's subsampling: the max_tokens smallest of torch.rand(B, N) scores, with
        ignored tokens scored +inf."""
        B, N, D = student.shape
        if self.max_tokens is None or N <= self.max_tokens:
            return student, teacher, valid
        scores = torch.rand(B, N, device=student.device).masked_fill(~valid, math.inf)
        index = scores.topk(self.max_tokens, dim=1, largest=False).indices
        wide = index[..., None].expand(-1, -1, D)
        return student.gather(1, wide), teacher.gather(1, wide), valid.gather(1, index)

    def forward(self, student_features: Tensor, teacher_features: Tensor,
                mask: Optional[Tensor] = None) -> Tensor:
        _check_dense(student_features, teacher_features, mask)
        B, N, D = student_features.shape
        valid = torch.ones(B, N, dtype=torch.bool, device=student_features.device) \
            if mask is None else ~mask.to(student_features.device)
        student, teacher, valid = self._tokens(student_features, teacher_features.detach(),
                                               valid)
        acc = _acc_of([student, teacher])
        M = student.shape[1]
        dxd = 3 * D < 2 * M
        s, fs = _centred(student.to(acc), valid)
        t, ft = _centred(teacher.to(acc), valid)
        h_st, h_ss, h_tt = _hsics(s, t, dxd)
        # HSIC(x, y) = fx^2 fy^2 * (the HSIC of the scaled features): the floor scales too.
        # The per-image ratio in float64 (B numbers): 1 - CKA cancels when CKA is near 1.
        wide = torch.float64
        h_st, h_ss, h_tt = h_st.to(wide), h_ss.to(wide), h_tt.to(wide)
        fs2, ft2 = fs.reshape(B).to(wide).square(), ft.reshape(B).to(wide).square()
        denom = torch.sqrt(torch.clamp(h_ss, min=_PKA_EPS / fs2 / fs2)) * \
            torch.sqrt(torch.clamp(h_tt, min=_PKA_EPS / ft2 / ft2))
        per_image = 1.0 - h_st / denom
        counted = valid.sum(1) >= 2
        zero = torch.zeros((), dtype=wide, device=per_image.device)
        loss = torch.where(counted, per_image, zero).sum() / counted.sum().clamp_min(1)
        return loss.to(student_features.dtype)


# ----------------------------------------------------------------------------- ROI resampling

def _roi_axis(lo: Tensor, hi: Tensor, out: int, size: int):
    """For one axis of every box: the bilinear weights (B, out, size) summed over the bin's
    samples, and the samples per bin. torchvision's roi_align with aligned=True and
    adaptive sampling: bin width (hi - lo) / out, ceil((hi - lo) / out) samples per bin at
    the sub-bin centres; a sample below -1 or above ``size`` weighs 0, one below 0 is
    clamped to 0, one at or past the last cell is clamped to it."""
    start, end = lo - 0.5, hi - 0.5
    extent = end - start
    bin_size = extent / out
    grid = torch.ceil(extent / out).clamp_min(0).to(torch.int64)  # (B,)
    top = max(int(grid.max()), 1) if grid.numel() and _checks.has_values(grid) else 1
    i = torch.arange(top, device=lo.device)
    p = torch.arange(out, device=lo.device, dtype=lo.dtype)
    step = bin_size / grid.clamp_min(1).to(lo.dtype)
    pos = start[:, None, None] + p[None, :, None] * bin_size[:, None, None] + \
        (i.to(lo.dtype) + 0.5)[None, None, :] * step[:, None, None]  # (B, out, top)
    used = (i[None, None, :] < grid[:, None, None]) & (pos >= -1) & (pos <= size)
    pos = pos.clamp_min(0)
    low = pos.floor().to(torch.int64)
    last = low >= size - 1
    low = torch.where(last, size - 1, low)
    high = torch.where(last, size - 1, low + 1)
    frac = torch.where(last, torch.zeros_like(pos), pos - low.to(pos.dtype))
    cells = torch.arange(size, device=lo.device)
    w = (1 - frac)[..., None] * (cells == low[..., None]) + \
        frac[..., None] * (cells == high[..., None])
    return (w * used[..., None]).sum(2), grid


def roi_resample_to_grid(feature_map: Tensor, boxes: Tensor, out_h: int, out_w: int) -> Tensor:
    """lightly's ``roi_resample_to_grid``: each sample's box of its feature map resampled onto
    an out_h x out_w grid, as ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1,
    spatial_scale=1)`` (bilinear samples at ceil(box / grid) points per bin and axis,
    averaged), returned as (B, out_h * out_w, C) in row-major order.

    feature_map (B, C, H, W), boxes (B, 4) as (x0, y0, x1, y1) in feature-grid coordinates.
    Bilinear sampling is separable, so the output is Wy F Wx^T with per-box weight matrices
    Wy (out_h, H) and Wx (out_w, W): no (B, C, out_h, out_w, samples) tensor. The gradient
    flows to feature_map only (boxes are constants, as in roi_align). Reads the largest
    sample count per bin back to the host (one synchronisation)."""
    _checks.floating(feature_map, "feature_map")
    _checks.tensor(boxes, "boxes")
    if feature_map.dim() != 4:
        raise ShapeError(f"feature_map must have shape (B, C, H, W) but has shape "
                         f"{tuple(feature_map.shape)}.")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ShapeError(f"boxes must have shape (B, 4) but has shape {tuple(boxes.shape)}.")
    if boxes.shape[0] != feature_map.shape[0]:
        raise ShapeError(f"boxes batch size {boxes.shape[0]} does not match feature_map "
                         f"batch size {feature_map.shape[0]}.")
    out_h, out_w = _checks.integer(out_h, "out_h", lo=1), _checks.integer(out_w, "out_w", lo=1)
    B, C, H, W = feature_map.shape
    acc = acc_dtype(feature_map)
    b = boxes.detach().to(device=feature_map.device, dtype=feature_map.dtype).to(acc)
    wy, gy = _roi_axis(b[:, 1], b[:, 3], out_h, H)
    wx, gx = _roi_axis(b[:, 0], b[:, 2], out_w, W)
    count = (gy * gx).clamp_min(1).to(acc)[:, None, None, None]
    out = torch.einsum("bph,bchw,bqw->bpqc", wy, feature_map.to(acc), wx) / count
    return out.reshape(B, out_h * out_w, C).to(feature_map.dtype)
