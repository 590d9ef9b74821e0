"""``fastssl pretrain --arch`` with the real torchvision and timm model registries: a
torchvision ResNet-18 and a timm ViT (by name, at a small image size), a few steps each
from the command line, then ``load_encoder`` gives back the trained encoder: the same
library class, the checkpoint's weights, the same features."""
import glob
import json
import os

import pytest
import torch

from ._peers import need

torchvision, timm = need("torchvision", "timm")

from fastssl import cli  # noqa: E402
from fastssl.pretrain import load_encoder  # noqa: E402
from fastssl.pretrain.models import encoder  # noqa: E402

STEPS = 3


def expected(arch, size):
    """(library class, parameter count without the classifier, feature width)."""
    if arch == "resnet18":
        m = torchvision.models.resnet18(weights=None)
        return torchvision.models.ResNet, sum(p.numel() for p in m.parameters()) - \
            m.fc.weight.numel() - m.fc.bias.numel(), 512
    m = timm.create_model(arch, pretrained=False, num_classes=0, img_size=size)
    return type(m), sum(p.numel() for p in m.parameters()), m.num_features


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("vit_tiny_patch16_224", 32)])
def test_pretrain_arch_then_load_encoder(arch, size, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "runs"
    rc = cli.main(["pretrain", "--method", "simclr", "--arch", arch, "--size", str(size),
                   "--batch-size", "8", "--max-steps", str(STEPS), "--epochs", "1",
                   "--no-eval", "--no-progress", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    (run_dir,) = glob.glob(str(out / "simclr-*"))
    report = json.load(open(os.path.join(run_dir, "report.json")))
    cls, params, dim = expected(arch, size)
    assert report["steps"] == STEPS and len(report["step_loss"]) == STEPS
    assert all(torch.isfinite(torch.tensor(report["step_loss"])))
    assert report["encoder_parameters"] == params

    enc = load_encoder(run_dir).eval()
    assert isinstance(enc.model, cls) and enc.dim == dim
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"]
    trained = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    assert trained.keys() == enc.state_dict().keys()
    assert all(torch.equal(v, trained[k]) for k, v in enc.state_dict().items())
    fresh = encoder(arch, size=size)
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.state_dict().items()
               if v.is_floating_point())
    fresh.load_state_dict(trained)
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        f = enc(x)
        assert f.shape == (3, dim) and torch.isfinite(f).all()
        assert torch.equal(f, fresh.eval()(x))


def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=0, **kw).double().eval()


@pytest.mark.parametrize("kw", [{}, {"no_embed_class": True, "reg_tokens": 2},
                                {"class_token": False, "global_pool": "avg"}])
def test_timm_vit_tokens_are_timms_own(kw):
    """``TimmViT`` on every patch is timm's ``forward_features`` exactly (prefix tokens,
    their positions and timm's conventions for them), its pooled features are timm's, and
    the kept-patch and masked encodings are the same network on fewer or replaced tokens:
    the kept tokens' positions are the table's rows of those patches."""
    from fastssl.masking import get_at_index
    from fastssl.pretrain.vit import TimmViT
    model = _timm_vit(**kw)
    enc = TimmViT(model)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_tokens(x), model.forward_features(x),
                                   rtol=0, atol=0)
        torch.testing.assert_close(enc(x), model(x), rtol=0, atol=0)
        final, layers = enc.forward_blocks(x, last=1)
        torch.testing.assert_close(model.norm(layers[0]), final, rtol=0, atol=0)
        keep = torch.stack([torch.randperm(16)[:5] for _ in range(3)])
        kept = enc.forward_tokens(x, keep)
        pre = enc.num_prefix_tokens
        patches = model.patch_embed(x) + enc._patch_positions()
        tokens = enc._with_prefix(get_at_index(patches, keep))
        ref = model.norm(model.blocks(model.norm_pre(tokens)))
        torch.testing.assert_close(kept, ref, rtol=1e-12, atol=1e-12)
        assert kept.shape == (3, pre + 5, 32)
        token = torch.randn(1, 1, 32, dtype=torch.float64)
        none = torch.zeros(3, 16, dtype=torch.bool)
        torch.testing.assert_close(enc.forward_masked(x, none, mask_token=token),
                                   model.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["mae", "ijepa", "data2vec", "ibot"])
def test_masked_methods_train_a_timm_vit(method, tmp_path):
    out = tmp_path / "runs"
    rc = cli.main(["pretrain", "--method", method, "--arch", "vit_tiny_patch16_224",
                   "--size", "64", "--batch-size", "8", "--max-steps", "2", "--epochs", "1",
                   "--no-eval", "--no-progress", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    (run_dir,) = glob.glob(str(out / f"{method}-*"))
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert len(report["step_loss"]) == 2 and all(torch.isfinite(torch.tensor(report["step_loss"])))
    enc = load_encoder(run_dir).eval()
    assert type(enc.model).__name__ == "VisionTransformer"
    assert (enc.num_prefix_tokens == 0) == (method in ("ijepa", "data2vec"))
