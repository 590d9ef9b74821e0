"""The masked-modelling methods of ``fastssl pretrain`` (I-JEPA, data2vec, iBOT, DINOv2):
each method's loss against its paper's formulation written out in float64 from the same
weights, views and masks (materialised logits, gathered and normalised targets, one
predictor call per target block), with the teacher moved off the student so that the
target path is checked; their masks and encoders. Training itself (two ranks agreeing
with one process, the loss falling, resume) is tested in test_trainer.py and
test_pretrain.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastssl.masking import get_at_index
from fastssl.pretrain import methods as M
from fastssl.pretrain.checkpoint import load_encoder, save_encoder
from fastssl.pretrain.models import encoder as build_encoder
from test_prototype import koleo_dense, sinkhorn_loops

N, SIZE, WIDTH = 5, 16, 8


def _method(name, seed=0):
    torch.manual_seed(seed)
    enc = build_encoder("vit", WIDTH, SIZE, cls_token=name not in M.NO_CLASS_TOKEN)
    method = M.build(name, enc).double()
    teacher = next(v for k, v in vars(method)["_modules"].items() if k in ("target", "teacher"))
    with torch.no_grad():  # a teacher a few steps away from the student
        for p in teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return method


def _views(count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
            for _ in range(count)]


def _sample(method, rows=N, seed=2):
    return method.sample(torch.Generator().manual_seed(seed), 0, rows, rows, "cpu")


def test_ijepa_is_smooth_l1_per_target_block_against_layer_normed_teacher_tokens():
    m = _method("ijepa")
    views = _views(1)
    context, targets = masks = _sample(m)
    assert context.shape[0] == N and targets.shape[:2] == (N, 4)
    loss = m(views, masks)
    x = views[0]
    z = m.encoder.forward_tokens(x, context)  # no class token
    h = m.target.module.forward_tokens(x)
    ref = sum(F.smooth_l1_loss(m.predictor(z, context, targets[:, b]),
                               F.layer_norm(get_at_index(h, targets[:, b]), (h.shape[-1],)))
              for b in range(targets.shape[1])) / targets.shape[1]
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert not set(context[0].tolist()) & set(targets[0].flatten().tolist())  # no overlap
    loss.backward()
    assert all(p.grad is not None for p in m.trainable())


def _instance_norm_tokens(t):
    return F.instance_norm(t.transpose(1, 2)).transpose(1, 2)


def test_data2vec_regresses_the_top_blocks_instance_then_layer_normed():
    m = _method("data2vec")
    views = _views(1)
    mask = _sample(m)
    assert mask.dtype == torch.bool and mask.shape == (N, m.encoder.num_patches)
    loss = m(views, mask)
    x = views[0]
    pred = m.head(m.encoder.forward_masked(x, mask, mask_token=m.mask_token))
    _, layers = m.teacher.module.forward_blocks(x, last=m.top_k)
    assert len(layers) == m.top_k == 3
    D = pred.shape[-1]
    y = F.layer_norm(sum(_instance_norm_tokens(t) for t in layers) / m.top_k, (D,))
    ref = ((pred - y) ** 2).sum(-1)[mask].mean() / math.sqrt(D)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def _ce(student_logits, target_probs):
    return -(target_probs * F.log_softmax(student_logits, dim=-1)).sum(-1)


def _ibot_reference(m, views, masks, sinkhorn):
    """(class-token loss, patch loss, KoLeo) of iBOT / DINOv2 from materialised scores."""
    x = torch.cat(views)
    enc, head = m.student[0], m.student[1]
    t_enc, t_head = m.teacher.module[0], m.teacher.module[1]
    tokens = enc.forward_masked(x, masks, mask_token=m.mask_token)
    W, V = head.prototypes(), t_head.prototypes()
    tau_s, tau_t = 0.1, m.teacher_temp()
    t_tokens = t_enc.forward_tokens(x)
    s_cls = head(tokens[:, 0]) @ W.T / tau_s
    t_cls = t_head(t_tokens[:, 0]) @ V.T
    s_patch = head(tokens[:, 1:][masks]) @ W.T / tau_s
    t_patch = t_head(t_tokens[:, 1:][masks]) @ V.T
    if sinkhorn:
        p_cls, p_patch = sinkhorn_loops(t_cls, tau_t, 3), sinkhorn_loops(t_patch, tau_t, 3)
    else:
        p_cls = F.softmax((t_cls - m.criterion.center.reshape(-1)) / tau_t, dim=-1)
        p_patch = F.softmax((t_patch - m.patch_center) / tau_t, dim=-1)
    B = N
    cls = 0.5 * (_ce(s_cls[:B], p_cls[B:]).mean() + _ce(s_cls[B:], p_cls[:B]).mean())
    image = masks.nonzero()[:, 0]
    weight = 1.0 / masks.sum(1).clamp_min(1).double()
    patch = (_ce(s_patch, p_patch) * weight[image]).sum() / (2 * B)
    koleo = 0.1 * (koleo_dense(tokens[:B, 0]) + koleo_dense(tokens[B:, 0]))
    return cls, patch, koleo


@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_ibot_and_dinov2_against_materialised_scores(name):
    m = _method(name)
    with torch.no_grad():  # centres away from zero, as after some steps
        m.criterion.center.copy_(0.3 * torch.randn_like(m.criterion.center))
        m.patch_center.copy_(0.3 * torch.randn_like(m.patch_center))
    views = _views(2)
    masks = _sample(m)
    L = m.encoder.num_patches
    assert masks.shape == (2 * N, L) and masks.any()
    cls, patch, koleo = _ibot_reference(m, views, masks, sinkhorn=name == "dinov2")
    ref = cls + patch + (koleo if name == "dinov2" else 0.0)
    loss = m(views, masks)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)


def test_ibot_centres_follow_the_teacher():
    m = _method("ibot")
    views, masks = _views(2), _sample(m)
    before = m.patch_center.clone()
    m(views, masks)
    x = torch.cat(views)
    t_head = m.teacher.module[1]
    t_patch = t_head(m.teacher.module[0].forward_tokens(x)[:, 1:][masks])
    stat = (t_patch @ t_head.prototypes().T).mean(0)
    m.after_step(0, 10)
    torch.testing.assert_close(m.patch_center, 0.9 * before + 0.1 * stat, rtol=1e-10,
                               atol=1e-12)


def test_ibot_masks_are_per_image_and_crop_major():
    m = _method("ibot")
    rows = 64
    full = _sample(m, rows=rows, seed=5)
    part = m.sample(torch.Generator().manual_seed(5), 16, 32, rows, "cpu")
    both = full.reshape(2, rows, -1)
    torch.testing.assert_close(part, both[:, 16:32].reshape(32, -1))
    counts = full.sum(1).double()
    L = m.encoder.num_patches
    assert 0.2 < (counts > 0).double().mean() < 0.8  # mask_prob 0.5
    assert counts.max() <= 0.5 * L


def test_data2vec_masks_follow_the_ratio():
    m = _method("data2vec")
    mask = _sample(m, rows=256, seed=3)
    ratio = mask.double().mean(1)
    assert (ratio <= 0.6 + 1e-9).all() and ratio.mean() > 0.45


@pytest.mark.parametrize("name", ["ijepa", "data2vec"])
def test_class_token_free_encoders_round_trip_through_encoder_pt(name, tmp_path):
    m = _method(name)
    enc = m.encoder.float()
    assert enc.num_prefix_tokens == 0 and enc.cls_token is None
    save_encoder(str(tmp_path), enc, {"arch": "vit", "width": WIDTH, "size": SIZE,
                                      "method": name})
    loaded = load_encoder(str(tmp_path))
    x = torch.randn(3, 3, SIZE, SIZE)
    torch.testing.assert_close(loaded(x), enc(x))
    torch.testing.assert_close(enc(x), enc.forward_tokens(x).mean(1))


def test_masked_methods_refuse_other_encoders():
    small = build_encoder("small", 8)
    for name in ("ijepa", "data2vec", "ibot", "dinov2"):
        with pytest.raises(ValueError, match="--arch vit"):
            M.build(name, small)
    with pytest.raises(ValueError, match="class token"):
        M.build("ibot", build_encoder("vit", WIDTH, SIZE, cls_token=False))
