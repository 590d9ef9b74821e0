"""k-means (fastssl.clustering) against dense float64 formulas and scikit-learn's Lloyd
iterations from the same initial centroids; both paths (the Triton kernels under the
interpreter on CPU), odd shapes, ties, empty clusters, bad arguments."""
import pytest
import torch
import torch.nn.functional as tF

from fastssl import ShapeError, _reference
from fastssl import clustering as CL


def blobs(n, k, D, seed, spread=0.3):
    """n rows around k random centres (float64)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, D, generator=g, dtype=torch.float64) * 3
    which = torch.randint(k, (n,), generator=g)
    return centres[which] + spread * torch.randn(n, D, generator=g, dtype=torch.float64)


def dense_assign(x, c, spherical):
    x, c = x.double(), c.double()
    if spherical:
        s = x @ c.T
        return s.argmax(1), 1 - s.amax(1)
    d = torch.cdist(x, c).pow(2)
    return d.argmin(1), d.amin(1)


@pytest.mark.parametrize("n,K,D", [(1, 1, 1), (65, 3, 5), (130, 70, 33), (7, 130, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spherical", [False, True])
def test_assign_matches_the_dense_distances(backend, device, n, K, D, dtype, spherical,
                                            monkeypatch):
    monkeypatch.setattr(_reference, "BLOCK", 64)
    g = torch.Generator().manual_seed(n + K + D)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    c = torch.randn(K, D, generator=g, dtype=torch.float64)
    if spherical:
        x, c = tF.normalize(x, dim=1), tF.normalize(c, dim=1)
    x, c = x.to(device, dtype), c.to(device, dtype)
    labels, dist = CL.assign(x, c, spherical)
    assert labels.dtype == torch.int64 and labels.shape == (n,) and dist.shape == (n,)
    want_l, want_d = dense_assign(x, c, spherical)  # on the operands rounded to dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    scale = 1.0 + x.double().pow(2).sum(1) + c.double().pow(2).sum(1).amax()
    # the chosen centroid is a nearest one (the same index unless two lie within rounding
    # of each other), and the distance returned is the nearest distance
    all_d = (1 - x.double() @ c.double().T) if spherical else torch.cdist(
        x.double(), c.double()).pow(2)
    picked = all_d.gather(1, labels[:, None]).squeeze(1)
    assert ((picked - want_d).abs() <= tol * scale).all()
    if dtype == torch.float64:
        assert torch.equal(labels, want_l)
    assert ((dist.double() - want_d).abs() <= 10 * tol * scale).all()


def test_ties_go_to_the_lowest_index(backend, device):
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], device=device)
    c = torch.tensor([[3.0, 3.0]] * 70 + [[1.0, 0.0], [0.0, 1.0]] * 40, device=device)
    labels, _ = CL.assign(x, c)
    assert labels.tolist() == [70, 71, 70]  # the first of the equal centroids, past a tile


@pytest.mark.parametrize("n,K,D", [(1, 1, 1), (200, 7, 3), (131, 130, 65)])
def test_segment_sums_equal_the_float64_sums(backend, device, n, K, D):
    from fastssl import _dispatch
    g = torch.Generator().manual_seed(n * K)
    x = torch.randn(n, D, generator=g).to(device)
    labels = torch.randint(K, (n,), generator=g).to(device)
    impl = _dispatch.implementation("kmeans", x)[1]
    got = impl.segment_sum(x, labels, K)
    want = torch.zeros(K, D, dtype=torch.float64, device=device).index_add_(0, labels, x.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(impl.segment_sum(x, labels, K), got)  # the same order every call


@pytest.mark.parametrize("iterations", [1, 2, 5])
@pytest.mark.parametrize("n,k,D", [(300, 5, 4), (257, 17, 9)])
def test_lloyd_iterations_are_scikit_learns(backend, device, iterations, n, k, D):
    """From the same initial centroids, in float64: the same labels and centroids."""
    from sklearn.cluster import KMeans as SK
    x = blobs(n, k, D, seed=n + k)
    init = x[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]].clone()
    ref = SK(n_clusters=k, init=init.numpy(), n_init=1, max_iter=iterations, tol=0.0,
             algorithm="lloyd").fit(x.numpy())
    r = CL.kmeans(x.to(device), k, iterations, init=init, empty="keep")
    assert r.labels.cpu().tolist() == ref.labels_.tolist()
    torch.testing.assert_close(r.centroids.cpu(), torch.from_numpy(ref.cluster_centers_),
                               rtol=1e-10, atol=1e-10)
    assert abs(float(r.inertia) - ref.inertia_) <= 1e-9 * ref.inertia_
    assert r.counts.sum() == n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_fits_reach_the_float64_fit(backend, device, dtype):
    x = blobs(400, 6, 8, seed=3)
    init = x[:6].clone()
    ref = CL.kmeans(x, 6, 10, init=init)
    r = CL.kmeans(x.to(device, dtype), 6, 10, init=init)
    assert r.centroids.dtype == dtype
    agree = (r.labels.cpu() == ref.labels).float().mean()
    assert agree >= 0.99
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(r.centroids.cpu().double(), ref.centroids, rtol=tol, atol=tol)


def test_spherical_kmeans_keeps_unit_centroids_and_cosine_labels(backend, device):
    x = tF.normalize(blobs(200, 4, 6, seed=5), dim=1).to(device)
    init = x[:4].clone()
    r = CL.kmeans(x, 4, 3, init=init, spherical=True, empty="keep")
    c = init.double().cpu()
    xc = x.double().cpu()
    for _ in range(3):  # the loop as written
        lab = (xc @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, lab, xc)
        c = torch.where(torch.bincount(lab, minlength=4)[:, None] > 0, tF.normalize(sums, dim=1), c)
    torch.testing.assert_close(r.centroids.cpu().double(), c, rtol=1e-5, atol=1e-5)
    assert torch.allclose(r.centroids.double().norm(dim=1).cpu(), torch.ones(4, dtype=torch.float64))
    assert torch.equal(r.labels.cpu(), (xc @ r.centroids.double().cpu().T).argmax(1))


def test_an_emptied_cluster_is_split_from_a_large_one(backend, device):
    x = blobs(120, 3, 4, seed=7).to(device)
    init = torch.cat([x[:2], torch.full((1, 4), 1e3, dtype=x.dtype, device=device)])
    g = torch.Generator().manual_seed(0)
    r = CL.kmeans(x, 3, 1, init=init, generator=g)
    # after the one iteration cluster 2 (far away) was empty: it took a copy of cluster 0 or
    # 1, the pair moved apart by 1/1024 in alternating directions
    means = [x[CL.assign(x, init)[0] == j].mean(0) for j in range(2)]
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=x.dtype, device=device)
    j = 0 if torch.allclose(r.centroids[2], means[0] * (1 + sign / 1024)) else 1
    torch.testing.assert_close(r.centroids[2], means[j] * (1 + sign / 1024))
    torch.testing.assert_close(r.centroids[j], means[j] * (1 - sign / 1024))
    kept = CL.kmeans(x, 3, 1, init=init, empty="keep")
    torch.testing.assert_close(kept.centroids[2], init[2])


def test_random_and_kmeanspp_inits_are_rows_and_reproducible(backend):
    x = blobs(90, 5, 3, seed=9)
    for init in ("random", "k-means++"):
        a = CL.kmeans(x, 5, 0, init=init, generator=torch.Generator().manual_seed(4))
        b = CL.kmeans(x, 5, 0, init=init, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a.centroids, b.centroids)
        rows = [int((x == c).all(1).nonzero()[0]) for c in a.centroids]
        assert len(set(rows)) == 5  # distinct rows of x
    # k-means++ on well-separated blobs takes one centroid per blob (a row far from the
    # chosen ones carries all the weight)
    x = blobs(200, 4, 2, seed=1, spread=1e-3)
    pp = CL.kmeans(x, 4, 0, init="k-means++", generator=torch.Generator().manual_seed(2))
    labels = CL.assign(x, pp.centroids)[0]
    assert set(labels.tolist()) == {0, 1, 2, 3}
    for j in range(4):  # each centroid's rows are one blob (blob diameter ~1e-2, gaps ~3)
        rows = x[labels == j]
        assert torch.cdist(rows, rows).amax() < 0.1


def test_sub_sampling_fits_on_a_subset_and_labels_every_row(backend):
    x = blobs(1000, 4, 3, seed=11)
    g = torch.Generator().manual_seed(3)
    r = CL.kmeans(x, 4, 5, max_points_per_centroid=20, generator=g)
    assert r.labels.shape == (1000,) and int(r.counts.sum()) == 1000
    g = torch.Generator().manual_seed(3)
    assert torch.equal(CL.kmeans(x, 4, 5, max_points_per_centroid=20, generator=g).centroids,
                       r.centroids)
    torch.testing.assert_close(r.labels, CL.assign(x, r.centroids)[0])


def test_estimator_has_scikit_learns_attributes(backend):
    x = blobs(150, 3, 2, seed=13)
    km = CL.KMeans(n_clusters=3, max_iter=10, seed=0).fit(x)
    assert km.cluster_centers_.shape == (3, 2) and km.labels_.shape == (150,)
    assert isinstance(km.inertia_, float)
    assert torch.equal(km.predict(x), km.labels_)
    assert torch.equal(CL.KMeans(n_clusters=3, max_iter=10, seed=0).fit_predict(x), km.labels_)
    with pytest.raises(RuntimeError, match="before fit"):
        CL.KMeans(3).predict(x)


def test_pca_whitening_is_scikit_learns_up_to_sign():
    from sklearn.decomposition import PCA
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g,
                                                                          dtype=torch.float64)
    y, (mean, proj) = CL.pca_whiten(x, 5, eps=0.0, normalize=False)
    ref = torch.from_numpy(PCA(5, whiten=True).fit_transform(x.numpy()))
    torch.testing.assert_close(y.abs(), ref.abs(), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(y.T @ y / 299, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-8)
    yn, _ = CL.pca_whiten(x, 5)
    torch.testing.assert_close(yn, tF.normalize((x - mean) @ proj, dim=1))


@pytest.mark.parametrize("call,error,match", [
    (lambda x: CL.kmeans(x, 11), ValueError, "at least k"),
    (lambda x: CL.kmeans(x, 0), ValueError, "k"),
    (lambda x: CL.kmeans(x, 3, init=torch.zeros(2, 4)), ShapeError, "init must have shape"),
    (lambda x: CL.kmeans(x, 3, init="best"), ValueError, "init"),
    (lambda x: CL.kmeans(x, 3, empty="drop"), ValueError, "empty"),
    (lambda x: CL.kmeans(x, 3, generator=3), TypeError, "generator"),
    (lambda x: CL.kmeans(x[0], 3), ShapeError, "2-D"),
    (lambda x: CL.kmeans(x.long(), 3), ValueError, "floating"),
    (lambda x: CL.assign(x, torch.zeros(3, 5)), ShapeError, "centroids"),
    (lambda x: CL.pca_whiten(x, 9), ValueError, "exceeds"),
])
def test_bad_arguments_are_clear_errors(call, error, match):
    x = torch.randn(10, 4)
    with pytest.raises(error, match=match):
        call(x)
