"""fastssl.clustering.kmeans against faiss-cpu's Kmeans (1.15): the same Lloyd iterations
from the same initial centroids in float32 (no sub-sampling on either side), and faiss's
rule for an emptied cluster (a split of a large one) on a case that empties one."""
import numpy as np
import pytest
import torch

from ._peers import need, rel

faiss = need("faiss")

from fastssl import clustering as CL  # noqa: E402


def blobs(n, k, D, seed, spread=0.5, with_init=False):
    """n rows around k centres; with ``with_init`` also one row of each blob (an init under
    which no cluster empties, so that the two fits take the same steps)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, D, generator=g) * 3
    which = torch.randint(k, (n,), generator=g)
    x = centres[which] + spread * torch.randn(n, D, generator=g)
    if not with_init:
        return x
    first = torch.stack([(which == j).nonzero()[0, 0] for j in range(k)])
    return x, x[first].clone()


def faiss_fit(x, init, iterations, spherical=False):
    km = faiss.Kmeans(x.shape[1], init.shape[0], niter=iterations, spherical=spherical,
                      max_points_per_centroid=10 ** 9, seed=1, verbose=False)
    km.train(x.numpy(), init_centroids=init.numpy())
    _, labels = km.index.search(x.numpy(), 1)
    return torch.from_numpy(km.centroids), torch.from_numpy(labels[:, 0].astype(np.int64))


@pytest.mark.parametrize("n,k,D,iterations", [(500, 8, 16, 1), (2000, 32, 64, 10),
                                              (777, 5, 3, 25)])
def test_lloyd_iterations_are_faiss(backend, n, k, D, iterations):
    x, init = blobs(n, k, D, seed=n, with_init=True)
    want_c, want_l = faiss_fit(x, init, iterations)
    r = CL.kmeans(x, k, iterations, init=init)
    assert (r.labels == want_l).float().mean() >= 0.999
    assert rel(r.centroids, want_c) <= 1e-5


def test_spherical_iterations_are_faiss(backend):
    x, init = blobs(600, 6, 8, seed=4, with_init=True)
    x, init = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(init, dim=1)
    want_c, want_l = faiss_fit(x, init, 5, spherical=True)
    r = CL.kmeans(x, 6, 5, init=init, spherical=True)
    assert (r.labels == want_l).float().mean() >= 0.999
    assert rel(r.centroids, want_c) <= 1e-5


def test_an_emptied_cluster_is_refilled_as_faiss_does(backend):
    """One initial centroid far from every row: faiss and fastssl both split a large
    cluster into it (which one is drawn; each run draws its own), so after the fit every
    cluster holds rows and the inertia is as low as faiss's within a few percent."""
    x = blobs(400, 4, 5, seed=9)
    init = torch.cat([x[:3], torch.full((1, 5), 1e3)])
    want_c, want_l = faiss_fit(x, init, 10)
    r = CL.kmeans(x, 4, 10, init=init, generator=torch.Generator().manual_seed(0))
    assert (r.counts > 0).all() and (torch.bincount(want_l, minlength=4) > 0).all()
    faiss_inertia = float((x - want_c[want_l]).pow(2).sum())
    assert float(r.inertia) <= 1.05 * faiss_inertia
