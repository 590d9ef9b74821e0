"""The pretext-task methods: rotation prediction (RotNet), the denoising autoencoder, jigsaw
puzzles (CFN), relative patch position, the context encoder (inpainting), image CPC, and
their multi-task sums (``multi_task``: ``--method rotation+jigsaw``).

Each draws its randomness in ``sample`` for the whole global batch and keeps this rank's
rows (a ``fastssl.pretext`` transform's parameters drawn on a stand-in batch of the global
batch's shape and replayed with ``params=``), so a run does not depend on the number of
ranks."""
import functools

import torch
import torch.nn.functional as tF
from torch import nn

import fastssl
from fastssl import _checks
from fastssl.pretrain.methods.base import Method
from fastssl.pretrain.models import mlp


class RotNet(Method):
    """RotNet (Gidaris et al.): the batch's images in their four exact quarter turns, the
    encoder's features through a linear head to the 4 rotations, cross-entropy (the mean
    over this rank's 4B rows; DistributedDataParallel averages the equal ranks)."""
    name, views, chance = "rotation", "plain", 25.0

    def __init__(self, encoder, distributed=False):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.dim, 4)

    def forward(self, views):
        x, labels = fastssl.pretext.rotations(views[0])
        return tF.cross_entropy(self.head(self.encoder(x)), labels)

    def pretext(self, x):
        x, labels = fastssl.pretext.rotations(x)
        return int((self.head(self.encoder(x)).argmax(1) == labels).sum()), len(labels)


class DAE(Method):
    """A denoising autoencoder (Vincent et al.): each pixel of the view zeroed with
    probability ``drop`` (all channels; the view is normalised, so 0 is the mean colour),
    the encoder's features through a linear decoder to the clean view's pixels, MSE over
    every pixel. The noise is drawn in ``sample`` for the global batch (rank-independent)."""
    name, views = "dae", "plain"

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, size, distributed=distributed)

    def __init__(self, encoder, size, drop=0.3, distributed=False):
        super().__init__()
        self.size, self.drop = size, drop
        self.encoder, self.decoder = encoder, nn.Linear(encoder.dim, 3 * size * size)

    def sample(self, generator, lo, hi, rows, device, indices=None):
        return torch.rand(rows, self.size, self.size, generator=generator,
                          device=device)[lo:hi] >= self.drop

    def forward(self, views, kept):
        x = views[0]
        out = self.decoder(self.encoder(x * kept[:, None].to(x.dtype)))
        return tF.mse_loss(out, x.flatten(1))


def _stand_in(rows, channels, size, device):
    """A (rows, channels, size, size) batch of zeros without memory: the shape a transform's
    parameters are drawn for."""
    return torch.zeros((), device=device).expand(rows, channels, size, size)


def _rows(params, lo, hi):
    return {k: v[lo:hi] for k, v in params.items()}


def _too_small(method, size, minimum, what):
    if size is None or size < minimum:
        raise ValueError(f"--method {method} needs views of at least {minimum} px ({what}), "
                         f"got --size {size}")


def _seeded(x, seed=0):
    """The generator of a deterministic pretext evaluation: seeded, on ``x``'s device."""
    return torch.Generator(device=x.device).manual_seed(seed)


class Jigsaw(Method):
    """Noroozi and Favaro's context-free network: the view cut into 3 x 3 cells, in each a
    tile of ``TILE`` x the cell side at a random offset (gap and jitter), each tile
    standardised on its own, the tiles in the order of one of P permutations
    (``pretext.jigsaw``; the set from ``jigsaw_permutations``: P = 100 greedy
    maximal-mean-Hamming permutations, the first drawn with seed 0; ``min_distance`` is the
    set's smallest pairwise Hamming distance). Every tile goes through the shared encoder,
    the 9 features are concatenated in tile order, an MLP (9 D -> 4 D -> P, BatchNorm and
    ReLU between) classifies the permutation, cross-entropy. The 8 x 8 digits are viewed at
    36 px: 12-px cells, 6-px tiles (half the cell: gaps of 6 px on average against the
    edge-continuity shortcut; at 24 px with 3/4-cell tiles the frozen kNN fell below the
    random-init encoder's).

    Pretext accuracy: every held-out image under ``EVAL_DRAWS`` seeded draws of the
    permutation and the offsets; chance 100 / P."""
    name, views, digits_size, epochs, chance = "jigsaw", "plain", 36, 50, 1.0
    GRID, TILE, EVAL_DRAWS = 3, 0.5, 4  # TILE: the tile side over the cell side

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, size, distributed=distributed)

    def __init__(self, encoder, size, permutations=100, distributed=False):
        super().__init__()
        permutations = _checks.integer(permutations, "permutations", lo=2)
        cell = (size or 0) // self.GRID
        _too_small(self.name, size, 3 * self.GRID, f"{self.GRID} x {self.GRID} cells of at "
                   f"least 3 px for tiles of 2 px or more")
        self.size, self.tile = size, max(2, int(self.TILE * cell))
        perms, self.min_distance = fastssl.pretext.jigsaw_permutations(
            permutations, self.GRID ** 2, generator=torch.Generator().manual_seed(0))
        self.register_buffer("permutations", perms)
        self.chance = 100.0 / permutations
        d = encoder.dim
        self.encoder, self.head = encoder, mlp([self.GRID ** 2 * d, 4 * d, permutations])

    def puzzles(self, x, **kw):
        """(tiles (N, 9, C, t, t), labels (N,)) of ``pretext.jigsaw`` on this geometry."""
        return fastssl.pretext.jigsaw(x, self.permutations, self.GRID, self.tile, **kw)

    def sample(self, generator, lo, hi, rows, device, indices=None):
        stand_in = _stand_in(rows, 1, self.size, device)
        params = self.puzzles(stand_in, normalize=False, generator=generator,
                              return_params=True)[2]
        return _rows(params, lo, hi)

    def logits(self, tiles):
        n = tiles.shape[0]
        return self.head(self.encoder(tiles.flatten(0, 1)).reshape(n, -1))

    def forward(self, views, params):
        tiles, labels = self.puzzles(views[0], params=params)
        return tF.cross_entropy(self.logits(tiles.to(views[0].dtype)), labels)

    def pretext(self, x):
        x = x.repeat_interleave(self.EVAL_DRAWS, 0)
        tiles, labels = self.puzzles(x, generator=_seeded(x))
        return int((self.logits(tiles.to(x.dtype)).argmax(1) == labels).sum()), len(labels)


def relpos_geometry(size):
    """(patch, gap, jitter) of ``relpos`` at views of ``size``: the largest patch p whose
    3 x 3 layout with gap p // 2 and jitter max(1, p // 8) fits the view."""
    for patch in range(size, 1, -1):
        gap, jitter = patch // 2, max(1, patch // 8)
        if 3 * patch + 2 * gap + 2 * jitter <= size:
            return patch, gap, jitter
    return None


class RelativePosition(Method):
    """Doersch et al.'s relative patch position: a centre patch and one of its 8 neighbours
    (``pretext.relative_patches``: gap half a patch, jitter, colour dropping: one channel
    kept, the others noise), both through the shared encoder (one forward), the two
    features concatenated, an MLP (2 D -> 4 D -> 8) classifies the direction,
    cross-entropy. The digits are viewed at 32 px: 7-px patches, gap 3, jitter 1
    (``relpos_geometry``).

    Pretext accuracy: every held-out image under ``EVAL_DRAWS`` seeded draws; chance 12.5%."""
    name, views, digits_size, epochs, chance = "relpos", "plain", 32, 150, 12.5
    EVAL_DRAWS = 4

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, size, distributed=distributed)

    def __init__(self, encoder, size, distributed=False):
        super().__init__()
        _too_small(self.name, size, 10, "2-px patches, gap 1 and jitter 1 around a centre")
        self.size = size
        self.patch, self.gap, self.jitter = relpos_geometry(size)
        d = encoder.dim
        self.encoder, self.head = encoder, mlp([2 * d, 4 * d, 8])

    def pairs(self, x, **kw):
        """(centre, neighbour, labels) of ``pretext.relative_patches`` on this geometry."""
        return fastssl.pretext.relative_patches(x, self.patch, self.gap, self.jitter,
                                                color_drop=True, **kw)

    def sample(self, generator, lo, hi, rows, device, indices=None):
        params = self.pairs(_stand_in(rows, 3, self.size, device), generator=generator,
                            return_params=True)[3]
        return _rows(params, lo, hi)

    def logits(self, a, b):
        f = self.encoder(torch.cat([a, b]))
        return self.head(torch.cat(f.chunk(2), 1))

    def forward(self, views, params):
        a, b, labels = self.pairs(views[0], params=params)
        return tF.cross_entropy(self.logits(a, b), labels)

    def pretext(self, x):
        x = x.repeat_interleave(self.EVAL_DRAWS, 0)
        a, b, labels = self.pairs(x, generator=_seeded(x))
        return int((self.logits(a, b).argmax(1) == labels).sum()), len(labels)


class ContextEncoder(Method):
    """Pathak et al.'s context encoder: a square hole (``pretext.region_mask``: side half
    the view, at a random place per image, or the centre with ``kind="center"``) filled
    with 0 (views are normalised, so 0 is the mean colour), the encoder's features through
    a linear decoder to the view's pixels, ``pretext.inpainting_loss`` (L2 over the hole's
    pixels and channels). No pretext accuracy."""
    name, views, epochs = "inpainting", "plain", 100

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, size, distributed=distributed)

    def __init__(self, encoder, size, kind="random", fraction=0.5, distributed=False):
        super().__init__()
        _too_small(self.name, size, 2, "a hole of at least one pixel")
        self.size, self.kind = size, _checks.choice(kind, "kind", ("center", "random"))
        self.fraction = _checks.number(fraction, "fraction", lo=0.0, hi=1.0, lo_open=True)
        self.encoder, self.decoder = encoder, nn.Linear(encoder.dim, 3 * size * size)

    def sample(self, generator, lo, hi, rows, device, indices=None):
        return fastssl.pretext.region_mask(rows, self.size, self.kind, self.fraction,
                                           generator=generator, device=device)[lo:hi]

    def forward(self, views, hole):
        x = views[0]
        out = self.decoder(self.encoder(x * (~hole)[:, None].to(x.dtype)))
        return fastssl.pretext.inpainting_loss(out.reshape(x.shape), x, hole)


class CausalRows(nn.Module):
    """CPC's autoregressive context over a grid of latents z (B, H, W, D) -> (B, H, W, C):
    two convolutions of ``rows`` x 3 taps over rows i - rows + 1 .. i only (zero padding
    above, none below), ReLU between, so c_{i,j} sees z_{i',j'} for i' <= i and
    |j' - j| <= 2: never a row below."""

    def __init__(self, dim, hidden, rows=2):
        super().__init__()
        self.rows = rows
        self.convs = nn.ModuleList([nn.Conv2d(dim, hidden, (rows, 3), padding=(0, 1)),
                                    nn.Conv2d(hidden, hidden, (rows, 3), padding=(0, 1))])

    def forward(self, z):
        x = z.permute(0, 3, 1, 2)
        for i, conv in enumerate(self.convs):
            x = conv(tF.pad(x, (0, 0, self.rows - 1, 0)))
            x = tF.relu(x) if i + 1 < len(self.convs) else x
        return x.permute(0, 2, 3, 1)


class CPC(Method):
    """Image CPC (van den Oord et al.): the view cut into a ``GRID`` x ``GRID`` grid of
    non-overlapping patches (an overlapping step-1 target would share pixels with the
    context's own patch), each encoded by the encoder: latents z (B, H, W, D); a causal
    context network down the rows (``CausalRows``); ``fastssl.CPCLoss``: W_k c_{i,j}
    scored against z_{i+k,j} for k = 1 .. ``STEPS``, the other images, rows and columns
    of the step its negatives. Under DDP the latents and contexts are gathered (with
    gradients), so the loss is the global batch's on every rank. The digits are viewed at
    32 px: a 4 x 4 grid of 8-px patches.

    Pretext accuracy: on each held-out image, the prediction W_1 c_{i,j} of every position
    of rows 0 .. H - 2 against the image's own (H - 1) W step-1 candidates z_{i',j'}
    (i' >= 1); correct when the true z_{i+1,j} scores strictly highest (a tie is a miss);
    chance 100 / ((H - 1) W)."""
    name, views, digits_size, epochs = "cpc", "plain", 32, 50
    GRID, STEPS = 4, 2
    chance = 100.0 / ((GRID - 1) * GRID)

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, size, distributed=distributed)

    def __init__(self, encoder, size, distributed=False):
        super().__init__()
        _too_small(self.name, size, 2 * self.GRID, f"a {self.GRID} x {self.GRID} grid of "
                   f"patches of at least 2 px")
        self.patch, self.distributed = size // self.GRID, distributed
        d = encoder.dim
        self.encoder, self.context = encoder, CausalRows(d, d)
        self.criterion = fastssl.CPCLoss(d, d, steps=self.STEPS)

    def latents(self, x):
        """z (B, GRID, GRID, D): the encoder on every patch (the grid's rows on axis 1)."""
        n, c, p, g = x.shape[0], x.shape[1], self.patch, self.GRID
        cells = x[:, :, :g * p, :g * p].unfold(2, p, p).unfold(3, p, p)  # (B, C, g, g, p, p)
        patches = cells.permute(0, 2, 3, 1, 4, 5).reshape(n * g * g, c, p, p)
        return self.encoder(patches).reshape(n, g, g, -1)

    def forward(self, views):
        z = self.latents(views[0])
        c = self.context(z)
        if self.distributed and fastssl.distributed.is_distributed():
            z, c = (fastssl.distributed.gather(t.flatten(1))[0].reshape(-1, *t.shape[1:])
                    for t in (z, c))
        return self.criterion(c, z)

    def pretext(self, x):
        z = self.latents(x)
        pred = self.criterion.predictors[0](self.context(z)[:, :-1].flatten(1, 2))
        scores = pred @ z[:, 1:].flatten(1, 2).transpose(1, 2)      # (N, queries, candidates)
        true = scores.diagonal(dim1=1, dim2=2)
        eye = torch.eye(scores.shape[1], dtype=torch.bool, device=x.device)
        rest = scores.masked_fill(eye, float("-inf")).amax(2)
        return int((true > rest).sum()), true.numel()


# the tasks a multi-task method may join
TASKS = (RotNet, DAE, Jigsaw, RelativePosition, ContextEncoder, CPC)


class MultiTask(Method):
    """Doersch and Zisserman's multi-task self-supervision: one encoder shared by every
    task (``task_classes``; the built tasks are ``tasks``), each task with its own head,
    the loss the sum of the task losses (each task's randomness drawn in ``sample`` in
    task order). Built by ``multi_task(name)``: the views are the first task's (every task
    uses the plain preset), the view side on the digits the largest task's, the epochs the
    smallest task's, and ``pretext`` (and ``chance``) the first task's accuracy."""
    task_classes = ()

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, [task.create(encoder, distributed=distributed, size=size,
                                         train_size=train_size) for task in cls.task_classes])

    def __init__(self, encoder, tasks):
        super().__init__()
        self.encoder, self.tasks = encoder, nn.ModuleList(tasks)
        self.chance = tasks[0].chance

    def sample(self, generator, lo, hi, rows, device, indices=None):
        return [t.sample(generator, lo, hi, rows, device, indices=indices) for t in self.tasks]

    def forward(self, views, extras):
        return sum(t(views) if e is None else t(views, e) for t, e in zip(self.tasks, extras))

    def after_step(self, step, total):
        for t in self.tasks:
            t.after_step(step, total)

    def pretext(self, x):
        return self.tasks[0].pretext(x)


@functools.lru_cache(maxsize=None)
def multi_task(name):
    """The ``MultiTask`` method of ``name``: two or more ``TASKS`` joined by '+'
    (``"rotation+jigsaw"``)."""
    known = {task.name: task for task in TASKS}
    parts = name.split("+")
    for part in parts:
        if part not in known:
            raise ValueError(f"unknown pretext task {part!r} in --method {name!r}; a "
                             f"multi-task method joins two or more of {', '.join(known)} "
                             f"with '+'")
    if len(parts) < 2 or len(set(parts)) < len(parts):
        raise ValueError(f"--method {name!r}: a multi-task method joins two or more "
                         f"different pretext tasks with '+'")
    tasks = tuple(known[p] for p in parts)
    if len({t.views for t in tasks}) > 1:
        raise ValueError(f"--method {name!r}: the tasks use different views "
                         f"({', '.join(t.views for t in tasks)})")
    first = tasks[0]
    return type(f"MultiTask[{name}]", (MultiTask,), {
        "name": name, "task_classes": tasks, "views": first.views, "chance": first.chance,
        "digits_size": max(t.digits_size for t in tasks),
        "epochs": min(t.epochs for t in tasks), "__doc__": MultiTask.__doc__})
