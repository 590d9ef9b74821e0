"""Argument checks shared by the loss modules."""
from torch import Tensor

from fastssl import _checks, distributed


def _world_args(name, rank, world_size):
    rank = _checks.integer(rank, "rank", lo=0)
    world_size = _checks.integer(world_size, "world_size", lo=1)
    if rank >= world_size:
        raise ValueError(f"{name}: rank must be < world_size, got rank={rank}, "
                         f"world_size={world_size}")
    return rank, world_size


def _check_world(name, rank, world_size):
    """open_clip passes rank/world_size explicitly: they must match the process group."""
    if world_size == 1:
        return
    if not distributed.is_distributed():
        raise ValueError(f"{name}(world_size={world_size}) but torch.distributed is not "
                         "initialised (call torch.distributed.init_process_group first)")
    if distributed.world_size() != world_size or distributed.rank() != rank:
        raise ValueError(f"{name}(rank={rank}, world_size={world_size}) does not match the "
                         f"process group (rank {distributed.rank()} of "
                         f"{distributed.world_size()})")


def _temperature(temperature):
    """lightly's rule for a temperature given as a number (or a CPU tensor): |T| >= 1e-8."""
    value = _checks.host_value(temperature, "temperature")
    if value is not None and abs(value) < 1e-8:
        raise ValueError(f"Illegal temperature: abs({value}) < 1e-8")
    return _checks.scalar(temperature, "temperature", nonzero=True)


def _gather_flag(value, what):
    value = _checks.flag(value, "gather_distributed")
    if value:
        distributed.require_distributed(f"{what}(gather_distributed=True)")
    return value


def _bank_size(memory_bank_size):
    """(K,) or (K, dim) from lightly's ``memory_bank_size``: 0, K (the width then comes
    from the first batch), (K, dim), or (0,)."""
    value = memory_bank_size
    if _checks.is_number(value) or isinstance(value, Tensor):
        return (_checks.integer(value, "memory_bank_size", lo=0),)
    if not isinstance(value, (tuple, list)):
        raise TypeError("memory_bank_size must be an integer K >= 0 or a pair (K, dim), "
                        f"got {type(value).__name__} {value!r}"[:200])
    if len(value) == 2:
        return (_checks.integer(value[0], "memory_bank_size[0] (K)", lo=0),
                _checks.integer(value[1], "memory_bank_size[1] (dim)", lo=1))
    if len(value) == 1 and _checks.integer(value[0], "memory_bank_size[0] (K)", lo=0) == 0:
        return (0,)
    raise ValueError(f"memory_bank_size as a sequence must be a pair (K, dim), got "
                     f"{len(value)} entries {tuple(value)!r}")
