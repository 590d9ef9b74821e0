"""``fastssl pretrain``: the SSL methods end to end on a small CNN, judged on held-out data.

Each method is written with fastssl's public pieces only (losses, ``EMA``, ``MoCoQueue``,
augmentation presets):

=========  ==========================================================================
method     views                      objective
=========  ==========================================================================
simclr     ``SimCLRAugment``          ``NTXentLoss`` on projections of both views
moco       ``MoCoV2Augment``          ``InfoNCELoss`` of queries against momentum keys
                                      (``EMA`` key encoder) + a ``MoCoQueue``, symmetrised
byol       ``BYOLAugment``            ``NegativeCosineSimilarity`` of online predictions
                                      against ``EMA`` target projections, symmetrised
simsiam    ``MoCoV2Augment``          ``NegativeCosineSimilarity`` of predictions against
                                      stop-gradient projections, symmetrised
barlow     ``BarlowTwinsAugment``     ``BarlowTwinsLoss`` on 512-d projections
vicreg     ``VICRegAugment``          ``VICRegLoss`` on 512-d projections
=========  ==========================================================================

Evaluation: the frozen encoder's pooled features of the held-out images (one
deterministic view: the whole image resized, normalised) against those of the training
images — a weighted kNN classifier (cosine similarity, k neighbours voting with
exp(s / 0.1)) and a linear probe (multinomial logistic regression on standardised
features, full-batch L-BFGS). The same evaluation runs on the identical encoder at its
random initialisation (the weights training started from) and on the raw pixels of the
same input view. Labels are used for evaluation only.

Default data: scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes,
shipped inside the scikit-learn wheel, so the command needs no download), replicated to
three channels; ``--data DIR`` reads an image folder (one sub-folder per class).
"""
import copy
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as tF
from torch import nn

import fastssl
from fastssl import augment as A

METHODS = ("simclr", "moco", "byol", "simsiam", "barlow", "vicreg")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# ----------------------------------------------------------------------------- data

class Dataset:
    """uint8 images (N, 3, H, W), integer labels, class names, and a name."""

    def __init__(self, images, labels, classes, name):
        self.images, self.labels, self.classes, self.name = images, labels, list(classes), name


def load_digits():
    """scikit-learn's digits: 8x8 intensities 0..16, scaled to 0..255, gray to RGB."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise RuntimeError("the default dataset ships with scikit-learn: pip install scikit-learn "
                           "(or pass --data DIR)") from e
    d = sk_digits()
    images = torch.from_numpy(d.images).mul(255.0 / 16.0).round_().to(torch.uint8)
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()
    return Dataset(images, torch.from_numpy(d.target).long(), [str(c) for c in range(10)],
                   "sklearn digits (8x8)")


def load_folder(root, side, log=print):
    """An image folder: ``root/<class>/<image>``; each image is converted to RGB, its shorter
    side resized to ``side`` (antialiased bilinear) and centre-cropped to side x side."""
    try:
        from PIL import Image
    except ImportError as e:
        raise RuntimeError("reading --data needs Pillow: pip install pillow") from e
    if not os.path.isdir(root):
        raise ValueError(f"--data {root!r} is not a folder")
    classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
    files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c)))
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    if len(classes) < 2 or not files:
        raise ValueError(f"--data {root!r} needs at least two class sub-folders holding images "
                         f"({', '.join(IMAGE_EXTENSIONS)}); found {len(classes)} folders, "
                         f"{len(files)} images")
    images = torch.empty(len(files), 3, side, side, dtype=torch.uint8)
    for k, (path, _) in enumerate(files):
        with Image.open(path) as im:
            x = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            x = x.view(im.height, im.width, 3).permute(2, 0, 1).float()[None]
        s = side / min(x.shape[-2:])
        h, w = max(side, round(x.shape[-2] * s)), max(side, round(x.shape[-1] * s))
        x = tF.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        t, l = (h - side) // 2, (w - side) // 2
        images[k] = x[0, :, t:t + side, l:l + side].round().clamp(0, 255).to(torch.uint8)
        if (k + 1) % 1000 == 0:
            log(f"  loaded {k + 1}/{len(files)} images")
    labels = torch.tensor([c for _, c in files])
    return Dataset(images, labels, classes, f"folder {root} ({side}x{side})")


def split(labels, test_fraction, seed):
    """Stratified train/test indices: each class keeps ``test_fraction`` of its images
    (at least one when it has two or more) for testing."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * test_fraction) if len(idx) > 1 else 0
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


# ----------------------------------------------------------------------------- encoder

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = tF.relu(self.bn1(self.conv1(x)))
        return tF.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style encoder: a 3x3 stem and three basic blocks of widths w, 2w, 4w (the
    last two stride 2), global average pooling. w = 32: 307k parameters, 128-d features."""

    def __init__(self, width=32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2),
                                    BasicBlock(2 * w, 4 * w, 2))
        self.dim = 4 * w

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def mlp(dims, last_bn=False):
    """Linear-BN-ReLU layers, a plain Linear last (followed by an affine-free BN if asked)."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU()]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- methods

class Method(nn.Module):
    """An encoder, the modules the optimiser trains (``self``'s parameters minus any
    teacher), ``loss(views)`` and ``after_step(step, total)``."""

    def after_step(self, step, total):
        pass

    def trainable(self):
        return [p for p in self.parameters() if p.requires_grad]


class SimCLR(Method):
    def __init__(self, encoder, temperature=0.2):
        super().__init__()
        self.encoder, self.head = encoder, mlp([encoder.dim, 256, 64])
        self.criterion = fastssl.NTXentLoss(temperature=temperature)

    def loss(self, views):
        z0, z1 = (self.head(self.encoder(v)) for v in views)
        return self.criterion(z0, z1)


class MoCo(Method):
    """MoCo v2: queries from the student, keys from its momentum copy, a queue of past
    keys as extra negatives (plus the batch's other keys), both view orders."""

    def __init__(self, encoder, temperature=0.2, queue_size=1024, momentum=0.99):
        super().__init__()
        self.encoder = encoder
        self.query = nn.Sequential(encoder, mlp([encoder.dim, 256, 64]))
        self.key = fastssl.EMA(self.query, momentum=momentum, final_momentum=1.0)
        self.queue = fastssl.MoCoQueue(64, queue_size)
        self.criterion = fastssl.InfoNCELoss(temperature=temperature)
        self._keys = None

    def loss(self, views):
        q0, q1 = (self.query(v) for v in views)
        with torch.no_grad():
            k0, k1 = (self.key(v) for v in views)
        negatives = self.queue.negatives()
        self._keys = torch.cat([k0, k1])
        return 0.5 * (self.criterion(q0, k1, negatives) + self.criterion(q1, k0, negatives))

    def after_step(self, step, total):
        self.key.update(step, total)
        self.queue.enqueue(tF.normalize(self._keys, dim=1))


class BYOL(Method):
    def __init__(self, encoder, momentum=0.99):
        super().__init__()
        self.encoder = encoder
        self.online = nn.Sequential(encoder, mlp([encoder.dim, 256, 64]))
        self.predictor = mlp([64, 256, 64])
        self.target = fastssl.EMA(self.online, momentum=momentum, final_momentum=1.0)
        self.criterion = fastssl.NegativeCosineSimilarity()

    def loss(self, views):
        p0, p1 = (self.predictor(self.online(v)) for v in views)
        with torch.no_grad():
            t0, t1 = (self.target(v) for v in views)
        return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))

    def after_step(self, step, total):
        self.target.update(step, total)


class SimSiam(Method):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp([encoder.dim, 256, 256], last_bn=True)
        self.predictor = mlp([256, 64, 256])
        self.criterion = fastssl.NegativeCosineSimilarity()

    def loss(self, views):
        z0, z1 = (self.projector(self.encoder(v)) for v in views)
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))


class Barlow(Method):
    def __init__(self, encoder, lambda_param=5e-3):
        super().__init__()
        self.encoder, self.projector = encoder, mlp([encoder.dim, 512, 512, 512])
        self.criterion = fastssl.BarlowTwinsLoss(lambda_param=lambda_param)

    def loss(self, views):
        z0, z1 = (self.projector(self.encoder(v)) for v in views)
        return self.criterion(z0, z1)


class VICReg(Method):
    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.projector = encoder, mlp([encoder.dim, 512, 512, 512])
        self.criterion = fastssl.VICRegLoss()

    def loss(self, views):
        z0, z1 = (self.projector(self.encoder(v)) for v in views)
        return self.criterion(z0, z1)


def build(method, encoder):
    return {"simclr": SimCLR, "moco": MoCo, "byol": BYOL, "simsiam": SimSiam,
            "barlow": Barlow, "vicreg": VICReg}[method](encoder)


def views_for(method, size, scale, flip_p):
    """The method's augmentation preset at ``size`` (crop ``scale``, flip probability)."""
    kw = dict(size=size, scale=scale, flip_p=flip_p)
    if method == "simclr":
        return A.SimCLRAugment(**kw)
    if method in ("moco", "simsiam"):
        return A.MoCoV2Augment(**kw)
    return A.BYOLAugment(**kw)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def features(fn, images, size, batch=512):
    """``fn`` of one deterministic view per image: the whole image resized to ``size``
    and normalised, exactly as training views are."""
    view = A.Augment(A.RandomResizedCrop(size, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
                     A.Normalize())
    return torch.cat([fn(view(images[i:i + batch])).float() for i in range(0, len(images), batch)])


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
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
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


def evaluate(fn, images, labels, train, test, size, knn_k):
    feats = features(fn, images, size)
    y = labels.to(feats.device)
    ftr, fte = feats[train], feats[test]
    return {"knn": knn_accuracy(ftr, y[train], fte, y[test], knn_k),
            "linear": linear_probe_accuracy(ftr, y[train], fte, y[test]),
            "dim": feats.shape[1]}


# ----------------------------------------------------------------------------- training

# Epochs per method: about four minutes each on two CPU cores (MoCo and BYOL also run a
# momentum encoder on both views, so they get fewer epochs).
EPOCHS = {"simclr": 100, "moco": 80, "byol": 80, "simsiam": 100, "barlow": 100, "vicreg": 100}
DEFAULTS = {"epochs": None, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4, "width": 32,
            "test_fraction": 0.25, "knn_k": 20, "seed": 0, "warmup_epochs": 2}


class Progress:
    """One line per epoch (epoch, bar, mean loss, elapsed, ETA), redrawn after every step
    on a terminal."""

    def __init__(self, name, epochs, total, stream=None):
        self.name, self.epochs, self.total = name, epochs, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def _line(self, epoch, step, loss):
        done = step / self.total
        bar = "#" * round(20 * done) + "." * (20 - round(20 * done))
        spent = time.perf_counter() - self.t0
        eta = spent / done - spent if done > 0 else float("nan")
        return (f"{self.name:>8} epoch {epoch:>3}/{self.epochs} [{bar}] loss {loss:9.4f}  "
                f"{spent:6.1f} s, eta {eta:4.0f} s")

    def step(self, epoch, step, loss):
        if self.tty:
            self.stream.write("\r" + self._line(epoch + 1, step, loss))
            self.stream.flush()

    def epoch(self, epoch, step, loss):
        self.stream.write(("\r" if self.tty else "") + self._line(epoch + 1, step, loss) + "\n")
        self.stream.flush()


def _lr(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def environment(device):
    env = {"fastssl": fastssl.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device_type": device.type,
           "date": datetime.date.today().isoformat()}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        env["threads"] = torch.get_num_threads()
    return env


def pretrain(method, data=None, epochs=None, batch_size=None, lr=None, weight_decay=None,
             width=None, size=None, scale=None, flip_p=None, test_fraction=None, knn_k=None,
             seed=None, device=None, max_steps=None, out_dir="runs", log=print, progress=True):
    """Train ``method`` and evaluate it; returns the report (also written to
    ``<out_dir>/<method>-<time>/report.json`` with ``loss.png`` beside it when out_dir is
    not None). ``max_steps`` stops training early (the schedules end there)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cfg = dict(DEFAULTS)
    cfg["epochs"] = EPOCHS[method]
    cfg.update({k: v for k, v in dict(epochs=epochs, batch_size=batch_size, lr=lr,
                                      weight_decay=weight_decay, width=width,
                                      test_fraction=test_fraction, knn_k=knn_k,
                                      seed=seed).items() if v is not None})
    digits = data is None
    cfg["size"] = size or (16 if digits else 64)
    # Digits are 8x8 and not mirror-symmetric: milder crops and no flip by default; the
    # BYOL-family views (the second one solarizes) keep more of the digit than SimCLR's.
    cfg["scale"] = tuple(scale) if scale else (
        (0.2, 1.0) if not digits else (0.3, 1.0) if method in ("simclr", "moco", "simsiam")
        else (0.5, 1.0))
    cfg["flip_p"] = flip_p if flip_p is not None else (0.0 if digits else 0.5)
    cfg.update(method=method, data=data or "sklearn-digits")
    for key in ("epochs", "batch_size", "width", "size", "knn_k"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if not 0 < cfg["test_fraction"] < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {cfg['test_fraction']}")
    if cfg["batch_size"] < 2:
        raise ValueError("batch_size must be >= 2 (the losses compare samples in a batch)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg["device"] = str(device)

    t_start = time.perf_counter()
    ds = load_digits() if digits else load_folder(data, round(cfg["size"] * 8 / 7), log)
    train, test = split(ds.labels, cfg["test_fraction"], cfg["seed"])
    n_train = len(train)
    if n_train < cfg["batch_size"]:
        cfg["batch_size"] = max(2, n_train)
        log(f"batch size lowered to the {n_train} training images")
    images = ds.images.to(device)
    train_d = train.to(device)

    torch.manual_seed(cfg["seed"])
    encoder = SmallResNet(cfg["width"])
    model = build(method, encoder).to(device)
    initial = copy.deepcopy(encoder)
    aug = views_for(method, cfg["size"], cfg["scale"], cfg["flip_p"])
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    opt = torch.optim.AdamW(model.trainable(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = n_train // cfg["batch_size"]  # full batches only (BatchNorm, equal-size views)
    total = steps * cfg["epochs"]
    if max_steps is not None:
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        total = min(total, int(max_steps))
        cfg["epochs"] = math.ceil(total / steps)
    cfg["max_steps"] = max_steps
    warmup = min(total // 2, steps * cfg["warmup_epochs"])
    params = sum(p.numel() for p in encoder.parameters())
    log(f"{method}: {ds.name}, {n_train} train / {len(test)} test images, encoder "
        f"{params / 1e3:.0f}k parameters, {cfg['epochs']} epoch{'s' * (cfg['epochs'] != 1)} x "
        f"{steps} steps of {cfg['batch_size']}, device {device}")
    bar = Progress(method, cfg["epochs"], total) if progress else None
    epoch_loss, epoch_time, step_loss = [], [], []
    t_train = time.perf_counter()
    step = 0
    for epoch in range(cfg["epochs"]):
        model.train()
        t0 = time.perf_counter()
        order = train_d[torch.randperm(n_train, generator=gen, device=device)]
        total_loss, done = 0.0, 0
        for s in range(min(steps, total - step)):
            for group in opt.param_groups:
                group["lr"] = _lr(step, total, warmup, cfg["lr"])
            batch = images[order[s * cfg["batch_size"]:(s + 1) * cfg["batch_size"]]]
            views = aug(batch, generator=gen)
            loss = model.loss(views)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.after_step(step, total)
            step += 1
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{method}: the loss became {value} at step {step}")
            step_loss.append(value)
            total_loss += value
            done += 1
            if bar:
                bar.step(epoch, step, value)
        epoch_loss.append(total_loss / done)
        epoch_time.append(time.perf_counter() - t0)
        if bar:
            bar.epoch(epoch, step, epoch_loss[-1])
    train_s = time.perf_counter() - t_train

    t_eval = time.perf_counter()
    encoder.eval(), initial.eval()
    flat = lambda x: x.flatten(1)  # noqa: E731
    acc = {method: evaluate(encoder, images, ds.labels, train_d, test.to(device), cfg["size"], cfg["knn_k"]),
           "random init": evaluate(initial.to(device), images, ds.labels, train_d, test.to(device),
                                   cfg["size"], cfg["knn_k"]),
           "raw pixels": evaluate(flat, images, ds.labels, train_d, test.to(device), cfg["size"],
                                  cfg["knn_k"])}
    eval_s = time.perf_counter() - t_eval
    report = {"method": method, "config": cfg,
              "dataset": {"name": ds.name, "train": n_train, "test": len(test),
                          "classes": ds.classes, "image": list(ds.images.shape[1:])},
              "encoder_parameters": params, "epoch_loss": epoch_loss, "step_loss": step_loss,
              "epoch_seconds": epoch_time,
              "accuracy": acc,
              "knn_margin_over_random_init": acc[method]["knn"] - acc["random init"]["knn"],
              "timings": {"train_s": train_s, "eval_s": eval_s,
                          "total_s": time.perf_counter() - t_start},
              "environment": environment(device),
              "command": _command(),
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if out_dir is not None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = _fresh(os.path.join(out_dir, f"{method}-{stamp}"))
        with open(os.path.join(run_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        plot_losses({method: epoch_loss}, os.path.join(run_dir, "loss.png"))
        report["run_dir"] = run_dir
    return report


def _command():
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    return "fastssl " + " ".join(sys.argv[1:]) if argv0 in ("fastssl", "cli.py") else None


def _fresh(path):
    """``path``, or ``path-2``, ``path-3``... when it exists (two runs in the same second)."""
    candidate, k = path, 1
    while os.path.exists(candidate):
        k += 1
        candidate = f"{path}-{k}"
    os.makedirs(candidate)
    return candidate


def plot_losses(curves, path):
    """One panel per method: training loss per epoch (losses of different methods live on
    different scales, so they do not share an axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(curves)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, loss) in zip(axes.flat, curves.items()):
        ax.plot(range(1, len(loss) + 1), loss, marker="o" if len(loss) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(reports):
    """A markdown table: kNN and linear-probe accuracy of each method, random init, pixels."""
    lines = ["| encoder | kNN % | linear probe % | kNN - random init | epochs | train s | final loss |",
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        a = r["accuracy"][r["method"]]
        lines.append(f"| {r['method']} | {a['knn']:.1f} | {a['linear']:.1f} | "
                     f"{r['knn_margin_over_random_init']:+.1f} | {r['config']['epochs']} | "
                     f"{r['timings']['train_s']:.0f} | "
                     f"{r['epoch_loss'][-1]:.4f} |")
    base = reports[0]["accuracy"]
    for name in ("random init", "raw pixels"):
        lines.append(f"| {name} | {base[name]['knn']:.1f} | {base[name]['linear']:.1f} | | | | |")
    return "\n".join(lines)


def run(methods, out_dir="runs", log=print, **kw):
    """Every method in ``methods`` with the same settings; prints one table."""
    reports = []
    for method in methods:
        reports.append(pretrain(method, out_dir=out_dir, log=log, **kw))
        if "run_dir" in reports[-1]:
            log(f"wrote {reports[-1]['run_dir']}/report.json and loss.png")
    r0 = reports[0]
    log("")
    log(f"{r0['dataset']['name']}: {r0['dataset']['train']} train / {r0['dataset']['test']} "
        f"held-out images; {r0['environment']['device']}, seed {r0['config']['seed']}")
    log(table(reports))
    if len(reports) > 1 and out_dir is not None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = _fresh(os.path.join(out_dir, f"all-{stamp}"))
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            # The schema of fastssl bench's files, so benchmarks/results_table.py reads it.
            json.dump({"op": "pretrain", "cpu": r0["environment"]["device_type"] != "cuda",
                       "environment": r0["environment"], "command": _command(),
                       "runs": [r.get("run_dir") for r in reports], "reports": reports}, f, indent=1)
        with open(os.path.join(run_dir, "summary.md"), "w") as f:
            f.write(table(reports) + "\n")
        plot_losses({r["method"]: r["epoch_loss"] for r in reports},
                    os.path.join(run_dir, "loss.png"))
        log(f"wrote {run_dir}/summary.json, summary.md and loss.png")
    return reports
