"""What every method shares: the ``Method`` interface the loop drives, the augmentation
presets, and two helpers (multi-crop forwards, means over the global batch)."""
import torch
from torch import nn

from fastssl import augment as A


class Method(nn.Module):
    """One SSL method. Class attributes: ``name`` (``--method``), ``epochs`` on the digits
    (about two minutes each on two CPU cores), ``arch`` (the default encoder),
    ``cls_token`` (whether its ViT has one), ``views`` (the augmentation preset, see
    ``augment``), ``digits_size`` (the view side on the 8 x 8 digits; a pretext task that
    cuts a view into tiles needs larger, upsampled views).

    ``forward(views[, extra])`` is the loss; ``sample(generator, lo, hi, rows, device,
    indices)`` draws the method's own randomness for the global batch of ``rows`` images
    (``indices``: their dataset indices) and keeps this rank's rows [lo, hi);
    ``after_step(step, total)`` updates teachers and queues after the optimiser step;
    ``before_epoch(epoch, run)`` runs before an epoch's first step (``run``: the loop's
    view of the data, see ``loop.EpochStart``) and may return the epoch's sample order;
    ``pretext(x)`` scores held-out images on the method's own task: (correct, count) or
    None."""
    name, epochs, arch, cls_token, views, digits_size = None, 100, "small", True, "byol", 16
    chance = None  # the pretext task's chance accuracy (percent), where it has one
    colour = False  # needs colour images (not the grayscale digits)

    @classmethod
    def create(cls, encoder, distributed=False, size=None, train_size=None):
        return cls(encoder, distributed=distributed)

    @classmethod
    def augment(cls, size, scale, flip_p, n_local=4, **kw):
        return preset(cls.views, size, scale, flip_p, n_local, **kw)

    def sample(self, generator, lo, hi, rows, device, indices=None):
        return None

    def after_step(self, step, total):
        pass

    def before_epoch(self, epoch, run):
        return None

    def epoch_order(self):
        """The order ``before_epoch`` returned for the current epoch (a resumed run)."""
        return None

    def pretext(self, x):
        return None

    def trainable(self):
        return [p for p in self.parameters() if p.requires_grad]


def preset(kind, size, scale, flip_p, n_local=4, **kw):
    """The augmentation preset ``kind`` at ``size`` (crop ``scale``, flip probability):
    simclr, moco, byol (SimCLR's, MoCo v2's, BYOL's two views), multi_crop (DINO's two
    global crops and ``n_local`` local crops at half the side, from crop scales below the
    global ones), global_pair (DINO's two global crops, no local ones) or plain (one crop
    and flip, no colour)."""
    kw = dict(size=size, scale=scale, flip_p=flip_p, **kw)
    if kind == "simclr":
        return A.SimCLRAugment(**kw)
    if kind == "moco":
        return A.MoCoV2Augment(**kw)
    if kind == "byol":
        return A.BYOLAugment(**kw)
    g_scale = kw.pop("scale")
    if kind == "global_pair":
        kw.pop("size")
        return A.DINOAugment(global_size=size, n_local=0, global_scale=g_scale, **kw)
    if kind == "multi_crop":
        kw.pop("size")
        return A.DINOAugment(global_size=size, local_size=max(size // 2, 4), n_local=n_local,
                             global_scale=g_scale, local_scale=(0.25, g_scale[0]), **kw)
    if kind == "plain":
        out = {k: v for k, v in kw.items() if k not in ("size", "flip_p")}
        return A.MultiView([A.Augment(A.RandomResizedCrop(size, scale=g_scale),
                                      A.RandomHorizontalFlip(flip_p), A.Normalize(), **out)],
                           "MAEAugment")
    raise ValueError(f"unknown augmentation preset {kind!r}")


def crops(net, views):
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


def global_mean(loss, count, distributed):
    """A mean over this rank's ``count`` scored rows -> its share of the mean over every
    rank's rows: ``loss * count * world / total`` (DDP then averages the gradients, and the
    loop the values, over the ranks), so the loss does not depend on how the rows fall."""
    if not (distributed and torch.distributed.is_initialized()):
        return loss
    world = torch.distributed.get_world_size()
    total = torch.tensor([float(count)], dtype=torch.float64, device=loss.device)
    torch.distributed.all_reduce(total)
    return loss * (count * world / max(float(total), 1.0))
