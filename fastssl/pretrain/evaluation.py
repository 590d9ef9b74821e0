"""Evaluation of an encoder: features of one deterministic view per image, a weighted kNN
classifier and a linear probe on the frozen features, the label-efficiency (low-shot)
table, and end-to-end fine-tuning.

kNN: cosine similarity, the k nearest training points vote with exp(s / 0.1). Linear
probe: multinomial logistic regression on standardised features (training-set
statistics), mean cross-entropy + wd * ||W||^2, full-batch L-BFGS. Low-shot: the same two
classifiers fitted on 1, 5 and 10 labelled training images per class (several seeded
draws; mean and standard deviation over the draws), tested on the whole held-out set.

Fine-tuning: a copy of the encoder and a linear head (on batch-standardised features,
zero-initialised) trained together with AdamW on the labelled images (a fixed number of
steps, linear warm-up then cosine decay, seeded mini-batches and crops, label-smoothed
cross-entropy), then tested in eval mode on the held-out set; at 1, 5 and 10 labels per
class (the probes' first draws) and with every training label.
"""
import contextlib
import copy

import torch
import torch.nn.functional as tF
from torch import nn

from fastssl import augment as A
from fastssl.pretrain.data import collate
from fastssl.pretrain.loop import learning_rate

SHOTS = (1, 5, 10)
# Fine-tuning defaults: a short schedule that separates pretrained from random encoders at
# 1-10 labels per class on the digits in seconds per run on two CPU cores (the committed
# reports in benchmarks/results/trainer/ show what it gives).
FINE_TUNE = {"steps": 50, "batch": 32, "lr": 1e-3, "weight_decay": 0.05,
             "label_smoothing": 0.1}


@torch.no_grad()
def features(fn, dataset, indices, size, device, batch=256, workers=0, dtype=torch.float32):
    """``fn`` of one deterministic view per image of ``dataset[indices]`` (the whole image
    resized to ``size`` and normalised, as training views are), in the order given, as
    ``dtype``."""
    view = A.Augment(A.RandomResizedCrop(size, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
                     A.Normalize())
    chunks = [indices[i:i + batch].tolist() for i in range(0, len(indices), batch)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=workers,
                                         collate_fn=collate)
    out = []
    for images, _, _ in loader:
        out.append(fn(view(images.to(device))).to(dtype))
    return torch.cat(out) if out else torch.zeros(0, device=device, dtype=dtype)


def knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.1):
    """Weighted kNN: cosine similarity, the k nearest training points vote with exp(s/T)."""
    a, b = tF.normalize(train_x, dim=1), tF.normalize(test_x, dim=1)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for i in range(0, len(b), 1024):
        s = b[i:i + 1024] @ a.T
        sim, idx = s.topk(min(k, len(a)), dim=1)
        votes = torch.zeros(len(s), n_classes, device=s.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return 100.0 * correct / len(b)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, weight_decay=1e-4, iters=200):
    """Multinomial logistic regression on standardised features (training-set statistics),
    fitted by full-batch L-BFGS with an L2 penalty; test accuracy in percent."""
    mean = train_x.mean(0)
    std = train_x.std(0).nan_to_num(0.0).clamp_min(1e-6) if len(train_x) > 1 \
        else torch.ones_like(mean)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    layer = nn.Linear(xtr.shape[1], n_classes).to(xtr.device)
    nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = tF.cross_entropy(layer(xtr), train_y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return 100.0 * (layer(xte).argmax(1) == test_y).float().mean().item()


def few_shot_draw(train_y, shots, seed):
    """Positions of ``shots`` training images per class (all of a class's images when it
    has fewer), drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in train_y.unique():
        idx = (train_y == c).nonzero()[:, 0].cpu()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(picked).sort().values


def low_shot(train_x, train_y, test_x, test_y, knn_k, shots=SHOTS, draws=5, seed=0):
    """{"1": {"knn": [mean, std], "linear": [mean, std], "accuracies": {...}}, ...}: both
    classifiers on ``shots`` labelled images per class, over ``draws`` seeded draws."""
    table = {}
    for s in shots:
        knn, linear = [], []
        for d in range(draws):
            pick = few_shot_draw(train_y, s, seed * 1000 + 100 * s + d).to(train_x.device)
            x, y = train_x[pick], train_y[pick]
            knn.append(knn_accuracy(x, y, test_x, test_y, knn_k))
            linear.append(linear_probe_accuracy(x, y, test_x, test_y))
        table[str(s)] = {name: [float(torch.tensor(v, dtype=torch.float64).mean()),
                                float(torch.tensor(v, dtype=torch.float64).std())
                                if len(v) > 1 else 0.0]
                         for name, v in (("knn", knn), ("linear", linear))}
        table[str(s)]["accuracies"] = {"knn": knn, "linear": linear}
    return table


def evaluate(fn, dataset, train, test, size, knn_k, device, workers=0, draws=5):
    """kNN and linear probe with every training label, and the low-shot table."""
    everything = torch.cat([train, test])
    feats = features(fn, dataset, everything, size, device, workers=workers)
    y = dataset.labels[everything].to(feats.device)
    n = len(train)
    ftr, fte, ytr, yte = feats[:n], feats[n:], y[:n], y[n:]
    return {"knn": knn_accuracy(ftr, ytr, fte, yte, knn_k),
            "linear": linear_probe_accuracy(ftr, ytr, fte, yte),
            "dim": feats.shape[1],
            "low_shot": low_shot(ftr, ytr, fte, yte, knn_k, draws=draws)}


def pretext_accuracy(model, dataset, indices, size, device, workers=0):
    """The trained method's own task (``Method.pretext``: rotation, jigsaw permutation,
    patch position, ...) on the deterministic views of ``dataset[indices]``: accuracy in
    percent, or None for a method without one."""
    model.eval()
    with torch.no_grad():
        if model.pretext(features(lambda x: x, dataset, indices[:2], size, device)) is None:
            return None
        scores = features(lambda x: torch.tensor([model.pretext(x)], dtype=torch.float64),
                          dataset, indices, size, device, workers=workers,
                          dtype=torch.float64).sum(0)
    return 100.0 * float(scores[0]) / max(float(scores[1]), 1.0)


# ----------------------------------------------------------------------------- fine-tuning

def _vit_layer_scale(name, depth, decay):
    """Layer-wise learning-rate factor of the ViT parameter ``name``: decay^(depth - i) in
    block i (0-based), decay^(depth + 1) for the patch embedding and the class / mask
    tokens, 1 for the final LayerNorm."""
    if name.startswith("blocks."):
        return decay ** (depth - int(name.split(".")[1]))
    if name.startswith(("patch_embed.", "cls_token", "mask_token", "pos_embed")):
        return decay ** (depth + 1)
    return 1.0


def fine_tune_param_groups(encoder, head, lr, weight_decay, layer_decay=None):
    """AdamW parameter groups for fine-tuning ``encoder`` with ``head``. Every group has
    ``lr = lr * lr_scale`` (``lr_scale`` is kept in the group for the schedule) and weight
    decay ``weight_decay`` on weights of two or more dimensions, 0 on biases, norms and
    tokens. ``layer_decay`` (fastssl's ViT only): block i's parameters get
    lr_scale = layer_decay^(depth - i), the patch embedding and the tokens
    layer_decay^(depth + 1), the final LayerNorm and the head 1; None: 1 everywhere."""
    from fastssl.pretrain.vit import ViT
    if layer_decay is not None:
        if not isinstance(encoder, ViT):
            raise ValueError(f"layer_decay needs fastssl's ViT encoder, got "
                             f"{type(encoder).__name__}")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth = len(encoder.blocks) if layer_decay is not None else 0
    groups = {}
    named = [(n, p, True) for n, p in encoder.named_parameters()] + \
        [(n, p, False) for n, p in head.named_parameters()]
    for name, p, in_encoder in named:
        if not p.requires_grad:
            continue
        scale = _vit_layer_scale(name, depth, layer_decay) \
            if in_encoder and layer_decay is not None else 1.0
        wd = weight_decay if p.dim() >= 2 else 0.0
        group = groups.setdefault((scale, wd), {"params": [], "lr": lr * scale,
                                                "lr_scale": scale, "weight_decay": wd})
        group["params"].append(p)
    return list(groups.values())


def _check_fine_tune(steps, batch, lr, weight_decay, label_smoothing, train_idx, test_idx):
    for name, value in (("steps", steps), ("batch", batch)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0 < lr < float("inf"):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not 0 <= weight_decay < float("inf"):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if len(train_idx) < 2 or len(test_idx) < 1:
        raise ValueError(f"fine-tuning needs at least 2 labelled images (the head's BatchNorm) "
                         f"and 1 test image, got {len(train_idx)} and {len(test_idx)}")


def _fit(model, head, opt, dataset, idx, size, device, seed, steps, batch, smoothing,
         workers):
    """``steps`` AdamW steps on mini-batches of ``batch`` images of ``dataset[idx]`` drawn
    without replacement (a fresh draw per step, CPU generator seeded with ``seed``), each a
    random crop (area 0.6..1 of the image, a device generator seeded with ``seed``) resized
    to ``size`` and normalised; lr = learning_rate(step) * lr_scale per group."""
    g = torch.Generator().manual_seed(seed)
    order = [idx[torch.randperm(len(idx), generator=g)[:batch]].tolist() for _ in range(steps)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, num_workers=workers,
                                         collate_fn=collate)
    crops = torch.Generator(device=device).manual_seed(seed)
    view = A.Augment(A.RandomResizedCrop(size, scale=(0.6, 1.0)), A.Normalize())
    base = opt.defaults["lr"]
    model.train(), head.train()
    for step, (images, labels, _) in enumerate(loader):
        lr = learning_rate(step, steps, steps // 10, base)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        logits = head(model(view(images.to(device), generator=crops)))
        loss = tF.cross_entropy(logits, labels.to(device), label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@contextlib.contextmanager
def _cpu_threads(threads, device):
    """torch's intra-op thread count set to ``threads`` inside (CPU devices; None: as it
    is), restored on exit."""
    before = torch.get_num_threads()
    change = threads is not None and device.type == "cpu" and threads != before
    if change:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(before)


def fine_tune_accuracy(encoder, dataset, train_idx, test_idx, size, device, seed=0,
                       steps=FINE_TUNE["steps"], batch=FINE_TUNE["batch"], lr=FINE_TUNE["lr"],
                       weight_decay=FINE_TUNE["weight_decay"], layer_decay=None, workers=0,
                       label_smoothing=FINE_TUNE["label_smoothing"], threads=1):
    """Test accuracy (percent on ``dataset[test_idx]``) of ``encoder`` fine-tuned end to end
    on the labelled images ``dataset[train_idx]``.

    A float32 deep copy of the encoder (the caller's is not touched) and a head minimise
    cross-entropy with ``label_smoothing`` by AdamW (``fine_tune_param_groups``:
    ``weight_decay`` on weights only, optional ViT ``layer_decay``) for ``steps`` steps:
    lr warms up linearly over steps // 10 steps, then decays to 0 along a cosine. Mini-batches hold min(batch, len(train_idx)) images
    (BatchNorm sees the whole labelled set when it is smaller than ``batch``). The test
    images get ``features``' deterministic view, the model in eval mode. Same ``seed``,
    same accuracy (on a given device and thread count).

    ``threads``: torch's intra-op threads during the run on a CPU device (None: torch's
    setting). One by default: the batches are small, and on a two-core machine shared with
    other processes two threads made a run on the digits 19x slower (50 s against 2.6 s)
    as they wait for each other at every op.

    The head is a parameter-free BatchNorm1d (the features standardised over the batch;
    running statistics in eval mode, as the linear probe standardises) and a
    zero-initialised Linear(encoder.dim, classes). Without the standardisation the head
    learns too slowly in a short schedule: on the digits, every label, 98.4% frozen
    linear probe, 81% fine-tuned without it, 96% with it."""
    device = torch.device(device)
    train_idx, test_idx = torch.as_tensor(train_idx).long(), torch.as_tensor(test_idx).long()
    _check_fine_tune(steps, batch, lr, weight_decay, label_smoothing, train_idx, test_idx)
    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or
                                threads < 1):
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    with _cpu_threads(threads, device):
        return _fine_tune(encoder, dataset, train_idx, test_idx, size, device, seed, steps,
                          batch, lr, weight_decay, layer_decay, workers, label_smoothing)


def _fine_tune(encoder, dataset, train_idx, test_idx, size, device, seed, steps, batch, lr,
               weight_decay, layer_decay, workers, label_smoothing):
    """``fine_tune_accuracy`` once its arguments are checked."""
    labels = dataset.labels
    classes = int(max(labels[train_idx].max(), labels[test_idx].max())) + 1
    model = copy.deepcopy(encoder).float().to(device)
    head = nn.Sequential(nn.BatchNorm1d(model.dim, affine=False),
                         nn.Linear(model.dim, classes)).to(device)
    nn.init.zeros_(head[1].weight), nn.init.zeros_(head[1].bias)
    opt = torch.optim.AdamW(fine_tune_param_groups(model, head, lr, weight_decay, layer_decay),
                            lr=lr)
    with torch.enable_grad():
        _fit(model, head, opt, dataset, train_idx, size, device, seed, int(steps),
             min(int(batch), len(train_idx)), label_smoothing, workers)
    model.eval(), head.eval()
    logits = features(lambda x: head(model(x)), dataset, test_idx, size, device,
                      workers=workers)
    return 100.0 * (logits.argmax(1) == labels[test_idx].to(logits.device)).float().mean().item()


def _mean_std(values):
    v = torch.tensor(values, dtype=torch.float64)
    return [float(v.mean()), float(v.std()) if len(v) > 1 else 0.0]


def fine_tune(encoder, dataset, train, test, size, device, shots=SHOTS, draws=2, seed=0,
              workers=0, **options):
    """{"1": [mean, std], "5": ..., "10": ..., "all": [acc, 0.0], "accuracies": {"1":
    [...], ..., "all": [acc]}}: ``fine_tune_accuracy`` on ``shots`` labelled training
    images per class over ``draws`` seeded draws (the low-shot probes' first draws: draw d
    of s shots uses seed seed * 1000 + 100 s + d, for the images and the fine-tune), and
    once on every training image. ``options`` go to ``fine_tune_accuracy``."""
    if isinstance(draws, bool) or int(draws) != draws or draws < 1:
        raise ValueError(f"fine-tune draws must be an integer >= 1, got {draws!r}")
    ytr = dataset.labels[train]
    kw = dict(dataset=dataset, test_idx=test, size=size, device=device, workers=workers,
              **options)
    accuracies = {}
    for s in shots:
        seeds = [seed * 1000 + 100 * s + d for d in range(int(draws))]
        accuracies[str(s)] = [fine_tune_accuracy(encoder, train_idx=train[few_shot_draw(
            ytr, s, k)], seed=k, **kw) for k in seeds]
    accuracies["all"] = [fine_tune_accuracy(encoder, train_idx=train, seed=seed * 1000, **kw)]
    table = {k: _mean_std(v) for k, v in accuracies.items()}
    table["accuracies"] = accuracies
    return table
