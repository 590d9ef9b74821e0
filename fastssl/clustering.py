"""k-means on the device without the (N x K) distance matrix, for DeepCluster-style
pseudo-labels.

Lloyd's iterations: each one assigns every row to its nearest centroid (one tiled pass,
``kernels/kmeans.py``'s ``assign``: the distances live in registers, a running minimum and
its index per row) and moves each centroid to the mean of its rows (a sum per cluster over
the rows sorted by label, ``segment_sum``: no float atomics, bitwise reproducible). Memory
O((N + K) x D). CUDA tensors take the Triton kernels, CPU tensors (and float64) the chunked
PyTorch twin (``fastssl._dispatch``).

- ``kmeans(x, k, ...)``: the fit -> ``KMeansResult(centroids, labels, distances, inertia,
  counts)``; Euclidean or spherical (unit rows, centroids renormalised, cosine
  assignment), random or k-means++ initialisation from ``generator``, or given centroids;
  empty clusters refilled by splitting a large one (faiss's rule) or kept; sub-sampling to
  ``max_points_per_centroid`` rows per centroid for the iterations (then every row is
  assigned); under torch.distributed (``gather_distributed``) every rank holds its own
  rows, the initial centroids come from rank 0 and the sums and counts are all-reduced.
- ``assign(x, centroids)``: the nearest centroid of every row and its squared distance.
- ``KMeans``: the same as an estimator (``fit``, ``predict``, ``cluster_centers_``,
  ``labels_``, ``inertia_``) with scikit-learn's attribute names.
- ``pca_whiten(x, dim)``: DeepCluster's feature preparation: PCA to ``dim`` components
  whitened by eigenvalue^power (faiss's ``eigen_power=-0.5``), then rows L2-normalised.

From the same initial centroids the iterations are scikit-learn's Lloyd iterations
(``KMeans(init=centroids, n_init=1, algorithm="lloyd")``): the same assignments and
centroids at every step in float64 (tests/test_clustering.py). Where a cluster empties,
scikit-learn moves it to the farthest points instead; faiss splits as here.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from fastssl import _checks, _dispatch

__all__ = ["kmeans", "assign", "KMeans", "KMeansResult", "pca_whiten"]

SPLIT_EPS = 1.0 / 1024  # faiss's relative perturbation of a split centroid


class KMeansResult(NamedTuple):
    centroids: Tensor   # (K, D), the input's dtype
    labels: Tensor      # (N,) int64: every row's nearest final centroid
    distances: Tensor   # (N,): squared Euclidean distance (spherical: 1 - cosine)
    inertia: Tensor     # (): the sum of distances
    counts: Tensor      # (K,) int64: rows per final centroid


def _impl(x):
    return _dispatch.implementation("kmeans", x)[1]


def _rows(x, name="x"):
    _checks.floating(x, name)
    if x.dim() != 2:
        raise _checks.ShapeError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def assign(x, centroids, spherical=False):
    """(labels (N,) int64, distances (N,)): each row's nearest centroid (the lowest index
    among equals) and its squared Euclidean distance, or with ``spherical`` the largest
    cosine's centroid and 1 - x . c (unit rows and centroids assumed)."""
    _rows(x), _rows(centroids, "centroids")
    if centroids.shape[1] != x.shape[1] or centroids.shape[0] == 0:
        raise _checks.ShapeError(f"centroids {tuple(centroids.shape)} must be (K >= 1, "
                                 f"D = {x.shape[1]})")
    if centroids.device != x.device:
        raise ValueError(f"centroids are on {centroids.device}, x on {x.device}")
    labels, dist = _impl(x).assign(x.contiguous(), centroids, bool(spherical))
    return labels, dist.to(_acc(x))


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _init(x, k, init, spherical, generator):
    """(K, D) initial centroids in the arithmetic dtype."""
    acc = _acc(x)
    if isinstance(init, Tensor):
        if init.shape != (k, x.shape[1]):
            raise _checks.ShapeError(f"init must have shape ({k}, {x.shape[1]}), got "
                                     f"{tuple(init.shape)}")
        return init.detach().to(device=x.device, dtype=acc).clone()
    init = _checks.choice(init, "init", ("random", "k-means++"))
    n = x.shape[0]
    if init == "random":  # k distinct rows, as faiss draws them
        pick = torch.randperm(n, generator=generator, device=generator.device
                              if generator is not None else "cpu")[:k].to(x.device)
        return x[pick].to(acc).clone()
    # k-means++: each next centroid drawn with probability proportional to the squared
    # distance to the nearest one chosen so far (one assign pass per centroid)
    g_dev = generator.device if generator is not None else torch.device("cpu")
    first = int(torch.randint(n, (1,), generator=generator, device=g_dev))
    chosen = [first]
    best = assign(x, x[first:first + 1], spherical)[1].to(acc)
    for _ in range(1, k):
        w = best.clamp(min=0)
        if float(w.sum()) == 0:  # every row sits on a chosen centroid: draw uniformly
            w = torch.ones_like(w)
        nxt = int(torch.multinomial(w.to(g_dev, torch.float64), 1, generator=generator))
        chosen.append(nxt)
        best = torch.minimum(best, assign(x, x[nxt:nxt + 1], spherical)[1].to(acc))
    return x[torch.tensor(chosen, device=x.device)].to(acc).clone()


def _split_empty(c, counts, generator):
    """faiss's refill, in place: each empty cluster takes a copy of a cluster drawn with
    probability proportional to (count - 1), the two moved apart by +-SPLIT_EPS in
    alternating dimensions, the count shared. Returns the number of splits."""
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    g_dev = generator.device if generator is not None else torch.device("cpu")
    counts_h = counts.to("cpu", torch.float64)
    sign = torch.ones(c.shape[1], dtype=c.dtype, device=c.device)
    sign[1::2] = -1
    for k in empty:
        w = (counts_h - 1).clamp(min=0)
        if float(w.sum()) == 0:
            break  # no cluster holds two rows: nothing to split
        j = int(torch.multinomial(w.to(g_dev), 1, generator=generator))
        c[k] = c[j] * (1 + SPLIT_EPS * sign)
        c[j] = c[j] * (1 - SPLIT_EPS * sign)
        half = torch.floor(counts_h[j] / 2)
        counts_h[k], counts_h[j] = half, counts_h[j] - half
    return len(empty)


def _distributed(gather):
    from fastssl import distributed
    return _checks.flag(gather, "gather_distributed") and distributed.is_distributed()


def _update(x, labels, k):
    """(sums, counts) of the rows per cluster."""
    sums = _impl(x).segment_sum(x.contiguous(), labels, k).to(_acc(x))
    counts = torch.bincount(labels, minlength=k)
    return sums, counts


def _means(sums, counts, old, spherical):
    """The new centroids: sums / counts (an empty cluster keeps its old centroid here;
    ``_split_empty`` may refill it), unit rows with ``spherical``."""
    n = counts.to(sums.dtype)[:, None]
    c = torch.where(n > 0, sums / n.clamp(min=1), old)
    if spherical:
        c = torch.nn.functional.normalize(c, dim=1, eps=1e-12)
    return c


def _check(x, k, iterations, empty, max_points_per_centroid, generator):
    _rows(x)
    k = _checks.integer(k, "k", lo=1)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k = {k} rows, got {x.shape[0]}")
    if x.shape[1] == 0:
        raise _checks.ShapeError("x must have D >= 1 columns")
    iterations = _checks.integer(iterations, "iterations", lo=0)
    empty = _checks.choice(empty, "empty", ("split", "keep"))
    if max_points_per_centroid is not None:
        max_points_per_centroid = _checks.integer(max_points_per_centroid,
                                                  "max_points_per_centroid", lo=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    return k, iterations, empty, max_points_per_centroid


@torch.no_grad()
def kmeans(x, k, iterations=20, init="random", spherical=False, empty="split",
           max_points_per_centroid=None, generator=None, gather_distributed=False):
    """Lloyd's k-means of the rows of ``x`` (N, D) into ``k`` clusters (module docstring).

    ``init``: "random" (k distinct rows, faiss's), "k-means++", or a (k, D) tensor.
    ``spherical``: cosine assignments and unit centroids (rows should be unit too: DINO /
    DeepCluster-v2 features). ``empty``: "split" (faiss: an emptied cluster takes half of a
    large one, chosen with probability proportional to its count - 1) or "keep" (its old
    centroid stays, DeepCluster-v2's rule). ``max_points_per_centroid``: iterate on a
    random subset of k * that many rows when there are more (faiss's default is 256; None:
    every row), then assign every row. All randomness comes from ``generator``.

    Returns ``KMeansResult``: centroids in x's dtype, every row's label and distance for
    the final centroids, the inertia and the counts."""
    k, iterations, empty, mppc = _check(x, k, iterations, empty, max_points_per_centroid,
                                        generator)
    spherical = _checks.flag(spherical, "spherical")
    if x.device.type == "meta":  # the shapes are known; the values are drawn and iterated
        n, D = x.shape
        return KMeansResult(x.new_empty(k, D), x.new_empty(n, dtype=torch.int64),
                            x.new_empty(n, dtype=_acc(x)), x.new_empty((), dtype=_acc(x)),
                            x.new_empty(k, dtype=torch.int64))
    active = _distributed(gather_distributed)
    fit = x
    if mppc is not None and x.shape[0] > k * mppc:
        g_dev = generator.device if generator is not None else torch.device("cpu")
        pick = torch.randperm(x.shape[0], generator=generator, device=g_dev)[:k * mppc]
        fit = x[pick.to(x.device)]
    c = _init(fit, k, init, spherical, generator)
    if spherical:
        c = torch.nn.functional.normalize(c, dim=1, eps=1e-12)
    if active:
        torch.distributed.broadcast(c, 0)
    for _ in range(iterations):
        labels, _ = assign(fit, c, spherical)
        sums, counts = _update(fit, labels, k)
        if active:
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        c = _means(sums, counts, c, spherical)
        if empty == "split" and bool((counts == 0).any()):
            _split_empty(c, counts, generator)
            if spherical:
                c = torch.nn.functional.normalize(c, dim=1, eps=1e-12)
            if active:
                torch.distributed.broadcast(c, 0)
    labels, dist = assign(x, c, spherical)
    counts = torch.bincount(labels, minlength=k)
    inertia = dist.sum()
    if active:
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(inertia)
    return KMeansResult(c.to(x.dtype), labels, dist, inertia, counts)


class KMeans:
    """k-means as an estimator, with scikit-learn's attribute names: ``KMeans(n_clusters=8,
    max_iter=20, init="random", spherical=False, empty="split",
    max_points_per_centroid=None, seed=None)``; ``fit(x)`` sets ``cluster_centers_`` (K, D),
    ``labels_`` (N,), ``inertia_`` (a float) and ``counts_``; ``predict(x)`` assigns new
    rows; ``fit_predict(x)`` returns ``labels_``. ``seed`` seeds a generator on x's
    device (None: the default generator)."""

    def __init__(self, n_clusters=8, max_iter=20, init="random", spherical=False,
                 empty="split", max_points_per_centroid=None, seed=None):
        self.n_clusters = _checks.integer(n_clusters, "n_clusters", lo=1)
        self.max_iter = _checks.integer(max_iter, "max_iter", lo=0)
        self.init, self.spherical, self.empty = init, spherical, empty
        self.max_points_per_centroid = max_points_per_centroid
        self.seed = None if seed is None else _checks.integer(seed, "seed")

    def fit(self, x):
        g = None
        if self.seed is not None:
            g = torch.Generator(device=x.device).manual_seed(self.seed)
        r = kmeans(x, self.n_clusters, self.max_iter, self.init, self.spherical, self.empty,
                   self.max_points_per_centroid, g)
        self.cluster_centers_, self.labels_, self.counts_ = r.centroids, r.labels, r.counts
        self.inertia_ = float(r.inertia)
        return self

    def predict(self, x):
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("KMeans.predict before fit")
        return assign(x, self.cluster_centers_.to(x.dtype), self.spherical)[0]

    def fit_predict(self, x):
        return self.fit(x).labels_


@torch.no_grad()
def pca_whiten(x, dim=256, power=-0.5, eps=1e-5, normalize=True):
    """DeepCluster's features: centred rows projected on the top ``dim`` principal
    components (of the covariance, in float64), each scaled by (eigenvalue + eps)^power
    (faiss's PCAMatrix eigen_power; -0.5 whitens), then L2-normalised (``normalize``).
    Returns (y (N, dim) in x's dtype, (mean (D,), projection (D, dim))) so that
    y = normalize((x - mean) @ projection)."""
    _rows(x)
    dim = _checks.integer(dim, "dim", lo=1)
    if dim > x.shape[1]:
        raise ValueError(f"dim = {dim} exceeds the feature width {x.shape[1]}")
    if x.shape[0] < 2:
        raise ValueError("PCA needs at least two rows")
    power = _checks.number(power, "power")
    eps = _checks.number(eps, "eps", lo=0.0)
    xd = x.to(torch.float64)
    mean = xd.mean(0)
    xc = xd - mean
    cov = xc.T @ xc / (x.shape[0] - 1)
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0)[:dim], vecs.flip(1)[:, :dim]
    proj = vecs * (vals.clamp(min=0) + eps).pow(power)[None, :]
    y = xc @ proj
    if normalize:
        y = torch.nn.functional.normalize(y, dim=1, eps=1e-12)
    return y.to(x.dtype), (mean.to(x.dtype), proj.to(x.dtype))
