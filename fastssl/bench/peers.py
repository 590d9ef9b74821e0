"""The incumbent libraries, timed beside fastssl when they are importable here.

``find(op, device)`` gives each peer's loss in the bench's calling convention
``loss(a, b)`` (the same two inputs as fastssl's row), and for each peer that cannot run
here the reason (not installed, the import's own error, or a CUDA-only kernel on a CPU
run). ``check(op, device, D)`` runs fastssl and every peer that computes the same loss on
one small batch and reports their relative difference, so a timing row is never that of
a differently configured loss.

- infonce: lightly ``NTXentLoss``;
- clip: open_clip ``ClipLoss``, Inf-CL ``cal_inf_loss`` (once each direction; CUDA);
- siglip: open_clip ``SigLipLoss``;
- barlow, vicreg: lightly ``BarlowTwinsLoss``, ``VICRegLoss``;
- dino: lightly ``DINOLoss`` on the head's logits; Cut Cross-Entropy (CUDA) with a
  one-hot target: the speed anchor of a fused linear + cross-entropy, not the same loss;
- ibot: lightly ``IBOTPatchLoss`` on the masked tokens' logits;
- sigreg: lightly ``SIGReg`` (seeded like fastssl's row: the same random directions);
- detcon: lightly ``DetConBLoss`` (the same fixed targets and mask ids as fastssl's row).

The EMA and augmentation benchmarks find their peers (timm ``ModelEmaV3``, torchvision,
Kornia) themselves.
"""
import torch

from .formulations import (CLIP_SCALE, DETCON_T, DINO_CROPS, IMPLS, SIGLIP_BIAS,
                           SIGLIP_SCALE, SIGREG_KNOTS, SIGREG_SEED, SIGREG_VECTORS,
                           detcon_inputs, make_inputs, teacher_inputs)

# Peers that compute another loss than fastssl's row (timed as an anchor, not checked)
ANCHORS = {"Cut Cross-Entropy (one-hot)"}


def _lightly_nt_xent():
    from lightly.loss import NTXentLoss
    return NTXentLoss(temperature=0.5)


def _open_clip_clip():
    from open_clip.loss import ClipLoss
    ref = ClipLoss()
    return lambda a, b: ref(a, b, torch.tensor(CLIP_SCALE, device=a.device))


def _inf_cl():
    from inf_cl import cal_inf_loss

    def loss(a, b):  # one direction per call: image->text and text->image, averaged
        scale = torch.tensor(CLIP_SCALE, device=a.device)
        return (cal_inf_loss(a, b, scale=scale) + cal_inf_loss(b, a, scale=scale)) / 2
    return loss


def _open_clip_siglip():
    from open_clip.loss import SigLipLoss
    ref = SigLipLoss()
    return lambda a, b: ref(a, b, torch.tensor(SIGLIP_SCALE, device=a.device),
                            torch.tensor(SIGLIP_BIAS, device=a.device))


def _lightly_barlow():
    from lightly.loss import BarlowTwinsLoss
    return BarlowTwinsLoss(lambda_param=5e-3)


def _lightly_vicreg():
    from lightly.loss import VICRegLoss
    return VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4)


def _per_prototype_count(make):
    """``get(K, device)``: the loss module ``make(K)`` made once per K, on that device."""
    made = {}

    def get(K, device):
        if K not in made:
            made[K] = make(K).to(device)
        return made[K]
    return get


def _lightly_dino():
    from lightly.loss import DINOLoss
    get = _per_prototype_count(lambda K: DINOLoss(
        output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.04, student_temp=0.1))

    def loss(s, W):
        t, V, c = teacher_inputs("dino", s, W)
        ref = get(W.shape[0], s.device)
        # the bench's fixed centre, every call, in the inputs' dtype as DINOLoss(...).to(dtype)
        # keeps it (a float32 centre fails lightly's einsum on 16-bit inputs)
        ref.center = c.view(1, 1, -1).to(s.dtype)
        with torch.no_grad():
            teacher_logits = (t @ V.T).chunk(DINO_CROPS[1])
        return ref(list(teacher_logits), list((s @ W.T).chunk(DINO_CROPS[0])))
    return loss


def ibot_mask(rows, device):
    """A boolean (images, 1, tokens) mask whose True entries, image by image, are the
    bench's iBOT rows (``formulations.ibot_weights``' split: 80 masked tokens per image)."""
    images = max(1, rows // 80)
    counts = torch.bincount(torch.arange(rows, device=device) * images // rows,
                            minlength=images)
    return (torch.arange(int(counts.max()), device=device) < counts[:, None])[:, None, :]


def _lightly_ibot():
    from lightly.loss import IBOTPatchLoss
    get = _per_prototype_count(lambda K: IBOTPatchLoss(output_dim=K, teacher_temp=0.04,
                                                       student_temp=0.1))

    def loss(s, W):
        t, V, c = teacher_inputs("ibot", s, W)
        ref = get(W.shape[0], s.device)
        ref.center.center = c.view(1, -1).float()  # the bench's fixed centre, every call
        with torch.no_grad():
            teacher_logits = t @ V.T
        return ref(teacher_logits, s @ W.T, ibot_mask(s.shape[0], s.device))
    return loss


def _cut_cross_entropy():
    from cut_cross_entropy import linear_cross_entropy
    targets = {}

    def loss(s, W):
        key = (s.shape[0], W.shape[0], s.device)
        if key not in targets:
            g = torch.Generator(device=s.device).manual_seed(s.shape[0])
            targets.clear()
            targets[key] = torch.randint(W.shape[0], (s.shape[0],), device=s.device,
                                         generator=g)
        return linear_cross_entropy(s, W, targets[key])
    return loss


def _lightly_sigreg():
    from lightly.loss import SIGReg
    loss_fn = SIGReg(knots=SIGREG_KNOTS, num_vectors=SIGREG_VECTORS)

    def loss(a, b):
        torch.manual_seed(SIGREG_SEED)
        return loss_fn.to(a.device)(a)
    return loss


def _lightly_detcon():
    from lightly.loss import DetConBLoss
    loss_fn = DetConBLoss(temperature=DETCON_T, gather_distributed=False)
    return lambda p0, p1: loss_fn(p0, p1, *detcon_inputs(p0))


# op -> [(name, constructor, needs CUDA)]
PEERS = {
    "infonce": [("lightly NTXentLoss", _lightly_nt_xent, False)],
    "clip": [("open_clip ClipLoss", _open_clip_clip, False), ("Inf-CL", _inf_cl, True)],
    "siglip": [("open_clip SigLipLoss", _open_clip_siglip, False)],
    "barlow": [("lightly BarlowTwinsLoss", _lightly_barlow, False)],
    "vicreg": [("lightly VICRegLoss", _lightly_vicreg, False)],
    "dino": [("lightly DINOLoss", _lightly_dino, False),
             ("Cut Cross-Entropy (one-hot)", _cut_cross_entropy, True)],
    "ibot": [("lightly IBOTPatchLoss", _lightly_ibot, False)],
    "sigreg": [("lightly SIGReg", _lightly_sigreg, False)],
    "detcon": [("lightly DetConBLoss", _lightly_detcon, False)],
}


def find(op, device):
    """({name: loss(a, b)} of the peers that can run here, {name: why not} of the rest)."""
    found, missing = {}, {}
    for name, make, cuda_only in PEERS.get(op, []):
        if cuda_only and device != "cuda":
            missing[name] = "needs a CUDA GPU (Triton kernels)"
            continue
        try:
            found[name] = make()
        except Exception as e:
            missing[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return found, missing


def check(op, device, D, found=None):
    """{peer: relative difference of its loss from fastssl's, or the error it raised} on
    one small float32 batch (rows: 64, DINO's 40; K as the bench's)."""
    found = find(op, device)[0] if found is None else found
    out = {}
    size = 4 * DINO_CROPS[0] if op == "dino" else 64
    a, b = make_inputs(op, size, D, torch.float32, device, seed=1)
    with torch.no_grad():
        want = float(IMPLS[op]["fastssl"](a, b))
        for name, fn in found.items():
            if name in ANCHORS:
                continue
            try:
                out[name] = abs(float(fn(a, b)) - want) / max(abs(want), 1e-12)
            except Exception as e:
                out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def report(op, device, D, log):
    """Find the peers, say which are missing and why, check the rest against fastssl.
    Returns ({name: loss}, {"missing": ..., "check": ...}) for the result file."""
    found, missing = find(op, device)
    for name, why in missing.items():
        log(f"note: {name} not benchmarked ({why})")
    checked = check(op, device, D, found) if found else {}
    for name, r in checked.items():
        if isinstance(r, str):
            log(f"note: {name} failed on the check batch ({r}); not benchmarked")
            del found[name]
        else:
            log(f"peer check: {name} {'agrees with' if r < 1e-3 else 'DIFFERS from'} "
                f"fastssl (relative difference {r:.1e}, float32, D={D})")
    return found, {"missing": missing, "check": checked}
