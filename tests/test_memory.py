"""fastssl.memory: lightly's FIFO memory bank (drop-on-overflow) written out by hand over
several steps, the nearest-neighbour search against a float64 brute force (both paths for
k = 1, the Triton kernel under the interpreter on CPU; chunked top-k merges), ties to the
lowest index, the NN memory bank, bad arguments, and the gathered bank on 2 gloo ranks."""
import pytest
import torch
import torch.nn.functional as tF

from fastssl import ShapeError
from fastssl import memory as M
from fastssl.memory import MemoryBankModule, NNMemoryBankModule, nearest_neighbours
import _gloo


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- FIFO by hand

K, D = 10, 3
# (batch rows, update, bank slots written [lo, hi), batch rows written [lo, hi), ptr after)
STEPS = [
    (3, True, (0, 3), (0, 3), 3),
    (4, True, (3, 7), (0, 4), 7),
    (5, False, None, None, 7),     # read only
    (2, True, (7, 9), (0, 2), 9),
    (5, True, (9, 10), (0, 1), 0),   # 1 row fits before the end, 4 dropped, back to 0
    (10, True, (0, 10), (0, 10), 0),  # exactly the bank
    (13, True, (0, 10), (0, 10), 0),  # larger than the bank: the last 3 dropped
    (1, True, (0, 1), (0, 1), 1),
    (12, True, (1, 10), (0, 9), 0),   # from slot 1: 9 rows fit, 3 dropped
    (0, True, None, None, 0),       # an empty batch changes nothing
    (7, True, (0, 7), (0, 7), 7),
]


@pytest.mark.parametrize("feature_dim_first", [False, True])
def test_fifo_steps_written_out(feature_dim_first):
    torch.manual_seed(3)
    bank = MemoryBankModule(size=(K, D), feature_dim_first=feature_dim_first)
    expect = bank.bank.clone()
    assert int(bank.bank_ptr) == 0
    for step, (n, update, slots, rows, ptr) in enumerate(STEPS):
        x = randn(n, D, seed=step).requires_grad_()
        out, got = bank(x, update=update)
        assert out is x, "the output is returned as it is"
        # the snapshot is the bank before this step's update, in the chosen layout
        want = expect.T if feature_dim_first else expect
        assert got.shape == ((D, K) if feature_dim_first else (K, D))
        assert torch.equal(got, want), f"step {step}: returned bank"
        assert not got.requires_grad
        if slots is not None:
            expect[slots[0]:slots[1]] = x.detach()[rows[0]:rows[1]]
        assert torch.equal(bank.bank, expect), f"step {step}: bank after the update"
        assert int(bank.bank_ptr) == ptr, f"step {step}: pointer"
        assert bank.bank_ptr.dtype == torch.int64 and bank.bank_ptr.shape == (1,)
    # a returned snapshot is a copy: later updates and edits do not alias
    _, snap = bank(randn(2, D, seed=99))
    snap.zero_()
    assert torch.equal(bank.bank, expect)


def test_initial_bank_is_lightlys_draw():
    torch.manual_seed(11)
    a = MemoryBankModule(size=(7, 5))
    torch.manual_seed(11)
    plain = torch.randn(7, 5)
    plain = plain / plain.norm(dim=1, keepdim=True)
    assert a.bank.dtype == torch.float32 and a.bank.shape == (7, 5)
    assert ((a.bank - plain).abs() <= 1e-7).all()
    assert ((a.bank.norm(dim=1) - 1).abs() <= 1e-6).all()
    assert a.size == (7, 5) and a.gather_distributed is False and a.feature_dim_first is True
    # lightly's buffers are not persistent; .to() converts the bank and keeps the pointer
    assert "bank" not in a.state_dict() and "bank_ptr" not in a.state_dict()
    b = a.to(torch.float64)
    assert b.bank.dtype == torch.float64 and b.bank_ptr.dtype == torch.int64


def test_16_bit_batches_are_cast_into_the_bank():
    bank = MemoryBankModule(size=(6, 4), feature_dim_first=False)
    for dtype in (torch.bfloat16, torch.float16):
        x = randn(3, 4, seed=1, dtype=dtype)
        bank(x, update=True)
    assert bank.bank.dtype == torch.float32
    assert torch.equal(bank.bank[3:6], randn(3, 4, seed=1, dtype=torch.float16).float())
    assert torch.equal(bank.bank[0:3], randn(3, 4, seed=1, dtype=torch.bfloat16).float())


@pytest.mark.parametrize("size", [0, (0,), [0], (0, 4)])
def test_disabled_bank(size):
    bank = MemoryBankModule(size=size)
    x = randn(3, 4, seed=0)
    out, got = bank(x, update=True)
    assert out is x and got is None


# ----------------------------------------------------------------------------- search

def ref_scores(x, bank):
    """Cosine similarities in float64 of the (already rounded) inputs."""
    return tF.normalize(x.double(), dim=1) @ tF.normalize(bank.double(), dim=1).T


def ref_order(s, k):
    """Per row the k columns of largest score, equal scores by increasing index."""
    return torch.tensor([sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
                         for row in s.tolist()], dtype=torch.int64).reshape(-1, k)


def check_neighbours(res, s, k, tol):
    """res (values, indices) against the float64 scores s: each chosen score is the j-th
    largest within tol, values descending, and where no other score lies within tol of
    the chosen ones (the answer is not decided by rounding) the indices are exactly the
    reference order, ties to the lowest index."""
    n = s.shape[0]
    assert res.indices.shape == (n, k) and res.values.shape == (n, k)
    assert res.indices.dtype == torch.int64
    top = torch.sort(s, dim=1, descending=True).values[:, :k]
    picked = s.gather(1, res.indices)
    assert ((picked - top).abs() <= tol).all()
    assert ((res.values.double() - picked).abs() <= tol).all()
    assert (res.values[:, 1:] <= res.values[:, :-1]).all()
    assert all(len(set(r)) == k for r in res.indices.tolist())
    near = ((s[:, None, :] - top[:, :, None]).abs() <= tol).sum(-1)
    exact = (s[:, None, :] == top[:, :, None]).sum(-1)
    decided = (near == exact).all(1)
    assert decided.float().mean() > 0.5, "the test data should mostly decide the answer"
    ref = ref_order(s, k)
    assert torch.equal(res.indices[decided], ref[decided])


SHAPES = [(1, 1, 1), (5, 3, 1), (67, 130, 257), (130, 97, 3), (2, 300, 33)]


@pytest.mark.parametrize("n,Kb,Dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top1_matches_brute_force(backend, n, Kb, Dim, dtype):
    x = randn(n, Dim, seed=n + Kb, dtype=dtype)
    bank = randn(Kb, Dim, seed=Dim, dtype=dtype) * 3
    res = nearest_neighbours(x, bank)
    assert res.values.dtype == torch.float32
    check_neighbours(res, ref_scores(x, bank), 1, 1e-5)


def test_top1_float64(backend):
    x, bank = randn(40, 9, seed=1, dtype=torch.float64), randn(77, 9, seed=2, dtype=torch.float64)
    res = nearest_neighbours(x, bank)
    assert res.values.dtype == torch.float64
    check_neighbours(res, ref_scores(x, bank), 1, 1e-12)


def tie_bank(Dim, seed):
    """(queries, bank) where each query's best score is shared by several bank rows that
    lie across tile boundaries (exact copies and power-of-two multiples: the same unit
    row), with distractors in between."""
    base = randn(4, Dim, seed=seed)
    bank = randn(150, Dim, seed=seed + 1) * 0.1
    for j, (b, scale) in {10: (0, 1.0), 70: (0, 2.0), 100: (0, 1.0), 3: (1, 0.5),
                          97: (1, 1.0), 149: (1, 4.0), 64: (2, 1.0), 128: (2, 1.0)}.items():
        bank[j] = base[b] * scale
    queries = torch.cat([base, base * 8])
    return queries, bank


def test_top1_ties_go_to_the_lowest_index(backend):
    x, bank = tie_bank(33, seed=5)
    idx = nearest_neighbours(x, bank).indices[:, 0].tolist()
    assert idx[:3] == [10, 3, 64] and idx[4:7] == [10, 3, 64]
    # D = 1: every positive row has cosine 1 with every positive bank entry
    x1 = torch.tensor([[2.0], [-0.5], [0.0]])
    b1 = torch.tensor([[-1.0], [3.0], [0.25], [-7.0]])
    assert nearest_neighbours(x1, b1).indices[:, 0].tolist() == [1, 0, 0]


@pytest.mark.parametrize("k", [2, 5, 23])
@pytest.mark.parametrize("n,Kb,Dim", [(1, 23, 1), (37, 61, 257), (9, 130, 4)])
def test_topk_order_matches_brute_force(monkeypatch, k, n, Kb, Dim):
    monkeypatch.setattr(M, "COLS", 7)   # many bank chunks to merge
    monkeypatch.setattr(M, "TILE", 96)  # and several row chunks
    for dtype in (torch.float32, torch.bfloat16):
        x = randn(n, Dim, seed=k + n, dtype=dtype)
        bank = randn(Kb, Dim, seed=Kb, dtype=dtype)
        res = nearest_neighbours(x, bank, k=k)
        check_neighbours(res, ref_scores(x, bank), k, 1e-5)
        first = nearest_neighbours(x, bank, k=1)
        assert torch.equal(first.indices[:, 0], res.indices[:, 0]) or Dim == 1


def test_topk_ties_go_to_the_lowest_index(monkeypatch):
    monkeypatch.setattr(M, "COLS", 16)
    x, bank = tie_bank(33, seed=5)
    res = nearest_neighbours(x, bank, k=4)
    assert res.indices[0, :3].tolist() == [10, 70, 100]
    assert res.indices[1, :3].tolist() == [3, 97, 149]
    assert res.indices[2, :2].tolist() == [64, 128]
    assert torch.equal(res.indices[:4], res.indices[4:])
    x1, b1 = torch.tensor([[2.0]]), torch.tensor([[-1.0], [3.0], [0.25], [-7.0], [1.0]])
    assert nearest_neighbours(x1, b1, k=5).indices.tolist() == [[1, 2, 4, 0, 3]]


def test_search_edge_shapes():
    res = nearest_neighbours(torch.empty(0, 4), randn(3, 4, seed=0), k=2)
    assert res.indices.shape == (0, 2) and res.values.shape == (0, 2)
    res = nearest_neighbours(torch.empty(2, 0), torch.empty(3, 0), k=2)
    assert res.indices.tolist() == [[0, 1], [0, 1]]


BAD_SEARCH = [
    (lambda: nearest_neighbours([[1.0]], torch.ones(1, 1)), TypeError, "x"),
    (lambda: nearest_neighbours(torch.ones(2, 3), "bank"), TypeError, "bank"),
    (lambda: nearest_neighbours(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3)),
     ValueError, "x"),
    (lambda: nearest_neighbours(torch.ones(3), torch.ones(2, 3)), ShapeError, "x"),
    (lambda: nearest_neighbours(torch.ones(2, 3), torch.ones(2, 4)), ShapeError, "bank"),
    (lambda: nearest_neighbours(torch.ones(2, 3), torch.ones(0, 3)), ShapeError, "bank"),
    (lambda: nearest_neighbours(torch.ones(2, 3), torch.ones(4, 3), k=0), ValueError, "k"),
    (lambda: nearest_neighbours(torch.ones(2, 3), torch.ones(4, 3), k=5), ValueError, "k"),
    (lambda: nearest_neighbours(torch.ones(2, 3), torch.ones(4, 3), k=2.0), TypeError, "k"),
    (lambda: nearest_neighbours(torch.ones(2, 3), torch.ones(4, 3), k=True), TypeError, "k"),
    (lambda: nearest_neighbours(torch.ones(2, 3), torch.ones(4, 3, device="meta")),
     ValueError, "device"),
]


@pytest.mark.parametrize("i", range(len(BAD_SEARCH)))
def test_search_bad_arguments(i):
    call, kind, name = BAD_SEARCH[i]
    with pytest.raises(kind, match=name):
        call()


# ----------------------------------------------------------------------------- NN bank

def test_nn_bank_returns_stored_entries_looked_up_before_the_update(backend):
    torch.manual_seed(0)
    module = NNMemoryBankModule(size=(130, 17))
    assert module.feature_dim_first is True and module.gather_distributed is False
    stored = randn(130, 17, seed=4) * 5  # not unit rows: the entries come back as stored
    module.bank.copy_(stored)
    x = randn(70, 17, seed=6, dtype=torch.bfloat16).requires_grad_()
    got = module(x, update=True)
    s = ref_scores(x.detach(), stored)
    idx = s.argmax(1)
    gap = s.max(1).values - s.masked_fill(tF.one_hot(idx, 130).bool(), -2).max(1).values
    clear = gap > 1e-5
    assert got.dtype == torch.float32 and got.shape == (70, 17) and not got.requires_grad
    assert torch.equal(got[clear], stored[idx[clear]])
    # now the bank holds the 70 queries (FIFO from slot 0), and each one is found itself
    assert int(module.bank_ptr) == 70
    assert torch.equal(module.bank[:70], x.detach().float())
    again = module(x[:5], update=False)
    assert torch.equal(again, x.detach()[:5].float())
    assert int(module.bank_ptr) == 70


@pytest.mark.parametrize("k", [1, 3])
def test_search_ignores_autocast(k):
    """Under autocast the scores stay float32 (lightly's einsum would run in bfloat16)."""
    x, bank = randn(40, 64, seed=1), randn(300, 64, seed=2)
    plain = nearest_neighbours(x, bank, k=k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = nearest_neighbours(x, bank, k=k)
        module = NNMemoryBankModule(size=(300, 64))
        module.bank.copy_(bank)
        got = module(x)
    assert torch.equal(plain.indices, cast.indices) and torch.equal(plain.values, cast.values)
    assert got.dtype == torch.float32 and torch.equal(got, bank[plain.indices[:, 0]])


def test_nn_bank_errors():
    with pytest.raises(ShapeError, match="size"):
        NNMemoryBankModule(size=0)(torch.ones(2, 3))
    with pytest.raises(AssertionError):  # lightly asserts there
        NNMemoryBankModule(size=(0, 3))(torch.ones(2, 3))
    module = NNMemoryBankModule(size=(5, 3))
    before = module.bank.clone()
    with pytest.raises(ShapeError, match="output"):
        module(torch.ones(2, 4), update=True)
    with pytest.raises(ValueError, match="output"):
        module(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="update"):
        module(torch.ones(2, 3), update="yes")
    assert torch.equal(module.bank, before) and int(module.bank_ptr) == 0


# ----------------------------------------------------------------------------- bad input

BAD_SIZES = [
    (-1, ValueError), ((10, -1), ValueError), (10, ValueError), ((1, 2, 3), ValueError),
    ((), ValueError), ((5,), ValueError), ("10", TypeError), (2.5, TypeError),
    ((10, 2.5), TypeError), (None, TypeError), (True, TypeError),
]


@pytest.mark.parametrize("size,kind", BAD_SIZES, ids=[repr(s) for s, _ in BAD_SIZES])
def test_bad_sizes(size, kind):
    with pytest.raises(kind, match="size"):
        MemoryBankModule(size=size)


def test_bad_flags_and_batches():
    with pytest.raises(TypeError, match="gather_distributed"):
        MemoryBankModule((4, 3), gather_distributed="yes")
    with pytest.raises(TypeError, match="feature_dim_first"):
        MemoryBankModule((4, 3), feature_dim_first=2)
    bank = MemoryBankModule((4, 3))
    bank(randn(1, 3, seed=0), update=True)
    before, ptr = bank.bank.clone(), int(bank.bank_ptr)
    for output, kind in [([[1.0, 2.0, 3.0]], TypeError),
                         (torch.ones(2, 3, dtype=torch.int64), ValueError),
                         (torch.ones(2, 4), ShapeError), (torch.ones(3), ShapeError),
                         (torch.ones(2, 3, 1), ShapeError)]:
        with pytest.raises(kind, match="output"):
            bank(output, update=True)
    with pytest.raises(TypeError, match="update"):
        bank(torch.ones(2, 3), update=None)
    # lightly's torch errors for these shapes are RuntimeErrors: ShapeError is one too
    with pytest.raises(RuntimeError):
        bank(torch.ones(2, 4), update=True)
    assert torch.equal(bank.bank, before) and int(bank.bank_ptr) == ptr, "half-written"
    # read-only calls do not look at the output (lightly's behaviour)
    _, got = bank(torch.ones(2, 4))
    assert torch.equal(got, before.T)


# ----------------------------------------------------------------------------- 2 ranks

def bank_worker(rank, world):
    torch.manual_seed(0)
    bank = MemoryBankModule((4, 3), gather_distributed=True, feature_dim_first=False)
    first = randn(3, 3, seed=1)[[slice(0, 1), slice(1, 3)][rank]]  # 1 + 2 rows
    second = randn(2, 3, seed=2)[[slice(0, 0), slice(0, 2)][rank]]  # 0 + 2 rows
    bank(first, update=True)
    if rank == 0:
        bank(first, update=False)  # read only: no collective, one rank alone is fine
    bank(second, update=True)
    try:
        bank(torch.ones(1, 3 + rank), update=True)  # rank 1's batch is too wide
        error = None
    except Exception as e:  # every rank must raise, none must hang
        error = (type(e).__name__, str(e))
    return {"bank": bank.bank.clone(), "ptr": int(bank.bank_ptr), "error": error}


def test_gathered_bank_on_two_ranks():
    results = _gloo.run(bank_worker, 2, timeout=120, what="the 2-rank memory bank")
    torch.manual_seed(0)
    expect = tF.normalize(torch.randn(4, 3), dim=-1)
    expect[0:3] = randn(3, 3, seed=1)   # step 1: the 3 gathered rows, pointer 3
    expect[3] = randn(2, 3, seed=2)[0]  # step 2: 1 of the 2 gathered rows fits, pointer 0
    for r in results:
        assert torch.equal(r["bank"], expect) and r["ptr"] == 0
        assert r["error"][0] == "ShapeError" and "rank 1" in r["error"][1]
