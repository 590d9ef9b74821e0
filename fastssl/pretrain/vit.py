"""Vision Transformers for masked image modelling: a ViT encoder that can encode a subset of
its patches (MAE) or blend in a mask token (SimMIM), and MAE's decoder and loss around it.

- ``sincos_pos_embed_2d(dim, grid_h, grid_w)``: MAE's fixed 2-D sine-cosine table.
- ``PatchEmbed``: a Conv2d with kernel = stride = patch, images (N, C, H, W) -> (N, L, dim),
  patches in raster order (patch ``(r, c)`` is token ``r * grid_w + c``, as in
  ``fastssl.masking``).
- ``Block``: a pre-norm transformer block (LayerNorm eps 1e-6, one qkv Linear,
  ``scaled_dot_product_attention``, a GELU MLP).
- ``ViT``: the encoder. ``forward(x)`` -> (N, dim) features (the class token, or the mean
  of the patch tokens), so it serves the kNN / linear probes like the other encoders
  (``.dim``); ``forward_tokens(x, ids_keep)`` encodes only the kept patches (MAE);
  ``forward_masked(x, mask)`` replaces masked patch embeddings by a mask token (SimMIM).
- ``TimmViT(model)``: a timm ``VisionTransformer`` with the same token interface.
- ``Predictor(encoder)``: I-JEPA's predictor, context tokens and target positions ->
  predictions of the target tokens in the encoder's width.
- ``MAE(encoder)``: MAE's decoder; ``forward(images)`` -> the norm-pix loss of
  ``fastssl.masking.masked_patch_loss`` over the removed patches.

Position embeddings are fixed (buffers, never trained) and added to the patch tokens before
any masking; the class token, learnable, is added after with a zero position. Weights are
initialised as MAE does: xavier-uniform Linear weights with zero biases, LayerNorm (1, 0),
class and mask tokens N(0, 0.02^2), the patch-embedding convolution xavier-uniform on its
(dim, C * p * p) view (its bias keeps PyTorch's default, as in MAE).
"""
import torch
import torch.nn.functional as tF
from torch import nn

from fastssl import _checks
from fastssl.masking import get_at_index, masked_patch_loss, random_masking, unshuffle

__all__ = ["sincos_pos_embed_2d", "PatchEmbed", "Attention", "Block", "TokenEncoder", "ViT",
           "TimmViT", "MAE", "Predictor"]


# ----------------------------------------------------------------------------- positions

def sincos_pos_embed_2d(dim, grid_h, grid_w, cls_token=False):
    """MAE's fixed 2-D sine-cosine position embeddings: float32 ``(grid_h * grid_w, dim)``,
    or ``(1 + grid_h * grid_w, dim)`` with a zero first row when ``cls_token``.

    Row ``r * grid_w + c`` (patch ``(r, c)``) is ``[e(c), e(r)]``: the first ``dim / 2``
    channels encode the column, the last ``dim / 2`` the row (the order MAE's
    ``np.meshgrid(grid_w, grid_h)`` gives), and with ``D = dim / 2`` and
    ``omega_i = 1 / 10000^(2i / D)`` for ``i < D / 2``,
    ``e(t) = [sin(t omega_0), .., sin(t omega_{D/2-1}), cos(t omega_0), .., cos(t omega_{D/2-1})]``.
    Computed in float64, returned in float32. ``dim`` must be a positive multiple of 4.
    """
    dim = _checks.integer(dim, "dim", lo=1)
    grid_h = _checks.integer(grid_h, "grid_h", lo=1)
    grid_w = _checks.integer(grid_w, "grid_w", lo=1)
    cls_token = _checks.flag(cls_token, "cls_token")
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for 2-D sine-cosine position "
                         f"embeddings (sin and cos for rows and columns), got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(t):  # (L,) positions -> (L, dim / 2)
        angle = t[:, None] * omega[None, :]
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)

    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    table = torch.cat([axis(cols), axis(rows)], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, dim), table], dim=0)
    return table.to(torch.float32)


# ----------------------------------------------------------------------------- layers

class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a Conv2d with kernel = stride = ``patch_size``,
    (N, in_chans, H, W) -> (N, L, dim), L = (H / p)(W / p) in raster order. ``img_size`` is
    an int or (H, W); both sides must be multiples of ``patch_size`` (ValueError)."""

    def __init__(self, img_size=32, patch_size=4, in_chans=3, dim=192):
        super().__init__()
        self.img_size = _checks.size2(img_size, "img_size")
        self.patch_size = _checks.integer(patch_size, "patch_size", lo=1)
        self.in_chans = _checks.integer(in_chans, "in_chans", lo=1)
        dim = _checks.integer(dim, "dim", lo=1)
        h, w = self.img_size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"patch_size {p} does not divide the image size {h} x {w}")
        self.grid = (h // p, w // p)
        self.num_patches = self.grid[0] * self.grid[1]
        self.dim = dim
        self.proj = nn.Conv2d(self.in_chans, dim, kernel_size=p, stride=p)

    def forward(self, x):
        _checks.tensor(x, "x")
        expected = (self.in_chans, *self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise _checks.ShapeError(f"images must be (N, {expected[0]}, {expected[1]}, "
                                     f"{expected[2]}), got shape {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear (with bias), ``scaled_dot_product_attention``
    (softmax(q k^T / sqrt(dim / heads)) v per head), an output Linear."""

    def __init__(self, dim, heads):
        super().__init__()
        dim = _checks.integer(dim, "dim", lo=1)
        heads = _checks.integer(heads, "heads", lo=1)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, s, d = x.shape
        qkv = self.qkv(x).reshape(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = tF.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(n, s, d))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with the MLP
    Linear(dim, dim * mlp_ratio) - GELU - Linear; LayerNorms with eps 1e-6."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(dim, heads)
        ratio = _checks.number(mlp_ratio, "mlp_ratio", lo=0.0, lo_open=True)
        hidden = int(dim * ratio)
        if hidden < 1:
            raise ValueError(f"dim * mlp_ratio = {dim} * {ratio} leaves an MLP of width 0")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_weights(module):
    """MAE's ``_init_weights``: xavier-uniform Linear weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- encoder

class TokenEncoder(nn.Module):
    """What the masked-modelling methods need of a ViT, on top of the parts a subclass
    provides: ``patch_embed`` ((N, C, H, W) -> (N, L, dim) in raster order),
    ``_patch_positions()`` ((1, L, dim), added to the patch tokens before any masking),
    ``_with_prefix(tokens)`` (the prefix tokens -- class, registers -- with their own
    positions, prepended), ``blocks`` and ``norm`` (and optionally ``_before_blocks``, applied
    to the full sequence before the first block). Subclasses: ``ViT`` and ``TimmViT``."""

    def _before_blocks(self, tokens):
        return tokens

    def _encode(self, tokens, last=0):
        """The blocks and the final norm: (normed output, the last ``last`` block outputs)."""
        tokens = self._before_blocks(tokens)
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i >= len(self.blocks) - last:
                outputs.append(tokens)
        return self.norm(tokens), outputs

    def forward_tokens(self, x, ids_keep=None):
        """Encode the patches of ``x`` (N, C, H, W) at ``ids_keep`` (int (N, K), e.g. from
        ``fastssl.masking.random_masking``; all L patches when None) -> (N, 1 + K, dim),
        the class token first (N, K, dim without one), after the final LayerNorm. Position
        embeddings are added to all patches before the kept ones are gathered."""
        tokens = self.patch_embed(x) + self._patch_positions().to(x.dtype)
        if ids_keep is not None:
            if ids_keep.dim() != 2:
                raise _checks.ShapeError(f"ids_keep must be (N, K), got shape "
                                         f"{tuple(ids_keep.shape)}")
            tokens = get_at_index(tokens, ids_keep)
        return self._encode(self._with_prefix(tokens))[0]

    def forward_masked(self, x, mask, mask_token=None):
        """SimMIM's encoder: the patch embeddings where ``mask`` is True (bool (N, L) or
        (N, h, w), e.g. ``fastssl.masking.simmim_mask``; a numeric mask counts non-zero as
        masked) replaced by the mask token (``mask_token`` (1, 1, dim) when given, e.g. a
        method's own parameter, else the model's), then position embeddings, all tokens
        encoded -> (N, 1 + L, dim) (N, L, dim without a class token)."""
        token = self.mask_token if mask_token is None else mask_token
        if token is None:
            raise RuntimeError("this ViT was built with mask_token=False; forward_masked "
                               "needs ViT(..., mask_token=True) or a mask_token argument")
        _checks.tensor(mask, "mask")
        tokens = self.patch_embed(x)
        n, length = tokens.shape[:2]
        if mask.shape not in ((n, length), (n, *self.grid)):
            raise _checks.ShapeError(f"mask must be (N, L) = ({n}, {length}) or (N, h, w) = "
                                     f"({n}, {self.grid[0]}, {self.grid[1]}), got "
                                     f"{tuple(mask.shape)}")
        if mask.device != tokens.device:
            raise ValueError(f"mask is on {mask.device} but the images on {tokens.device}")
        masked = mask.reshape(n, length, 1)
        if masked.dtype != torch.bool:
            masked = masked != 0
        tokens = torch.where(masked, token.to(tokens.dtype), tokens)
        tokens = tokens + self._patch_positions().to(tokens.dtype)
        return self._encode(self._with_prefix(tokens))[0]

    def forward_blocks(self, x, last=None):
        """Every patch encoded: (the final LayerNorm's output (N, prefix + L, dim), the
        outputs of the ``last`` blocks (all when None), each (N, prefix + L, dim) before the
        final LayerNorm, first to last) -- data2vec's teacher averages them."""
        depth = len(self.blocks)
        last = depth if last is None else _checks.integer(last, "last", lo=1)
        if last > depth:
            raise ValueError(f"last ({last}) must be at most the depth ({depth})")
        tokens = self.patch_embed(x) + self._patch_positions().to(x.dtype)
        return self._encode(self._with_prefix(tokens), last)


class ViT(TokenEncoder):
    """A Vision Transformer encoder with fixed 2-D sine-cosine position embeddings.

    Args:
        img_size: an int or (H, W); both multiples of ``patch_size``.
        patch_size, in_chans, dim, depth, heads, mlp_ratio: the usual ViT sizes (``dim``
            a multiple of 4 for the position table and of ``heads``).
        cls_token: a learnable class token, first in every sequence (position 0: no
            position embedding). Without it ``forward`` averages the patch tokens.
        mask_token: a learnable mask token for ``forward_masked`` (SimMIM). MAE never uses
            it; build MAE's encoder with ``mask_token=False`` so every parameter gets a
            gradient (DistributedDataParallel requires this unless
            ``find_unused_parameters``).

    Attributes: ``dim``, ``num_patches`` (L), ``grid`` ((h, w) in patches),
    ``patch_size``, ``in_chans``, ``img_size``, ``num_prefix_tokens`` (1 with a class token,
    else 0), ``pos_embed`` (a (1, L, dim) float32 buffer).
    """

    def __init__(self, img_size=32, patch_size=4, in_chans=3, dim=192, depth=12, heads=3,
                 mlp_ratio=4.0, cls_token=True, mask_token=True):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        depth = _checks.integer(depth, "depth", lo=1)
        heads = _checks.integer(heads, "heads", lo=1)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if dim % 4:
            raise ValueError(f"dim must be a multiple of 4 (2-D sine-cosine position "
                             f"embeddings), got {dim}")
        use_cls = _checks.flag(cls_token, "cls_token")
        use_mask = _checks.flag(mask_token, "mask_token")
        self.dim = dim
        self.img_size = self.patch_embed.img_size
        self.patch_size = self.patch_embed.patch_size
        self.in_chans = self.patch_embed.in_chans
        self.grid = self.patch_embed.grid
        self.num_patches = self.patch_embed.num_patches
        self.num_prefix_tokens = 1 if use_cls else 0
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, *self.grid)[None])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_mask else None
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self):
        """MAE's initialisation (see the module docstring)."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for token in (self.cls_token, self.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        self.apply(_init_weights)

    def _patch_positions(self):
        return self.pos_embed

    def _with_prefix(self, tokens):
        if self.cls_token is None:
            return tokens
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype),
                          tokens], dim=1)

    def forward(self, x):
        """Features (N, dim): the class token's output, or the mean of the patch tokens'
        outputs (after the final LayerNorm) when the model has no class token."""
        out = self.forward_tokens(x)
        return out[:, 0] if self.cls_token is not None else out.mean(dim=1)


class TimmViT(TokenEncoder):
    """A timm ``VisionTransformer`` behind ``TokenEncoder``'s interface, so that the masked
    methods train it: ``forward_tokens`` / ``forward_masked`` / ``forward_blocks`` run
    timm's own patch embedding, position table, prefix tokens (class and register
    tokens), ``norm_pre``, blocks and final norm on the kept or masked patches;
    ``forward(x)`` is the model's own pooled features (``num_classes=0``). Position
    embeddings follow timm's convention: with ``no_embed_class`` only the patches have
    them, otherwise the table's first ``num_prefix_tokens`` rows belong to the prefix.
    Needs a fixed image size (no ``dynamic_img_size``) and no patch dropout. Weights live
    under ``model.`` as in ``models.Backbone``."""

    def __init__(self, model):
        super().__init__()
        embed = model.patch_embed
        if getattr(model, "dynamic_img_size", False) or model.pos_embed is None:
            raise ValueError("TimmViT needs a timm ViT with a fixed image size and a "
                             "learned position table")
        if not isinstance(model.patch_drop, nn.Identity):
            raise ValueError("TimmViT needs patch_drop_rate=0 (masking chooses the tokens)")
        ph, pw = embed.patch_size
        if ph != pw:
            raise ValueError(f"TimmViT needs square patches, got {ph} x {pw}")
        self.model = model
        self.dim = int(model.num_features)
        self.patch_size, self.grid = ph, tuple(embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.img_size = tuple(embed.img_size)
        self.in_chans = embed.proj.in_channels
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.mask_token = None

    @property
    def patch_embed(self):
        return self.model.patch_embed

    @property
    def blocks(self):
        return self.model.blocks

    def _patch_positions(self):
        table = self.model.pos_embed
        return table if self.model.no_embed_class else table[:, self.num_prefix_tokens:]

    def _with_prefix(self, tokens):
        m, n = self.model, tokens.shape[0]
        prefix = [t.expand(n, -1, -1).to(tokens.dtype) for t in (m.cls_token, m.reg_token)
                  if t is not None]
        if not prefix:
            return tokens
        prefix = torch.cat(prefix, dim=1)
        if not m.no_embed_class:
            prefix = prefix + m.pos_embed[:, :self.num_prefix_tokens].to(tokens.dtype)
        return torch.cat([prefix, tokens], dim=1)

    @property
    def norm(self):
        return self.model.norm

    def _before_blocks(self, tokens):
        return self.model.norm_pre(self.model.pos_drop(tokens))

    def forward(self, x):
        return self.model(x)


def _head_sizes(encoder, dim, depth, heads, what):
    """(dim, depth, heads) of a decoder or predictor on ``encoder``, checked: positive
    integers, ``dim`` a multiple of 4 (2-D sine-cosine positions) and of ``heads``."""
    if not isinstance(encoder, TokenEncoder):
        raise TypeError(f"encoder must be a fastssl.pretrain.vit.ViT or TimmViT, got "
                        f"{type(encoder).__name__}")
    dim = _checks.integer(dim, f"{what}_dim", lo=1)
    depth = _checks.integer(depth, f"{what}_depth", lo=1)
    heads = _checks.integer(heads, f"{what}_heads", lo=1)
    if dim % heads:
        raise ValueError(f"{what}_dim ({dim}) must be divisible by {what}_heads ({heads})")
    if dim % 4:
        raise ValueError(f"{what}_dim must be a multiple of 4 (2-D sine-cosine position "
                         f"embeddings), got {dim}")
    return dim, depth, heads


# ----------------------------------------------------------------------------- MAE

class MAE(nn.Module):
    """Masked autoencoder (He et al.) around a ``ViT`` encoder.

    Per image a fraction ``mask_ratio`` of the patches is removed
    (``fastssl.masking.random_masking``: ``int(L (1 - ratio))`` kept); the encoder sees the
    kept ones (plus its class token); the decoder maps them to ``decoder_dim``, fills the
    removed places with a learnable mask token and restores the original order
    (``fastssl.masking.unshuffle``, class token kept first), adds fixed sine-cosine
    position embeddings (zero for the class token), runs ``decoder_depth`` blocks, a
    LayerNorm and a Linear to ``patch_size^2 * in_chans`` values for every patch, and
    drops the class token. The loss is ``masked_patch_loss(pred, images, mask, p,
    norm_pix=norm_pix)``: MSE against the (per-patch normalised) pixels of the removed
    patches.

    Images are the encoder's float input (N, C, H, W), normalised by the caller; the
    targets are read from the same tensor. ``decoder_dim`` must be a multiple of 4 and of
    ``decoder_heads``.
    """

    def __init__(self, encoder, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                 mask_ratio=0.75, norm_pix=True):
        super().__init__()
        decoder_dim, decoder_depth, decoder_heads = _head_sizes(
            encoder, decoder_dim, decoder_depth, decoder_heads, "decoder")
        self.mask_ratio = _checks.number(mask_ratio, "mask_ratio", lo=0.0, hi=1.0, hi_open=True)
        self.norm_pix = _checks.flag(norm_pix, "norm_pix")
        p, c = encoder.patch_size, encoder.in_chans
        if self.norm_pix and p * p * c < 2:
            raise ValueError("norm_pix needs at least 2 values per patch (patch_size^2 * "
                             "in_chans >= 2)")
        self.encoder = encoder
        self.patch_size = p
        self.decoder_dim = decoder_dim
        prefix = encoder.num_prefix_tokens
        self.decoder_embed = nn.Linear(encoder.dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        table = sincos_pos_embed_2d(decoder_dim, *encoder.grid, cls_token=bool(prefix))
        self.register_buffer("decoder_pos_embed", table[None])
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, 4.0)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * c)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                       self.decoder_pred):
            module.apply(_init_weights)

    def forward_decoder(self, latent, ids_restore):
        """Encoder output (N, prefix + K, encoder.dim) in shuffled order -> predictions
        (N, L, patch_size^2 * in_chans) for every patch in raster order."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)
        x = unshuffle(x, ids_restore, mask_token=self.mask_token, num_prefix_tokens=prefix)
        x = x + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]

    def forward_with_outputs(self, images, generator=None, masks=None):
        """-> (loss, pred (N, L, P), mask float (N, L), 1 = removed and scored). ``masks``
        (ids_keep, mask, ids_restore) as ``random_masking`` returns them, or None: drawn
        from ``generator``."""
        _checks.tensor(images, "images")
        if images.dim() != 4:
            raise _checks.ShapeError(f"images must be (N, C, H, W), got shape "
                                     f"{tuple(images.shape)}")
        n, length = images.shape[0], self.encoder.num_patches
        if masks is None:
            masks = random_masking((n, length), self.mask_ratio, device=images.device,
                                   generator=generator)
        ids_keep, mask, ids_restore = masks
        latent = self.encoder.forward_tokens(images, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        loss = masked_patch_loss(pred, images, mask, self.patch_size, norm_pix=self.norm_pix)
        return loss, pred, mask

    def forward(self, images, generator=None, masks=None):
        """The scalar MAE loss of ``images`` (N, C, H, W), masks drawn from ``generator``
        (or given: see ``forward_with_outputs``)."""
        return self.forward_with_outputs(images, generator, masks)[0]


# ----------------------------------------------------------------------------- I-JEPA

class Predictor(nn.Module):
    """I-JEPA's predictor: a narrow ViT from the context encoder's tokens to predictions of
    the target tokens.

    ``forward(context, context_idx, target_idx)``: ``context`` (N, K, encoder.dim) are the
    encoder's outputs for the patches ``context_idx`` (N, K) (no prefix tokens);
    ``target_idx`` (N, M) the patches to predict. The context is mapped to ``dim``, gets
    the fixed sine-cosine position embedding of its patch, and is followed by M copies of a
    learnable mask token, each with the position embedding of its target patch; ``depth``
    blocks, a LayerNorm and a Linear back to encoder.dim give (N, M, encoder.dim), the
    outputs at the mask tokens. One call predicts one target block per image (I-JEPA runs
    the predictor once per block, so the blocks never attend to each other).
    """

    def __init__(self, encoder, dim=64, depth=2, heads=4):
        super().__init__()
        dim, depth, heads = _head_sizes(encoder, dim, depth, heads, "predictor")
        self.encoder_dim, self.num_patches = encoder.dim, encoder.num_patches
        self.embed = nn.Linear(encoder.dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, *encoder.grid)[None])
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, encoder.dim)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, context, context_idx, target_idx):
        for t, name in ((context_idx, "context_idx"), (target_idx, "target_idx")):
            if t.dim() != 2 or t.shape[0] != context.shape[0]:
                raise _checks.ShapeError(f"{name} must be (N, count) with N = "
                                         f"{context.shape[0]}, got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[1:] != (context_idx.shape[1], self.encoder_dim):
            raise _checks.ShapeError(f"context must be (N, K, {self.encoder_dim}) with K = "
                                     f"{context_idx.shape[1]}, got {tuple(context.shape)}")
        pos = self.pos_embed.to(context.dtype).expand(context.shape[0], -1, -1)
        x = self.embed(context) + get_at_index(pos, context_idx)
        queries = self.mask_token.to(x.dtype) + get_at_index(pos, target_idx)
        x = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, context_idx.shape[1]:]))
