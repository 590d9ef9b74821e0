"""fastssl.memory against lightly 1.6.0's ``MemoryBankModule`` and ``NNMemoryBankModule``:
the same signatures, the same seeded initial bank (the same draw), then over several steps
(odd batch sizes, batches larger than the space left or than the bank, reads without an
update, duplicate entries) the same outputs, returned banks, buffers and pointers, and the
same nearest neighbours, all bitwise; the same exception types (and, for the constructor,
the same messages) on lightly's documented errors."""
import inspect

import pytest
import torch

from ._peers import need

lightly = need("lightly")
from lightly.loss.memory_bank import MemoryBankModule as LightlyLossBank  # noqa: E402
from lightly.models.modules import NNMemoryBankModule as LightlyNN  # noqa: E402
from lightly.models.modules.memory_bank import MemoryBankModule as LightlyBank  # noqa: E402

from fastssl import memory  # noqa: E402
from fastssl.memory import MemoryBankModule, NNMemoryBankModule  # noqa: E402


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures():
    assert LightlyLossBank is LightlyBank
    for ours, theirs in [(MemoryBankModule, LightlyBank), (NNMemoryBankModule, LightlyNN)]:
        assert params(ours.__init__) == params(theirs.__init__), ours.__name__
        assert params(ours.forward) == params(theirs.forward), ours.__name__


def seeded(ours_cls, theirs_cls, seed, *args, **kwargs):
    """Both modules built after the same manual_seed: the same initial bank."""
    torch.manual_seed(seed)
    theirs = theirs_cls(*args, **kwargs)
    torch.manual_seed(seed)
    ours = ours_cls(*args, **kwargs)
    assert torch.equal(ours.bank, theirs.bank), "the same seed must give the same bank"
    assert ours.size == theirs.size and ours.bank.dtype == theirs.bank.dtype
    assert ours.gather_distributed == theirs.gather_distributed
    assert ours.feature_dim_first == theirs.feature_dim_first
    return ours, theirs


def same_state(ours, theirs, what):
    assert torch.equal(ours.bank, theirs.bank), f"{what}: bank"
    assert int(ours.bank_ptr) == int(theirs.bank_ptr), f"{what}: pointer"
    assert set(ours.state_dict()) == set(theirs.state_dict())


# batch rows and update, on a bank of 10: crossing the end, exactly filling, larger than
# the bank, empty, read-only calls in between
BANK_STEPS = [(3, True), (5, False), (4, True), (7, True), (1, True), (12, True), (0, True),
              (2, False), (9, True), (10, True), (25, True), (6, True)]


@pytest.mark.parametrize("feature_dim_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_bank_over_steps(feature_dim_first, dtype):
    ours, theirs = seeded(MemoryBankModule, LightlyBank, 5, size=(10, 6),
                          feature_dim_first=feature_dim_first)
    for step, (n, update) in enumerate(BANK_STEPS):
        x = randn(n, 6, seed=step, dtype=dtype).requires_grad_()
        out_t, bank_t = theirs(x, None, update)
        out_o, bank_o = ours(x, None, update)
        assert out_o is x and out_t is x
        assert bank_o.shape == bank_t.shape and bank_o.stride() == bank_t.stride()
        assert bank_o.dtype == bank_t.dtype and torch.equal(bank_o, bank_t), f"step {step}"
        assert bank_o.requires_grad == bank_t.requires_grad
        same_state(ours, theirs, f"step {step}")


@pytest.mark.parametrize("size", [0, (0,), (0, 4)])
def test_disabled_bank(size):
    x = randn(3, 4, seed=0)
    for module in (LightlyBank(size), MemoryBankModule(size)):
        out, bank = module(x, update=True)
        assert out is x and bank is None


def nnclr_steps(ours, theirs, batches, dim, seed, dtype=torch.float32):
    """NNCLR's use: z0 looked up without update, z1 looked up then enqueued. Step 1
    enqueues duplicates and a power-of-two multiple (the same unit row: exact ties in the
    bank), which step 2's z0 then looks up."""
    dups = None
    for step, n in enumerate(batches):
        z0 = randn(n, dim, seed=seed + 2 * step, dtype=dtype)
        z1 = randn(n, dim, seed=seed + 2 * step + 1, dtype=dtype)
        if step == 1:
            z1 = torch.cat([z1[:2], z1[:2], 2 * z1[:1], z1[2:]])[:n]
            dups = z1[:2]
        if step == 2:
            z0 = torch.cat([dups, 0.5 * dups, z0])[:n]
        for z, update in ((z0, False), (z1, True)):
            got_t = theirs(z, update=update)
            got_o = ours(z, update=update)
            assert got_o.dtype == got_t.dtype and got_o.shape == got_t.shape
            assert torch.equal(got_o, got_t), f"step {step}, update={update}"
            assert got_o.requires_grad == got_t.requires_grad
            same_state(ours, theirs, f"step {step}")


def test_nn_memory_bank_over_steps():
    ours, theirs = seeded(NNMemoryBankModule, LightlyNN, 7, size=(37, 16))
    nnclr_steps(ours, theirs, [8, 5, 9, 40, 3, 37, 1], 16, seed=100)


def test_nn_memory_bank_float64():
    ours, theirs = seeded(NNMemoryBankModule, LightlyNN, 8, size=(29, 5))
    ours, theirs = ours.double(), theirs.double()
    nnclr_steps(ours, theirs, [4, 11, 30], 5, seed=200, dtype=torch.float64)


def test_nn_memory_bank_large_bank(monkeypatch):
    """A bank of 5000 crosses the portable search's chunks (and the top-k tiles)."""
    ours, theirs = seeded(NNMemoryBankModule, LightlyNN, 9, size=(5000, 32))
    nnclr_steps(ours, theirs, [64, 300], 32, seed=300)
    z = randn(50, 32, seed=1)
    want = theirs(z)
    monkeypatch.setattr(memory, "COLS", 333)
    bank = ours.bank
    idx = memory.nearest_neighbours(z, bank, k=3).indices
    assert torch.equal(bank[idx[:, 0]], want)


# ----------------------------------------------------------------------------- errors

BAD_SIZES = [-1, (10, -1), 10, (1, 2, 3), (), (5,), [-3, 2]]


@pytest.mark.parametrize("size", BAD_SIZES, ids=[repr(s) for s in BAD_SIZES])
def test_constructor_errors_match(size):
    with pytest.raises(Exception) as theirs:
        LightlyBank(size)
    with pytest.raises(type(theirs.value)) as ours:
        MemoryBankModule(size)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(type(theirs.value)):
        NNMemoryBankModule(size)


def error_of(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return e
    return None


@pytest.mark.parametrize("case", ["wide", "narrow", "nn-wide", "nn-disabled"])
def test_forward_errors_match(case):
    torch.manual_seed(0)
    if case.startswith("nn"):
        size = 0 if case == "nn-disabled" else (6, 4)
        pair = (NNMemoryBankModule(size), LightlyNN(size))
        calls = [lambda m: m(torch.ones(2, 5), update=True)]
    else:
        pair = (MemoryBankModule((6, 4)), LightlyBank((6, 4)))
        width = 5 if case == "wide" else 3
        calls = [lambda m: m(torch.ones(2, width), update=True)]
    for call in calls:
        ours, theirs = (error_of(lambda: call(m)) for m in pair)
        assert theirs is not None, "lightly raises here"
        assert isinstance(ours, type(theirs)), f"fastssl {ours!r}, lightly {theirs!r}"
