"""The SSL methods, each written with fastssl's public pieces only, one module per family:
``joint`` (two-view embeddings), ``prototype`` (DINO, SwAV), ``masked`` (masked image
modelling on a ViT), ``pretext`` (pretext tasks, autoencoders), ``colorization``,
``clustering`` (DeepCluster); ``base`` holds the ``Method`` interface and the augmentation
presets.

=============  ==========================================================================
method         objective
=============  ==========================================================================
simclr         ``NTXentLoss`` on projections of both views (negatives gathered from every rank)
moco           ``InfoNCELoss`` of queries against momentum keys (``EMA`` key encoder) and a
               ``MoCoQueue`` shared by the ranks, symmetrised
byol           ``NegativeCosineSimilarity`` of online predictions against ``EMA`` target
               projections, symmetrised
simsiam        ``NegativeCosineSimilarity`` of predictions against stop-gradient projections
barlow         ``BarlowTwinsLoss`` on 512-d projections (global-batch statistics under DDP)
vicreg         ``VICRegLoss`` on 512-d projections (embeddings gathered under DDP)
dino           multi-crop self-distillation: ``PrototypeCrossEntropy`` of every student crop
               against the ``EMA`` teacher's other global crops over weight-normalised
               prototypes (centring, teacher-temperature warm-up); no rows x K matrix
swav           multi-crop swapped prediction: each crop predicts the Sinkhorn-Knopp codes of
               the other global crops (``prototype_cross_entropy(teacher_target="sinkhorn")``,
               column sums all-reduced under DDP)
mae            masked autoencoder on a ViT (``--arch vit``): 75% of the patches removed per
               image, the encoder on the rest, a light decoder predicting every patch,
               ``masking.masked_patch_loss`` (norm-pix MSE) on the removed ones
simmim         SimMIM on a ViT: 60% of the patches (``masking.simmim_mask``, one-patch cells)
               replaced by a learnable token, every token encoded, a linear head to the
               patches' pixels, L1 on the masked ones (``masked_patch_loss(loss="l1")``)
ijepa          I-JEPA on a ViT: multi-block masks, the encoder on the context block, a narrow
               predictor per target block, smooth-L1 against the ``EMA`` encoder's layer-normed
               tokens (``masking.masked_latent_loss``)
data2vec       data2vec on a ViT: block masks, a mask token, a linear head regressing the
               ``EMA`` teacher's top-3 block outputs (instance-normed, averaged, layer-normed)
ibot           iBOT on a ViT: DINO's class-token loss + the masked patch-token loss on the same
               prototypes (``prototype_cross_entropy(pairing="rows")``), two global crops
dinov2         DINOv2's objective: iBOT with Sinkhorn-Knopp teacher targets + 0.1 x KoLeo
rotation       RotNet: every image of one view in its four quarter turns
               (``pretext.rotations``), a linear head to the rotation, cross-entropy
dae            denoising autoencoder: masking noise on one view (``pretext.corrupt``, 30% of
               the pixels), the encoder, a linear decoder to the clean view, MSE
deepcluster    DeepCluster: k-means (``clustering.kmeans``) of the PCA-whitened features of
               every training image gives pseudo-labels; an epoch's order uniform over the
               clusters; a new linear classifier at each clustering; cross-entropy
deepclusterv2  DeepCluster-v2: spherical k-means of a memory bank of projections into three
               prototype heads (the centroids, fixed in between); cross-entropy at 0.1 on
               multi-crop views
jigsaw         context-free network: 3 x 3 tiles with gap and jitter, each standardised
               (``pretext.jigsaw``), shuffled by one of 100 greedy-Hamming permutations; each
               tile through the encoder, the 9 features concatenated, an MLP to the
               permutation, cross-entropy (36-px views of the digits, 6-px tiles)
relpos         relative patch position: a centre patch and one of its 8 neighbours
               (``pretext.relative_patches``: gap, jitter, colour dropping), both encoded, the
               features concatenated, an MLP to the direction, cross-entropy (32-px views)
inpainting     context encoder: a random square hole of half the side filled with 0, the
               encoder, a linear decoder, ``pretext.inpainting_loss`` (L2 over the hole)
cpc            image CPC: a 4 x 4 grid of patches encoded, a causal convolution down the rows,
               ``CPCLoss`` predicting 1 and 2 rows below (other images, rows, columns as
               negatives; gathered under DDP) (32-px views)
colorization   Zhang et al.'s colorization from the view's L* (colour data: ``--data photos``):
               a linear head to logits over fastssl's 261 ab bins per cell of a 4 x 4 grid,
               ``pretext.colorization_loss`` rebalanced by the training images' bin prior
a+b            pretext tasks joined by '+' (``rotation+jigsaw``; rotation, dae, jigsaw, relpos,
               inpainting, cpc): one encoder, each task's head, the sum of the task losses
=============  ==========================================================================

Every method follows ``base.Method``; with ``distributed=True`` every loss is the one over
the global batch.
"""
from fastssl.pretrain.methods import clustering, colorization, joint, masked, pretext, prototype
from fastssl.pretrain.methods.base import Method, preset

FAMILIES = (joint, prototype, masked, pretext, clustering, colorization)
REGISTRY = {cls.name: cls for family in FAMILIES for cls in vars(family).values()
            if isinstance(cls, type) and issubclass(cls, Method) and "name" in vars(cls)
            and cls.name}
METHODS = tuple(REGISTRY)
EPOCHS = {name: cls.epochs for name, cls in REGISTRY.items()}
MASKED = tuple(name for name, cls in REGISTRY.items() if cls.arch == "vit")
NO_CLASS_TOKEN = tuple(name for name, cls in REGISTRY.items() if not cls.cls_token)
MULTI_CROP = tuple(name for name, cls in REGISTRY.items() if cls.views == "multi_crop")


def get(method):
    """The method class of ``method``: a name of ``METHODS``, or pretext tasks joined by
    '+' (``"rotation+jigsaw"``: ``pretext.multi_task``, one encoder, the tasks' losses
    summed)."""
    if method in REGISTRY:
        return REGISTRY[method]
    if isinstance(method, str) and "+" in method:
        return pretext.multi_task(method)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}, or "
                     f"pretext tasks joined by '+' (rotation+jigsaw)")


def build(method, encoder, distributed=False, size=None, train_size=None):
    """The method's model around ``encoder`` (``size``: the view side; ``train_size``: the
    number of training images)."""
    return get(method).create(encoder, distributed=distributed, size=size,
                              train_size=train_size)


def views_for(method, size, scale, flip_p, n_local=4, **kw):
    """The method's augmentation at ``size`` (crop ``scale``, flip probability)."""
    return get(method).augment(size, scale, flip_p, n_local=n_local, **kw)


__all__ = ["METHODS", "EPOCHS", "MASKED", "NO_CLASS_TOKEN", "MULTI_CROP", "REGISTRY",
           "Method", "build", "get", "preset", "views_for"]
