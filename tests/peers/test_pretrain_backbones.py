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
