"""The training loop: settings, model, optimiser and schedules, DistributedDataParallel,
the streamed batches, per-rank augmentation, checkpoints, progress and throughput."""
import copy
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from fastssl import augment as A
from fastssl.optim import LARS
from fastssl.pretrain import checkpoint
from fastssl.pretrain.data import BatchOrder, collate, open_data, split
from fastssl.pretrain.methods import METHODS, build, views_for
from fastssl.pretrain.models import encoder as build_encoder
from fastssl.pretrain.models import sync_batchnorm

# Epochs per method on the digits: about two minutes each on two CPU cores (MoCo and BYOL
# also run a momentum encoder on both views, so they get fewer epochs). On --data without
# --epochs, enough epochs for about FOLDER_STEPS optimiser steps.
EPOCHS = {"simclr": 100, "moco": 80, "byol": 80, "simsiam": 100, "barlow": 100, "vicreg": 100,
          "dino": 60, "swav": 50}
FOLDER_STEPS = 1000
SHORT_RUN = 500  # fewer optimiser steps than this: warn that the run is too short to learn
LR = {"adamw": 4e-3, "lars": 0.3}  # per 256 images of the global batch (linear scaling)
WEIGHT_DECAY = {"adamw": 1e-4, "lars": 1e-6}
DEFAULTS = {"epochs": None, "batch_size": 128, "optimizer": "adamw", "lr": None,
            "weight_decay": None, "arch": "small", "width": 32, "test_fraction": 0.25,
            "knn_k": 20, "seed": 0, "warmup_epochs": 2, "workers": 0, "precision": "auto"}
# Settings a resumed run may change (they do not change what is computed).
RESUMABLE = {"workers", "stop_after", "max_steps", "device", "evaluate", "low_shot_draws"}


def settings(method, given):
    """The run's settings: the defaults, the method's, and the caller's (not None)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cfg = dict(DEFAULTS, method=method)
    cfg.update({k: v for k, v in given.items() if v is not None})
    digits = cfg.get("data") is None
    cfg["data"] = cfg.get("data")
    cfg["size"] = cfg.get("size") or (16 if digits else 64)
    # Digits are 8x8 and not mirror-symmetric: milder crops and no flip by default; the
    # BYOL-family views (the second one solarizes) keep more of the digit than SimCLR's.
    cfg["scale"] = list(cfg["scale"]) if cfg.get("scale") else (
        [0.2, 1.0] if not digits else [0.3, 1.0] if method in ("simclr", "moco", "simsiam")
        else [0.5, 1.0])
    cfg["flip_p"] = cfg["flip_p"] if cfg.get("flip_p") is not None else (0.0 if digits else 0.5)
    if cfg["optimizer"] not in LR:
        raise ValueError(f"optimizer must be one of {', '.join(LR)}, got {cfg['optimizer']!r}")
    cfg["lr"] = cfg["lr"] if cfg["lr"] is not None else LR[cfg["optimizer"]]
    if cfg["weight_decay"] is None:
        cfg["weight_decay"] = WEIGHT_DECAY[cfg["optimizer"]]
    for key in ("batch_size", "width", "size", "knn_k") + (
            ("epochs",) if cfg["epochs"] is not None else ()):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    for key in ("max_steps", "stop_after"):
        if cfg.get(key) is not None and int(cfg[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if int(cfg["workers"]) < 0:
        raise ValueError(f"workers must be >= 0, got {cfg['workers']}")
    if not 0 < cfg["test_fraction"] < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {cfg['test_fraction']}")
    if cfg["batch_size"] < 2:
        raise ValueError("batch_size must be >= 2 (the losses compare samples in a batch)")
    if cfg["precision"] not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg['precision']!r}")
    return cfg


def check_resume(cfg, saved, given):
    """A resumed run keeps the saved settings; a given setting that differs is an error."""
    for key, value in given.items():
        if value is None or key in RESUMABLE:
            continue
        have = saved.get(key)
        if json.loads(json.dumps(value)) != have:
            raise ValueError(f"--resume continues a run with its own settings: {key} was "
                             f"{have!r}, got {value!r}")
    out = dict(saved)
    out.update({k: given[k] for k in RESUMABLE if given.get(k) is not None})
    out["stop_after"] = given.get("stop_after")  # an interruption is not a setting
    return out


class Progress:
    """One line per epoch (epoch, bar, mean loss, images/s, elapsed, ETA), redrawn after
    every step on a terminal."""

    def __init__(self, name, epochs, total, start=0, stream=None):
        self.name, self.epochs, self.total, self.start = name, epochs, total, start
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def _line(self, epoch, step, loss, rate):
        done = step / self.total
        bar = "#" * round(20 * done) + "." * (20 - round(20 * done))
        spent = time.perf_counter() - self.t0
        ran = (step - self.start) / self.total
        eta = spent / ran * (1 - done) if ran > 0 else float("nan")
        return (f"{self.name:>8} epoch {epoch:>3}/{self.epochs} [{bar}] loss {loss:9.4f}  "
                f"{rate:7.0f} img/s  {spent:6.1f} s, eta {eta:4.0f} s")

    def step(self, epoch, step, loss, rate):
        if self.tty:
            self.stream.write("\r" + self._line(epoch + 1, step, loss, rate))
            self.stream.flush()

    def epoch(self, epoch, step, loss, rate):
        self.stream.write(("\r" if self.tty else "") + self._line(epoch + 1, step, loss, rate)
                          + "\n")
        self.stream.flush()


def learning_rate(step, total, warmup, base):
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_views(aug, images, generator, lo, hi, rows):
    """The views of this rank's rows [lo, hi) of a global batch of ``rows`` images: every
    rank draws the parameters of the whole global batch from the same seeded generator and
    applies its rows', so the views do not depend on the number of ranks."""
    batch, _ = A.as_batch(images)
    side = images.shape[-1]
    sizes = torch.tensor([[side, side]], device=images.device).expand(rows, 2)
    views = []
    for v in aug.views:
        params = [{k: t[lo:hi] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == rows
                   else t for k, t in p.items()} for p in v.sample(sizes, generator)]
        views.append(v.apply(batch, params))
    return views


class Trained:
    """What evaluation and the report need from a finished training run."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _mean_over_ranks(value, world):
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value


def _sum_over_ranks(count, world, device):
    if world == 1:
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def train(method, ctx, given, out_dir, log=print, progress=True, fresh=None):
    """Train one method on this rank; returns a ``Trained`` record (rank 0 also saved the
    checkpoint and ``encoder.pt`` in its run folder)."""
    say = log if ctx.main else (lambda *a: None)
    resume = given.pop("resume", None)
    cfg = settings(method, given)
    state = None
    if resume is not None:
        state = checkpoint.load(resume)
        if state["config"]["method"] != method:
            raise ValueError(f"--resume {resume!r} is a {state['config']['method']} run, "
                             f"not {method}")
        cfg = check_resume(cfg, state["config"], given)
    device = ctx.device
    cuda = device.type == "cuda"
    bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and cuda)

    dataset = open_data(cfg["data"], round(cfg["size"] * 8 / 7))
    train_idx, test_idx = split(dataset.labels, cfg["test_fraction"], cfg["seed"])
    b, world = int(cfg["batch_size"]), ctx.world
    if len(train_idx) < b * world:
        if world > 1:
            raise ValueError(f"a global batch of {b} x {world} ranks needs at least "
                             f"{b * world} training images; the data has {len(train_idx)}")
        b = cfg["batch_size"] = max(2, len(train_idx))
        say(f"batch size lowered to the {b} training images")
    B = b * world
    order = BatchOrder(train_idx, b, ctx.rank, world, cfg["seed"])
    steps = order.steps  # full global batches only (BatchNorm, equal-size views)
    if cfg["epochs"] is None:
        cfg["epochs"] = EPOCHS[method] if cfg["data"] is None else \
            max(1, math.ceil(FOLDER_STEPS / steps))
    total = steps * cfg["epochs"]
    if cfg.get("max_steps"):
        total = min(total, int(cfg["max_steps"]))
        cfg["epochs"] = math.ceil(total / steps)
    warmup = min(total // 2, steps * cfg["warmup_epochs"])
    base_lr = cfg["lr"] * B / 256

    torch.manual_seed(cfg["seed"])
    enc = build_encoder(cfg["arch"], cfg["width"], cfg["size"])
    initial = copy.deepcopy(enc)
    model = build(method, enc, distributed=world > 1)
    if world > 1:
        sync_batchnorm(model, device)
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    if cfg["optimizer"] == "lars":
        opt = LARS(model.trainable(), lr=base_lr, weight_decay=cfg["weight_decay"])
    else:
        opt = torch.optim.AdamW(model.trainable(), lr=base_lr, weight_decay=cfg["weight_decay"])
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    history = {"step_loss": [], "epoch_loss": [], "epoch_seconds": [], "skipped": 0,
               "train_s": 0.0, "data_wait_s": 0.0, "images": 0}
    step = 0
    if state is not None:
        checkpoint.restore(state, model, opt, gen)
        step, history = state["step"], state["history"]
        say(f"resumed {state['path']} at step {step}")
    run_dir = None
    if ctx.main and out_dir is not None:
        run_dir = os.path.dirname(state["path"]) if state is not None else fresh(method)
    aug = views_for(method, cfg["size"], tuple(cfg["scale"]), cfg["flip_p"],
                    dtype=torch.bfloat16 if bf16 and cuda else torch.float32,
                    channels_last=cuda)
    net = _ddp(model, device) if world > 1 else model
    workers = int(cfg["workers"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=order, num_workers=workers, collate_fn=collate, pin_memory=cuda,
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

    params = sum(p.numel() for p in enc.parameters())
    say(f"{method}: {dataset.name}, {len(train_idx)} train / {len(test_idx)} test images, "
        f"{cfg['arch']} encoder {params / 1e6:.2f}M parameters, {world} process"
        f"{'es' * (world > 1)} x batch {b} = global batch {B}, {total} steps ({cfg['epochs']} "
        f"epoch{'s' * (cfg['epochs'] != 1)} of {steps}), {cfg['optimizer']} "
        f"lr {base_lr:.4g}, device {device}{', bf16' if bf16 else ''}, {workers} workers")
    if total < SHORT_RUN:
        say(f"warning: {total} optimiser steps is too few for SSL to learn much (methods "
            f"usually need thousands); raise --epochs or --max-steps")
    stop = min(total, step + int(cfg["stop_after"])) if cfg.get("stop_after") else total
    bar = Progress(method, cfg["epochs"], total, step) if progress and ctx.main else None
    seen_bad = set()
    while step < stop:
        epoch, offset = divmod(step, steps)
        order.set_epoch(epoch, offset)
        net.train()
        if offset == 0:
            epoch_sum, epoch_n, t_epoch = 0.0, 0, 0.0
        else:  # resumed inside an epoch: its mean covers the steps run before
            done_steps = history["step_loss"][epoch * steps:]
            epoch_sum, epoch_n, t_epoch = sum(done_steps), len(done_steps), 0.0
        skipped = 0
        batches = iter(loader)
        t_wait = t_run = 0.0
        while step < stop and step < (epoch + 1) * steps:
            t0 = time.perf_counter()
            images, _, bad = next(batches)
            images = images.to(device, non_blocking=True)
            t1 = time.perf_counter()
            for path, error in bad:
                if path not in seen_bad:
                    seen_bad.add(path)
                    say(f"skipped unreadable file {path} ({error})")
            skipped += len(bad)
            views = make_views(aug, images, gen, ctx.rank * b, (ctx.rank + 1) * b, B)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, total, warmup, base_lr)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = net(views)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.after_step(step, total)
            value = _mean_over_ranks(loss.detach().float(), world).item()
            step += 1
            if not math.isfinite(value):
                raise FloatingPointError(f"{method}: the loss became {value} at step {step}")
            history["step_loss"].append(value)
            epoch_sum, epoch_n = epoch_sum + value, epoch_n + 1
            t2 = time.perf_counter()
            t_wait, t_run = t_wait + (t1 - t0), t_run + (t2 - t0)
            history["images"] += B
            if bar:
                bar.step(epoch, step, value, B * (epoch_n - (offset if offset else 0)) /
                         max(t_run, 1e-9))
        t_epoch += t_run
        history["train_s"] += t_run
        history["data_wait_s"] += t_wait
        history["skipped"] += _sum_over_ranks(skipped, world, device)
        ran = step - epoch * steps - offset
        rate = B * ran / max(t_run, 1e-9)
        if step == (epoch + 1) * steps or step == total:
            history["epoch_loss"].append(epoch_sum / epoch_n)
            history["epoch_seconds"].append(t_epoch)
        if bar:
            bar.epoch(epoch, step, epoch_sum / epoch_n, rate)
        if run_dir is not None:
            checkpoint.save(run_dir, model, opt, step, gen, history, cfg)
    del net, loader
    tp = history["throughput"] = throughput(history, B, world)
    say(f"{method}: {step} steps, {history['train_s']:.1f} s of training: "
        f"{tp['images_per_s']:.0f} images/s ({tp['images_per_s_per_rank']:.0f} per process), "
        f"{100 * tp['data_wait_share']:.1f}% of step time waiting for data")
    if history["skipped"]:
        say(f"{history['skipped']} reads of unreadable files skipped ({len(seen_bad)} files "
            f"named above on rank 0)")
    return Trained(method=method, cfg=cfg, encoder=enc, initial=initial, dataset=dataset,
                   train=train_idx, test=test_idx, history=history, run_dir=run_dir,
                   step=step, total=total, params=params, device=device)


def _ddp(model, device):
    """DistributedDataParallel without buffer broadcasts in forward: every rank's buffers
    (BatchNorm over the global batch, the EMA teacher, the queue) evolve identically."""
    import inspect
    DDP = torch.nn.parallel.DistributedDataParallel
    quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
        inspect.signature(DDP).parameters else {"broadcast_buffers": False}
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **quiet)


def throughput(history, B, world):
    t = max(history["train_s"], 1e-9)
    return {"images_per_s": history["images"] / t,
            "images_per_s_per_rank": history["images"] / world / t,
            "data_wait_share": history["data_wait_s"] / t, "world": world, "global_batch": B}
