"""`fastssl bench`'s peer rows (lightly, open_clip) on 16-bit inputs, with the peers
installed: every CPU peer of each op is found and runs forward+backward within 16-bit
rounding of the eager formulation (tests/test_bench_peers.py runs the same check on the
fastssl and eager rows without the peers)."""
import pytest

from ._peers import need

need("lightly.loss", "open_clip")
from fastssl.bench import formulations, peers  # noqa: E402
from test_bench_peers import TINY, check_16bit_rows  # noqa: E402  (tests/ is on sys.path)


@pytest.mark.parametrize("op", sorted(op for op in TINY if peers.PEERS.get(op)))
def test_peer_rows_take_16bit_inputs(op, monkeypatch):
    found, missing = peers.find(op, "cpu")
    cpu_peers = [name for name, _, cuda_only in peers.PEERS[op] if not cuda_only]
    assert sorted(found) == sorted(cpu_peers), missing
    check_16bit_rows(op, [*formulations.IMPLS[op], *found], monkeypatch)
