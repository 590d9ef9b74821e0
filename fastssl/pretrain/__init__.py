"""``fastssl pretrain``: SSL methods end to end, on one process or many, judged on held-out
images.

The parts: ``data`` (the digits, streamed image folders, prepared arrays, the batch order
across ranks), ``models`` (encoders, projection heads, global BatchNorm), ``methods`` (the
methods, one module per family, from fastssl's losses, ``EMA`` and ``MoCoQueue``), ``loop`` (settings, optimiser,
DDP, the training steps), ``checkpoint`` (resume, ``encoder.pt``), ``evaluation`` (kNN,
linear probe, low-shot, end-to-end fine-tuning) and ``report`` (report.json, plots,
tables); ``launch`` joins the process group torchrun describes.

One process by default; under ``torchrun --nproc_per_node N -m fastssl.cli pretrain ...``
(or ``fastssl pretrain --nproc N``) every rank trains on its share of each global batch
(``--batch-size`` per rank) with DistributedDataParallel, gathered losses, a shared MoCo
queue and BatchNorm over the global batch, so a run gives the same losses and weights (to
float rounding) whatever the number of processes. Rank 0 writes the files and evaluates.
"""
import datetime
import json
import os

from fastssl.pretrain import launch
from fastssl.pretrain.checkpoint import load_encoder
from fastssl.pretrain.data import ImageArray, ImageFolder, load_digits, prepare, split
from fastssl.pretrain.evaluation import (fine_tune, fine_tune_accuracy, knn_accuracy,
                                         linear_probe_accuracy, low_shot)
from fastssl.pretrain.loop import DEFAULTS, settings, train
from fastssl.pretrain.methods import EPOCHS, METHODS, build, views_for
from fastssl.pretrain.models import SmallResNet, mlp
from fastssl.pretrain.report import (command, fine_tune_table, fresh, has_fine_tune,
                                     low_shot_table, plot_losses, report, table)

__all__ = ["pretrain", "run", "methods_for_all", "prepare", "load_encoder", "METHODS", "DEFAULTS", "EPOCHS"]


def pretrain(method, out_dir="runs", log=print, progress=True, evaluate=True,
             low_shot_draws=5, fine_tune=True, fine_tune_draws=2, **settings_):
    """Train ``method`` and evaluate it; returns the report (also written, with ``loss.png``,
    ``checkpoint.pt`` and ``encoder.pt``, to ``<out_dir>/<method>-<time>/`` when out_dir is
    not None). Settings: data, epochs, batch_size (per rank), optimizer ("adamw" or
    "lars"), lr (per 256 images of the global batch), weight_decay, arch, width, size,
    scale, flip_p, test_fraction, knn_k, seed, device, max_steps (the schedules end there),
    stop_after (stop after this many steps, checkpointed, as if interrupted), workers,
    precision ("auto": bf16 autocast on CUDA; "fp32"; "bf16"; "fp64": weights, views and losses in float64), resume (a checkpoint or run folder).

    Evaluation (``evaluate``): kNN and linear probes of the frozen encoder, its random
    initialisation and raw pixels, with every training label and ``low_shot_draws`` draws
    of 1, 5 and 10 labels per class; with ``fine_tune`` also the trained and random-init
    encoders fine-tuned end to end (``evaluation.fine_tune``: ``fine_tune_draws`` draws per
    shot count, one run with every label, on one CPU thread), in ``accuracy[name]["fine_tune"]`` and ``fine_tune_margin_over_random_init``."""
    return run([method], out_dir, log, progress, evaluate, low_shot_draws, fine_tune,
               fine_tune_draws, **settings_)[0]


def methods_for_all(data=None):
    """``--method all``: every method, less those that need colour images (colorization)
    on the grayscale digits (``data`` None)."""
    from fastssl.pretrain.methods import REGISTRY
    return [m for m, cls in REGISTRY.items() if data is not None or not cls.colour]


def run(methods, out_dir="runs", log=print, progress=True, evaluate=True, low_shot_draws=5,
        fine_tune=True, fine_tune_draws=2, device=None, **settings_):
    """Every method in ``methods`` with the same settings; prints the tables (the
    fine-tune table with ``fine_tune``; see ``pretrain``). Training runs on every rank;
    evaluation and files on rank 0, after the process group is left."""
    if isinstance(fine_tune_draws, bool) or int(fine_tune_draws) != fine_tune_draws or \
            fine_tune_draws < 1:
        raise ValueError(f"fine_tune_draws must be an integer >= 1, got {fine_tune_draws!r}")
    ctx = launch.setup(device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    trained = []
    try:
        for method in methods:
            given = dict(settings_, device=device)
            trained.append(train(method, ctx, given, out_dir, log, progress,
                                 fresh=lambda m: fresh(os.path.join(out_dir, f"{m}-{stamp}"))))
    finally:
        launch.teardown(ctx)
    say = log if ctx.main else (lambda *a: None)
    reports = []
    for t in trained:
        if not ctx.main:
            reports.append({"method": t.method, "rank": ctx.rank, "step_loss":
                            t.history["step_loss"], "steps": t.step})
            continue
        if evaluate:
            say(f"{t.method}: evaluating")
        reports.append(report(t, evaluate, low_shot_draws, say, fine_tune,
                              int(fine_tune_draws)))
        if "run_dir" in reports[-1]:
            say(f"wrote {reports[-1]['run_dir']}/report.json, loss.png, checkpoint.pt, encoder.pt")
    if ctx.main and evaluate:
        _summary(reports, out_dir, stamp, say)
    return reports


def _summary(reports, out_dir, stamp, say):
    r0 = reports[0]
    th = r0["throughput"]
    say("")
    say(f"{r0['dataset']['name']}: {r0['dataset']['train']} train / {r0['dataset']['test']} "
        f"held-out images; {r0['environment']['device']}, {th['world']} process"
        f"{'es' * (th['world'] > 1)}, global batch {th['global_batch']}, "
        f"seed {r0['config']['seed']}")
    say(table(reports))
    say("")
    say("label efficiency (accuracy %, mean ± std over draws of the labelled images):")
    say(low_shot_table(reports))
    tuned = has_fine_tune(reports)
    if tuned:
        say("")
        say("fine-tuned end to end (accuracy %, mean ± std over draws of the labelled images):")
        say(fine_tune_table(reports))
    if len(reports) > 1 and out_dir is not None:
        run_dir = fresh(os.path.join(out_dir, f"all-{stamp}"))
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            # The schema of fastssl bench's files, so benchmarks/results_table.py reads it.
            json.dump({"op": "pretrain", "cpu": r0["environment"]["device_type"] != "cuda",
                       "environment": r0["environment"], "command": command(),
                       "runs": [r.get("run_dir") for r in reports], "reports": reports}, f,
                      indent=1)
        with open(os.path.join(run_dir, "summary.md"), "w") as f:
            f.write(table(reports) + "\n\n" + low_shot_table(reports) + "\n" +
                    ("\n" + fine_tune_table(reports) + "\n" if tuned else ""))
        plot_losses({r["method"]: r["epoch_loss"] for r in reports},
                    os.path.join(run_dir, "loss.png"))
        say(f"wrote {run_dir}/summary.json, summary.md and loss.png")
