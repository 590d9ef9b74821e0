"""fastssl: fused kernels for self-supervised pretraining in PyTorch."""
import os as _os

__version__ = "0.1.0"

# Installed, ``kernels/`` is the subpackage ``fastssl.kernels``. Run from a source tree
# without installing, the same folder is found beside this package.
_tree = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_tree, "kernels", "__init__.py")) and \
        not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")):
    __path__.append(_tree)  # noqa: F821  (fastssl.kernels -> <tree>/kernels)

from fastssl import (augment, clustering, detcon, distributed, functional,  # noqa: E402
                     masking, memory, multipositive, pretext)
from fastssl.detcon import (DetConBLoss, DetConSLoss, MACLLoss, detcon_loss,  # noqa: E402
                            macl_loss)
from fastssl._checks import ShapeError  # noqa: E402
from fastssl.ema import EMA, cosine_schedule, ema_, update_momentum  # noqa: E402
from fastssl.functional import (barlow_twins, clip_loss, info_nce,  # noqa: E402
                                negative_cosine_similarity, nt_xent, siglip_loss, vicreg)
from fastssl.cpc import CPCLoss, cpc_loss  # noqa: E402
from fastssl.multipositive import (DCLLoss, DCLWLoss, SupConLoss, dcl_loss,  # noqa: E402
                                   simclr_loss_func, supcon_loss)
from fastssl.optim import LARS  # noqa: E402
from fastssl.prototype import (DINOLoss, IBOTPatchLoss, KoLeoLoss,  # noqa: E402
                               PrototypeCrossEntropy, SwaVLoss, koleo, prototype_cross_entropy,
                               sinkhorn, sinkhorn_knopp)
from fastssl.losses import (BarlowTwinsLoss, ClipLoss, CO2Regularizer,  # noqa: E402
                            DirectCLRLoss, DSERegularizer, HypersphereLoss, InfoNCELoss,
                            MoCoQueue, NegativeCosineSimilarity, NTXentLoss, SigLipLoss,
                            SymNegCosineSimilarity, SymNegCosineSimilarityLoss, VICRegLoss)
from fastssl.losses import (EMPSSLLoss, FroSSLLoss, MMCRLoss, TiCoLoss,  # noqa: E402
                            Whitening2d, WMSELoss)
from fastssl.losses import LeJEPALoss, LeWMLoss, SIGReg, VISRegLoss  # noqa: E402
from fastssl.losses import (PatchKernelAlignmentLoss, VICRegLLoss,  # noqa: E402
                            roi_resample_to_grid)
from fastssl.losses import (CAPILoss, IBOTPlusPlusPatchLoss, MSNLoss,  # noqa: E402
                            PMSNCustomLoss, PMSNLoss, positionwise_sinkhorn_knopp)
from fastssl.losses.solo import (byol_loss_func, mocov3_loss_func,  # noqa: E402
                                 nnclr_loss_func, ressl_loss_func, simsiam_loss_func)
from fastssl.memory import MemoryBankModule, NNMemoryBankModule  # noqa: E402

__all__ = ["augment", "clustering", "functional", "distributed", "masking", "pretext", "nt_xent", "info_nce", "clip_loss", "siglip_loss",
           "barlow_twins", "vicreg", "negative_cosine_similarity", "NTXentLoss", "InfoNCELoss",
           "ClipLoss", "SigLipLoss", "MoCoQueue", "BarlowTwinsLoss", "VICRegLoss",
           "NegativeCosineSimilarity", "EMA", "update_momentum", "cosine_schedule", "ema_",
           "ShapeError", "LARS", "prototype_cross_entropy", "PrototypeCrossEntropy",
           "sinkhorn_knopp", "sinkhorn", "koleo", "KoLeoLoss", "DINOLoss", "IBOTPatchLoss",
           "SwaVLoss", "cpc_loss", "CPCLoss", "multipositive", "supcon_loss", "SupConLoss",
           "simclr_loss_func", "dcl_loss", "DCLLoss", "DCLWLoss", "DirectCLRLoss",
           "HypersphereLoss", "SymNegCosineSimilarityLoss", "SymNegCosineSimilarity",
           "CO2Regularizer", "DSERegularizer", "memory", "MemoryBankModule",
           "NNMemoryBankModule", "MMCRLoss", "EMPSSLLoss", "Whitening2d", "WMSELoss",
           "FroSSLLoss", "TiCoLoss", "SIGReg", "LeJEPALoss", "LeWMLoss", "VISRegLoss",
           "mocov3_loss_func", "nnclr_loss_func", "ressl_loss_func", "byol_loss_func",
           "simsiam_loss_func", "IBOTPlusPlusPatchLoss", "CAPILoss",
           "positionwise_sinkhorn_knopp", "MSNLoss", "PMSNLoss", "PMSNCustomLoss",
           "VICRegLLoss", "PatchKernelAlignmentLoss", "roi_resample_to_grid", "detcon",
           "DetConBLoss", "DetConSLoss", "MACLLoss", "detcon_loss", "macl_loss", "__version__"]
