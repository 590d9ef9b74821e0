"""DeepCluster and DeepCluster-v2 as trainer methods: the epoch's clustering against the
k-means fixed point and the uniform sampler's counts, written out here; the losses against
float64 cross-entropies computed by hand; the classifier reset; the memory bank."""
import pytest
import torch
import torch.nn.functional as tF

from fastssl.clustering import pca_whiten
from fastssl.pretrain.methods import build
from fastssl.pretrain.methods.clustering import DeepCluster, DeepClusterV2, \
    uniform_over_clusters
from fastssl.pretrain.models import encoder as build_encoder

N, SIZE = 90, 12


class Run:
    """The loop's ``EpochStart`` for one process: features of fixed images."""

    def __init__(self, images, seed=0, steps=3):
        self.images, self.seed, self.steps, self.world = images, seed, steps, 1
        self.train_idx = torch.arange(3, 3 + 2 * len(images), 2)  # dataset indices, sorted
        self.device, self.dtype, self.reset = torch.device("cpu"), torch.float64, []
        self.lines = []

    def features(self, fn):
        with torch.no_grad():
            return fn(self.images).to(self.dtype)

    def reset_optimizer(self, params):
        self.reset.extend(params)

    def say(self, line):
        self.lines.append(line)


def _images(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64)


def _model(cls, **kw):
    torch.manual_seed(0)
    enc = build_encoder("small", 8, SIZE)
    return cls(enc, N, **kw).double()


@pytest.mark.parametrize("count", [40, 41, 90])
def test_uniform_sampler_draws_every_cluster_equally(count):
    labels = torch.tensor([0] * 50 + [3] * 7 + [5] * 1 + [9] * 32)
    pos = uniform_over_clusters(labels, count, torch.Generator().manual_seed(1))
    assert len(pos) == count
    per = -(-count // 4)
    got = torch.bincount(labels[pos], minlength=10)
    assert set(got.nonzero()[:, 0].tolist()) <= {0, 3, 5, 9}
    each = got[[0, 3, 5, 9]]
    assert each.max() <= per and each.sum() == count and each.min() >= count - 3 * per
    # a cluster at least as large as its share is drawn without replacement
    big = pos[labels[pos] == 0]
    assert len(torch.unique(big)) == len(big)


def test_deepcluster_epoch_is_a_kmeans_fixed_point_of_the_whitened_features():
    m = _model(DeepCluster, clusters=6, pca_dim=5, iterations=60)
    run = Run(_images())
    order = m.before_epoch(0, run)
    with torch.no_grad():
        m.eval()
        x, _ = pca_whiten(m.head(m.encoder(run.images)), 5)
    labels = m.assigned[0]
    # every image's cluster is the nearest of the clusters' means (Lloyd's fixed point)
    means = torch.stack([x[labels == c].mean(0) for c in torch.unique(labels)])
    d = torch.cdist(x, means)
    assert torch.equal(torch.unique(labels)[d.argmin(1)], labels)
    # the order: dataset indices of the training images, as many as there are
    assert len(order) == N and bool(torch.isin(order, run.train_idx).all())
    clusters = torch.unique(labels)
    per = -(-N // len(clusters))
    drawn = torch.bincount(labels[torch.searchsorted(run.train_idx, order)])
    assert drawn.max() <= per
    assert run.reset == list(m.classifier.parameters()) and "non-empty" in run.lines[0]


def test_deepcluster_new_classifier_each_clustering_and_the_loss():
    m = _model(DeepCluster, clusters=5, pca_dim=4, min_steps=1)
    run = Run(_images())
    m.before_epoch(0, run)
    w0 = m.classifier.weight.detach().clone()
    m.before_epoch(1, run)
    assert not torch.equal(w0, m.classifier.weight) and len(run.reset) == 4
    m.train()
    idx = run.train_idx[torch.tensor([4, 0, 17, 8, 33, 60, 61, 2])]
    labels = m.sample(None, 2, 7, 8, "cpu", indices=idx)
    view = _images(5, 5)
    loss = m([view], labels)
    pos = torch.searchsorted(run.train_idx, idx[2:7])
    logits = m.classifier(m.head(m.encoder(view)))
    ref = -torch.log_softmax(logits, 1)[torch.arange(5), m.assigned[0, pos]].mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_deepcluster_reclusters_every_min_steps():
    m = _model(DeepCluster, clusters=5, pca_dim=4, min_steps=7)  # 3 steps per epoch: every 3rd
    run = Run(_images())
    for epoch in range(4):
        m.before_epoch(epoch, run)
    assert len(run.lines) == 2 and run.lines[1].startswith("deepcluster: epoch 4 ")


def test_deepclusterv2_prototypes_are_the_banks_spherical_centroids():
    m = _model(DeepClusterV2, prototypes=(4, 7), dim=6, iterations=30)
    run = Run(_images())
    m.before_epoch(0, run)
    assert bool(m.filled) and torch.equal(m.bank[0], m.bank[1])
    for h, W in enumerate(m.prototypes):
        z, labels = m.bank[h % 2], m.assigned[h]
        assert not W.requires_grad
        torch.testing.assert_close(W.norm(dim=1), torch.ones(len(W), dtype=W.dtype))
        # every embedding's cluster has its most similar prototype; each non-empty
        # prototype is the normalised mean of its members
        assert torch.equal((z @ W.T).argmax(1), labels)
        for c in torch.unique(labels):
            torch.testing.assert_close(W[c], tF.normalize(z[labels == c].mean(0), dim=0))


def test_deepclusterv2_loss_and_bank_update():
    m = _model(DeepClusterV2, prototypes=(4, 7), dim=6)
    run = Run(_images())
    m.before_epoch(0, run)
    m.train()
    idx = run.train_idx[torch.tensor([9, 1, 40, 3])]
    labels = m.sample(None, 0, 4, 4, "cpu", indices=idx)
    views = [_images(s, 4) for s in (7, 8)] + [_images(9, 4)[..., :8, :8]]
    loss = m(views, labels)
    # views of one size go through the network together (BatchNorm over both crops)
    z = torch.cat([tF.normalize(m.projector(m.encoder(v)), dim=1)
                   for v in (torch.cat(views[:2]), views[2])])
    pos = torch.searchsorted(run.train_idx, idx)
    ref = 0
    for h, W in enumerate(m.prototypes):
        logp = torch.log_softmax(z @ W.T / 0.1, 1)
        target = m.assigned[h, pos].repeat(3)
        ref = ref - logp[torch.arange(12), target].mean()
    torch.testing.assert_close(loss, ref / 2, rtol=1e-10, atol=0)
    before = m.bank.clone()
    m.after_step(0, 10)
    torch.testing.assert_close(m.bank[0, pos], z[:4].detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(m.bank[1, pos], z[4:8].detach(), rtol=1e-10, atol=0)
    rest = torch.ones(N, dtype=torch.bool)
    rest[pos] = False
    assert torch.equal(m.bank[:, rest], before[:, rest])


def test_too_few_images_for_the_clusters():
    enc = build_encoder("small", 8, SIZE)
    with pytest.raises(ValueError, match="deepcluster: 100 clusters"):
        build("deepcluster", enc, train_size=50)
    with pytest.raises(ValueError, match="deepclusterv2: 100 prototypes"):
        build("deepclusterv2", enc, train_size=50)
