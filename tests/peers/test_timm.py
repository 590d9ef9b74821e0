"""fastssl.EMA against timm's ModelEmaV3 (1.0) on the same timm model over several updates.

What differs on purpose: timm averages every floating tensor of the state dict, BatchNorm's
running statistics included, unless ``exclude_buffers=True`` (then it copies the buffers);
fastssl's EMA averages the parameters and copies the buffers (``include_buffers=True``,
the default) or leaves them (``include_buffers=False``). timm's ``update(model, step)``
warms the decay up from 0 by step; fastssl's ``update(step, max_steps)`` follows a cosine
schedule. With a constant decay and buffers copied the two are the same teacher.
"""
import copy

import pytest
import torch

from ._peers import need, rel

timm = need("timm")
from timm.utils.model_ema import ModelEmaV3  # noqa: E402

import fastssl  # noqa: E402

FLOOR = {torch.float32: 4 * 2.0 ** -24, torch.float64: 1e4 * 2.0 ** -53}


def student_and_steps(dtype, steps=4):
    """timm's test_resnet (BatchNorm buffers, an integer counter), then ``steps`` moves of
    the student: an SGD-like random step on the parameters and a forward pass in training
    mode (the BatchNorm statistics move)."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)

    def move():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            model.train()
            model(x)
    return model, move


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_matches_model_ema_v3(decay, dtype):
    model, move = student_and_steps(dtype)
    ours = fastssl.EMA(model, momentum=decay, schedule=None)
    copied = ModelEmaV3(model, decay=decay, exclude_buffers=True)
    averaged = ModelEmaV3(model, decay=decay)
    ref = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    for _ in range(4):
        move()
        ours.update()
        copied.update(model)
        averaged.update(model)
        ref = {k: decay * ref[k] + (1 - decay) * p.detach().double()
               for k, p in model.named_parameters()}
    s_ours, s_copied = ours.module.state_dict(), copied.module.state_dict()
    s_avg, s_student = averaged.module.state_dict(), model.state_dict()
    assert s_ours.keys() == s_copied.keys()
    for k, p in ref.items():  # parameters: both against the float64 recurrence
        e_ours, e_timm = rel(s_ours[k], p), rel(s_copied[k], p)
        assert e_ours <= 2 * e_timm + FLOOR[dtype], f"{k}: fastssl {e_ours:.3g}, timm {e_timm:.3g}"
        torch.testing.assert_close(s_avg[k], s_copied[k], rtol=0, atol=0)
    buffers = [k for k in s_ours if k not in ref]
    assert any("running_mean" in k for k in buffers) and any("num_batches" in k for k in buffers)
    for k in buffers:
        assert torch.equal(s_ours[k], s_student[k]) and torch.equal(s_copied[k], s_student[k]), k
        if s_ours[k].is_floating_point():  # timm's default averages them
            assert not torch.equal(s_avg[k], s_student[k]), k
        else:
            assert torch.equal(s_avg[k], s_student[k]), k


def test_ema_without_buffers_and_the_teacher_is_frozen():
    model, move = student_and_steps(torch.float32, steps=2)
    ours = fastssl.EMA(model, momentum=0.9, schedule=None, include_buffers=False)
    timm_ema = ModelEmaV3(model, decay=0.9, exclude_buffers=True)
    start = {k: v.clone() for k, v in ours.module.named_buffers()}
    move()
    ours.update()
    timm_ema.update(model)
    for k, v in ours.module.named_buffers():
        assert torch.equal(v, start[k]), k
    for (k, a), (_, b) in zip(ours.module.named_parameters(), timm_ema.module.named_parameters()):
        torch.testing.assert_close(a, b, rtol=2 * 2.0 ** -23, atol=2 ** -30, msg=k)
        assert not a.requires_grad
    assert copy.deepcopy(ours).module is not ours.module
