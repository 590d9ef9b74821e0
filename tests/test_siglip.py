"""SigLIP sigmoid loss against a float64 reference (open_clip's formula), and MoCoQueue."""
import pytest
import torch
import torch.nn.functional as tF

import fastssl

from test_infonce import DTYPES, check, embeddings, grads_of, leaf


def ref_siglip(img, txt, scale, bias):
    logits = scale * img.double() @ txt.double().T + bias
    labels = 2 * torch.eye(img.shape[0], dtype=torch.float64, device=img.device) - 1
    return -tF.logsigmoid(labels * logits).sum() / img.shape[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D", [(1, 3), (2, 1), (3, 130), (257, 3), (257, 130)])
def test_siglip_loss(backend, device, dtype, n, D):
    img = embeddings(n, D, dtype, device, seed=11 * n + D)
    txt = embeddings(n, D, dtype, device, seed=11 * n + D + 1)
    scale = torch.tensor(9.0, device=device, requires_grad=True)
    bias = torch.tensor(-4.0, device=device, requires_grad=True)
    loss = fastssl.siglip_loss(img, txt, scale, bias)
    assert loss.dtype == dtype
    got = grads_of(loss, [img, txt, scale, bias])
    ri, rt, rs, rb = leaf(img), leaf(txt), leaf(scale), leaf(bias)
    ref = ref_siglip(ri, rt, rs, rb)
    want = grads_of(ref, [ri, rt, rs, rb])
    check(loss, ref, dtype, "loss")
    for name, a, b in zip(["image", "text", "logit_scale", "logit_bias"], got, want):
        check(a, b, dtype, f"d{name}")


def test_siglip_module_matches_and_extreme_logits_stay_finite(backend, device):
    img = embeddings(20, 16, torch.float32, device, seed=1)
    txt = embeddings(20, 16, torch.float32, device, seed=2)
    out = fastssl.SigLipLoss()(img, txt, 10.0, -10.0, output_dict=True)
    check(out["contrastive_loss"], ref_siglip(img, txt, 10.0, -10.0), torch.float32, "loss")
    # |z| ~ 1e4: softplus and sigmoid must not overflow.
    loss = fastssl.siglip_loss(img * 100, txt * 100, 1.0, 0.0)
    ref = ref_siglip(img * 100, txt * 100, 1.0, 0.0)
    assert torch.isfinite(loss) and torch.isfinite(ref)
    check(loss, ref, torch.float32, "loss (large logits)")
    d_img, = grads_of(loss, [img])
    assert torch.isfinite(d_img).all()


def test_siglip_bias_defaults_to_zero(device):
    img, txt = torch.randn(5, 4, device=device), torch.randn(5, 4, device=device)
    check(fastssl.siglip_loss(img, txt, 3.0), ref_siglip(img, txt, 3.0, 0.0), torch.float32,
          "loss")


def test_siglip_deterministic(backend, device):
    img = embeddings(130, 40, torch.bfloat16, device, seed=1)
    txt = embeddings(130, 40, torch.bfloat16, device, seed=2)
    runs = []
    for _ in range(2):
        loss = fastssl.siglip_loss(img, txt, 5.0, 1.0)
        runs.append([loss.detach(), *grads_of(loss, [img, txt])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_siglip_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        fastssl.siglip_loss(torch.randn(3, 4), torch.randn(3, 5), 1.0, 0.0)
    with pytest.raises(ValueError, match="scalar"):
        fastssl.siglip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, torch.zeros(2))
    with pytest.raises(ValueError, match="dist_impl"):
        fastssl.SigLipLoss(dist_impl="magic")


def test_siglip_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    from test_ops import _step
    _step(lambda a, b: fastssl.SigLipLoss()(a, b, 5.0, -2.0), "aot_eager", device)


# ----------------------------------------------------------------------------- MoCoQueue

def test_queue_fifo_order_and_wrap_around():
    q = fastssl.MoCoQueue(dim=3, size=5)
    assert q.negatives().shape == (5, 3) and int(q.filled) == 0
    torch.testing.assert_close(q.negatives().norm(dim=1), torch.ones(5))
    keys = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    q.enqueue(keys[:2])
    torch.testing.assert_close(q.queue[:2], keys[:2])
    assert int(q.ptr) == 2 and int(q.filled) == 2
    q.enqueue(keys[2:6])               # wraps: slots 2, 3, 4, 0
    torch.testing.assert_close(q.queue[[2, 3, 4, 0]], keys[2:6])
    torch.testing.assert_close(q.queue[1], keys[1])
    assert int(q.ptr) == 1 and int(q.filled) == 5
    q.enqueue(keys)                    # more than the queue holds: the last 5, in FIFO slots
    slots = [(1 + 3 + j) % 5 for j in range(5)]
    torch.testing.assert_close(q.queue[slots], keys[3:])
    assert int(q.ptr) == (1 + 8) % 5


def test_queue_state_dict_and_to():
    q = fastssl.MoCoQueue(dim=4, size=6, dtype=torch.bfloat16)
    q.enqueue(torch.randn(4, 4))
    state = q.state_dict()
    assert set(state) == {"queue", "ptr", "filled"}
    r = fastssl.MoCoQueue(dim=4, size=6, dtype=torch.bfloat16)
    r.load_state_dict(state)
    assert torch.equal(r.queue, q.queue) and int(r.ptr) == 4
    assert q.to(torch.float64).queue.dtype == torch.float64


def test_queue_feeds_info_nce(backend, device):
    q = fastssl.MoCoQueue(dim=8, size=16, device=device)
    keys = embeddings(10, 8, torch.float32, device, seed=3)
    q.enqueue(keys)
    query = embeddings(10, 8, torch.float32, device, seed=4)
    loss = fastssl.info_nce(query, keys, 0.2, negatives=q.negatives())
    from test_infonce import ref_info_nce
    check(loss, ref_info_nce(query, keys, 0.2, q.negatives()), torch.float32, "loss")


def test_queue_bad_input():
    with pytest.raises(ValueError, match="dim"):
        fastssl.MoCoQueue(dim=0, size=3)
    with pytest.raises(ValueError, match="floating"):
        fastssl.MoCoQueue(dim=2, size=3, dtype=torch.int64)
    with pytest.raises(ValueError, match="shape"):
        fastssl.MoCoQueue(dim=2, size=3).enqueue(torch.randn(4, 3))
