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
from fastssl.pretrain.data import PHOTOS, BatchOrder, collate, open_data, split
from fastssl.pretrain.methods import MASKED, NO_CLASS_TOKEN, build, get, views_for
from fastssl.pretrain.models import encoder as build_encoder
from fastssl.pretrain.models import sync_batchnorm

# Epochs per method on the digits and the sample photographs: each method's ``epochs``
# (``methods.EPOCHS``). On other --data without --epochs, enough epochs for about
# FOLDER_STEPS optimiser steps.
FOLDER_STEPS = 1000
PHOTOS_SIZE = 32  # the view side on --data photos
SHORT_RUN = 500  # fewer optimiser steps than this: warn that the run is too short to learn
LR = {"adamw": 4e-3, "lars": 0.3}  # per 256 images of the global batch (linear scaling)
WEIGHT_DECAY = {"adamw": 1e-4, "lars": 1e-6}
DEFAULTS = {"epochs": None, "batch_size": 128, "optimizer": "adamw", "lr": None,
            "weight_decay": None, "arch": "small", "width": 32, "test_fraction": 0.25,
            "knn_k": 20, "seed": 0, "warmup_epochs": 2, "workers": 0, "precision": "auto"}
# auto: bf16 autocast on CUDA, fp32 on CPU; fp64: weights, views and losses in float64
# (slow; for runs that must agree across process counts to float64 rounding)
PRECISIONS = ("auto", "fp32", "bf16", "fp64")
# Settings a resumed run may change (they do not change what is computed).
RESUMABLE = {"workers", "stop_after", "max_steps", "device", "evaluate", "low_shot_draws",
             "fine_tune", "fine_tune_draws"}


def settings(method, given):
    """The run's settings: the defaults, the method's, and the caller's (not None)."""
    get(method)  # a ValueError naming the choices for an unknown method
    cfg = dict(DEFAULTS, method=method, arch="vit" if method in MASKED else DEFAULTS["arch"])
    cfg.update({k: v for k, v in given.items() if v is not None})
    digits = cfg.get("data") is None
    cfg["data"] = cfg.get("data")
    photos = cfg.get("data") == PHOTOS  # the bundled colour crops: a fixed, small set
    default_size = get(method).digits_size if digits else PHOTOS_SIZE if photos else 64
    cfg["size"] = cfg.get("size") or default_size
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
    if cfg["precision"] not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{cfg['precision']!r}")
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


class Plan:
    """What one rank trains on: the data and its split, the batch order and the step counts,
    the learning rate."""

    def __init__(self, cfg, ctx, say):
        self.dataset = open_data(cfg["data"], round(cfg["size"] * 8 / 7))
        self.train_idx, self.test_idx = split(self.dataset.labels, cfg["test_fraction"],
                                              cfg["seed"])
        b, world = int(cfg["batch_size"]), ctx.world
        if len(self.train_idx) < b * world:
            if world > 1:
                raise ValueError(f"a global batch of {b} x {world} ranks needs at least "
                                 f"{b * world} training images; the data has "
                                 f"{len(self.train_idx)}")
            b = cfg["batch_size"] = max(2, len(self.train_idx))
            say(f"batch size lowered to the {b} training images")
        self.b, self.B = b, b * world
        self.order = BatchOrder(self.train_idx, b, ctx.rank, world, cfg["seed"])
        self.steps = self.order.steps  # full global batches only (BatchNorm, equal views)
        if cfg["epochs"] is None:
            cfg["epochs"] = get(cfg["method"]).epochs if cfg["data"] in (None, PHOTOS) \
                else max(1, math.ceil(FOLDER_STEPS / self.steps))
        self.total = self.steps * cfg["epochs"]
        if cfg.get("max_steps"):
            self.total = min(self.total, int(cfg["max_steps"]))
            cfg["epochs"] = math.ceil(self.total / self.steps)
        self.warmup = min(self.total // 2, self.steps * cfg["warmup_epochs"])
        self.base_lr = cfg["lr"] * self.B / 256


def _config(method, given, say):
    """The run's settings and, with ``resume``, the saved state to continue from."""
    resume = given.pop("resume", None)
    cfg = settings(method, given)
    if resume is None:
        return cfg, None
    state = checkpoint.load(resume)
    if state["config"]["method"] != method:
        raise ValueError(f"--resume {resume!r} is a {state['config']['method']} run, "
                         f"not {method}")
    return check_resume(cfg, state["config"], given), state


def _model(method, cfg, ctx, plan):
    """(encoder, its random initialisation, the method's model, the optimiser)."""
    torch.manual_seed(cfg["seed"])
    enc = build_encoder(cfg["arch"], cfg["width"], cfg["size"],
                        cls_token=method not in NO_CLASS_TOKEN)
    initial = copy.deepcopy(enc)
    model = build(method, enc, distributed=ctx.world > 1, size=cfg["size"],
                  train_size=len(plan.train_idx))
    if ctx.world > 1:
        sync_batchnorm(model, ctx.device)
    model.to(ctx.device)
    if cfg["precision"] == "fp64":
        model.double()
    if ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    kind = LARS if cfg["optimizer"] == "lars" else torch.optim.AdamW
    opt = kind(model.trainable(), lr=plan.base_lr, weight_decay=cfg["weight_decay"])
    return enc, initial, model, opt


def _announce(say, method, cfg, ctx, plan, params, bf16):
    say(f"{method}: {plan.dataset.name}, {len(plan.train_idx)} train / {len(plan.test_idx)} "
        f"test images, {cfg['arch']} encoder {params / 1e6:.2f}M parameters, {ctx.world} "
        f"process{'es' * (ctx.world > 1)} x batch {plan.b} = global batch {plan.B}, "
        f"{plan.total} steps ({cfg['epochs']} epoch{'s' * (cfg['epochs'] != 1)} of "
        f"{plan.steps}), {cfg['optimizer']} lr {plan.base_lr:.4g}, device {ctx.device}"
        f"{', bf16' if bf16 else ', fp64' if cfg['precision'] == 'fp64' else ''}, "
        f"{cfg['workers']} workers")
    if plan.total < SHORT_RUN:
        say(f"warning: {plan.total} optimiser steps is too few for SSL to learn much (methods "
            f"usually need thousands); raise --epochs or --max-steps")


class EpochStart:
    """What a method's ``before_epoch`` may use: the epoch and its ``steps``, the training
    images (``dataset``, ``train_idx``, ``size``), the run's ``device``, ``dtype``, ``seed``,
    ``world`` and ``say``; ``features(fn)`` (``fn`` of one deterministic view of every
    training image, in ``train_idx`` order, each rank computing its share and all ranks
    receiving all) and ``reset_optimizer(params)`` (forget the optimiser's state of
    ``params``, as for a freshly made head)."""

    def __init__(self, loop, epoch):
        ctx, plan = loop.ctx, loop.plan
        self.epoch, self.dataset, self.train_idx = epoch, plan.dataset, plan.train_idx
        self.steps = plan.steps  # optimiser steps per epoch
        self.size, self.device, self.seed = loop.cfg["size"], ctx.device, loop.cfg["seed"]
        self.dtype = torch.float64 if loop.fp64 else torch.float32
        self.world, self.rank, self.say, self._opt = ctx.world, ctx.rank, loop.say, loop.opt
        self._workers = int(loop.cfg["workers"])

    def features(self, fn):
        from fastssl.pretrain.evaluation import features
        n = len(self.train_idx)
        share = -(-n // self.world)
        mine = self.train_idx[self.rank * share:(self.rank + 1) * share]
        with torch.no_grad():
            out = features(lambda x: fn(x.to(self.dtype)), self.dataset, mine, self.size,
                           self.device, workers=self._workers, dtype=self.dtype)
        if self.world == 1:
            return out
        padded = out.new_zeros(share, *out.shape[1:])
        padded[:len(out)] = out
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[:n]

    def reset_optimizer(self, params):
        for p in params:
            self._opt.state.pop(p, None)


class _Loop:
    """The optimiser steps of one rank: batches, views, loss, update, history, progress."""

    def __init__(self, method, cfg, ctx, plan, model, opt, gen, history, say, bar):
        self.__dict__.update(method=method, cfg=cfg, ctx=ctx, plan=plan, model=model,
                             opt=opt, gen=gen, history=history, say=say, bar=bar)
        cuda = ctx.device.type == "cuda"
        self.bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and cuda)
        self.fp64 = cfg["precision"] == "fp64"
        self.aug = views_for(method, cfg["size"], tuple(cfg["scale"]), cfg["flip_p"],
                             dtype=torch.bfloat16 if self.bf16 and cuda else torch.float32,
                             channels_last=cuda)
        self.net = _ddp(model, ctx.device) if ctx.world > 1 else model
        workers = int(cfg["workers"])
        self.loader = torch.utils.data.DataLoader(
            plan.dataset, batch_sampler=plan.order, num_workers=workers, collate_fn=collate,
            pin_memory=cuda, persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None)
        self.seen_bad = set()

    def one_step(self, images, step, indices):
        """One optimiser step on a global batch's rows of this rank (``indices``: the global
        batch's dataset indices); the loss averaged over ranks."""
        ctx, plan = self.ctx, self.plan
        views = make_views(self.aug, images, self.gen, ctx.rank * plan.b,
                           (ctx.rank + 1) * plan.b, plan.B)
        if self.fp64:
            views = [v.double() for v in views]
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(step, plan.total, plan.warmup, plan.base_lr)
        extra = self.model.sample(self.gen, ctx.rank * plan.b, (ctx.rank + 1) * plan.b,
                                  plan.B, ctx.device, indices=indices)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.net(views) if extra is None else self.net(views, extra)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.model.after_step(step, plan.total)
        value = _mean_over_ranks(loss.detach().to(torch.float64 if self.fp64 else
                                                  torch.float32), ctx.world).item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.method}: the loss became {value} at step "
                                     f"{step + 1}")
        return value

    def epoch(self, step, stop, run_dir):
        """Steps of the epoch that ``step`` lies in, up to ``stop``; returns the next step."""
        plan, history = self.plan, self.history
        epoch, offset = divmod(step, plan.steps)
        # a method's own order for the epoch (DeepCluster's sampler), kept in its state so
        # that a run resumed inside the epoch continues it
        order = self.model.before_epoch(epoch, EpochStart(self, epoch)) if offset == 0 else \
            self.model.epoch_order()
        plan.order.set_epoch(epoch, offset, order)
        self.net.train()
        done = history["step_loss"][epoch * plan.steps:] if offset else []
        epoch_sum, epoch_n = sum(done), len(done)  # resumed inside an epoch: its first steps
        skipped, t_wait, t_run = 0, 0.0, 0.0
        batches = iter(self.loader)
        while step < stop and step < (epoch + 1) * plan.steps:
            t0 = time.perf_counter()
            images, _, bad = next(batches)
            images = images.to(self.ctx.device, non_blocking=True)
            t1 = time.perf_counter()
            skipped += self._note_bad(bad)
            value = self.one_step(images, step,
                                  plan.order.global_batch(step - epoch * plan.steps))
            step += 1
            history["step_loss"].append(value)
            epoch_sum, epoch_n = epoch_sum + value, epoch_n + 1
            t2 = time.perf_counter()
            t_wait, t_run = t_wait + (t1 - t0), t_run + (t2 - t0)
            history["images"] += plan.B
            if self.bar:
                self.bar.step(epoch, step, value, plan.B * (epoch_n - len(done)) /
                              max(t_run, 1e-9))
        history["train_s"] += t_run
        history["data_wait_s"] += t_wait
        history["skipped"] += _sum_over_ranks(skipped, self.ctx.world, self.ctx.device)
        if step == (epoch + 1) * plan.steps or step == plan.total:
            history["epoch_loss"].append(epoch_sum / epoch_n)
            history["epoch_seconds"].append(t_run)
        if self.bar:
            ran = step - epoch * plan.steps - offset
            self.bar.epoch(epoch, step, epoch_sum / epoch_n, plan.B * ran / max(t_run, 1e-9))
        if run_dir is not None:
            checkpoint.save(run_dir, self.model, self.opt, step, self.gen, history, self.cfg)
        return step

    def _note_bad(self, bad):
        for path, error in bad:
            if path not in self.seen_bad:
                self.seen_bad.add(path)
                self.say(f"skipped unreadable file {path} ({error})")
        return len(bad)


def train(method, ctx, given, out_dir, log=print, progress=True, fresh=None):
    """Train one method on this rank; returns a ``Trained`` record (rank 0 also saved the
    checkpoint and ``encoder.pt`` in its run folder)."""
    say = log if ctx.main else (lambda *a: None)
    cfg, state = _config(method, given, say)
    plan = Plan(cfg, ctx, say)
    enc, initial, model, opt = _model(method, cfg, ctx, plan)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg["seed"])
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
    params = sum(p.numel() for p in enc.parameters())
    bar = Progress(method, cfg["epochs"], plan.total, step) if progress and ctx.main else None
    loop = _Loop(method, cfg, ctx, plan, model, opt, gen, history, say, bar)
    _announce(say, method, cfg, ctx, plan, params, loop.bf16)
    stop = min(plan.total, step + int(cfg["stop_after"])) if cfg.get("stop_after") else \
        plan.total
    while step < stop:
        step = loop.epoch(step, stop, run_dir)
    named = len(loop.seen_bad)
    del loop  # DistributedDataParallel and the loader's workers go before the process group
    tp = history["throughput"] = throughput(history, plan.B, ctx.world)
    say(f"{method}: {step} steps, {history['train_s']:.1f} s of training: "
        f"{tp['images_per_s']:.0f} images/s ({tp['images_per_s_per_rank']:.0f} per process), "
        f"{100 * tp['data_wait_share']:.1f}% of step time waiting for data")
    if history["skipped"]:
        say(f"{history['skipped']} reads of unreadable files skipped ({named} files named "
            f"above on rank 0)")
    return Trained(method=method, cfg=cfg, encoder=enc, initial=initial, model=model,
                   dataset=plan.dataset,
                   train=plan.train_idx, test=plan.test_idx, history=history, run_dir=run_dir,
                   step=step, total=plan.total, params=params, device=ctx.device)


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
