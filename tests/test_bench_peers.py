"""`fastssl bench`'s peer libraries: found when importable, named with the reason when not,
checked against fastssl before they are timed, and timed in the same run (CPU child
processes included). The peers themselves are not installed here: stand-ins written by
these tests (float64 textbook formulas under the peers' names) play their part."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastssl.bench import ema, formulations, peers, timing

LIBRARIES = ("lightly", "lightly.loss", "open_clip", "open_clip.loss", "inf_cl",
             "cut_cross_entropy", "timm", "timm.utils")


@pytest.fixture
def no_peers(monkeypatch):
    """Every peer library unimportable, whatever this environment has installed."""
    for name in LIBRARIES:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_missing_peers_are_named_with_the_reason(no_peers, device):
    for op, listed in peers.PEERS.items():
        found, missing = peers.find(op, device)
        assert found == {} and list(missing) == [name for name, _, _ in listed]
        for name, _, cuda_only in listed:
            if cuda_only and device == "cpu":
                assert missing[name] == "needs a CUDA GPU (Triton kernels)"
            else:
                assert missing[name].startswith(("ImportError", "ModuleNotFoundError")), missing
    assert peers.find("ema", "cpu") == ({}, {})  # ema and augment find their own


def test_report_logs_each_missing_peer(no_peers):
    lines = []
    found, info = peers.report("clip", "cpu", 8, lines.append)
    assert found == {} and info["check"] == {}
    assert set(info["missing"]) == {"open_clip ClipLoss", "Inf-CL"}
    assert any(line.startswith("note: open_clip ClipLoss not benchmarked (") for line in lines)
    assert "note: Inf-CL not benchmarked (needs a CUDA GPU (Triton kernels))" in lines


def test_check_tells_the_same_loss_from_another(monkeypatch):
    def raises(a, b):
        raise RuntimeError("boom")

    same = formulations.eager_barlow
    other = lambda a, b: formulations.eager_barlow(a, b, lambda_param=0.5)  # noqa: E731
    stand_ins = {"same": same, "other": other, "broken": raises}
    checked = peers.check("barlow", "cpu", 8, dict(stand_ins))
    assert checked["same"] < 1e-5 and checked["other"] > 1e-2
    assert checked["broken"] == "RuntimeError: boom"
    monkeypatch.setattr(peers, "find", lambda op, device: (dict(stand_ins), {}))
    lines = []
    found, info = peers.report("barlow", "cpu", 8, lines.append)
    assert set(found) == {"same", "other"}  # a peer that fails the check is not timed
    assert any(line.startswith("peer check: same agrees with fastssl") for line in lines)
    assert any(line.startswith("peer check: other DIFFERS from fastssl") for line in lines)
    assert "note: broken failed on the check batch (RuntimeError: boom); not benchmarked" in lines


def test_an_anchor_is_timed_but_not_checked(monkeypatch):
    monkeypatch.setattr(formulations, "PROTOTYPES", 33)
    anchor = "Cut Cross-Entropy (one-hot)"
    checked = peers.check("dino", "cpu", 4, {anchor: lambda s, W: (s @ W.T).sum()})
    assert checked == {}


def test_implementation_names_a_missing_peer(no_peers):
    with pytest.raises(ValueError, match="'lightly BarlowTwinsLoss' is not available for barlow: "
                                         "(ImportError|ModuleNotFoundError)"):
        timing.implementation("barlow", "lightly BarlowTwinsLoss")
    with pytest.raises(ValueError, match="no such implementation"):
        timing.implementation("barlow", "nobody")


@pytest.mark.parametrize("rows", [1, 79, 80, 81, 170, 1000, 4097])
def test_ibot_mask_gives_the_bench_weights(rows):
    """The mask handed to an iBOT peer weights tokens as the bench's own formulations do:
    1 / (masked tokens of the image) / images, image by image."""
    mask = peers.ibot_mask(rows, "cpu")
    assert mask.dtype == torch.bool and int(mask.sum()) == rows
    per_image = mask.sum(dim=(1, 2), keepdim=True).double()
    weights = (1.0 / per_image).expand_as(mask)[mask] / mask.shape[0]
    torch.testing.assert_close(weights, formulations.ibot_weights(rows, "cpu").double())


def test_clip_formulations_agree_in_float64():
    a, b = formulations.make_inputs("clip", 37, 5, torch.float64, "cpu")
    torch.testing.assert_close(a.norm(dim=1), torch.ones(37, dtype=torch.float64))
    want = formulations.eager_clip(a, b)
    got = formulations.fastssl_clip(a, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    ga = torch.autograd.grad(want, (a, b))
    gb = torch.autograd.grad(formulations.fastssl_clip(a, b), (a, b))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)


def test_ema_times_timm_model_ema_when_it_imports(monkeypatch):
    import copy
    import types

    made = []

    class ModelEmaV3(torch.nn.Module):  # the stand-in: a copy, lerped in place
        def __init__(self, model, decay):
            super().__init__()
            self.module, self.decay = copy.deepcopy(model), decay
            made.append(self)

        @torch.no_grad()
        def update(self, model):
            torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()),
                                 1 - self.decay)

    timm = types.ModuleType("timm")
    timm.utils = types.SimpleNamespace(ModelEmaV3=ModelEmaV3)
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.utils", timm.utils)
    online = [torch.randn(3, 4), torch.randn(5)]
    methods = ema._ema_methods([t.clone() for t in online], online, 0.9)
    assert "timm ModelEmaV3" in methods and len(made) == 1
    before = [t.clone() for t in online]  # the EMA's copy, made at construction
    for t in online:  # the training step moves the online tensors in place
        t.add_(torch.randn_like(t))
    methods["timm ModelEmaV3"]()
    # the update reads the bench's online tensors themselves (not a copy taken earlier)
    for e, b, o in zip(made[0].module.parameters(), before, online):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * o)
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.utils", None)
    lines = []
    assert "timm ModelEmaV3" not in ema._ema_methods([t.clone() for t in online], online, 0.9,
                                                     lines.append)
    assert lines and lines[0].startswith("note: timm ModelEmaV3 not benchmarked (")


STAND_IN = '''
import torch


class BarlowTwinsLoss(torch.nn.Module):
    """Barlow Twins in float64: standardised views, cross-correlation, on/off-diagonal."""

    def __init__(self, lambda_param=5e-3, gather_distributed=False):
        super().__init__()
        self.lambda_param = lambda_param

    def forward(self, a, b):
        n = a.shape[0]
        a, b = a.double(), b.double()
        za = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
        zb = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5)
        c = za.T @ zb / n
        on = ((torch.diagonal(c) - 1) ** 2).sum()
        off = (c ** 2).sum() - (torch.diagonal(c) ** 2).sum()
        return (on + self.lambda_param * off).float()
'''


def test_bench_times_an_installed_peer_beside_fastssl(tmp_path):
    """End to end on the CPU: the peer found in the parent is timed in its own child
    process, checked against fastssl first, and kept in the result file."""
    site = tmp_path / "site"
    (site / "lightly").mkdir(parents=True)
    (site / "lightly" / "__init__.py").write_text("")
    (site / "lightly" / "loss.py").write_text(textwrap.dedent(STAND_IN))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
        [str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", "barlow", "--sizes", "16",
                          "--dims", "8", "--out", str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert "peer check: lightly BarlowTwinsLoss agrees with fastssl" in out.stdout
    (path,) = (tmp_path / "out").glob("*-barlow.json")
    result = json.loads(path.read_text())
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"fastssl (portable)", "eager", "torch.compile", "lightly BarlowTwinsLoss"}
    assert all("error" not in r and r["fwd_bwd_ms"] > 0 for r in rows.values()), rows
    assert result["peers"]["check"]["lightly BarlowTwinsLoss"] < 1e-5
    assert "lightly BarlowTwinsLoss" not in result["peers"]["missing"]


def test_bench_clip_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", "clip", "--quick",
                          "--sizes", "24", "--dims", "8", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob("*-clip.json")
    result = json.loads(path.read_text())
    assert {r["impl"] for r in result["rows"]} >= {"fastssl (portable)", "eager", "torch.compile"}
    assert all("error" not in r and r["rows"] == 24 for r in result["rows"])
    assert "| impl | n |" in (tmp_path / path.name.replace(".json", ".md")).read_text()
    assert "Inf-CL" in result["peers"]["missing"]


# tiny (size, D) per op for the 16-bit sweep below (sizes the bench accepts)
TINY = {"infonce": (64, 8), "supcon": (64, 8), "sigreg": (64, 8), "detcon": (8, 8),
        "clip": (32, 8), "siglip": (32, 8), "barlow": (32, 16), "vicreg": (32, 16),
        "dino": (20, 8), "ibot": (16, 8), "mae": (2, 32)}


def check_16bit_rows(op, names, monkeypatch):
    """Every named bench row of ``op`` runs forward+backward on bf16 and fp16 inputs, with
    a finite value within 16-bit rounding of the eager formulation's and finite gradients
    (a float32 buffer meeting 16-bit inputs, as DINO's centre did, is an error here)."""
    monkeypatch.setattr(formulations, "PROTOTYPES", 256)
    size, D = TINY[op]
    for dtype in (torch.bfloat16, torch.float16):
        values = {}
        for name in names:
            a, b = formulations.make_inputs(op, size, D, dtype, "cpu")
            loss = timing.implementation(op, name)(a, b)
            loss.backward()
            grads = [t.grad for t in (a, b) if t.requires_grad and t.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads), (op, name, dtype)
            values[name] = float(loss)
        for name, v in values.items():
            assert abs(v - values["eager"]) <= 0.03 * abs(values["eager"]), (op, name, dtype, values)


@pytest.mark.parametrize("op", sorted(TINY))
def test_every_bench_row_takes_16bit_inputs(op, monkeypatch):
    found, _ = peers.find(op, "cpu")
    check_16bit_rows(op, [*formulations.IMPLS[op], *found], monkeypatch)
