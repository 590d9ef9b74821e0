"""The clustering methods: DeepCluster (pseudo-labels from k-means of the whole training
set, a new classifier each epoch) and DeepCluster-v2 (spherical k-means of a memory bank of
projections, the centroids as the prototypes), on ``fastssl.clustering.kmeans``."""
import torch
import torch.nn.functional as tF
from torch import nn

from fastssl.clustering import kmeans, pca_whiten
from fastssl.pretrain.methods.base import Method, crops
from fastssl.pretrain.models import mlp


def _generator(seed, epoch, salt=0, device="cpu"):
    """The epoch's clustering randomness: the same on every rank, a new seed each epoch."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 31 + salt)


def _positions(train_idx, indices):
    """Where each dataset index of ``indices`` sits in the sorted ``train_idx``."""
    return torch.searchsorted(train_idx, indices.to(train_idx.device))


def uniform_over_clusters(labels, count, generator):
    """DeepCluster's sampler: ``count`` positions of ``labels`` (N,) drawn equally from every
    non-empty cluster (ceil(count / clusters) each, with replacement where a cluster is
    smaller than that), shuffled, the first ``count`` kept."""
    clusters = torch.unique(labels)
    per = -(-count // len(clusters))
    picks = []
    for c in clusters.tolist():
        members = (labels == c).nonzero()[:, 0].cpu()
        if len(members) >= per:
            picks.append(members[torch.randperm(len(members), generator=generator)[:per]])
        else:
            picks.append(members[torch.randint(len(members), (per,), generator=generator)])
    out = torch.cat(picks)
    return out[torch.randperm(len(out), generator=generator)][:count]


class _Clustered(Method):
    """What both DeepClusters keep: the sorted training indices (buffer ``train_idx``) and
    each image's pseudo-label per head (buffer ``assigned`` (heads, N)), so that a resumed
    run continues the epoch's clustering; ``sample`` hands the loss the labels of this
    rank's rows."""

    def _label_state(self, train_size, heads):
        self.register_buffer("train_idx", torch.zeros(train_size, dtype=torch.int64))
        self.register_buffer("assigned", torch.zeros(heads, train_size, dtype=torch.int64))

    def _remember(self, run):
        self.train_idx.copy_(torch.sort(torch.as_tensor(run.train_idx))[0])

    def sample(self, generator, lo, hi, rows, device, indices=None):
        pos = _positions(self.train_idx, indices[lo:hi])
        return self.assigned[:, pos].to(device), pos


class DeepCluster(_Clustered):
    """DeepCluster (Caron et al., 2018). Before each epoch: the features of every training
    image (the deterministic view; encoder and MLP head in eval mode), PCA-whitened to
    ``min(pca_dim, width)`` dimensions and L2-normalised (``clustering.pca_whiten``),
    k-means into ``clusters`` (``iterations`` Lloyd steps, random init from a new seed each
    epoch, empty clusters split as faiss does); the epoch's order uniform over the non-empty
    clusters (``uniform_over_clusters``); a new classifier on the head (drawn from the
    epoch's seed, its optimiser state cleared). The loss: cross-entropy of the classifier on
    one augmented view against the image's cluster."""
    name, views = "deepcluster", "plain"

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, train_size, distributed=distributed)

    def __init__(self, encoder, train_size, clusters=100, pca_dim=256, iterations=20,
                 hidden=256, min_steps=100, distributed=False):
        super().__init__()
        if train_size is None or train_size < clusters:
            raise ValueError(f"deepcluster: {clusters} clusters need at least as many "
                             f"training images, got {train_size}")
        self.clusters, self.pca_dim, self.iterations = clusters, pca_dim, iterations
        self.min_steps = min_steps
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(encoder.dim, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU())
        self.classifier = nn.Linear(hidden, clusters)
        self._label_state(train_size, 1)
        self.register_buffer("order", torch.zeros(train_size, dtype=torch.int64))

    def before_epoch(self, epoch, run):
        g = _generator(run.seed, epoch)
        if epoch % max(1, -(-self.min_steps // run.steps)) == 0:
            self._cluster(epoch, run, g)
        pos = uniform_over_clusters(self.assigned[0], len(self.train_idx), g)
        self.order.copy_(self.train_idx[pos.to(self.train_idx.device)])
        return self.order

    def _cluster(self, epoch, run, g):
        self._remember(run)
        was = self.training
        self.eval()
        feats = run.features(lambda x: self.head(self.encoder(x)))
        self.train(was)
        x, _ = pca_whiten(feats, min(self.pca_dim, feats.shape[1]))
        fit = kmeans(x, self.clusters, iterations=self.iterations,
                     generator=_generator(run.seed, epoch, 1, x.device))
        self.assigned[0].copy_(fit.labels)
        self._new_classifier(g, run)
        empty = int((fit.counts == 0).sum())
        run.say(f"deepcluster: epoch {epoch + 1} clusters: {self.clusters - empty} non-empty "
                f"of {self.clusters}, largest {int(fit.counts.max())} images")

    def _new_classifier(self, generator, run):
        w = self.classifier.weight
        bound = 1.0 / w.shape[1] ** 0.5  # nn.Linear's default range, from the epoch's seed
        with torch.no_grad():
            w.copy_((torch.rand(w.shape, generator=generator, dtype=torch.float64) * 2 - 1)
                    * bound)
            self.classifier.bias.zero_()
        run.reset_optimizer(self.classifier.parameters())

    def epoch_order(self):
        return self.order

    def forward(self, views, labels):
        assigned, _ = labels
        return tF.cross_entropy(self.classifier(self.head(self.encoder(views[0]))),
                                assigned[0])


class DeepClusterV2(_Clustered):
    """DeepCluster-v2 (Caron et al., 2020, the SwAV paper's variant). A projection head to
    ``dim``-d unit embeddings, and ``len(prototypes)`` heads of K_h prototypes, fixed
    between epochs (not trained: each epoch copies the centroids in). A memory bank holds,
    for every training image, the embeddings of its two global crops from the last time it
    was seen (filled from the deterministic view before the first epoch). Before each
    epoch, head h clusters the bank's crop (h mod 2) by spherical k-means (``iterations``
    steps, random init from the epoch's seed, empty clusters keep their centroid), and its
    prototypes become the centroids. The loss: for every crop (multi-crop views) and head,
    cross-entropy of z . c_k / ``temperature`` against the image's cluster, averaged over
    the heads. Under DDP every rank holds the whole bank (the embeddings are gathered)."""
    name, epochs, views = "deepclusterv2", 60, "multi_crop"

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, train_size, distributed=distributed)

    def __init__(self, encoder, train_size, prototypes=(100, 100, 100), dim=64,
                 temperature=0.1, iterations=10, distributed=False):
        super().__init__()
        if train_size is None or train_size < max(prototypes):
            raise ValueError(f"deepclusterv2: {max(prototypes)} prototypes need at least as "
                             f"many training images, got {train_size}")
        self.temperature, self.iterations = temperature, iterations
        self.encoder = encoder
        self.projector = mlp([encoder.dim, 256, dim])
        self.prototypes = nn.ParameterList(
            nn.Parameter(tF.normalize(torch.randn(k, dim), dim=1), requires_grad=False)
            for k in prototypes)
        self._label_state(train_size, len(prototypes))
        self.register_buffer("bank", torch.zeros(2, train_size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))

    def _embed(self, x):
        return tF.normalize(self.projector(self.encoder(x)), dim=1)

    def before_epoch(self, epoch, run):
        self._remember(run)
        if not bool(self.filled):
            was = self.training
            self.eval()
            self.bank.copy_(run.features(self._embed).to(self.bank.dtype).expand(2, -1, -1))
            self.train(was)
            self.filled.fill_(True)
        for h, W in enumerate(self.prototypes):
            fit = kmeans(self.bank[h % 2], W.shape[0], iterations=self.iterations,
                         spherical=True, empty="keep",
                         generator=_generator(run.seed, epoch, h, self.bank.device))
            with torch.no_grad():
                W.copy_(fit.centroids)
            self.assigned[h].copy_(fit.labels)
        return None

    def forward(self, views, labels):
        assigned, pos = labels
        B = views[0].shape[0]
        z = crops(self._embed, views)  # crop-major, the global crops first
        self._store(z[:2 * B].detach(), B)
        loss = 0.0
        for h, W in enumerate(self.prototypes):
            scores = z @ W.to(z.dtype).T / self.temperature
            loss = loss + tF.cross_entropy(scores, assigned[h].repeat(len(views)))
        return loss / len(self.prototypes)

    def _store(self, z, B):
        """The two global crops' embeddings of the whole global batch into the bank."""
        from fastssl import distributed
        both = torch.cat([z[:B], z[B:]], dim=1)  # (B, 2 dim): one gather for both crops
        every, _ = distributed.gather(both, with_grad=False)
        self._pending = every

    def sample(self, generator, lo, hi, rows, device, indices=None):
        self._batch = _positions(self.train_idx, indices)
        return super().sample(generator, lo, hi, rows, device, indices)

    def after_step(self, step, total):
        dim = self.bank.shape[-1]
        pos = self._batch.to(self.bank.device)
        self.bank[0, pos] = self._pending[:, :dim].to(self.bank.dtype)
        self.bank[1, pos] = self._pending[:, dim:].to(self.bank.dtype)
