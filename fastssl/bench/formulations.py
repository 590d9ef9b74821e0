"""The losses each benchmark times: the eager formulations users run today (as the
incumbents write them), fastssl's calls, their inputs and the work they do, and the optional
peer libraries found in this environment."""
import os

import torch
import torch.nn.functional as tF

import fastssl

# K of the prototype-head benchmarks (DINO's and DINOv2's); FASTSSL_BENCH_K overrides it
# (read at import, so the child processes of a CPU run see the same K)
PROTOTYPES = int(os.environ.get("FASTSSL_BENCH_K", 65536))
DINO_CROPS = (10, 2)  # student crops (2 global + 8 local), teacher crops
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
CLIP_SCALE = 1 / 0.07  # CLIP's initial logit scale (exponentiated), on unit features


def eager_nt_xent(z0, z1, temperature=0.5):
    """NT-Xent as the incumbents write it: normalise, four similarity blocks with the
    self-similarities removed, concatenated logits, cross-entropy (O(n^2) memory)."""
    n = z0.shape[0]
    a, b = tF.normalize(z0, dim=1), tF.normalize(z1, dim=1)
    off_diag = ~torch.eye(n, dtype=torch.bool, device=z0.device)
    l_ab, l_ba = a @ b.T / temperature, b @ a.T / temperature
    l_aa = (a @ a.T / temperature)[off_diag].view(n, n - 1)
    l_bb = (b @ b.T / temperature)[off_diag].view(n, n - 1)
    logits = torch.cat([torch.cat([l_ab, l_aa], 1), torch.cat([l_ba, l_bb], 1)])
    labels = torch.arange(n, device=z0.device).repeat(2)
    return tF.cross_entropy(logits, labels)


def eager_siglip(img, txt, scale=SIGLIP_SCALE, bias=SIGLIP_BIAS):
    """SigLIP as the incumbents write it: the full logits matrix and a +-1 label matrix."""
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(img.shape[0], device=img.device, dtype=img.dtype) - 1
    return -tF.logsigmoid(labels * logits).sum() / img.shape[0]


def eager_barlow(z_a, z_b, lambda_param=5e-3):
    """Barlow Twins as the reference implementation writes it: batch-norm both views, the
    D x D cross-correlation, on- and off-diagonal sums."""
    N, D = z_a.shape
    c = tF.batch_norm(z_a, None, None, training=True).T @ tF.batch_norm(z_b, None, None, training=True) / N
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.flatten()[:-1].view(D - 1, D + 1)[:, 1:].flatten().pow(2).sum()
    return on_diag + lambda_param * off_diag


def eager_vicreg(z_a, z_b, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    """VICReg as the reference implementation writes it (D x D covariance matrices)."""
    N, D = z_a.shape
    inv = tF.mse_loss(z_a, z_b)
    a, b = z_a - z_a.mean(0), z_b - z_b.mean(0)
    var = (torch.relu(1 - torch.sqrt(a.var(0) + eps)).mean()
           + torch.relu(1 - torch.sqrt(b.var(0) + eps)).mean()) / 2
    off = ~torch.eye(D, dtype=torch.bool, device=z_a.device)
    cov = sum(((x.T @ x) / (N - 1))[off].pow(2).sum() / D for x in (a, b))
    return lam * inv + mu * var + nu * cov


def eager_clip(img, txt, scale=CLIP_SCALE):
    """CLIP's symmetric loss as the incumbents write it: the (n x n) logits, their
    transpose, a cross-entropy each way."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (tF.cross_entropy(logits, labels) + tF.cross_entropy(logits.T, labels)) / 2


def fastssl_nt_xent(z0, z1):
    return fastssl.nt_xent(z0, z1, 0.5)


def fastssl_clip(img, txt):
    return fastssl.clip_loss(img, txt, CLIP_SCALE)


def fastssl_siglip(img, txt):
    return fastssl.siglip_loss(img, txt, SIGLIP_SCALE, SIGLIP_BIAS)


_TEACHERS = {}


def teacher_inputs(op, student, prototypes):
    """Fixed teacher rows, teacher prototypes and centre for a prototype-head row (made once
    per shape, at the untimed warm-up call): unit rows like a DINO head's."""
    rows, D = student.shape
    K = prototypes.shape[0]
    key = (op, rows, K, D, student.dtype, student.device)
    if key not in _TEACHERS:
        _TEACHERS.clear()
        g = torch.Generator(device=student.device).manual_seed(rows + K + D)
        n = rows * DINO_CROPS[1] // DINO_CROPS[0] if op == "dino" else rows
        mk = lambda m: torch.nn.functional.normalize(torch.randn(  # noqa: E731
            m, D, device=student.device, generator=g), dim=1).to(student.dtype)
        _TEACHERS[key] = (mk(n), mk(K), 0.01 * torch.randn(K, device=student.device,
                                                          generator=g))
    return _TEACHERS[key]


def ibot_weights(rows, device):
    """iBOT's token weights: rows split over images of 80 masked tokens (1 / 80 / images)."""
    images = max(1, rows // 80)
    image = torch.arange(rows, device=device) * images // rows
    counts = torch.bincount(image, minlength=images).float()
    return 1.0 / counts[image] / images


def eager_dino(s, W):
    """DINO's loss as lightly writes it on the head's logits: both (rows x K) score
    matrices, the teacher softmax, the student log-softmax, an einsum per crop pair."""
    t, V, c = teacher_inputs("dino", s, W)
    S, T = DINO_CROPS
    B = t.shape[0] // T
    # the centre is float32: the teacher softmax too, cast for the einsum as autocast would
    teacher = torch.softmax((t @ V.T - c) / 0.04, dim=-1).to(s.dtype).view(T, B, -1)
    student = torch.log_softmax((s @ W.T) / 0.1, dim=-1).view(S, B, -1)
    loss = -torch.einsum("tbk,sbk->tsb", teacher, student).mean(-1)  # (T, S) pair means
    return sum(loss[u, v] for u in range(T) for v in range(S) if u != v) / (T * S - min(T, S))


def fastssl_dino(s, W):
    t, V, c = teacher_inputs("dino", s, W)
    return fastssl.prototype_cross_entropy(s, t, W, V, 0.1, 0.04, c,
                                           teacher_crops=DINO_CROPS[1])


def eager_ibot(s, W):
    """iBOT's patch loss as lightly writes it: the masked tokens' score matrices, softmax,
    log-softmax, per-token weights."""
    t, V, c = teacher_inputs("ibot", s, W)
    w = ibot_weights(s.shape[0], s.device)
    teacher = torch.softmax((t @ V.T - c) / 0.04, dim=-1)
    loss = torch.sum(-teacher * torch.log_softmax((s @ W.T) / 0.1, dim=-1), dim=-1)
    return (loss * w).sum()


def fastssl_ibot(s, W):
    t, V, c = teacher_inputs("ibot", s, W)
    return fastssl.prototype_cross_entropy(s, t, W, V, 0.1, 0.04, c, pairing="rows",
                                           weights=ibot_weights(s.shape[0], s.device))


MAE_PATCH, MAE_RATIO = 16, 0.75
_MASKS = {}


def mae_mask(N, L, device):
    """MAE's random mask (1 = removed, ratio 0.75, exactly int(L * 0.25) kept per image),
    drawn once per shape from a fixed seed (at the untimed warm-up call)."""
    key = (N, L, str(device))
    if key not in _MASKS:
        _MASKS.clear()
        g = torch.Generator(device=device).manual_seed(N + L)
        noise = torch.rand(N, L, device=device, generator=g)
        keep = int(L * (1 - MAE_RATIO))
        ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
        _MASKS[key] = (ranks >= keep).float()
    return _MASKS[key]


def eager_mae(pred, imgs):
    """MAE's ``forward_loss`` as its reference code writes it: patchify (a copy), the
    norm-pix target, the squared error of every patch, the mask product."""
    N, C, H, W = imgs.shape
    p = MAE_PATCH
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    target = torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, p * p * C)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask = mae_mask(N, h * w, pred.device)
    return (loss * mask).sum() / mask.sum()


def fastssl_mae(pred, imgs):
    from fastssl.masking import masked_patch_loss
    N, L = pred.shape[:2]
    return masked_patch_loss(pred, imgs, mae_mask(N, L, pred.device), MAE_PATCH)


SUPCON_CLASSES = 100  # labels: sample i of a batch is in class i mod 100
SUPCON_T = 0.1


def _supcon_labels(n, device):
    return torch.arange(n, device=device) % SUPCON_CLASSES


def eager_supcon(z0, z1, temperature=SUPCON_T):
    """The reference SupCon as people run it: (2N x 2N) logits, masks and log-probabilities
    (contrast_mode="all", base temperature = temperature)."""
    n = z0.shape[0]
    labels = _supcon_labels(n, z0.device)
    f = torch.cat([z0, z1]).float()
    logits = f @ f.T / temperature
    logits = logits - logits.detach().amax(1, keepdim=True)
    eye = torch.eye(2 * n, dtype=torch.bool, device=f.device)
    mask = (labels[:, None] == labels[None, :]).float().repeat(2, 2).masked_fill(eye, 0)
    log_prob = logits - torch.log(torch.exp(logits).masked_fill(eye, 0).sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1).clamp_min(1)).mean()


def fastssl_supcon(z0, z1):
    return fastssl.supcon_loss(torch.stack([z0, z1], 1), _supcon_labels(z0.shape[0], z0.device),
                               temperature=SUPCON_T, base_temperature=SUPCON_T)


SIGREG_VECTORS = 1024  # random directions M
SIGREG_KNOTS = 17
SIGREG_SEED = 0  # every implementation draws the same directions


def eager_sigreg(a, b):
    """SIGReg as its reference code writes it, on the first batch (the second is unused):
    the (N x M x K) arguments, their cos and sin, the sums over the samples."""
    torch.manual_seed(SIGREG_SEED)
    N, D = a.shape
    A = torch.randn(D, SIGREG_VECTORS, device=a.device, dtype=a.dtype)
    A = A / A.norm(p=2, dim=0)
    t = torch.linspace(0, 3.0, SIGREG_KNOTS, device=a.device)
    w = torch.full((SIGREG_KNOTS,), 2 * 3.0 / (SIGREG_KNOTS - 1), device=a.device)
    w[[0, -1]] = 3.0 / (SIGREG_KNOTS - 1)
    phi = torch.exp(-t.square() / 2)
    x_t = (a @ A).unsqueeze(-1) * t
    err = (x_t.cos().mean(-3) - phi).square() + x_t.sin().mean(-3).square()
    return ((err @ (w * phi)) * N).mean()


_SIGREG = {}


def fastssl_sigreg(a, b):
    if "loss" not in _SIGREG:
        _SIGREG["loss"] = fastssl.SIGReg(knots=SIGREG_KNOTS, num_vectors=SIGREG_VECTORS)
    torch.manual_seed(SIGREG_SEED)
    return _SIGREG["loss"](a)


DETCON_MASKS = 16  # m: regions pooled per image (DetCon samples 16 masks per view)
DETCON_IDS = 8  # each region's mask id drawn uniformly from 8 ids per image
DETCON_T = 0.1
_DETCON = {}


def detcon_inputs(pred):
    """The fixed target-branch embeddings (no gradient: BYOL's stop-gradient branch) and
    the mask ids (b, m) of both views for a DetConB row, drawn once per shape from a fixed
    seed (at the untimed warm-up call, or by ``make_inputs``)."""
    b, m, D = pred.shape
    key = (b, m, D, pred.dtype, pred.device)
    if key not in _DETCON:
        _DETCON.clear()
        g = torch.Generator(device=pred.device).manual_seed(b + D)
        targets = [torch.randn(b, m, D, device=pred.device, generator=g).to(pred.dtype)
                   for _ in range(2)]
        masks = [torch.randint(0, DETCON_IDS, (b, m), device=pred.device, generator=g)
                 for _ in range(2)]
        _DETCON[key] = (*targets, *masks)
    return _DETCON[key]


def eager_detcon(p0, p1):
    """DetConB as lightly writes it: four (b, m, b, m) similarity blocks by einsum, one-hot
    same-image labels times same-mask indicators, the same-view matches pushed out by
    -1e9, soft-label cross-entropy over the concatenated blocks, per-region weights."""
    t0, t1, k0, k1 = detcon_inputs(p0)
    b, m, _ = p0.shape
    p0, p1, t0, t1 = (tF.normalize(x, dim=2) for x in (p0, p1, t0, t1))
    eye = torch.eye(b, device=p0.device)[:, None, :, None]

    def same(a, c):
        return (a[:, :, None] == c[:, None, :]).float()[:, :, None, :]

    def side(p, t_other, t_same, k_row, k_other):
        logit_other = torch.einsum("abk,uvk->abuv", p, t_other) / DETCON_T
        logit_same = torch.einsum("abk,uvk->abuv", p, t_same) / DETCON_T
        same_view = eye * same(k_row, k_row)
        logits = torch.cat([logit_other, logit_same - 1e9 * same_view], 2).view(b, m, -1)
        labels = torch.cat([eye * same(k_row, k_other), 0 * same_view], 2).view(b, m, -1)
        n_pos = labels.sum(-1, keepdim=True)
        labels = labels / n_pos.clamp_min(1)
        weights = (n_pos[..., 0] > 1e-3).float() / same_view.sum((2, 3)).clamp_min(1e-8)
        ce = -weights * (labels * torch.log_softmax(logits, -1)).sum(-1)
        return ce.mean()
    return side(p0, t1, t0, k0, k1) + side(p1, t0, t1, k1, k0)


_DETCON_LOSS = {}


def fastssl_detcon(p0, p1):
    from fastssl.detcon import DetConBLoss
    if "loss" not in _DETCON_LOSS:
        _DETCON_LOSS["loss"] = DetConBLoss(DETCON_T, gather_distributed=False)
    return _DETCON_LOSS["loss"](p0, p1, *detcon_inputs(p0))


IMPLS = {"infonce": {"fastssl": fastssl_nt_xent, "eager": eager_nt_xent},
         "supcon": {"fastssl": fastssl_supcon, "eager": eager_supcon},
         "sigreg": {"fastssl": fastssl_sigreg, "eager": eager_sigreg},
         "detcon": {"fastssl": fastssl_detcon, "eager": eager_detcon},
         "clip": {"fastssl": fastssl_clip, "eager": eager_clip},
         "dino": {"fastssl": fastssl_dino, "eager": eager_dino},
         "ibot": {"fastssl": fastssl_ibot, "eager": eager_ibot},
         "siglip": {"fastssl": fastssl_siglip, "eager": eager_siglip},
         "barlow": {"fastssl": fastssl.barlow_twins, "eager": eager_barlow},
         "vicreg": {"fastssl": fastssl.vicreg, "eager": eager_vicreg},
         "mae": {"fastssl": fastssl_mae, "eager": eager_mae}}


def make_inputs(op, size, D, dtype, device, seed=0):
    """Two embedding batches. NT-Xent's size is 2N (two views of N); SigLIP's and CLIP's
    is n pairs (CLIP's unit rows, as its models produce them); MAE's is N images of side D
    (predictions for every 16-px patch, and the images); DetCon's is b images of
    ``DETCON_MASKS`` regions (both views' predictions; targets and masks fixed)."""
    rows = size // 2 if op in ("infonce", "supcon") else size
    g = torch.Generator(device=device).manual_seed(seed + size + D)
    if op == "mae":  # size N images of side D: the decoder's predictions and the images
        L, P = (D // MAE_PATCH) ** 2, MAE_PATCH * MAE_PATCH * 3
        return [torch.randn(size, L, P, device=device, generator=g).to(dtype).requires_grad_(),
                torch.randn(size, 3, D, D, device=device, generator=g).to(dtype)]
    if op == "clip":
        return [torch.nn.functional.normalize(torch.randn(
            rows, D, device=device, generator=g), dim=1).to(dtype).requires_grad_()
            for _ in range(2)]
    if op in ("dino", "ibot"):  # student rows and the K prototypes (unit rows)
        return [torch.nn.functional.normalize(torch.randn(
            n, D, device=device, generator=g), dim=1).to(dtype).requires_grad_()
            for n in (size, PROTOTYPES)]
    if op == "detcon":  # size b images of m regions: both views' predictions
        preds = [torch.randn(size, DETCON_MASKS, D, device=device, generator=g).to(dtype)
                 .requires_grad_() for _ in range(2)]
        detcon_inputs(preds[0])  # the fixed targets and masks, made here (not traced)
        return preds
    if op == "supcon":  # the reference expects unit rows
        return [torch.nn.functional.normalize(torch.randn(
            rows, D, device=device, generator=g), dim=1).to(dtype).requires_grad_()
            for _ in range(2)]
    return [torch.randn(rows, D, device=device, dtype=dtype, generator=g).requires_grad_()
            for _ in range(2)]


def model_flops(op, size, D):
    """Forward+backward work of the textbook formulation: 3 matmuls of size x size x D
    (contrastive), or of N x D x D (cross-correlation: C and its two gradients; VICReg has
    two covariance matrices)."""
    if op == "barlow":
        return 6 * size * D * D
    if op == "vicreg":
        return 12 * size * D * D
    if op == "mae":  # elementwise: ~10 operations per predicted value (no matmul)
        return 10 * size * D * D * 3
    if op == "detcon":  # 4 blocks of (b m)^2 D forward, 4 for the predictions' gradient
        return 16 * (size * DETCON_MASKS) ** 2 * D
    if op == "sigreg":  # the projections and their gradient: N x D x M, twice
        return 4 * size * D * SIGREG_VECTORS
    if op in ("dino", "ibot"):  # student and teacher scores, dS, dW: rows x K x D each
        teacher = size * DINO_CROPS[1] // DINO_CROPS[0] if op == "dino" else size
        return 2 * (3 * size + teacher) * PROTOTYPES * D
    return 6 * size * size * D
