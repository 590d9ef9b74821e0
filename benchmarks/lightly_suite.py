"""Run lightly's own test files against fastssl's classes.

    python benchmarks/lightly_suite.py /path/to/lightly/tests [pytest args ...]

``/path/to/lightly/tests`` is the ``tests`` folder of a lightly checkout (its parent is the
root the test files import ``tests.*`` from). Before pytest collects anything, every name in
``SUBSTITUTES`` is replaced under each of lightly's import paths (the package, the
submodule that defines it) by fastssl's class of the same role, so that the test files'
``from lightly.loss import DINOLoss`` bind fastssl's. lightly itself must be importable
(its test files import its helpers). Without ``-k`` / file arguments the files in ``FILES``
are run; pytest's summary line gives the counts.
"""
import importlib
import os
import sys

import pytest

import fastssl
from fastssl import memory, prototype

# lightly name -> (fastssl object, the lightly modules that bind that name)
SUBSTITUTES = {
    "DINOLoss": (fastssl.DINOLoss, ("lightly.loss", "lightly.loss.dino_loss")),
    "IBOTPatchLoss": (fastssl.IBOTPatchLoss, ("lightly.loss", "lightly.loss.ibot_loss")),
    "KoLeoLoss": (fastssl.KoLeoLoss, ("lightly.loss", "lightly.loss.koleo_loss")),
    "SwaVLoss": (fastssl.SwaVLoss, ("lightly.loss", "lightly.loss.swav_loss")),
    "sinkhorn": (fastssl.sinkhorn, ("lightly.loss.swav_loss",)),
    "NTXentLoss": (fastssl.NTXentLoss, ("lightly.loss", "lightly.loss.ntx_ent_loss")),
    "BarlowTwinsLoss": (fastssl.BarlowTwinsLoss,
                        ("lightly.loss", "lightly.loss.barlow_twins_loss")),
    "VICRegLoss": (fastssl.VICRegLoss, ("lightly.loss", "lightly.loss.vicreg_loss")),
    "NegativeCosineSimilarity": (fastssl.NegativeCosineSimilarity,
                                 ("lightly.loss", "lightly.loss.negative_cosine_similarity")),
    "Center": (prototype.Center, ("lightly.models.modules.center",)),
    "DCLLoss": (fastssl.DCLLoss, ("lightly.loss", "lightly.loss.dcl_loss")),
    "DCLWLoss": (fastssl.DCLWLoss, ("lightly.loss", "lightly.loss.dcl_loss")),
    "HypersphereLoss": (fastssl.HypersphereLoss, ("lightly.loss", "lightly.loss.hypersphere_loss")),
    "DirectCLRLoss": (fastssl.DirectCLRLoss, ("lightly.loss", "lightly.loss.directclr_loss")),
    "SymNegCosineSimilarityLoss": (fastssl.SymNegCosineSimilarityLoss, ("lightly.loss",)),
    "CO2Regularizer": (fastssl.CO2Regularizer, ("lightly.loss.regularizer",
                                                "lightly.loss.regularizer.co2")),
    "DSERegularizer": (fastssl.DSERegularizer, ("lightly.loss.regularizer",
                                                "lightly.loss.regularizer.dse")),
    "MMCRLoss": (fastssl.MMCRLoss, ("lightly.loss", "lightly.loss.mmcr_loss")),
    "EMPSSLLoss": (fastssl.EMPSSLLoss, ("lightly.loss", "lightly.loss.emp_ssl_loss")),
    "WMSELoss": (fastssl.WMSELoss, ("lightly.loss", "lightly.loss.wmse_loss")),
    "Whitening2d": (fastssl.Whitening2d, ("lightly.loss", "lightly.loss.wmse_loss")),
    "FroSSLLoss": (fastssl.FroSSLLoss, ("lightly.loss", "lightly.loss.frossl_loss")),
    "TiCoLoss": (fastssl.TiCoLoss, ("lightly.loss", "lightly.loss.tico_loss")),
    "MemoryBankModule": (memory.MemoryBankModule, ("lightly.models.modules.memory_bank",
                                                   "lightly.loss.memory_bank")),
    "NNMemoryBankModule": (memory.NNMemoryBankModule, ("lightly.models.modules",
                                                       "lightly.models.modules.nn_memory_bank")),
}

FILES = ("loss/test_dino_loss.py", "loss/test_ibot_loss.py", "loss/test_koleo_loss.py",
         "loss/test_swav_loss.py", "loss/test_ntx_ent_loss.py",
         "loss/test_barlow_twins_loss.py", "loss/test_vicreg_loss.py",
         "loss/test_negative_cosine_similarity.py", "models/modules/test_center.py",
         "loss/test_dcl_loss.py", "loss/test_hypersphere_loss.py", "loss/test_directclr_loss.py",
         "loss/test_sym_neg_cos_sim_loss.py", "loss/test_co2.py", "loss/test_dse_regularizer.py",
         "loss/test_MMCR_loss.py", "loss/test_emp_ssl_loss.py", "loss/test_wmse_loss.py",
         "loss/test_frossl_loss.py", "loss/test_tico_loss.py")


class Substitute:
    """pytest plugin: binds fastssl's objects under lightly's names before collection."""

    def pytest_configure(self, config):
        for name, (obj, modules) in SUBSTITUTES.items():
            for path in modules:
                setattr(importlib.import_module(path), name, obj)


def main(argv):
    if not argv or not os.path.isdir(argv[0]):
        sys.exit(__doc__)
    tests = os.path.abspath(argv[0])
    root = os.path.dirname(tests)
    rest = argv[1:]
    if not any(os.path.exists(os.path.join(tests, a)) for a in rest):
        rest = [os.path.join(tests, f) for f in FILES if os.path.exists(os.path.join(tests, f))] \
            + rest
    else:
        rest = [os.path.join(tests, a) if os.path.exists(os.path.join(tests, a)) else a
                for a in rest]
    sys.path.insert(0, root)
    os.chdir(root)
    return pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", root, *rest],
                       plugins=[Substitute()])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
