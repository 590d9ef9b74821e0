"""Shape inference on the meta device, over the whole public API, on both paths.

Every entry of ``TABLE`` is called twice: with real CPU tensors and with meta tensors of the
same shapes, dtypes and ``requires_grad`` (modules with state are built under
``torch.device(...)``, as deferred initialisation does). The meta call must return meta
tensors with the real call's shapes and dtypes (and the same non-tensor values), and where
the real output is differentiable, ``autograd.grad`` on the meta output must give meta
gradients shaped like the real ones. ``test_the_table_covers_the_public_api`` walks
``fastssl.__all__`` (and ``fastssl.distributed``, ``fastssl.augment``) so that a new public
loss or op cannot be left out.
"""
import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import fastssl
from fastssl import augment as A
from fastssl import distributed as dist_mod
from fastssl import functional as F

META = torch.device("meta")


class Maker:
    """Fresh random inputs for one call, made on the CPU from a fixed seed and moved to
    ``device`` as leaves (so a meta input has the real input's shape, dtype and grad flag)."""

    def __init__(self, device, seed):
        self.device = torch.device(device)
        self.g = torch.Generator().manual_seed(seed)
        self.leaves = []

    def _leaf(self, x, grad):
        x = x.to(self.device)
        if grad:
            x.requires_grad_(True)
            self.leaves.append(x)
        return x

    def randn(self, *shape, dtype=torch.float32, grad=False, unit=False):
        x = torch.randn(*shape, generator=self.g, dtype=torch.float64)
        if unit:
            x = torch.nn.functional.normalize(x, dim=-1)
        return self._leaf(x.to(dtype), grad)

    def scalar(self, value, grad=False, dtype=torch.float32):
        return self._leaf(torch.tensor(value, dtype=dtype), grad)

    def mask(self, *shape):
        return self._leaf(torch.rand(*shape, generator=self.g) < 0.5, False)

    def context(self):
        """Where a module is built: under ``torch.device(meta)`` for the meta call."""
        return self.device if self.device.type == "meta" else contextlib.nullcontext()

    def linear(self, i, o, dtype=torch.float32):
        seed = int(torch.randint(1 << 30, (1,), generator=self.g))
        with self.context():
            torch.manual_seed(seed)
            return nn.Linear(i, o, dtype=dtype)


@dataclass
class Entry:
    """``call(maker)`` returns what the public call returns (a tensor, a tuple, a dict, a
    list of a module's tensors, numbers). ``names``: the public names it covers."""
    call: Callable
    names: tuple = ()
    real_backend: str = None  # the path of the real call: the fixture's unless named


TABLE = {}


def entry(name, *covers, real_backend=None):
    def add(fn):
        TABLE[name] = Entry(fn, covers or (name,), real_backend)
        return fn
    return add


def pair(mk, n=6, D=5, dtype=torch.float32, unit=False):
    return (mk.randn(n, D, dtype=dtype, grad=True, unit=unit),
            mk.randn(n, D, dtype=dtype, grad=True, unit=unit))


# ----------------------------------------------------------------------------- contrastive

for dtype in (torch.float32, torch.bfloat16, torch.float64):
    tag = str(dtype).replace("torch.", "")
    entry(f"nt_xent[{tag}]", "nt_xent")(
        lambda mk, dtype=dtype: fastssl.nt_xent(*pair(mk, dtype=dtype), 0.3))

entry("info_nce", "info_nce")(lambda mk: fastssl.info_nce(
    *pair(mk), 0.2, negatives=mk.randn(9, 5), symmetric=True))
entry("clip_loss", "clip_loss")(lambda mk: fastssl.clip_loss(
    *pair(mk, unit=True), mk.scalar(14.0, grad=True), mk.scalar(-1.0, grad=True)))
for dtype in (torch.float32, torch.float16):
    tag = str(dtype).replace("torch.", "")
    entry(f"siglip_loss[{tag}]", "siglip_loss")(lambda mk, dtype=dtype: fastssl.siglip_loss(
        *pair(mk, dtype=dtype, unit=True), mk.scalar(10.0, grad=True),
        mk.scalar(-5.0, grad=True)))
entry("functional.normalize")(lambda mk: F.normalize(mk.randn(4, 3, grad=True)))
entry("NTXentLoss", "NTXentLoss")(lambda mk: fastssl.NTXentLoss(0.3)(*pair(mk)))


@entry("NTXentLoss(memory_bank_size)", "NTXentLoss")
def _bank(mk):
    with mk.context():
        loss_fn = fastssl.NTXentLoss(0.2, memory_bank_size=(8, 5))
    loss = loss_fn(*pair(mk))
    return loss, loss_fn.bank, loss_fn.bank_ptr


entry("InfoNCELoss", "InfoNCELoss")(lambda mk: fastssl.InfoNCELoss(0.2)(
    *pair(mk), mk.randn(7, 5)))
entry("ClipLoss", "ClipLoss")(lambda mk: fastssl.ClipLoss()(
    *pair(mk, unit=True), mk.scalar(14.0, grad=True), output_dict=True))
entry("SigLipLoss", "SigLipLoss")(lambda mk: fastssl.SigLipLoss()(
    *pair(mk, unit=True), mk.scalar(10.0, grad=True), mk.scalar(-5.0, grad=True)))


@entry("MoCoQueue", "MoCoQueue")
def _queue(mk):
    with mk.context():
        queue = fastssl.MoCoQueue(dim=5, size=7)
    loss = fastssl.InfoNCELoss(0.2)(*pair(mk), queue.negatives())
    loss.backward()  # the step, then the enqueue (the queue is read in place)
    for n in (3, 9):
        queue.enqueue(mk.randn(n, 5))
    return loss.detach(), queue.negatives(), queue.ptr, queue.filled


entry("distributed.gather", "distributed.gather")(
    lambda mk: dist_mod.gather(mk.randn(4, 5, grad=True)))

# ----------------------------------------------------------------------------- non-contrastive

for form in ("gram", "dxd"):
    entry(f"barlow_twins[{form}]", "barlow_twins")(lambda mk, form=form: fastssl.barlow_twins(
        *pair(mk, 6, 9), 5e-3, formulation=form))
entry("BarlowTwinsLoss", "BarlowTwinsLoss")(lambda mk: fastssl.BarlowTwinsLoss()(
    *pair(mk, dtype=torch.bfloat16)))
entry("vicreg[3-D]", "vicreg")(lambda mk: fastssl.vicreg(
    mk.randn(6, 2, 5, grad=True), mk.randn(6, 2, 5, grad=True)))
entry("VICRegLoss", "VICRegLoss")(lambda mk: fastssl.VICRegLoss(formulation="gram")(
    *pair(mk, 4, 9)))
entry("negative_cosine_similarity", "negative_cosine_similarity")(
    lambda mk: fastssl.negative_cosine_similarity(mk.randn(4, 3, 5, grad=True),
                                                  mk.randn(4, 3, 5), dim=2))
entry("NegativeCosineSimilarity", "NegativeCosineSimilarity")(
    lambda mk: fastssl.NegativeCosineSimilarity()(*pair(mk)))

# ----------------------------------------------------------------------------- momentum


@entry("EMA", "EMA")
def _ema(mk):
    with mk.context():
        norm = nn.BatchNorm1d(4)
    student = nn.Sequential(mk.linear(5, 4), norm)
    teacher = fastssl.EMA(student, momentum=0.99)
    m = teacher.update(step=3, max_steps=10)
    return m, list(teacher.module.parameters()), list(teacher.module.buffers())


@entry("update_momentum(tensor momentum)", "update_momentum")
def _update_momentum(mk):
    student, teacher = mk.linear(5, 4), mk.linear(5, 4, dtype=torch.float64)
    fastssl.update_momentum(student, teacher, mk.scalar(0.99))
    return list(teacher.parameters())


@entry("ema_(mixed dtypes)", "ema_")
def _ema_lists(mk):
    teacher = [mk.randn(3, 4, dtype=torch.float64), mk.randn(5, dtype=torch.bfloat16)]
    student = [mk.randn(3, 4), mk.randn(5)]
    fastssl.ema_(teacher, student, mk.scalar(0.9, dtype=torch.float64))
    fastssl.ema_(teacher, student, 0.5)
    return teacher


@entry("LARS", "LARS")
def _lars(mk):
    layer = mk.linear(5, 3)
    opt = fastssl.LARS(layer.parameters(), lr=0.1)
    for p in layer.parameters():
        p.grad = mk.randn(*p.shape)
    opt.step()
    opt.step()
    return list(layer.parameters()), [opt.state[p]["momentum_buffer"] for p in layer.parameters()]


# ----------------------------------------------------------------------------- prototype heads

def _heads(mk, S=4, T=2, B=3, K=11, D=5):
    return (mk.randn(S * B, D, grad=True, unit=True), mk.randn(T * B, D, unit=True),
            mk.randn(K, D, grad=True, unit=True), mk.randn(K, D, unit=True))


entry("prototype_cross_entropy[dino]", "prototype_cross_entropy")(
    lambda mk: fastssl.prototype_cross_entropy(*_heads(mk), center=mk.randn(11),
                                               return_center_stat=True))
entry("prototype_cross_entropy[rows]", "prototype_cross_entropy")(
    lambda mk: fastssl.prototype_cross_entropy(
        *_heads(mk, S=1, T=1, B=6), pairing="rows", weights=mk.randn(6).abs()))
entry("prototype_cross_entropy[sinkhorn]", "prototype_cross_entropy")(
    lambda mk: fastssl.prototype_cross_entropy(*_heads(mk), teacher_target="sinkhorn"))
entry("sinkhorn_knopp", "sinkhorn_knopp")(
    lambda mk: fastssl.sinkhorn_knopp(mk.randn(7, 5, unit=True), mk.randn(11, 5, unit=True)))
entry("sinkhorn", "sinkhorn")(lambda mk: fastssl.sinkhorn(mk.randn(6, 9).exp()))
entry("koleo", "koleo")(lambda mk: fastssl.koleo(mk.randn(7, 5, grad=True)))
entry("KoLeoLoss", "KoLeoLoss")(lambda mk: fastssl.KoLeoLoss()(mk.randn(7, 5, grad=True)))


@entry("PrototypeCrossEntropy", "PrototypeCrossEntropy")
def _proto_module(mk):
    with mk.context():
        loss_fn = fastssl.PrototypeCrossEntropy(output_dim=11)
    s, t, W, V = _heads(mk)
    return loss_fn(s, t, W, V, epoch=2), list(loss_fn.buffers())


@entry("DINOLoss", "DINOLoss")
def _dino(mk):
    with mk.context():
        loss_fn = fastssl.DINOLoss(output_dim=9)
    teacher = [mk.randn(3, 9) for _ in range(2)]
    student = [mk.randn(3, 9, grad=True) for _ in range(4)]
    return loss_fn(teacher, student, epoch=1), list(loss_fn.buffers())


@entry("IBOTPatchLoss", "IBOTPatchLoss")
def _ibot(mk):
    with mk.context():
        loss_fn = fastssl.IBOTPatchLoss(output_dim=9)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask.view(-1)[torch.randperm(18, generator=mk.g)[:7]] = True  # 7 masked tokens
    mask = mask.to(mk.device)
    return loss_fn(mk.randn(7, 9), mk.randn(7, 9, grad=True), mask), list(loss_fn.buffers())


@entry("SwaVLoss", "SwaVLoss")
def _swav(mk):
    high = [mk.randn(4, 9, grad=True) for _ in range(2)]
    low = [mk.randn(4, 9, grad=True)]
    queue = [mk.randn(6, 9) for _ in range(2)]
    return fastssl.SwaVLoss()(high, low, queue)


# ----------------------------------------------------------------------------- augmentation
# uint8 batches (N, C, H, W) and lists of images of different sizes; a float batch is read
# once on the host for its [0, 1] range check, which a meta batch cannot answer.

def _images(mk, n=2, h=9, w=7):
    return mk._leaf(torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=mk.g),
                    False)


def _aug(mk, build, images=None):
    with mk.context():
        op = build()
    return op(_images(mk) if images is None else images)


AUGMENT_CALLS = {
    "SimCLRAugment": lambda: A.SimCLRAugment(size=5),
    "BYOLAugment": lambda: A.BYOLAugment(size=5, dtype=torch.bfloat16),
    "MoCoV2Augment": lambda: A.MoCoV2Augment(size=5),
    "BarlowTwinsAugment": lambda: A.BarlowTwinsAugment(size=5),
    "VICRegAugment": lambda: A.VICRegAugment(size=5),
    "Augment": lambda: A.Augment(A.RandomResizedCrop((5, 4)), A.RandomHorizontalFlip(),
                                 A.ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0),
                                 A.RandomGrayscale(0.5), A.GaussianBlur(5, p=1.0),
                                 A.RandomSolarize(0.5, p=1.0), A.Normalize()),
    "MultiView": lambda: A.MultiView([A.Augment(A.RandomResizedCrop(5)),
                                      A.Augment(A.RandomResizedCrop(4), A.ColorJitter(p=1.0))]),
    "ColorJitter": lambda: A.ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0),
    "GaussianBlur": lambda: A.GaussianBlur(5, p=1.0),
    "Normalize": lambda: A.Normalize(),
    "RandomGrayscale": lambda: A.RandomGrayscale(0.5),
    "RandomHorizontalFlip": lambda: A.RandomHorizontalFlip(),
    "RandomResizedCrop": lambda: A.RandomResizedCrop(5),
    "RandomSolarize": lambda: A.RandomSolarize(0.5, p=1.0),
}
# The real call of an augmentation takes the portable path on both backends: the shapes are
# the same on both (tests/test_augment*.py compare the two paths' values), and the
# interpreter takes seconds per preset. The meta call runs under each backend.
for _name, _build in AUGMENT_CALLS.items():
    entry(f"augment.{_name}", f"augment.{_name}", real_backend="torch")(
        lambda mk, build=_build: _aug(mk, build))
entry("augment.DINOAugment[list]", "augment.DINOAugment", real_backend="torch")(lambda mk: _aug(
    mk, lambda: A.DINOAugment(global_size=6, local_size=3, n_local=2),
    [_images(mk, 1, 9, 7)[0], _images(mk, 1, 8, 11)[0]]))

# ----------------------------------------------------------------------------- masking

entry("masking.masked_patch_loss", "masking.masked_patch_loss")(
    lambda mk: fastssl.masking.masked_patch_loss(mk.randn(2, 6, 48, grad=True),
                                                 _images(mk, 2, 8, 12), mk.mask(2, 6), 4))
entry("masking.masked_patch_loss[l1, packed]", "masking.masked_patch_loss")(
    lambda mk: fastssl.masking.masked_patch_loss(mk.randn(12, 48, grad=True),
                                                 mk.randn(2, 3, 8, 12), mk.scalar(1.0).expand(2, 6),
                                                 4, norm_pix=False, loss="l1"))
entry("masking.masked_latent_loss[ijepa]", "masking.masked_latent_loss")(
    lambda mk: fastssl.masking.masked_latent_loss(
        mk.randn(2, 4, 6, grad=True), mk.randn(2, 7, 6),
        mk._leaf(torch.tensor([[0, 2, 2, 6], [1, 3, 4, 5]]), False)))
entry("masking.masked_latent_loss[data2vec, list]", "masking.masked_latent_loss")(
    lambda mk: fastssl.masking.masked_latent_loss(
        mk.randn(2, 7, 6, grad=True), [mk.randn(2, 7, 6, dtype=torch.bfloat16) for _ in range(3)],
        mk.mask(2, 7), instance_norm=True, dim_scale=6 ** 0.5))
entry("masking.masked_latent_loss[mse, packed]", "masking.masked_latent_loss")(
    lambda mk: fastssl.masking.masked_latent_loss(
        mk.randn(3, 6, dtype=torch.bfloat16, grad=True), mk.randn(2, 2, 4, 6),
        mk._leaf(torch.tensor([[True, False, False, True], [False, True, False, False]]),
                 False), loss="mse", layer_norm=False))
entry("masking.get_at_index", "masking.get_at_index")(
    lambda mk: fastssl.masking.get_at_index(mk.randn(3, 7, 5, grad=True),
                                            mk._leaf(torch.tensor([[0, 2], [1, 6], [3, 4]]),
                                                     False)))
entry("masking.set_at_index", "masking.set_at_index")(
    lambda mk: fastssl.masking.set_at_index(mk.randn(3, 7, 5, grad=True),
                                            mk._leaf(torch.tensor([[0, 2], [1, 6], [3, 4]]),
                                                     False), mk.randn(3, 2, 5, grad=True)))
entry("masking.unshuffle", "masking.unshuffle")(
    lambda mk: fastssl.masking.unshuffle(
        mk.randn(2, 1 + 2, 5, grad=True),
        mk._leaf(torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]]), False),
        mask_token=mk.randn(1, 1, 5, grad=True), num_prefix_tokens=1))

# The mask generators take sizes and a device (the meta call: device="meta"), no generator
# (a CPU generator cannot draw on another device).
entry("masking.random_token_mask", "masking.random_token_mask")(
    lambda mk: fastssl.masking.random_token_mask((3, 17), 0.6, device=mk.device))
entry("masking.random_masking", "masking.random_masking")(
    lambda mk: fastssl.masking.random_masking((3, 16), 0.75, device=mk.device))
entry("masking.random_masking[tokens]", "masking.random_masking")(
    lambda mk: fastssl.masking.random_masking(mk.randn(3, 16, 5, grad=True), 0.75))
entry("masking.mae_random_masking", "masking.mae_random_masking")(
    lambda mk: fastssl.masking.mae_random_masking(mk.randn(2, 16, 5, grad=True), 0.75))
entry("masking.block_mask", "masking.block_mask")(
    lambda mk: fastssl.masking.block_mask(3, (6, 7), device=mk.device))
entry("masking.simmim_mask", "masking.simmim_mask")(
    lambda mk: fastssl.masking.simmim_mask(3, 32, 8, 4, 0.6, device=mk.device))

# Public callables of fastssl.augment with no entry yet (to end up empty).
AUGMENT_NOT_YET = []

# ----------------------------------------------------------------------------- CPC

entry("cpc_loss", "cpc_loss")(lambda mk: fastssl.cpc_loss(
    mk.randn(2, 5, 3, grad=True), mk.randn(2, 5, 4, grad=True), mk.randn(2, 4, 3, grad=True)))
@entry("CPCLoss", "CPCLoss")
def _cpc_module(mk):
    with mk.context():  # the predictors on the meta device for the meta call
        torch.manual_seed(3)
        crit = fastssl.CPCLoss(3, 4, steps=2)
    return crit(mk.randn(2, 3, 4, 3, grad=True), mk.randn(2, 3, 4, 4, grad=True))

# ----------------------------------------------------------------------------- clustering

entry("clustering.assign", "clustering.assign")(
    lambda mk: fastssl.clustering.assign(mk.randn(9, 4), mk.randn(3, 4)))
entry("clustering.kmeans", "clustering.kmeans")(
    lambda mk: tuple(fastssl.clustering.kmeans(mk.randn(12, 4), 3, 2, init=mk.randn(3, 4))))
entry("clustering.pca_whiten", "clustering.pca_whiten")(
    lambda mk: fastssl.clustering.pca_whiten(mk.randn(10, 6, dtype=torch.float64), 3))

# ----------------------------------------------------------------------------- multi-positive

entry("supcon_loss", "supcon_loss", "SupConLoss")(lambda mk: fastssl.SupConLoss(0.1)(
    mk.randn(5, 2, 4, grad=True, unit=True), mk.randn(5).abs().mul(2).long()))
entry("supcon_loss(one)", "supcon_loss")(lambda mk: fastssl.supcon_loss(
    mk.randn(5, 3, 4, grad=True), contrast_mode="one"))
entry("simclr_loss_func", "simclr_loss_func")(lambda mk: fastssl.simclr_loss_func(
    mk.randn(6, 4, grad=True), torch.arange(6, device=mk.device) % 3, 0.2))
entry("dcl_loss", "dcl_loss", "DCLLoss")(lambda mk: fastssl.DCLLoss(0.2)(*pair(mk)))
entry("DCLWLoss", "DCLWLoss")(lambda mk: fastssl.DCLWLoss(0.2, 0.5)(*pair(mk)))

# ----------------------------------------------------------------------------- lightly's others

entry("HypersphereLoss", "HypersphereLoss")(lambda mk: fastssl.HypersphereLoss()(*pair(mk)))
entry("DirectCLRLoss", "DirectCLRLoss")(lambda mk: fastssl.DirectCLRLoss(loss_dim=3)(*pair(mk)))
entry("SymNegCosineSimilarityLoss", "SymNegCosineSimilarityLoss", "SymNegCosineSimilarity")(
    lambda mk: fastssl.SymNegCosineSimilarityLoss()(pair(mk), pair(mk)))


entry("MMCRLoss", "MMCRLoss")(lambda mk: fastssl.MMCRLoss()(
    mk.randn(4, 2, 5, grad=True), mk.randn(4, 2, 5, grad=True)))
entry("EMPSSLLoss", "EMPSSLLoss")(lambda mk: fastssl.EMPSSLLoss()(
    [mk.randn(4, 5, grad=True) for _ in range(3)]))
entry("FroSSLLoss", "FroSSLLoss")(lambda mk: fastssl.FroSSLLoss()(
    [mk.randn(6, 5, grad=True) for _ in range(2)]))
entry("SIGReg", "SIGReg")(lambda mk: fastssl.SIGReg(num_vectors=8)(mk.randn(2, 6, 5, grad=True)))
entry("LeJEPALoss", "LeJEPALoss")(lambda mk: fastssl.LeJEPALoss(sigreg_num_vectors=8)(
    local_proj=mk.randn(3, 6, 5, grad=True), global_proj=mk.randn(2, 6, 5, grad=True)))
entry("LeWMLoss", "LeWMLoss")(lambda mk: fastssl.LeWMLoss(sigreg_num_vectors=8)(
    predicted=mk.randn(6, 3, 5, grad=True), target=mk.randn(6, 3, 5),
    embeddings=mk.randn(6, 4, 5, grad=True)))
entry("VISRegLoss", "VISRegLoss")(lambda mk: tuple(fastssl.VISRegLoss(num_slices=9)
                                                   .forward_components(
    local_proj=mk.randn(3, 6, 5, grad=True), global_proj=mk.randn(2, 6, 5, grad=True))))


entry("MSNLoss", "MSNLoss")(lambda mk: fastssl.MSNLoss()(
    mk.randn(6, 5, grad=True), mk.randn(3, 5), mk.randn(4, 5, grad=True)))
entry("PMSNLoss", "PMSNLoss")(lambda mk: fastssl.PMSNLoss()(
    mk.randn(6, 5, grad=True), mk.randn(3, 5), mk.randn(4, 5, grad=True)))
entry("PMSNCustomLoss", "PMSNCustomLoss")(lambda mk: fastssl.PMSNCustomLoss(
    lambda p: torch.full_like(p, 1.0 / p.shape[0]))(
    mk.randn(6, 5, grad=True), mk.randn(3, 5), mk.randn(4, 5, grad=True)))


def _vicregl_views(mk, n, hw, dtype=torch.float32):
    return ([(mk.randn(4, 6, dtype=dtype, grad=True), mk.randn(4, *hw, 3, dtype=dtype, grad=True))
             for _ in range(n)], [mk.randn(4, *hw, 2) for _ in range(n)])


@entry("VICRegLLoss", "VICRegLLoss")
def _vicregl(mk):
    gvf, gvg = _vicregl_views(mk, 2, (3, 3))
    lvf, lvg = _vicregl_views(mk, 2, (2, 2))
    return fastssl.VICRegLLoss(num_matches=(5, 2))(gvf, gvg, lvf, lvg)


entry("PatchKernelAlignmentLoss", "PatchKernelAlignmentLoss")(
    lambda mk: fastssl.PatchKernelAlignmentLoss()(
        mk.randn(3, 8, 5, grad=True), mk.randn(3, 8, 5, grad=True), mk.mask(3, 8)))
entry("PatchKernelAlignmentLoss(max_tokens)[bfloat16]", "PatchKernelAlignmentLoss")(
    lambda mk: fastssl.PatchKernelAlignmentLoss(max_tokens=4)(
        mk.randn(2, 9, 3, dtype=torch.bfloat16, grad=True),
        mk.randn(2, 9, 3, dtype=torch.bfloat16)))
entry("roi_resample_to_grid", "roi_resample_to_grid")(
    lambda mk: fastssl.roi_resample_to_grid(
        mk.randn(2, 3, 6, 5, grad=True),
        mk._leaf(torch.tensor([[0.5, 1.0, 4.0, 5.5], [0.0, 0.0, 5.0, 6.0]]), False), 3, 2))


# ----------------------------------------------------------------------------- DetCon, MACL

def _mask_ids(mk, b=3, m=4):
    return mk._leaf(torch.randint(0, 3, (b, m), generator=mk.g), False)


entry("detcon_loss", "detcon_loss", "DetConBLoss")(lambda mk: fastssl.DetConBLoss(0.2)(
    *[mk.randn(3, 4, 5, grad=True) for _ in range(4)], _mask_ids(mk), _mask_ids(mk)))
entry("DetConSLoss", "DetConSLoss")(lambda mk: fastssl.DetConSLoss(0.2)(
    mk.randn(3, 4, 5, grad=True), mk.randn(3, 4, 5, grad=True), _mask_ids(mk), _mask_ids(mk)))
entry("macl_loss", "macl_loss", "MACLLoss")(lambda mk: fastssl.MACLLoss()(*pair(mk)))
entry("macl_loss[bfloat16]", "macl_loss")(lambda mk: fastssl.macl_loss(
    *pair(mk, dtype=torch.bfloat16), 0.2, 0.5, 0.1))


@entry("IBOTPlusPlusPatchLoss", "IBOTPlusPlusPatchLoss")
def _ibotpp(mk):
    with mk.context():
        loss_fn = fastssl.IBOTPlusPlusPatchLoss(output_dim=9)
    loss = loss_fn(mk.randn(2, 5, 9), mk.randn(2, 5, 9, grad=True), mk.mask(2, 5),
                   visible_loss_weight=0.5)
    return loss, list(loss_fn.buffers())


entry("CAPILoss", "CAPILoss")(lambda mk: fastssl.CAPILoss()(
    mk.randn(3, 6, 9), mk.randn(3, 4, 9, grad=True),
    mk._leaf(torch.randint(0, 6, (3, 4), generator=mk.g), False)))
entry("positionwise_sinkhorn_knopp", "positionwise_sinkhorn_knopp")(
    lambda mk: fastssl.positionwise_sinkhorn_knopp(mk.randn(3, 4, 9)))

# ----------------------------------------------------------------------------- solo-learn's

entry("mocov3_loss_func", "mocov3_loss_func")(lambda mk: fastssl.mocov3_loss_func(
    mk.randn(6, 5, grad=True), mk.randn(6, 5), 0.2))
entry("nnclr_loss_func", "nnclr_loss_func")(lambda mk: fastssl.nnclr_loss_func(*pair(mk), 0.1))
entry("ressl_loss_func", "ressl_loss_func")(lambda mk: fastssl.ressl_loss_func(
    mk.randn(6, 5, grad=True, unit=True), mk.randn(6, 5, unit=True),
    mk.randn(9, 5, grad=True, unit=True)))
entry("byol_loss_func", "byol_loss_func")(lambda mk: fastssl.byol_loss_func(*pair(mk)))
entry("simsiam_loss_func", "simsiam_loss_func")(lambda mk: fastssl.simsiam_loss_func(
    mk.randn(4, 3, 5, grad=True), mk.randn(4, 3, 5), simplified=False))

@entry("WMSELoss", "WMSELoss", "Whitening2d")
def _wmse(mk):
    with mk.context():
        loss_fn = fastssl.WMSELoss(embedding_dim=3, w_size=8)
    return loss_fn(mk.randn(16, 3, grad=True)), list(loss_fn.buffers())


@entry("TiCoLoss", "TiCoLoss")
def _tico(mk):
    with mk.context():
        loss_fn = fastssl.TiCoLoss()
    loss = loss_fn(*pair(mk))
    return loss, list(loss_fn.buffers())


@entry("CO2Regularizer", "CO2Regularizer")
def _co2(mk):
    with mk.context():
        reg = fastssl.CO2Regularizer(memory_bank_size=(7, 5))
    return reg(*pair(mk)), list(reg.buffers())


@entry("MemoryBankModule", "MemoryBankModule")
def _memory_bank(mk):
    with mk.context():
        bank = fastssl.MemoryBankModule((7, 5), feature_dim_first=False)
    out, before = bank(mk.randn(3, 5, grad=True), update=True)
    return out, before, list(bank.buffers())


@entry("NNMemoryBankModule", "NNMemoryBankModule")
def _nn_bank(mk):
    with mk.context():
        bank = fastssl.NNMemoryBankModule((7, 5))
    return bank(mk.randn(3, 5), update=True), list(bank.buffers())

# Public names with no shape to infer, and why.
NOT_TENSOR_OPS = {
    "DSERegularizer": "k-means with a data-dependent number of iterations and clusters per "
                      "image: its shapes depend on the values (tests/test_similarity_losses.py)",
    "cosine_schedule": "takes and returns Python numbers",
    "ShapeError": "an exception class",
    "__version__": "a string",
    "distributed.is_distributed": "reports the process group, no tensors",
    "distributed.world_size": "reports the process group, no tensors",
    "distributed.rank": "reports the process group, no tensors",
    "distributed.require_distributed": "a check on the torch build, no tensors",
    "distributed.agree": "checks the arguments on every rank; a no-op outside a process group "
                         "(covered through every loss's call above)",
    "distributed.Agreement": "the record ``agree`` returns",
    "masking.multiblock_masks": "its shapes (the drawn block sizes, the batch's smallest "
                                "context) depend on drawn values: on meta it raises ValueError "
                                "(test_multiblock_masks_on_meta_say_why)",
}


# ----------------------------------------------------------------------------- the sweep

def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flatten(item)]
    return [out]


def _describe(item):
    if isinstance(item, torch.Tensor):
        return ("tensor", tuple(item.shape), item.dtype, item.requires_grad)
    return ("value", item)


def _run(name, device):
    mk = Maker(device, seed=sum(map(ord, name)))
    return _flatten(TABLE[name].call(mk)), mk.leaves


def _grads(outputs, leaves):
    """d (sum of the differentiable outputs) / d leaves, or None when nothing is differentiable."""
    diff = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not diff or not leaves:
        return None
    total = sum(t.float().sum() for t in diff)
    return torch.autograd.grad(total, leaves, allow_unused=True)


@pytest.mark.parametrize("name", list(TABLE))
def test_meta_call_gives_the_real_call_shapes(backend, name, monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", TABLE[name].real_backend or backend)
    real, real_leaves = _run(name, "cpu")
    monkeypatch.setenv("FASTSSL_BACKEND", backend)
    meta, meta_leaves = _run(name, META)
    assert [_describe(t) for t in meta] == [_describe(t) for t in real]
    for t in meta:
        if isinstance(t, torch.Tensor):
            assert t.device == META, f"{name}: a {t.device} output from meta inputs"
    real_g, meta_g = _grads(real, real_leaves), _grads(meta, meta_leaves)
    assert (real_g is None) == (meta_g is None)
    for r, m in zip(real_g or (), meta_g or ()):
        assert (r is None) == (m is None)
        if r is not None:
            assert m.device == META and (m.shape, m.dtype) == (r.shape, r.dtype)
            assert torch.isfinite(r).all()  # the real call's gradient is a real one


def _public(module, prefix=""):
    """(name, object) of ``module``'s public callables defined in fastssl."""
    for name, obj in vars(module).items():
        if name.startswith("_") or not callable(obj) or inspect.ismodule(obj):
            continue
        if getattr(obj, "__module__", "") == module.__name__:
            yield prefix + name, obj


def test_the_table_covers_the_public_api():
    covered = {n for e in TABLE.values() for n in e.names}
    names = [n for n in fastssl.__all__ if not inspect.ismodule(getattr(fastssl, n))]
    names += [n for n, _ in _public(dist_mod, "distributed.")]
    missing = [n for n in names if n not in covered and n not in NOT_TENSOR_OPS]
    assert not missing, f"public names with no meta entry in tests/test_meta.py: {missing}"
    augment = [n for n, obj in _public(A) if (inspect.isclass(obj) and issubclass(obj, nn.Module))
               or n.endswith("Augment")]
    missing = [n for n in augment if f"augment.{n}" not in covered and n not in AUGMENT_NOT_YET]
    assert not missing, f"augmentation modules with no meta entry: {missing}"
    stale = [n for n in AUGMENT_NOT_YET if f"augment.{n}" in covered or n not in augment]
    assert not stale, f"AUGMENT_NOT_YET names that have an entry or are gone: {stale}"
    for n, obj in _public(fastssl.clustering):
        if not inspect.isclass(obj):
            assert f"clustering.{n}" in covered, f"clustering.{n} has no meta entry"
    masking = [n for n, _ in _public(fastssl.masking)]
    missing = [n for n in masking if f"masking.{n}" not in covered | set(NOT_TENSOR_OPS)]
    assert not missing, f"masking entry points with no meta entry: {missing}"
    assert all(n in fastssl.__all__ or n.startswith(("distributed.", "functional.", "augment.",
                                                     "masking.", "clustering."))
               for n in covered)


def test_shape_only_is_the_one_rule():
    """The dispatch point's predicate: meta and tracer tensors infer shapes, plain and
    Parameter tensors on a real device run."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fastssl import _dispatch
    real = torch.randn(2)
    assert not _dispatch.shape_only((real, nn.Parameter(real), None, 3, True))
    assert _dispatch.shape_only((real, torch.empty(2, device=META)))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
    assert _dispatch.shape_only((fake,))
    assert _dispatch.backend(torch.empty(2, device=META)) == "torch"


def test_multiblock_masks_on_meta_say_why():
    with pytest.raises(ValueError, match="depend on the drawn values"):
        fastssl.masking.multiblock_masks(2, (14, 14), device=META)
    with pytest.raises(ValueError, match="number of blocks depends"):
        fastssl.masking.block_mask(2, (6, 6), device=META, return_params=True)
