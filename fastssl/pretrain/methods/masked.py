"""Masked image modelling on a ViT: MAE, SimMIM, I-JEPA, data2vec, iBOT and DINOv2."""
import torch
from torch import nn

import fastssl
from fastssl.pretrain.methods.base import Method, global_mean
from fastssl.pretrain.methods.prototype import DINO


class MAE(Method):
    """MAE: ``fastssl.pretrain.vit.MAE`` (a 2-block decoder of width 64) on one view; the
    masks (ratio 0.75) come from ``sample``."""
    name, arch, views = "mae", "vit", "plain"

    def __init__(self, encoder, mask_ratio=0.75, distributed=False):
        super().__init__()
        from fastssl.pretrain.vit import MAE as Model
        self.encoder = _vit(encoder, "mae")
        self.model = Model(encoder, decoder_dim=64, decoder_depth=2, decoder_heads=4,
                           mask_ratio=mask_ratio)

    def sample(self, generator, lo, hi, rows, device, indices=None):
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
    name, arch, views = "simmim", "vit", "plain"

    def __init__(self, encoder, mask_ratio=0.6, distributed=False):
        super().__init__()
        self.encoder = _vit(encoder, "simmim")
        self.mask_ratio = mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        nn.init.normal_(self.mask_token, std=0.02)
        p = encoder.patch_size
        self.head = nn.Linear(encoder.dim, p * p * encoder.in_chans)

    def sample(self, generator, lo, hi, rows, device, indices=None):
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


class IJEPA(Method):
    """I-JEPA: ``masking.multiblock_masks`` per image (the paper's settings; ``min_keep``
    lowered to L / 8 on grids of fewer than 80 patches); the encoder sees the context
    patches; ``vit.Predictor`` predicts each target block from them; the targets are the
    ``EMA`` encoder's layer-normed tokens of the whole image at the target blocks,
    smooth-L1 (``masking.masked_latent_loss``). The target encoder's momentum starts at the
    paper's 0.996 (cosine to 1; at 0.99 the digits run gave features no better than random
    init, kNN -0.2 points). No class token (the encoder's features are its mean patch
    token)."""
    name, arch, cls_token, views = "ijepa", "vit", False, "plain"

    def __init__(self, encoder, momentum=0.996, n_pred=4, distributed=False):
        super().__init__()
        from fastssl.pretrain.vit import Predictor
        self.encoder = _vit(encoder, "ijepa")
        self.predictor = Predictor(encoder, dim=max(4, encoder.dim // 8 * 4), depth=2)
        self.target = fastssl.EMA(encoder, momentum=momentum, final_momentum=1.0)
        self.n_pred = n_pred
        self.min_keep = min(10, max(1, encoder.num_patches // 8))

    def sample(self, generator, lo, hi, rows, device, indices=None):
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
    name, arch, cls_token, views = "data2vec", "vit", False, "plain"

    def __init__(self, encoder, mask_ratio=0.6, top_k=3, momentum=0.99, distributed=False):
        super().__init__()
        self.encoder = _vit(encoder, "data2vec")
        self.teacher = fastssl.EMA(encoder, momentum=momentum, final_momentum=1.0)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.dim, encoder.dim)
        self.mask_ratio, self.distributed = mask_ratio, distributed
        self.top_k = min(top_k, len(encoder.blocks))

    def sample(self, generator, lo, hi, rows, device, indices=None):
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
        return global_mean(loss, pred.shape[0], self.distributed)

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
    name, target, epochs, arch, views = "ibot", "softmax", 50, "vit", "global_pair"

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

    def sample(self, generator, lo, hi, rows, device, indices=None):
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
