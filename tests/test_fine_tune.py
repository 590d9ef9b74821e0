"""End-to-end fine-tuning in ``fastssl pretrain``'s evaluation: the caller's encoder is left
alone, a seed repeats a run, fine-tuning learns what a frozen random encoder hides, the
ViT layer-wise learning rates, and the report / table / CLI switches."""
import functools
import importlib
import json

import pytest
import torch
from torch import nn

from fastssl import cli
from fastssl import pretrain as P
from fastssl.pretrain import evaluation as E
from fastssl.pretrain.data import ImageArray, load_digits, split
from fastssl.pretrain.models import SmallResNet
from fastssl.pretrain.vit import ViT

R = importlib.import_module("fastssl.pretrain.report")  # (the package's ``report`` is the function)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two (no synchronisation per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Bottleneck(nn.Module):
    """Flattened pixels -> a random 2-d projection -> ``dim`` features: at random
    initialisation the features keep 2 of the 3 * side^2 pixel directions."""

    def __init__(self, side, width=2, dim=8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, width),
                                 nn.Linear(width, dim))
        self.dim = dim

    def forward(self, x):
        return self.net(x)


def _colours(n, side=4, seed=0):
    """Noisy images (uniform 0..199 per pixel) whose label is the brighter of the red and
    green channels (+40 on every pixel of one): one direction in pixel space."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 200, (n, 3, side, side), generator=g)
    x[:, 0] += 40 * y[:, None, None]
    x[:, 1] += 40 * (1 - y)[:, None, None]
    return ImageArray(x.to(torch.uint8), y, ["green", "red"], "colours")


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    train, test = split(ds.labels, 0.25, seed=0)
    return ds, train, test[:120]


def _tiny_resnet():
    torch.manual_seed(0)
    return SmallResNet(width=4).eval()


def test_the_callers_encoder_is_unchanged(digits):
    ds, train, test = digits
    enc = _tiny_resnet()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.no_grad():  # the caller's context: fine-tuning enables gradients itself
        acc = E.fine_tune_accuracy(enc, ds, train[:64], test, 16, CPU, steps=3, batch=16)
    assert 0 <= acc <= 100
    assert not enc.training
    after = enc.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers too
    assert all(p.grad is None for p in enc.parameters())


def test_the_thread_count_is_restored(digits):
    ds, train, test = digits
    torch.set_num_threads(2)
    E.fine_tune_accuracy(_tiny_resnet(), ds, train[:16], test[:8], 16, CPU, steps=1,
                         threads=1)
    assert torch.get_num_threads() == 2


def test_a_seed_repeats_a_fine_tune(digits):
    ds, train, test = digits
    enc = _tiny_resnet()
    run = functools.partial(E.fine_tune_accuracy, enc, ds, train[:80], test, 16, CPU,
                            steps=4, batch=16)
    assert run(seed=3) == run(seed=3)


def test_one_label_per_class_with_batchnorm(digits):
    ds, train, test = digits
    pick = train[E.few_shot_draw(ds.labels[train], 1, 0)]
    assert len(pick) == 10
    acc = E.fine_tune_accuracy(_tiny_resnet(), ds, pick, test, 16, CPU, steps=3, batch=64)
    assert 0 <= acc <= 100


def test_fine_tuning_learns_what_the_random_encoder_hides():
    ds = _colours(400)
    train, test = torch.arange(200), torch.arange(200, 400)
    torch.manual_seed(0)
    enc = Bottleneck(4).eval()
    f = E.features(enc, ds, torch.arange(400), 4, CPU)
    frozen = E.linear_probe_accuracy(f[:200], ds.labels[train], f[200:], ds.labels[test])
    tuned = E.fine_tune_accuracy(enc, ds, train, test, 4, CPU, steps=50, batch=32, lr=1e-2)
    # measured: 69.0% frozen, 97.5% fine-tuned
    assert tuned >= frozen + 20, (frozen, tuned)
    assert tuned >= 90


def test_layer_decay_assigns_the_documented_learning_rates():
    vit = ViT(img_size=8, patch_size=4, dim=16, depth=3, heads=2)
    head = nn.Linear(16, 5)
    groups = E.fine_tune_param_groups(vit, head, lr=2.0, weight_decay=0.1, layer_decay=0.5)
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = [("vit." + n, p) for n, p in vit.named_parameters()] + \
        [("head." + n, p) for n, p in head.named_parameters()]
    assert len(rate) == len(named)
    for name, p in named:
        if name.startswith("vit.blocks."):
            i = int(name.split(".")[2])
            expected = 2.0 * 0.5 ** (3 - i)
        elif name.startswith(("vit.patch_embed.", "vit.cls_token", "vit.mask_token")):
            expected = 2.0 * 0.5 ** 4
        else:  # the final LayerNorm and the head
            expected = 2.0
        assert rate[id(p)] == (pytest.approx(expected), 0.1 if p.dim() >= 2 else 0.0), name
    plain = E.fine_tune_param_groups(vit, head, lr=2.0, weight_decay=0.1)
    assert {g["lr"] for g in plain} == {2.0}


def test_layer_decay_fine_tunes_a_vit():
    ds = _colours(64, side=8)
    torch.manual_seed(0)
    vit = ViT(img_size=8, patch_size=4, dim=16, depth=2, heads=2, mask_token=False).eval()
    acc = E.fine_tune_accuracy(vit, ds, torch.arange(32), torch.arange(32, 64), 8, CPU,
                               steps=3, batch=8, layer_decay=0.75)
    assert 0 <= acc <= 100


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(batch=0), "batch must be an integer >= 1"),
    (dict(steps=2.5), "steps must be an integer >= 1"),
    (dict(lr=0.0), "lr must be a positive finite number"),
    (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (dict(layer_decay=0.5), "layer_decay needs fastssl's ViT"),
    (dict(train_idx=torch.tensor([0])), "at least 2 labelled images"),
    (dict(threads=0), "threads must be None or an integer >= 1"),
])
def test_bad_arguments(kw, match):
    ds = _colours(16)
    args = dict(encoder=Bottleneck(4), dataset=ds, train_idx=torch.arange(8),
                test_idx=torch.arange(8, 16), size=4, device=CPU)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        E.fine_tune_accuracy(**args)
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        E.fine_tune_param_groups(ViT(img_size=8, patch_size=4, dim=16, depth=1, heads=2),
                                 nn.Linear(16, 2), 1.0, 0.0, layer_decay=1.5)
    with pytest.raises(ValueError, match="fine-tune draws must be an integer >= 1"):
        E.fine_tune(Bottleneck(4), ds, torch.arange(8), torch.arange(8, 16), 4, CPU, draws=0)


TINY = dict(device="cpu", epochs=1, max_steps=2, batch_size=64, width=4, progress=False)


@pytest.fixture
def short_fine_tunes(monkeypatch):
    """The report's fine-tunes cut to 3 steps of 16 images (the plumbing, not the quality)."""
    monkeypatch.setattr(R, "fine_tune_scores",
                        functools.partial(E.fine_tune, steps=3, batch=16))


def test_the_report_holds_the_fine_tune_table(tmp_path, short_fine_tunes):
    lines = []
    report = P.pretrain("simclr", out_dir=str(tmp_path), log=lines.append,
                        low_shot_draws=1, fine_tune_draws=2, **TINY)
    with open(f"{report['run_dir']}/report.json") as f:
        saved = json.load(f)
    for name in ("simclr", "random init"):
        ft = saved["accuracy"][name]["fine_tune"]
        for key in ("1", "5", "10"):
            mean, std = ft[key]
            assert len(ft["accuracies"][key]) == 2 and 0 <= mean <= 100 and std >= 0
            assert mean == pytest.approx(sum(ft["accuracies"][key]) / 2)
        assert ft["all"][1] == 0.0 and ft["accuracies"]["all"] == [ft["all"][0]]
        assert f"{name}: fine-tuning (1/5/10 labels per class, all labels)" in lines
    assert "fine_tune" not in saved["accuracy"]["raw pixels"]
    assert saved["fine_tune_margin_over_random_init"] == pytest.approx(
        saved["accuracy"]["simclr"]["fine_tune"]["10"][0]
        - saved["accuracy"]["random init"]["fine_tune"]["10"][0])
    text = "\n".join(lines)
    assert "| encoder | 1-shot fine-tune | 5-shot fine-tune | 10-shot fine-tune |" in text
    rows = [r for r in R.fine_tune_table([saved]).splitlines() if r.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| encoder", "| simclr", "| random init"]
    assert rows[1] in text and "1-shot kNN" in text  # beside the low-shot table


def test_no_fine_tune_leaves_it_out(tmp_path, short_fine_tunes):
    assert cli.main(["pretrain", "--method", "simclr", "--max-steps", "2", "--epochs", "1",
                     "--batch-size", "64", "--width", "4", "--device", "cpu",
                     "--no-progress", "--no-fine-tune", "--out", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.glob("simclr-*")
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["fine_tune_margin_over_random_init"] is None
    assert all("fine_tune" not in saved["accuracy"][n] for n in saved["accuracy"])
    assert not R.has_fine_tune([saved])


def test_fine_tune_draws_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--method", "simclr", "--fine-tune-draws", "0"])
    assert e.value.code == 2 and "must be a positive finite number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fine_tune_draws must be an integer >= 1"):
        P.pretrain("simclr", out_dir=None, fine_tune_draws=0, **TINY)
