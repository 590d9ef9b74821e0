"""Processes: joining the process group torchrun describes (NCCL on CUDA, gloo on CPU),
leaving it cleanly, and ``fastssl pretrain --nproc N`` (torchrun on this machine)."""
import gc
import os
import subprocess
import sys

import torch
import torch.distributed as dist


class Context:
    """rank, world, local_rank, device, and whether this run created the process group."""

    def __init__(self, rank, world, local_rank, device, owns_group):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device, self.owns_group = device, owns_group

    @property
    def main(self):
        return self.rank == 0


def setup(device=None):
    """The run's context. Under torchrun (WORLD_SIZE > 1 in the environment) it joins the
    process group, unless one is already initialised (then it is used as is)."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
        local = int(os.environ.get("LOCAL_RANK", rank))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local, owns = int(os.environ.get("LOCAL_RANK", "0")), True
        if want == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want == "cuda" else "gloo")
    else:
        rank, world, local, owns = 0, 1, 0, False
    dev = torch.device(f"cuda:{local}" if want == "cuda" and world > 1 else want)
    return Context(rank, world, local, dev, owns)


def teardown(ctx):
    """Destroy the group this run created, after freeing what still references it (a
    DistributedDataParallel's reducer, once its owner has dropped it): otherwise gloo may
    abort at process exit."""
    if ctx.owns_group:
        try:
            import torch._dynamo
            torch._dynamo.reset()
        except Exception:
            pass
        gc.collect()
        dist.destroy_process_group()


def spawn(nproc, argv):
    """``fastssl pretrain ... --nproc N``: the same command under torchrun with N processes
    on this machine; returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "fastssl.cli"] + list(argv)
    return subprocess.call(cmd)
