"""Checkpoints: everything a run needs to continue exactly where it stopped, and the
encoder's weights for downstream use.

``checkpoint.pt`` holds the method's state (student, teacher, queue, BatchNorm statistics:
``Method.state_dict()``), the optimiser's, the step, the augmentation generator's state,
torch's CPU and CUDA RNG states, the loss history and the run's settings. The learning-rate
and momentum schedules are functions of the step. Files are written to a temporary name
and renamed, so a run killed while saving keeps its previous checkpoint.
"""
import os

import torch

from fastssl.pretrain.models import encoder as build_encoder

CHECKPOINT, ENCODER = "checkpoint.pt", "encoder.pt"


def _atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(run_dir, method, optimizer, step, generator, history, config):
    state = {"format": 1, "config": config, "step": step, "history": history,
             "model": method.state_dict(), "optimizer": optimizer.state_dict(),
             "augment_rng": generator.get_state(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    _atomic_save(state, os.path.join(run_dir, CHECKPOINT))
    save_encoder(run_dir, method.encoder, config)


def save_encoder(run_dir, encoder, config):
    _atomic_save({"arch": config["arch"], "width": config["width"], "size": config["size"],
                  "dim": encoder.dim, "method": config["method"],
                  "cls_token": getattr(encoder, "num_prefix_tokens", 1) == 1,
                  "state_dict": encoder.state_dict()}, os.path.join(run_dir, ENCODER))


def load(path):
    """A checkpoint file, or the ``checkpoint.pt`` of a run folder."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise ValueError(f"--resume {path!r}: no such checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ValueError(f"--resume {path!r} is not a fastssl pretrain checkpoint")
    state["path"] = path
    return state


def restore(state, method, optimizer, generator):
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["augment_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def load_encoder(path, map_location="cpu"):
    """The encoder saved by ``fastssl pretrain`` (``encoder.pt`` or its run folder), built
    and loaded; ``.dim`` is its feature width."""
    if os.path.isdir(path):
        path = os.path.join(path, ENCODER)
    saved = torch.load(path, map_location=map_location, weights_only=True)
    model = build_encoder(saved["arch"], saved["width"], saved["size"],
                          cls_token=saved.get("cls_token", True))
    model.load_state_dict(saved["state_dict"])
    return model
