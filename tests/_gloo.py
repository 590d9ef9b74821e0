"""The tests' two-rank harness: fork `world` gloo ranks on 127.0.0.1, run a plain function
on each inside an initialised process group, and hand its return values back to the test in
rank order. Import as `from _gloo import free_port, run` (tests/ is on sys.path)."""
import datetime
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GROUP_TIMEOUT = 60  # s: the process group's own timeout, for a collective that never completes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, fn, world, port, out, args, group_timeout):
    # a forked child must not enter the parent's OpenMP pool (it would wait on threads
    # that fork did not copy): one thread, as DataLoader workers do
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=group_timeout))
    try:
        torch.save(fn(rank, world, *args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run(fn, world=2, args=(), timeout=120, what="the 2-rank run", group_timeout=GROUP_TIMEOUT):
    """fn(rank, world, *args) on `world` forked gloo ranks; its return values (anything
    torch.save takes), loaded in rank order. Fails the test when the ranks have not all
    finished in `timeout` s; a rank that raises fails it with that rank's traceback
    (torch.multiprocessing's ProcessRaisedException, raised from join)."""
    with tempfile.TemporaryDirectory() as out:
        # fork, not spawn: a spawned child re-imports torch (seconds on a loaded 2-core box)
        ctx = mp.start_processes(_rank, args=(fn, world, free_port(), out, tuple(args),
                                              group_timeout),
                                 nprocs=world, join=False, start_method="fork")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail(f"{what} did not finish in {timeout} s")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
