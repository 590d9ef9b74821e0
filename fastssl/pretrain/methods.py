"""The sixteen SSL methods, each written with fastssl's public pieces only.

=========  ==========================================================================
method     objective
=========  ==========================================================================
simclr     ``NTXentLoss`` on projections of both views (negatives gathered from every rank)
moco       ``InfoNCELoss`` of queries against momentum keys (``EMA`` key encoder) and a
           ``MoCoQueue`` shared by the ranks, symmetrised
byol       ``NegativeCosineSimilarity`` of online predictions against ``EMA`` target
           projections, symmetrised
simsiam    ``NegativeCosineSimilarity`` of predictions against stop-gradient projections
barlow     ``BarlowTwinsLoss`` on 512-d projections (global-batch statistics under DDP)
vicreg     ``VICRegLoss`` on 512-d projections (embeddings gathered under DDP)
dino       multi-crop self-distillation: ``PrototypeCrossEntropy`` of every student crop
           against the ``EMA`` teacher's other global crops over weight-normalised
           prototypes (centring, teacher-temperature warm-up); no rows x K matrix
swav       multi-crop swapped prediction: each crop predicts the Sinkhorn-Knopp codes of
           the other global crops (``prototype_cross_entropy(teacher_target="sinkhorn")``,
           column sums all-reduced under DDP)
mae        masked autoencoder on a ViT (``--arch vit``): 75% of the patches removed per
           image, the encoder on the rest, a light decoder predicting every patch,
           ``masking.masked_patch_loss`` (norm-pix MSE) on the removed ones
simmim     SimMIM on a ViT: 60% of the patches (``masking.simmim_mask``, one-patch cells)
           replaced by a learnable token, every token encoded, a linear head to the
           patches' pixels, L1 on the masked ones (``masked_patch_loss(loss="l1")``)
ijepa      I-JEPA on a ViT: multi-block masks, the encoder on the context block, a narrow
           predictor per target block, smooth-L1 against the ``EMA`` encoder's layer-normed
           tokens (``masking.masked_latent_loss``)
data2vec   data2vec on a ViT: block masks, a mask token, a linear head regressing the
           ``EMA`` teacher's top-3 block outputs (instance-normed, averaged, layer-normed)
ibot       iBOT on a ViT: DINO's class-token loss + the masked patch-token loss on the same
           prototypes (``prototype_cross_entropy(pairing="rows")``), two global crops
dinov2     DINOv2's objective: iBOT with Sinkhorn-Knopp teacher targets + 0.1 x KoLeo
rotation   RotNet: every image of one view in its four quarter turns
           (``pretext.rotations``), a linear head to the rotation, cross-entropy
dae        denoising autoencoder: masking noise on one view (``pretext.corrupt``, 30% of
           the pixels), the encoder, a linear decoder to the clean view, MSE
=========  ==========================================================================

``forward(views)`` is the loss (so DistributedDataParallel wraps the method);
``after_step(step, total)`` updates teachers and queues after the optimiser step. A method
that draws its own randomness (MAE's masks) draws it in ``sample(generator, lo, hi, rows)``
for the whole global batch of ``rows`` images and keeps this rank's rows [lo, hi), so the
draw does not depend on the number of ranks; the loop then calls ``forward(views, sample)``.
With ``distributed=True`` every loss is the one over the global batch.
"""
import torch
import torch.nn.functional as tF
from torch import nn

import fastssl
from fastssl import augment as A
from fastssl.pretrain.models import mlp

METHODS = ("simclr", "moco", "byol", "simsiam", "barlow", "vicreg", "dino", "swav", "mae",
           "simmim", "ijepa", "data2vec", "ibot", "dinov2", "rotation", "dae")
MULTI_CROP = ("dino", "swav")
# masked image modelling: a ViT encoder by default; one view, or two global crops (ibot,
# dinov2)
MASKED = ("mae", "simmim", "ijepa", "data2vec", "ibot", "dinov2")
NO_CLASS_TOKEN = ("ijepa", "data2vec")  # their ViT's features: the mean patch token


class Method(nn.Module):
    def after_step(self, step, total):
        pass

    def sample(self, generator, lo, hi, rows, device):
        return None

    def trainable(self):
        return [p for p in self.parameters() if p.requires_grad]


class SimCLR(Method):
    def __init__(self, encoder, temperature=0.2, distributed=False):
        super().__init__()
        self.encoder, self.head = encoder, mlp([encoder.dim, 256, 64])
        self.criterion = fastssl.NTXentLoss(temperature=temperature,
                                            gather_distributed=distributed)

    def forward(self, views):
        z0, z1 = (self.head(self.encoder(v)) for v in views)
        return self.criterion(z0, z1)


class MoCo(Method):
    """MoCo v2: queries from the student, keys from its momentum copy, a queue of past
    keys as extra negatives (plus the batch's other keys), both view orders."""

    def __init__(self, encoder, temperature=0.2, queue_size=1024, momentum=0.99,
                 distributed=False):
        super().__init__()
        self.encoder = encoder
        self.query = nn.Sequential(encoder, mlp([encoder.dim, 256, 64]))
        self.key = fastssl.EMA(self.query, momentum=momentum, final_momentum=1.0)
        self.queue = fastssl.MoCoQueue(64, queue_size, gather_distributed=distributed)
        self.criterion = fastssl.InfoNCELoss(temperature=temperature,
                                             gather_distributed=distributed)
        self._keys = None

    def forward(self, views):
        q0, q1 = (self.query(v) for v in views)
        with torch.no_grad():
            k0, k1 = (self.key(v) for v in views)
        negatives = self.queue.negatives()
        self._keys = (k0, k1)
        return 0.5 * (self.criterion(q0, k1, negatives) + self.criterion(q1, k0, negatives))

    def after_step(self, step, total):
        self.key.update(step, total)
        for k in self._keys:  # view by view: the queue's order does not depend on the ranks
            self.queue.enqueue(tF.normalize(k, dim=1))


class BYOL(Method):
    def __init__(self, encoder, momentum=0.99, distributed=False):
        super().__init__()
        self.encoder = encoder
        self.online = nn.Sequential(encoder, mlp([encoder.dim, 256, 64]))
        self.predictor = mlp([64, 256, 64])
        self.target = fastssl.EMA(self.online, momentum=momentum, final_momentum=1.0)
        self.criterion = fastssl.NegativeCosineSimilarity()

    def forward(self, views):
        p0, p1 = (self.predictor(self.online(v)) for v in views)
        with torch.no_grad():
            t0, t1 = (self.target(v) for v in views)
        return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))

    def after_step(self, step, total):
        self.target.update(step, total)


class SimSiam(Method):
    def __init__(self, encoder, distributed=False):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp([encoder.dim, 256, 256], last_bn=True)
        self.predictor = mlp([256, 64, 256])
        self.criterion = fastssl.NegativeCosineSimilarity()

    def forward(self, views):
        z0, z1 = (self.projector(self.encoder(v)) for v in views)
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))


class Barlow(Method):
    def __init__(self, encoder, lambda_param=5e-3, distributed=False):
        super().__init__()
        self.encoder, self.projector = encoder, mlp([encoder.dim, 512, 512, 512])
        self.criterion = fastssl.BarlowTwinsLoss(
            lambda_param=lambda_param, gather_distributed=distributed,
            normalize="global" if distributed else "local")

    def forward(self, views):
        z0, z1 = (self.projector(self.encoder(v)) for v in views)
        return self.criterion(z0, z1)


class VICReg(Method):
    def __init__(self, encoder, distributed=False):
        super().__init__()
        self.encoder, self.projector = encoder, mlp([encoder.dim, 512, 512, 512])
        self.criterion = fastssl.VICRegLoss(gather_distributed=distributed)

    def forward(self, views):
        z0, z1 = (self.projector(self.encoder(v)) for v in views)
        return self.criterion(z0, z1)


class PrototypeHead(nn.Module):
    """MLP to a bottleneck, L2-normalised, and K prototypes used weight-normalised (unit
    rows): the head of DINO and SwAV without its last linear layer, whose cosine scores
    the fused loss computes tile by tile. ``forward`` returns the unit bottleneck rows. The
    MLP is Linear-BN-ReLU-Linear, or Linear-GELU-Linear with ``batch_norm=False``."""

    def __init__(self, dim, prototypes, bottleneck=64, hidden=256, batch_norm=True):
        super().__init__()
        # a ViT's head (DINO's own) has no BatchNorm: it also scores patch tokens, whose
        # count varies per image
        self.mlp = mlp([dim, hidden, bottleneck]) if batch_norm else nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.weight = nn.Parameter(torch.randn(prototypes, bottleneck) / bottleneck ** 0.5)

    def prototypes(self):
        return tF.normalize(self.weight, dim=1)

    def forward(self, h):
        return tF.normalize(self.mlp(h), dim=1)


def _crops(net, views):
    """Features of every view, crop-major, one forward per resolution (views of the same
    size are stacked, as DINO's multi-crop does)."""
    out, i = [], 0
    while i < len(views):
        j = i
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        out.append(net(torch.cat(views[i:j])))
        i = j
    return torch.cat(out)


class DINO(Method):
    """DINO: the student sees every crop, the ``EMA`` teacher (cosine momentum schedule) the
    two global crops; the teacher's centred, sharpened distribution over the prototypes is
    the target of every other student crop. The teacher temperature warms up linearly over
    the first ``warmup`` fraction of the steps."""

    def __init__(self, encoder, prototypes=256, momentum=0.99, student_temp=0.1,
                 teacher_temp=(0.02, 0.03), warmup=0.3, teacher_target="softmax",
                 batch_norm=True, distributed=False):
        super().__init__()
        self.encoder = encoder
        self.student = nn.Sequential(encoder, PrototypeHead(encoder.dim, prototypes,
                                                            batch_norm=batch_norm))
        self.teacher = fastssl.EMA(self.student, momentum=momentum, final_momentum=1.0)
        self.criterion = fastssl.PrototypeCrossEntropy(
            output_dim=prototypes, student_temp=student_temp, teacher_crops=2,
            warmup_teacher_temp=teacher_temp[0], teacher_temp=teacher_temp[1],
            teacher_target=teacher_target)
        self.temps, self.warmup = teacher_temp, warmup
        self.register_buffer("progress", torch.zeros(()))  # fraction of the steps done

    def teacher_temp(self):
        lo, hi = self.temps
        done = float(self.progress)
        return hi if done >= self.warmup else lo + (hi - lo) * done / self.warmup

    def forward(self, views):
        s = _crops(self.student, views)
        with torch.no_grad():
            t = _crops(self.teacher.module, views[:2])
            V = self.teacher.module[1].prototypes()
        return self.criterion(s, t, self.student[1].prototypes(), V,
                              teacher_temp=self.teacher_temp())

    def after_step(self, step, total):
        self.teacher.update(step, total)
        self.progress.fill_((step + 1) / total)


class SwAV(Method):
    """SwAV: every crop's softmax over the prototypes (temperature 0.1) predicts the
    Sinkhorn-Knopp codes (epsilon 0.05, 3 iterations) of the other global crops; the codes
    come from the same network without gradient, in factored form."""

    def __init__(self, encoder, prototypes=128, temperature=0.1, epsilon=0.02, iterations=3,
                 distributed=False):
        super().__init__()
        self.encoder = encoder
        self.net = nn.Sequential(encoder, PrototypeHead(encoder.dim, prototypes))
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, iterations

    def forward(self, views):
        z = _crops(self.net, views)
        W = self.net[1].prototypes()
        B = views[0].shape[0]
        return fastssl.prototype_cross_entropy(
            z, z[:2 * B].detach(), W, W.detach(), self.temperature, self.epsilon,
            teacher_crops=2, teacher_target="sinkhorn", sinkhorn_iterations=self.iterations,
            gather_distributed=True)


class MAE(Method):
    """MAE: ``fastssl.pretrain.vit.MAE`` (a 2-block decoder of width 64) on one view; the
    masks (ratio 0.75) come from ``sample``."""

    def __init__(self, encoder, mask_ratio=0.75, distributed=False):
        super().__init__()
        from fastssl.pretrain.vit import MAE as Model
        self.encoder = _vit(encoder, "mae")
        self.model = Model(encoder, decoder_dim=64, decoder_depth=2, decoder_heads=4,
                           mask_ratio=mask_ratio)

    def sample(self, generator, lo, hi, rows, device):
        ids_keep, mask, ids_restore = fastssl.masking.random_masking(
            (rows, self.encoder.num_patches), self.model.mask_ratio, device=device,
            generator=generator)
        return ids_keep[lo:hi], mask[lo:hi], ids_restore[lo:hi]

    def forward(self, views, masks):
        return self.model(views[0], masks=masks)


def _vit(encoder, method):
    from fastssl.pretrain.vit import TokenEncoder
    if not isinstance(encoder, TokenEncoder):
        raise ValueError(f"--method {method} needs --arch vit (fastssl's ViT) or a timm ViT "
                         f"by name, got a {type(encoder).__name__}")
    return encoder


class SimMIM(Method):
    """SimMIM: the masks (``masking.simmim_mask``, cells of one patch, ratio 0.6) come from
    ``sample``; the mask token and the linear pixel head belong to the method, so the
    encoder saved in ``encoder.pt`` is a plain ViT."""

    def __init__(self, encoder, mask_ratio=0.6, distributed=False):
        super().__init__()
        self.encoder = _vit(encoder, "simmim")
        self.mask_ratio = mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        nn.init.normal_(self.mask_token, std=0.02)
        p = encoder.patch_size
        self.head = nn.Linear(encoder.dim, p * p * encoder.in_chans)

    def sample(self, generator, lo, hi, rows, device):
        h, p = self.encoder.grid[0], self.encoder.patch_size
        mask = fastssl.masking.simmim_mask(rows, h * p, p, p, self.mask_ratio,
                                           generator=generator, device=device)
        return mask[lo:hi]

    def forward(self, views, mask):
        x = views[0]
        tokens = self.encoder.forward_masked(x, mask, mask_token=self.mask_token)
        pred = self.head(tokens[:, self.encoder.num_prefix_tokens:])
        return fastssl.masking.masked_patch_loss(pred, x, mask, self.encoder.patch_size,
                                                 norm_pix=False, loss="l1")


def _min_block(grid):
    """iBOT's smallest mask block, (min(h, w) // 3)^2 patches (16 on 14 x 14, 1 on the
    digits' 4 x 4)."""
    return max(1, (min(grid) // 3) ** 2)


def _global_mean(loss, count, distributed):
    """A mean over this rank's ``count`` scored rows -> its share of the mean over every
    rank's rows: ``loss * count * world / total`` (DDP then averages the gradients, and the
    loop the values, over the ranks), so the loss does not depend on how the rows fall."""
    if not (distributed and torch.distributed.is_initialized()):
        return loss
    world = torch.distributed.get_world_size()
    total = torch.tensor([float(count)], dtype=torch.float64, device=loss.device)
    torch.distributed.all_reduce(total)
    return loss * (count * world / max(float(total), 1.0))


class IJEPA(Method):
    """I-JEPA: ``masking.multiblock_masks`` per image (the paper's settings; ``min_keep``
    lowered to L / 8 on grids of fewer than 80 patches); the encoder sees the context
    patches; ``vit.Predictor`` predicts each target block from them; the targets are the
    ``EMA`` encoder's layer-normed tokens of the whole image at the target blocks,
    smooth-L1 (``masking.masked_latent_loss``). The target encoder's momentum starts at the
    paper's 0.996 (cosine to 1; at 0.99 the digits run gave features no better than random
    init, kNN -0.2 points). No class token (the encoder's features are its mean patch
    token)."""

    def __init__(self, encoder, momentum=0.996, n_pred=4, distributed=False):
        super().__init__()
        from fastssl.pretrain.vit import Predictor
        self.encoder = _vit(encoder, "ijepa")
        self.predictor = Predictor(encoder, dim=max(4, encoder.dim // 8 * 4), depth=2)
        self.target = fastssl.EMA(encoder, momentum=momentum, final_momentum=1.0)
        self.n_pred = n_pred
        self.min_keep = min(10, max(1, encoder.num_patches // 8))

    def sample(self, generator, lo, hi, rows, device):
        context, targets = fastssl.masking.multiblock_masks(
            rows, self.encoder.grid, n_pred=self.n_pred, min_keep=self.min_keep,
            generator=generator, device=device)
        return context[lo:hi, 0], targets[lo:hi]

    def forward(self, views, masks):
        context_idx, target_idx = masks  # (n, K), (n, blocks, M)
        x, pre = views[0], self.encoder.num_prefix_tokens
        n, blocks, m = target_idx.shape
        z = self.encoder.forward_tokens(x, context_idx)[:, pre:]
        with torch.no_grad():
            h = self.target.module.forward_tokens(x)[:, pre:]
        pred = self.predictor(z.repeat_interleave(blocks, 0),
                              context_idx.repeat_interleave(blocks, 0),
                              target_idx.reshape(n * blocks, m))
        return fastssl.masking.masked_latent_loss(
            pred.reshape(n, blocks * m, -1), h, target_idx.reshape(n, blocks * m),
            loss="smooth_l1")

    def after_step(self, step, total):
        self.target.update(step, total)


class Data2Vec(Method):
    """data2vec on a ViT: ``masking.block_mask`` (ratio 0.6, iBOT's smallest block); the
    student encodes every token, masked ones replaced by a learnable token, and a linear
    head regresses, at the masked tokens, the ``EMA`` teacher's top ``top_k`` block
    outputs on the whole image, each instance-normed over the tokens, averaged and
    layer-normed: MSE summed over the channels / sqrt(D) (``masking.masked_latent_loss``),
    averaged over the masked tokens of the global batch. No class token."""

    def __init__(self, encoder, mask_ratio=0.6, top_k=3, momentum=0.99, distributed=False):
        super().__init__()
        self.encoder = _vit(encoder, "data2vec")
        self.teacher = fastssl.EMA(encoder, momentum=momentum, final_momentum=1.0)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.dim, encoder.dim)
        self.mask_ratio, self.distributed = mask_ratio, distributed
        self.top_k = min(top_k, len(encoder.blocks))

    def sample(self, generator, lo, hi, rows, device):
        grid = self.encoder.grid
        mask = fastssl.masking.block_mask(rows, grid, ratio=self.mask_ratio,
                                          min_num_patches=_min_block(grid),
                                          generator=generator, device=device)
        return mask[lo:hi].flatten(1)

    def forward(self, views, mask):
        x, pre = views[0], self.encoder.num_prefix_tokens
        out = self.encoder.forward_masked(x, mask, mask_token=self.mask_token)[:, pre:]
        pred = self.head(out[mask])
        with torch.no_grad():
            _, layers = self.teacher.module.forward_blocks(x, last=self.top_k)
        loss = fastssl.masking.masked_latent_loss(
            pred, [t[:, pre:] for t in layers], mask, loss="mse", instance_norm=True,
            dim_scale=self.encoder.dim ** 0.5)
        return _global_mean(loss, pred.shape[0], self.distributed)

    def after_step(self, step, total):
        self.teacher.update(step, total)


class IBOT(DINO):
    """iBOT on a ViT: DINO's class-token loss between the two global crops plus the masked
    patch-token loss. Each image of each crop is masked with probability ``mask_prob``
    (``masking.block_mask``, ratio U(0.1, 0.5), iBOT's smallest block; a global batch
    with no masked patch gets one), the masked patch embeddings replaced by a learnable token;
    the student's masked patch tokens predict the ``EMA`` teacher's distribution over the
    same prototypes (one shared head) for the unmasked crop at the same places,
    ``prototype_cross_entropy(pairing="rows")`` with each row weighted 1 / (its image's
    masked count) / images, the patch centre following the teacher's masked tokens
    (momentum 0.9). Two global crops and no local crops (the ViT's position table has one
    grid)."""
    name, target = "ibot", "softmax"

    def __init__(self, encoder, prototypes=256, mask_prob=0.5, mask_ratio=(0.1, 0.5),
                 distributed=False):
        super().__init__(_vit(encoder, self.name), prototypes, teacher_target=self.target,
                         batch_norm=False, distributed=distributed)
        if encoder.num_prefix_tokens != 1:
            raise ValueError(f"--method {self.name} needs a ViT with a class token")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("patch_center", torch.zeros(prototypes))
        self.mask_prob, self.mask_ratio, self.distributed = mask_prob, mask_ratio, distributed
        self._stat = None

    def sample(self, generator, lo, hi, rows, device):
        grid = self.encoder.grid
        masks = fastssl.masking.block_mask(2 * rows, grid, ratio=self.mask_ratio,
                                           min_num_patches=_min_block(grid),
                                           generator=generator, device=device)
        picked = torch.rand(2 * rows, generator=generator, device=device) < self.mask_prob
        masks = (masks & picked[:, None, None]).reshape(2, rows, -1)
        if not bool(masks.any()):  # the patch loss needs a masked token in the batch
            masks[0, 0, 0] = True
        return masks[:, lo:hi].reshape(-1, grid[0] * grid[1])  # crop-major, as the views

    def _tokens(self, x, mask):
        enc, head = self.student[0], self.student[1]
        tokens = enc.forward_masked(x, mask, mask_token=self.mask_token)
        with torch.no_grad():
            t_enc, t_head = self.teacher.module[0], self.teacher.module[1]
            teacher = t_enc.forward_tokens(x)
            t_cls, t_patch = t_head(teacher[:, 0]), t_head(teacher[:, 1:][mask])
        return tokens, head(tokens[:, 0]), head(tokens[:, 1:][mask]), t_cls, t_patch

    def forward(self, views, mask):
        x = torch.cat(views[:2])
        tokens, s_cls, s_patch, t_cls, t_patch = self._tokens(x, mask)
        W, tau = self.student[1].prototypes(), self.teacher_temp()
        with torch.no_grad():
            V = self.teacher.module[1].prototypes()
        loss = self.criterion(s_cls, t_cls, W, V, teacher_temp=tau)
        image = mask.nonzero()[:, 0]
        weights = (1.0 / mask.sum(1).clamp_min(1).to(s_patch.dtype))[image] / mask.shape[0]
        return loss + self._patch_loss(s_patch, t_patch, W, V, weights, tau) + \
            self._extra(tokens[:, 0], x.shape[0] // 2)

    def _patch_loss(self, s_patch, t_patch, W, V, weights, tau):
        with torch.no_grad():  # the centre's statistic over every rank's masked tokens
            stat = torch.cat([V.to(torch.float64) @ t_patch.to(torch.float64).sum(0),
                              V.new_tensor([t_patch.shape[0]], dtype=torch.float64)])
            if self.distributed and torch.distributed.is_initialized():
                torch.distributed.all_reduce(stat)
            self._stat = stat
        return fastssl.prototype_cross_entropy(
            s_patch, t_patch, W, V, self.criterion.schedule.student_temp, tau,
            center=self.patch_center, pairing="rows", weights=weights)

    def _extra(self, cls_tokens, batch):
        return 0.0

    def after_step(self, step, total):
        super().after_step(step, total)
        stat, count = self._stat[:-1], float(self._stat[-1])
        if count > 0:
            self.patch_center.mul_(0.9).add_(0.1 * (stat / count).to(self.patch_center.dtype))


class DINOv2(IBOT):
    """DINOv2's objective on a ViT: iBOT's two losses with Sinkhorn-Knopp teacher targets
    (no centres; epsilon = the teacher temperature, the column sums over every rank) plus
    0.1 x ``KoLeoLoss`` on each global crop's class tokens (over the global batch; DINOv2
    takes each GPU's)."""
    name, target = "dinov2", "sinkhorn"

    def _patch_loss(self, s_patch, t_patch, W, V, weights, tau):
        return fastssl.prototype_cross_entropy(
            s_patch, t_patch, W, V, self.criterion.schedule.student_temp, tau,
            pairing="rows", weights=weights, teacher_target="sinkhorn",
            gather_distributed=True)

    def _extra(self, cls_tokens, batch):
        from fastssl import distributed
        crops = [distributed.gather(c)[0] for c in cls_tokens.split(batch)]
        return 0.1 * sum(fastssl.koleo(c) for c in crops)

    def after_step(self, step, total):
        DINO.after_step(self, step, total)


class RotNet(Method):
    """RotNet (Gidaris et al.): the batch's images in their four exact quarter turns, the
    encoder's features through a linear head to the 4 rotations, cross-entropy (the mean
    over this rank's 4B rows; DistributedDataParallel averages the equal ranks)."""

    def __init__(self, encoder, distributed=False):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.dim, 4)

    def forward(self, views):
        x, labels = fastssl.pretext.rotations(views[0])
        return tF.cross_entropy(self.head(self.encoder(x)), labels)


class DAE(Method):
    """A denoising autoencoder (Vincent et al.): each pixel of the view zeroed with
    probability ``drop`` (all channels; the view is normalised, so 0 is the mean colour),
    the encoder's features through a linear decoder to the clean view's pixels, MSE over
    every pixel. The noise is drawn in ``sample`` for the global batch (rank-independent)."""

    def __init__(self, encoder, size, drop=0.3, distributed=False):
        super().__init__()
        self.size, self.drop = size, drop
        self.encoder, self.decoder = encoder, nn.Linear(encoder.dim, 3 * size * size)

    def sample(self, generator, lo, hi, rows, device):
        return torch.rand(rows, self.size, self.size, generator=generator,
                          device=device)[lo:hi] >= self.drop

    def forward(self, views, kept):
        x = views[0]
        out = self.decoder(self.encoder(x * kept[:, None].to(x.dtype)))
        return tF.mse_loss(out, x.flatten(1))


def build(method, encoder, distributed=False, size=None):
    if method == "dae":
        return DAE(encoder, size, distributed=distributed)
    return {"simclr": SimCLR, "moco": MoCo, "byol": BYOL, "simsiam": SimSiam,
            "barlow": Barlow, "vicreg": VICReg, "dino": DINO,
            "swav": SwAV, "mae": MAE, "simmim": SimMIM, "ijepa": IJEPA,
            "data2vec": Data2Vec, "ibot": IBOT, "dinov2": DINOv2, "rotation": RotNet}[method](
                encoder, distributed=distributed)


def views_for(method, size, scale, flip_p, n_local=4, **kw):
    """The method's augmentation preset at ``size`` (crop ``scale``, flip probability);
    the multi-crop methods add ``n_local`` local crops at half the side, from crop scales
    below the global ones."""
    kw = dict(size=size, scale=scale, flip_p=flip_p, **kw)
    if method == "simclr":
        return A.SimCLRAugment(**kw)
    if method in ("moco", "simsiam"):
        return A.MoCoV2Augment(**kw)
    if method in ("ibot", "dinov2"):  # DINO's two global crops, no local crops
        kw.pop("size")
        return A.DINOAugment(global_size=size, n_local=0, global_scale=kw.pop("scale"), **kw)
    if method in MASKED or method in ("rotation", "dae"):  # a crop and a flip, no colour
        out = {k: v for k, v in kw.items() if k not in ("size", "scale", "flip_p")}
        return A.MultiView([A.Augment(A.RandomResizedCrop(size, scale=scale),
                                      A.RandomHorizontalFlip(flip_p), A.Normalize(), **out)],
                           "MAEAugment")
    if method in MULTI_CROP:
        kw.pop("size")
        g_scale = kw.pop("scale")
        return A.DINOAugment(global_size=size, local_size=max(size // 2, 4), n_local=n_local,
                             global_scale=g_scale, local_scale=(0.25, g_scale[0]), **kw)
    return A.BYOLAugment(**kw)
