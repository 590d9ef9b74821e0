"""Reports: the evaluation of a trained encoder beside its random initialisation and raw
pixels (frozen probes; fine-tuning for the two encoders), ``report.json``, the loss plots
and the markdown tables."""
import datetime
import json
import math
import os
import sys
import time

import torch

from fastssl.pretrain.evaluation import SHOTS, evaluate, pretext_accuracy
from fastssl.pretrain.evaluation import fine_tune as fine_tune_scores


def environment(device):
    """``fastssl bench``'s environment record (versions, commit, device), for ``device``."""
    from fastssl.bench import environment as common
    env = common()
    env.pop("command", None)  # the report has its own, with the process count
    env["device_type"] = device.type
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["threads"] = torch.get_num_threads()
    return env


def command():
    """The command line that ran (under torchrun, with its process count)."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 not in ("fastssl", "cli.py"):
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun ({world} processes) -m fastssl.cli " if world > 1 else "fastssl "
    return launcher + " ".join(sys.argv[1:])


def fresh(path):
    """``path``, or ``path-2``, ``path-3``... when it exists (two runs in the same second)."""
    candidate, k = path, 1
    while os.path.exists(candidate):
        k += 1
        candidate = f"{path}-{k}"
    os.makedirs(candidate)
    return candidate


def _evaluate(t, draws, fine_tune_draws, log):
    """{name: evaluate(...)} for the trained encoder, its random initialisation and raw
    pixels; with ``fine_tune_draws`` (not None) each encoder's entry also holds
    ``"fine_tune"``: ``evaluation.fine_tune`` with that many draws per shot count (one
    progress line per encoder)."""
    cfg = t.cfg
    t.encoder.eval(), t.initial.eval()
    initial = t.initial.to(t.device)
    kw = dict(dataset=t.dataset, train=t.train, test=t.test, size=cfg["size"],
              device=t.device, workers=int(cfg["workers"]))
    acc = {t.method: evaluate(t.encoder, knn_k=cfg["knn_k"], draws=draws, **kw),
           "random init": evaluate(initial, knn_k=cfg["knn_k"], draws=draws, **kw),
           "raw pixels": evaluate(lambda x: x.flatten(1), knn_k=cfg["knn_k"], draws=draws,
                                  **kw)}
    if getattr(t, "model", None) is not None:
        score = pretext_accuracy(t.model, t.dataset, t.test, cfg["size"], t.device,
                                 workers=int(cfg["workers"]))
        if score is not None:
            acc[t.method]["pretext"] = {"accuracy": score, "chance": t.model.chance}
            log(f"{t.method}: pretext accuracy {score:.1f}% on the test images (chance "
                f"{t.model.chance:.1f}%)")
    if fine_tune_draws is not None:
        shots = "/".join(map(str, SHOTS))
        for name, enc in ((t.method, t.encoder), ("random init", initial)):
            log(f"{name}: fine-tuning ({shots} labels per class, all labels)")
            acc[name]["fine_tune"] = fine_tune_scores(enc, draws=fine_tune_draws, **kw)
    return acc


def report(t, evaluate_encoders=True, draws=5, log=print, fine_tune=True, fine_tune_draws=2):
    """The run's report (evaluation on this process), written to its run folder. With
    ``fine_tune`` the trained and random-init encoders are also fine-tuned end to end
    (``fine_tune_draws`` draws at 1, 5 and 10 labels per class, one run on every label):
    ``accuracy[name]["fine_tune"]`` and ``fine_tune_margin_over_random_init`` (10-label
    means, trained minus random init; None without fine-tuning)."""
    cfg, h = t.cfg, t.history
    acc = None
    eval_s = 0.0
    if evaluate_encoders:
        t0 = time.perf_counter()
        acc = _evaluate(t, draws, fine_tune_draws if fine_tune else None, log)
        eval_s = time.perf_counter() - t0
    tuned = acc is not None and "fine_tune" in acc[t.method]
    out = {"method": t.method, "config": cfg,
           "dataset": {"name": t.dataset.name, "train": len(t.train), "test": len(t.test),
                       "classes": t.dataset.classes,
                       "image": [3, t.dataset.side, t.dataset.side]},
           "encoder_parameters": t.params, "steps": t.step, "planned_steps": t.total,
           "epoch_loss": h["epoch_loss"], "step_loss": h["step_loss"],
           "epoch_seconds": h["epoch_seconds"], "skipped_files": h["skipped"],
           "throughput": h["throughput"], "accuracy": acc,
           "knn_margin_over_random_init":
               acc[t.method]["knn"] - acc["random init"]["knn"] if acc else None,
           "fine_tune_margin_over_random_init":
               acc[t.method]["fine_tune"]["10"][0] - acc["random init"]["fine_tune"]["10"][0]
               if tuned else None,
           "timings": {"train_s": h["train_s"], "data_wait_s": h["data_wait_s"],
                       "eval_s": eval_s},
           "environment": environment(t.device), "command": command(),
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if t.run_dir is not None:
        with open(os.path.join(t.run_dir, "report.json"), "w") as f:
            json.dump(out, f, indent=1)
        if h["epoch_loss"]:
            plot_losses({t.method: h["epoch_loss"]}, os.path.join(t.run_dir, "loss.png"))
        out["run_dir"] = t.run_dir
    return out


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


def _pretext_cell(task):
    return "" if task is None else f"{task['accuracy']:.1f} ({task['chance']:.0f})"


def table(reports):
    """A markdown table: kNN and linear-probe accuracy of each method, random init, pixels."""
    lines = ["| encoder | kNN % | linear probe % | kNN - random init | pretext % (chance) | "
             "steps | train s | img/s | final loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        a = r["accuracy"][r["method"]]
        rate = r.get("throughput", {}).get("images_per_s")  # (absent from older reports)
        lines.append(f"| {r['method']} | {a['knn']:.1f} | {a['linear']:.1f} | "
                     f"{r['knn_margin_over_random_init']:+.1f} | "
                     f"{_pretext_cell(a.get('pretext'))} | "
                     f"{r.get('steps', len(r['step_loss']))} | "
                     f"{r['timings']['train_s']:.0f} | "
                     f"{'' if rate is None else f'{rate:.0f}'} | "
                     f"{(r['epoch_loss'] or r['step_loss'])[-1]:.4f} |")
    base = reports[0]["accuracy"]
    for name in ("random init", "raw pixels"):
        lines.append(f"| {name} | {base[name]['knn']:.1f} | {base[name]['linear']:.1f} | "
                     "| | | | | |")
    return "\n".join(lines)


def low_shot_table(reports):
    """Accuracy with 1, 5 and 10 labelled images per class (mean ± std over the draws)."""
    head = " | ".join(f"{s}-shot kNN | {s}-shot linear" for s in SHOTS)
    lines = [f"| encoder | {head} | all labels kNN | all labels linear |",
             "|---|" + "---|" * (2 * len(SHOTS) + 2)]

    def row(name, a):
        cells = " | ".join(f"{a['low_shot'][str(s)]['knn'][0]:.1f} ± "
                           f"{a['low_shot'][str(s)]['knn'][1]:.1f} | "
                           f"{a['low_shot'][str(s)]['linear'][0]:.1f} ± "
                           f"{a['low_shot'][str(s)]['linear'][1]:.1f}" for s in SHOTS)
        return f"| {name} | {cells} | {a['knn']:.1f} | {a['linear']:.1f} |"
    for r in reports:
        lines.append(row(r["method"], r["accuracy"][r["method"]]))
    for name in ("random init", "raw pixels"):
        lines.append(row(name, reports[0]["accuracy"][name]))
    return "\n".join(lines)


def fine_tune_table(reports):
    """End-to-end fine-tuning accuracy with 1, 5 and 10 labelled images per class (mean ±
    std over the draws) and with every label, for each method and random init; the last
    column is the 10-label mean minus random init's."""
    head = " | ".join(f"{s}-shot fine-tune" for s in SHOTS)
    lines = [f"| encoder | {head} | all labels fine-tune | 10-shot - random init |",
             "|---|" + "---|" * (len(SHOTS) + 2)]

    def row(name, f, margin):
        cells = " | ".join(f"{f[str(s)][0]:.1f} ± {f[str(s)][1]:.1f}" for s in SHOTS)
        return f"| {name} | {cells} | {f['all'][0]:.1f} | {margin} |"
    for r in reports:
        lines.append(row(r["method"], r["accuracy"][r["method"]]["fine_tune"],
                         f"{r['fine_tune_margin_over_random_init']:+.1f}"))
    lines.append(row("random init", reports[0]["accuracy"]["random init"]["fine_tune"], ""))
    return "\n".join(lines)


def has_fine_tune(reports):
    """Whether every report holds the fine-tune entries (``fine_tune_table`` can show it)."""
    return all((r.get("accuracy") or {}).get(r["method"], {}).get("fine_tune") is not None
               for r in reports)
