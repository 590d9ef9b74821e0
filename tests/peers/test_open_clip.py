"""fastssl's ClipLoss / SigLipLoss against open_clip's (3.3) on 2 gloo ranks: every
(local_loss, gather_with_grad) pair of ClipLoss and every dist_impl of SigLipLoss, the loss
and the gradients of both features, the logit scale and the bias on each rank, in float32
and float64. open_clip's float64 run is the reference (its code is the textbook formula);
the precision rule is the lightly tests': fastssl's float32 error at most twice open_clip's
plus four roundings of a float32 result, float64 within 1e4 roundings of float64.
``local_loss=True, gather_with_grad=False`` differs from open_clip on purpose in the
feature gradients (see ``_clip_worker.OwnColumns``); there the reference is that rule, written with
torch.distributed, and open_clip's loss and scale gradient are checked to be the same."""
import torch

from ._peers import need, rel

open_clip = need("open_clip")
from test_distributed import run_ranks  # noqa: E402  (tests/ is on sys.path)

from ._clip_worker import CLIP, FLOOR, OWN, SIGLIP, worker  # noqa: E402


def test_clip_and_siglip_on_two_ranks_match_open_clip():
    ranks = run_ranks(worker, 2, timeout=120, failure="open_clip comparison did not finish")
    bad = []
    for case in CLIP + SIGLIP:
        errors = []
        peer = "own columns" if case == OWN else "open_clip"
        for r, res in enumerate(ranks):
            ref_loss, ref_grads = res[(case, str(torch.float64), peer)]
            if case == OWN:  # the same loss and scale gradient as open_clip; not its features'
                oc_loss, oc_grads = res[(case, str(torch.float64), "open_clip")]
                assert rel(oc_loss, ref_loss) < 1e-12 and rel(oc_grads[2], ref_grads[2]) < 1e-12
                assert rel(oc_grads[0], ref_grads[0]) > 0.1
            for dtype in (torch.float32, torch.float64):
                ours = res[(case, str(dtype), "fastssl")]
                theirs = res[(case, str(dtype), peer)]
                names = ["loss", "d image", "d text", "d scale", "d bias"]
                for name, a, b, ref in zip(names, [ours[0]] + ours[1], [theirs[0]] + theirs[1],
                                           [ref_loss] + ref_grads):
                    assert a.dtype == dtype and torch.isfinite(a).all(), (case, r, name)
                    errors.append((dtype, f"{case} rank {r} {name} vs {peer}", rel(a, ref),
                                   rel(b, ref)))
        for dtype, what, e_ours, e_theirs in errors:
            bound = FLOOR[dtype] + (2 * e_theirs if dtype == torch.float32 else 0.0)
            if not e_ours <= bound:
                bad.append(f"{what} ({dtype}): fastssl is {e_ours:.3g} from open_clip's "
                           f"float64, open_clip's {dtype} {e_theirs:.3g}")
    assert not bad, "\n".join(bad)
