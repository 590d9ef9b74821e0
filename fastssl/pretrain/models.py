"""Encoders (the small ResNet, fastssl's ViT, torchvision and timm models by name),
projection MLPs, and BatchNorm synchronised across ranks."""
import torch
import torch.nn.functional as tF
from torch import nn

from fastssl import distributed


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = tF.relu(self.bn1(self.conv1(x)))
        return tF.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style encoder: a 3x3 stem and three basic blocks of widths w, 2w, 4w (the
    last two stride 2), global average pooling. w = 32: 307k parameters, 128-d features."""

    def __init__(self, width=32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2),
                                    BasicBlock(2 * w, 4 * w, 2))
        self.dim = 4 * w

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


class Backbone(nn.Module):
    """A library model with its classifier removed; ``dim`` is its feature width."""

    def __init__(self, model, dim):
        super().__init__()
        self.model, self.dim = model, int(dim)

    def forward(self, x):
        return self.model(x)


def _strip_classifier(model):
    """Replace the last Linear classifier (``fc``, ``head``, ``heads``, ``classifier``) by an
    identity; its input width is the feature width."""
    for name in ("fc", "head", "heads", "classifier"):
        layer = getattr(model, name, None)
        if layer is None:
            continue
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)] \
            if isinstance(layer, nn.Module) else []
        if linears:
            setattr(model, name, nn.Identity())
            return linears[-1].in_features
    raise ValueError(f"cannot find the classifier of {type(model).__name__} to remove")


def vit_patch(size):
    """The ViT patch side for views of side ``size``: 4 px below 64 (the digits' 16-px views
    are a 4 x 4 grid), else 16 px (MAE's)."""
    return 4 if size < 64 else 16


def _timm(timm, arch, size, cls_token):
    """A timm model by name without its classifier; a ``VisionTransformer`` comes as
    ``vit.TimmViT`` (the masked methods' token interface), built without a class token and
    with mean pooling when ``cls_token`` is False."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # a timm without its ViT module
        VisionTransformer = ()
    kw = {} if cls_token else {"class_token": False, "global_pool": "avg"}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=size, **kw)
    except TypeError:  # models without an image size argument
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    if isinstance(model, VisionTransformer):
        from fastssl.pretrain.vit import TimmViT
        return TimmViT(model)
    return Backbone(model, model.num_features)


def encoder(arch, width=32, size=None, cls_token=True):
    """``"small"`` (SmallResNet(width)), ``"vit"`` (fastssl's ViT: 4 * width channels, 6
    blocks of 4 heads, patches of ``vit_patch(size)``, a class token unless ``cls_token``
    is False: then its features are the mean patch token; timm ViTs likewise), a torchvision model
    name (resnet18, resnet50, vit_b_16, ...) or a timm model name (vit_small_patch16_224,
    ...), randomly initialised."""
    if arch == "small":
        return SmallResNet(width)
    if arch == "vit":
        from fastssl.pretrain.vit import ViT
        size = size or 32
        if size % vit_patch(size):
            raise ValueError(f"--arch vit needs a view side divisible by its patch "
                             f"({vit_patch(size)} px), got --size {size}")
        # no mask token: methods that do not use one would leave it without a gradient,
        # which DistributedDataParallel refuses
        return ViT(img_size=size, patch_size=vit_patch(size), dim=4 * width, depth=6, heads=4,
                   cls_token=cls_token, mask_token=False)
    found = []
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None and arch in torchvision.models.list_models():
        kw = {"image_size": size} if arch.startswith("vit_") and size else {}
        model = torchvision.models.get_model(arch, weights=None, **kw)
        return Backbone(model, _strip_classifier(model))
    found.append("torchvision" if torchvision is not None else "torchvision (not installed)")
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and arch in timm.list_models():
        return _timm(timm, arch, size, cls_token)
    found.append("timm" if timm is not None else "timm (not installed)")
    raise ValueError(f"unknown --arch {arch!r}: not 'small' and not a model of "
                     f"{' or '.join(found)}")


def mlp(dims, last_bn=False):
    """Linear-BN-ReLU layers, a plain Linear last (followed by an affine-free BN if asked)."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU()]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- BatchNorm

class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of a process group on any device (torch's
    SyncBatchNorm runs on accelerators only): the mean and then the variance summed over
    the ranks with differentiable all_reduces. Outside training or a group it is BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        if not (self.training and distributed.is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() // x.shape[1]], dtype=x.dtype)
        total = distributed._all_reduce_sum(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = distributed._all_reduce_sum(centred.pow(2).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), m)
        return y


def sync_batchnorm(model, device):
    """Every BatchNorm of ``model`` computed over the global batch: torch's SyncBatchNorm on
    CUDA, ``GlobalBatchNorm`` elsewhere (e.g. CPU with gloo). Same parameters and buffers."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and \
                not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats, device=device)
            new.load_state_dict(child.state_dict())
            for a, b in zip(new.parameters(), child.parameters()):
                a.requires_grad_(b.requires_grad)
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model

