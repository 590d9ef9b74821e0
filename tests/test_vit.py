"""fastssl.pretrain.vit against independent references: the sine-cosine table from its
definition in float64, attention written out by hand in float64, the encoder's masking
order (position embeddings before gathering), MAE's un-shuffle, loss and gradients, and a
short optimisation. Tiny models (8 x 12 images, 4-px patches, dim 32, depth 2) keep the file
fast on CPU."""
import math

import pytest
import torch

from fastssl import ShapeError
from fastssl.masking import masked_patch_loss, random_masking
from fastssl.pretrain.vit import MAE, Block, PatchEmbed, ViT, sincos_pos_embed_2d
from test_masked_loss import mae_loss

IMG, P, DIM, DEPTH, HEADS = (8, 12), 4, 32, 2, 2
GRID, L = (2, 3), 6


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return ViT(IMG, P, 3, DIM, DEPTH, HEADS, **kw)


def tiny_mae(seed=0, mask_ratio=0.75, vit_kw=None, **kw):
    encoder = tiny_vit(seed, **(vit_kw or {}))
    torch.manual_seed(seed + 1)
    return MAE(encoder, decoder_dim=32, decoder_depth=2, decoder_heads=4,
               mask_ratio=mask_ratio, **kw)


def images(n=3, seed=0):
    return torch.randn(n, 3, *IMG, generator=gen(seed))


class Capture:
    """Records the first positional input (pre-hook) or the output (hook) of a module."""

    def __init__(self, module, output=False):
        self.value = None
        if output:
            self.handle = module.register_forward_hook(self._out)
        else:
            self.handle = module.register_forward_pre_hook(self._in)

    def _in(self, module, args):
        self.value = args[0].detach().clone()

    def _out(self, module, args, out):
        self.value = out.detach().clone()

    def remove(self):
        self.handle.remove()


# ----------------------------------------------------------------------------- positions

def sincos_reference(dim, gh, gw):
    """The definition, element by element in float64: the first dim/2 channels encode the
    column, the last dim/2 the row; each half is [sin(t w_j)]_j then [cos(t w_j)]_j with
    w_j = 1 / 10000^(2j / (dim/2))."""
    half, quarter = dim // 2, dim // 4
    out = torch.zeros(gh * gw, dim, dtype=torch.float64)
    for r in range(gh):
        for c in range(gw):
            for k in range(dim):
                t, j = (c, k) if k < half else (r, k - half)
                f = math.sin if j < quarter else math.cos
                omega = 1.0 / 10000 ** (2 * (j % quarter) / half)
                out[r * gw + c, k] = f(t * omega)
    return out


@pytest.mark.parametrize("dim,gh,gw", [(16, 2, 3), (8, 4, 1), (32, 3, 5)])
def test_sincos_matches_definition(dim, gh, gw):
    table = sincos_pos_embed_2d(dim, gh, gw)
    assert table.dtype == torch.float32 and table.shape == (gh * gw, dim)
    ref = sincos_reference(dim, gh, gw)
    torch.testing.assert_close(table.double(), ref, atol=1e-7, rtol=0)
    with_cls = sincos_pos_embed_2d(dim, gh, gw, cls_token=True)
    assert with_cls.shape == (1 + gh * gw, dim)
    assert torch.equal(with_cls[0], torch.zeros(dim)) and torch.equal(with_cls[1:], table)
    # Patches in one column share the first half; patches in one row the second.
    grid = table.view(gh, gw, dim)
    assert torch.equal(grid[:1, :, :dim // 2].expand(gh, gw, -1), grid[..., :dim // 2])
    assert torch.equal(grid[:, :1, dim // 2:].expand(gh, gw, -1), grid[..., dim // 2:])


@pytest.mark.parametrize("dim", [6, 10, 2])
def test_sincos_dim_not_multiple_of_4(dim):
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(dim, 2, 3)


# ----------------------------------------------------------------------------- layers

def test_patch_embed_matches_patchify_matmul():
    torch.manual_seed(0)
    pe = PatchEmbed(IMG, P, 3, DIM)
    assert pe.grid == GRID and pe.num_patches == L
    x = images(3)
    out = pe(x)
    assert out.shape == (3, L, DIM)
    # Patch (r, c) is token r * w + c; the conv's weight is (DIM, C, p, p).
    patches = x.double().reshape(3, 3, GRID[0], P, GRID[1], P).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(3, L, 3 * P * P)
    w = pe.proj.weight.double().reshape(DIM, -1)
    ref = patches @ w.T + pe.proj.bias.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def block_reference(block, x):
    """The block in float64 from its own weights, attention written out."""
    def w(t):
        return t.detach().double()

    def ln(t, norm):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + norm.eps) * w(norm.weight) + w(norm.bias)

    x = x.double()
    n, s, d = x.shape
    heads = block.attn.heads
    hd = d // heads
    qkv = ln(x, block.norm1) @ w(block.attn.qkv.weight).T + w(block.attn.qkv.bias)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
        outs.append(torch.softmax(scores, -1) @ v[..., sl])
    attn = torch.cat(outs, -1) @ w(block.attn.proj.weight).T + w(block.attn.proj.bias)
    x = x + attn
    fc1, fc2 = block.mlp[0], block.mlp[2]
    hidden = ln(x, block.norm2) @ w(fc1.weight).T + w(fc1.bias)
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + hidden @ w(fc2.weight).T + w(fc2.bias)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_block_matches_float64_attention(heads):
    torch.manual_seed(heads)
    block = Block(DIM, heads)
    with torch.no_grad():  # non-trivial norms and biases
        for m in block.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.Linear)):
                m.bias.normal_(0, 0.1)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, DIM, generator=gen(1))
    ref = block_reference(block, x)
    torch.testing.assert_close(block(x).double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(block.double()(x.double()), ref, atol=1e-12, rtol=0)
    assert block.norm1.eps == block.norm2.eps == 1e-6
    assert block.mlp[0].out_features == 4 * DIM


# ----------------------------------------------------------------------------- encoder

def test_vit_attributes_and_init():
    vit = tiny_vit()
    assert vit.dim == DIM and vit.num_patches == L and vit.grid == GRID
    assert vit.patch_size == P and vit.num_prefix_tokens == 1
    names = dict(vit.named_parameters())
    assert "pos_embed" not in names and not vit.pos_embed.requires_grad
    assert "pos_embed" in dict(vit.named_buffers())
    torch.testing.assert_close(vit.pos_embed[0], sincos_pos_embed_2d(DIM, *GRID))
    for m in vit.modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    # Xavier on the (dim, C p p) view: bound sqrt(6 / (48 + 32)) ~ 0.27, not the conv's
    # own fan (sqrt(6 / (48 + 512)) ~ 0.10).
    w = vit.patch_embed.proj.weight
    assert 0.2 < w.abs().max() <= math.sqrt(6 / (3 * P * P + DIM))
    for token in (vit.cls_token, vit.mask_token):
        assert 0 < token.abs().max() < 0.2


def manual_tokens(vit, x, ids_keep, pos_first=True):
    """The encoder by hand: embed, add positions, gather, class token, blocks, norm."""
    t = vit.patch_embed(x)
    n, _, d = t.shape
    if pos_first:
        t = t + vit.pos_embed
    if ids_keep is not None:
        t = torch.stack([t[i, ids_keep[i]] for i in range(n)])
    if not pos_first:  # the wrong order: the first K positions on the gathered tokens
        t = t + vit.pos_embed[:, :t.shape[1]]
    t = torch.cat([vit.cls_token.expand(n, 1, d), t], 1)
    for block in vit.blocks:
        t = block(t)
    return vit.norm(t)


@pytest.mark.parametrize("n", [1, 3])
def test_forward_tokens_gathers_after_positions(n):
    vit = tiny_vit()
    x = images(n)
    ids_keep, mask, _ = random_masking((n, L), 0.5, generator=gen(2))
    k = ids_keep.shape[1]
    with torch.no_grad():
        out = vit.forward_tokens(x, ids_keep)
        assert out.shape == (n, 1 + k, DIM)
        torch.testing.assert_close(out, manual_tokens(vit, x, ids_keep), atol=1e-6, rtol=0)
        wrong = manual_tokens(vit, x, ids_keep, pos_first=False)
        assert (out - wrong).abs().max() > 1e-2  # the order matters
        full = vit.forward_tokens(x)
        assert full.shape == (n, 1 + L, DIM)
        torch.testing.assert_close(full, manual_tokens(vit, x, None), atol=1e-6, rtol=0)
        ident = torch.arange(L).expand(n, L)
        torch.testing.assert_close(vit.forward_tokens(x, ident), full, atol=1e-6, rtol=0)


def test_forward_pools_and_is_per_image():
    vit = tiny_vit()
    x = images(3)
    with torch.no_grad():
        feats = vit(x)
        assert feats.shape == (3, DIM)
        torch.testing.assert_close(feats, vit.forward_tokens(x)[:, 0])
        alone = torch.cat([vit(x[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(feats, alone, atol=1e-6, rtol=0)
        gap = tiny_vit(cls_token=False)
        assert gap.cls_token is None and gap.num_prefix_tokens == 0
        tokens = gap.forward_tokens(x)
        assert tokens.shape == (3, L, DIM)
        torch.testing.assert_close(gap(x), tokens.mean(1))
        ids_keep, _, _ = random_masking((3, L), 0.5, generator=gen())
        assert gap.forward_tokens(x, ids_keep).shape == (3, ids_keep.shape[1], DIM)


@pytest.mark.parametrize("grid_mask", [False, True])
def test_forward_masked_puts_mask_token(grid_mask):
    vit = tiny_vit()
    x = images(3)
    mask = torch.rand(3, L, generator=gen(4)) < 0.5
    mask[0, 0], mask[0, 1] = True, False  # both kinds present
    cap = Capture(vit.blocks[0])
    with torch.no_grad():
        out = vit.forward_masked(x, mask.view(3, *GRID) if grid_mask else mask)
        emb = vit.patch_embed(x)
    cap.remove()
    assert out.shape == (3, 1 + L, DIM)
    seen = cap.value
    assert seen.shape == (3, 1 + L, DIM)
    assert torch.equal(seen[:, 0], vit.cls_token.detach()[0].expand(3, DIM))
    base = seen[:, 1:] - vit.pos_embed
    token = vit.mask_token.detach()[0, 0]
    torch.testing.assert_close(base[mask], token.expand(int(mask.sum()), DIM), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(base[~mask], emb[~mask], atol=1e-6, rtol=0)
    # A float (MAE-style 1 = masked) mask means the same; no mask equals forward_tokens.
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_masked(x, mask.float()), out)
        torch.testing.assert_close(vit.forward_masked(x, torch.zeros(3, L, dtype=torch.bool)),
                                   vit.forward_tokens(x))
    # The mask token learns through forward_masked.
    vit.forward_masked(x, mask).sum().backward()
    assert vit.mask_token.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- MAE

def test_mae_unshuffle_restores_positions():
    mae = tiny_mae(mask_ratio=0.5)
    n = 3
    x = images(n)
    latent_cap = Capture(mae.encoder.norm, output=True)
    dec_cap = Capture(mae.decoder_blocks[0])
    with torch.no_grad():
        _, pred, mask = mae.forward_with_outputs(x, generator=gen(5))
    latent_cap.remove()
    dec_cap.remove()
    ids_keep, mask_ref, _ = random_masking((n, L), 0.5, generator=gen(5))
    assert torch.equal(mask, mask_ref)
    k = ids_keep.shape[1]
    assert latent_cap.value.shape == (n, 1 + k, DIM)
    with torch.no_grad():
        e = mae.decoder_embed(latent_cap.value)
    expected = mae.mask_token.detach().expand(n, 1 + L, 32).clone()
    for i in range(n):
        expected[i, 0] = e[i, 0]  # the class token stays first
        for j in range(k):
            expected[i, 1 + int(ids_keep[i, j])] = e[i, 1 + j]
    expected = expected + mae.decoder_pos_embed
    torch.testing.assert_close(dec_cap.value, expected, atol=1e-6, rtol=0)
    # Kept positions are exactly the unmasked ones.
    kept = torch.zeros(n, L)
    kept.scatter_(1, ids_keep, 1.0)
    assert torch.equal(kept, 1 - mask)
    assert pred.shape == (n, L, P * P * 3)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_is_masked_patch_loss(norm_pix):
    mae = tiny_mae(norm_pix=norm_pix)
    x = images(3)
    loss, pred, mask = mae.forward_with_outputs(x, generator=gen(6))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.equal(mask.sum(1), torch.full((3,), float(L - int(L * 0.25))))
    again = masked_patch_loss(pred, x, mask, P, norm_pix=norm_pix)
    torch.testing.assert_close(loss, again)
    # Against MAE's forward_loss in float64 (the reference of tests/test_masked_loss.py)
    ref = mae_loss(pred.detach().double(), x.double(), mask.double(), P, norm_pix)
    torch.testing.assert_close(loss.detach().double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(mae(x, generator=gen(6)), loss)


@pytest.mark.parametrize("mask_token", [False, True])
def test_mae_gradients_reach_every_parameter(mask_token):
    mae = tiny_mae(vit_kw={"mask_token": mask_token})
    mae(images(3), generator=gen(7)).backward()
    for name, p in mae.named_parameters():
        if name == "encoder.mask_token":  # SimMIM's token: MAE never uses it
            assert mask_token and p.grad is None
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_mae_seeded_generator_repeats():
    mae = tiny_mae()
    x = images(3)
    with torch.no_grad():
        a, b = mae(x, generator=gen(8)), mae(x, generator=gen(8))
        c = mae(x, generator=gen(9))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("n", [1, 3])
def test_mae_encoder_sees_only_kept_tokens(ratio, n):
    mae = tiny_mae(mask_ratio=ratio)
    cap = Capture(mae.encoder.blocks[0])
    loss, pred, mask = mae.forward_with_outputs(images(n), generator=gen(10))
    cap.remove()
    k = int(L * (1 - ratio))
    assert cap.value.shape == (n, 1 + k, DIM)
    assert pred.shape == (n, L, P * P * 3) and mask.shape == (n, L)
    assert int(mask.sum()) == n * (L - k)
    assert torch.isfinite(loss)
    if ratio == 0:  # nothing removed, nothing scored
        assert loss == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mae.parameters() if p.grad is not None)


def test_mae_without_cls_token():
    mae = tiny_mae(vit_kw={"cls_token": False, "mask_token": False})
    assert mae.decoder_pos_embed.shape == (1, L, 32)
    cap = Capture(mae.encoder.blocks[0])
    loss, pred, _ = mae.forward_with_outputs(images(3), generator=gen(11))
    cap.remove()
    assert cap.value.shape == (3, int(L * 0.25), DIM) and pred.shape == (3, L, P * P * 3)
    loss.backward()
    assert all(p.grad is not None for p in mae.parameters())


def test_mae_adam_steps_lower_the_loss():
    mae = tiny_mae()
    x = images(3, seed=12)
    opt = torch.optim.Adam(mae.parameters(), lr=1e-3)
    with torch.no_grad():
        before = float(mae(x, generator=gen(13)))
    for _ in range(10):
        opt.zero_grad()
        mae(x, generator=gen(13)).backward()
        opt.step()
    with torch.no_grad():
        after = float(mae(x, generator=gen(13)))
    assert after < 0.9 * before, (before, after)


def test_mae_float64():
    mae = tiny_mae().double()
    x = images(3).double()
    loss, pred, _ = mae.forward_with_outputs(x, generator=gen(14))
    assert loss.dtype == pred.dtype == torch.float64
    loss.backward()


# ----------------------------------------------------------------------------- bad arguments

def test_bad_arguments():
    with pytest.raises(ValueError, match="does not divide"):
        ViT((8, 10), 4, 3, DIM, 1, HEADS)
    with pytest.raises(ValueError, match="does not divide"):
        PatchEmbed(30, 4, 3, DIM)
    with pytest.raises(ValueError, match="divisible by heads"):
        ViT(IMG, P, 3, 36, 1, 5)
    with pytest.raises(ValueError, match="divisible by heads"):
        Block(30, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        ViT(IMG, P, 3, 30, 1, 3)
    with pytest.raises(TypeError):
        ViT(IMG, 4.0, 3, DIM, 1, HEADS)
    enc = tiny_vit()
    with pytest.raises(ValueError, match="divisible by decoder_heads"):
        MAE(enc, decoder_dim=36, decoder_heads=5)
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(enc, decoder_dim=32, mask_ratio=1.0)
    with pytest.raises(TypeError):
        MAE(torch.nn.Linear(2, 2))
    for shape in [(2, 3, 12, 8), (2, 1, 8, 12), (3, 8, 12), (2, 3, 8, 16)]:
        with pytest.raises(ShapeError):
            enc(torch.zeros(shape))
    mae = MAE(enc, decoder_dim=32)
    with pytest.raises(ShapeError):
        mae(torch.zeros(2, 3, 12, 8))
    with pytest.raises(ShapeError):
        enc.forward_masked(images(2), torch.zeros(2, L + 1, dtype=torch.bool))
    with pytest.raises(ShapeError):
        enc.forward_tokens(images(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="mask_token"):
        tiny_vit(mask_token=False).forward_masked(images(2), torch.zeros(2, L, dtype=bool))


def test_forward_blocks_are_the_encoder_layers():
    vit = tiny_vit().double()
    x = images().double()
    final, layers = vit.forward_blocks(x)
    torch.testing.assert_close(final, vit.forward_tokens(x))
    assert len(layers) == DEPTH
    torch.testing.assert_close(vit.norm(layers[-1]), final)
    tokens = vit._with_prefix(vit.patch_embed(x) + vit.pos_embed.double())
    torch.testing.assert_close(layers[0], vit.blocks[0](tokens))
    _, last = vit.forward_blocks(x, last=1)
    assert len(last) == 1 and torch.equal(last[0], layers[-1])
    with pytest.raises(ValueError, match="at most the depth"):
        vit.forward_blocks(x, last=DEPTH + 1)


def _predictor(seed=0):
    from fastssl.pretrain.vit import Predictor
    torch.manual_seed(seed)
    return Predictor(tiny_vit(seed), dim=16, depth=2, heads=2).double()


def test_predictor_carries_positions_not_order():
    """Attention is permutation-equivariant, so what ties a prediction to a place is the
    position embedding: permuting the target list permutes the predictions, and permuting
    the context (tokens with their indices) changes nothing."""
    pred = _predictor()
    g = gen(3)
    context = torch.randn(2, 4, DIM, generator=g, dtype=torch.float64)
    cidx = torch.stack([torch.randperm(L, generator=g)[:4] for _ in range(2)])
    tidx = torch.tensor([[0, 5], [2, 3]])
    out = pred(context, cidx, tidx)
    assert out.shape == (2, 2, DIM)
    torch.testing.assert_close(pred(context, cidx, tidx.flip(1)), out.flip(1))
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(pred(context[:, perm], cidx[:, perm], tidx), out)
    moved = pred(context, cidx, torch.tensor([[1, 5], [2, 3]]))
    assert not torch.allclose(moved[0, 0], out[0, 0])  # another place, another prediction
    torch.testing.assert_close(moved[1], out[1])  # images are independent


def test_predictor_bad_shapes():
    pred = _predictor()
    context = torch.zeros(2, 4, DIM, dtype=torch.float64)
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ShapeError, match="context must be"):
        pred(context[:, :3], idx, idx[:, :1])
    with pytest.raises(ShapeError, match="target_idx must be"):
        pred(context, idx, idx[:1, :1])
    with pytest.raises(TypeError, match="ViT"):
        from fastssl.pretrain.vit import Predictor
        Predictor(torch.nn.Linear(2, 2))
