"""Colorization as a pretext task (Zhang et al., "Colorful Image Colorization"): the encoder
sees a view's lightness L* and predicts its a*b* as a distribution over fastssl's ab bins
(``fastssl.pretext``), trained with the class-rebalanced soft-target cross-entropy."""
import torch
from torch import nn
from torch.nn import functional as tF

from fastssl import augment as A
from fastssl import pretext
from fastssl.pretrain.data import PHOTOS
from fastssl.pretrain.methods.base import Method


class Colorization(Method):
    """Colorization on a coarse grid from the pooled features.

    The view (normalised RGB) goes back to sRGB, then to L*a*b*; the encoder's input is
    L / 50 - 1 in its three channels. The encoders return pooled features (a spatial map
    is reachable only inside the small ResNet), so a linear head predicts, for each cell of
    a ``grid`` x ``grid`` partition of the view, logits over the Q bins; the target is the
    view's a*b* averaged over each cell (area averaging). Loss: ``colorization_loss`` (soft
    targets on the 5 nearest bins, sigma 5) weighted by ``rebalance_weights`` of the
    training images' bin prior (lambda 0.5), the mean over this rank's cells
    (DistributedDataParallel averages the equal ranks).

    The prior (hard counts of every training image's cells, one deterministic view each,
    computed before the first epoch and kept with the checkpoint) is the same on every
    rank. Pretext accuracy: the argmax bin equals the cell's nearest bin, over held-out
    cells; chance: the prior's largest bin share (always answering the commonest bin).
    Training images without colour (every cell in the neutral bin: the digits) are refused.
    """
    name, views, colour = "colorization", "plain", True
    epochs = 20  # on --data photos at 32-px views: about two minutes (the digits are gray)

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, size, distributed=distributed)

    def __init__(self, encoder, size, grid=4, distributed=False):
        super().__init__()
        if size is not None and size < grid:
            raise ValueError(f"colorization predicts a {grid} x {grid} grid of colours; the "
                             f"view side {size} is smaller")
        self.grid = grid
        self.register_buffer("bins", pretext.ab_bins(torch.float64), persistent=False)
        q = len(self.bins)
        self.register_buffer("prior", torch.zeros(q, dtype=torch.float64))
        self.register_buffer("weights", torch.ones(q, dtype=torch.float64))
        self.encoder, self.head = encoder, nn.Linear(encoder.dim, q * grid * grid)

    @property
    def chance(self):
        return 100.0 * float(self.prior.max()) if float(self.prior.sum()) > 0 else None

    def _lab(self, x):
        """Normalised views -> (the encoder's input, the a*b* targets per grid cell), the
        colours in float32 (float64 views: float64) outside autocast."""
        with torch.autocast(x.device.type, enabled=False):
            rgb = x.double() if x.dtype == torch.float64 else x.float()
            # float32 constants, as augment.Normalize applied them
            mean = torch.tensor(A.IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(A.IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            lab = pretext.rgb_to_lab((rgb * std + mean).clamp(0, 1))
            inputs = (lab[:, :1] / 50 - 1).expand(-1, 3, -1, -1).to(x.dtype)
            return inputs, tF.adaptive_avg_pool2d(lab[:, 1:], self.grid)

    def _logits(self, inputs):
        n, g = len(inputs), self.grid
        return self.head(self.encoder(inputs)).view(n, len(self.bins), g, g)

    def forward(self, views):
        inputs, ab = self._lab(views[0])
        logits = self._logits(inputs)
        return pretext.colorization_loss(logits, ab, self.bins.to(ab.dtype),
                                         self.weights.to(ab.dtype))

    def _bin_counts(self, x):
        """(n, Q) how many of each image's cells fall nearest to each bin."""
        _, ab = self._lab(x)
        nearest = pretext.nearest_bin(ab, self.bins.to(ab.dtype))
        return tF.one_hot(nearest.flatten(1), len(self.bins)).sum(1)

    def before_epoch(self, epoch, run):
        if float(self.prior.sum()) > 0:  # computed (or restored with the checkpoint)
            return None
        counts = run.features(self._bin_counts).double().sum(0)
        prior = counts / counts.sum()
        neutral = int(pretext.nearest_bin(self.bins.new_zeros(1, 2, 1, 1), self.bins))
        if float(prior[neutral]) == 1:
            raise ValueError(f"colorization needs colour images, but every training image is "
                             f"grayscale here (the digits are): pass --data {PHOTOS} (crops "
                             f"of scikit-learn's sample photographs, no download) or --data "
                             f"with a folder of colour images")
        self.prior.copy_(prior)
        self.weights.copy_(pretext.rebalance_weights(prior, self.bins))
        run.say(f"colorization: bin prior of {len(run.train_idx)} training images, "
                f"{int((prior > 0).sum())} of {len(prior)} bins used, the largest "
                f"{self.chance:.1f}% (chance), weights {float(self.weights.min()):.2f} .. "
                f"{float(self.weights.max()):.2f}")
        return None

    def pretext(self, x):
        inputs, ab = self._lab(x)
        guess = self._logits(inputs).argmax(1)
        truth = pretext.nearest_bin(ab, self.bins.to(ab.dtype))
        return int((guess == truth).sum()), truth.numel()
