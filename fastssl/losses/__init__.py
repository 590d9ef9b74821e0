"""nn.Module losses with the incumbents' signatures, one module per family. They hold state
only (a memory bank, a queue); the math is in ``fastssl.functional``. Constructor arguments
are checked when the module is built, naming the argument (see ``fastssl._checks``)."""
from .contrastive import ClipLoss, InfoNCELoss, MoCoQueue, NTXentLoss, SigLipLoss
from .redundancy import BarlowTwinsLoss, VICRegLoss
from .regularizers import CO2Regularizer, DSERegularizer
from .dense import PatchKernelAlignmentLoss, VICRegLLoss, roi_resample_to_grid
from .msn import MSNLoss, PMSNCustomLoss, PMSNLoss
from .sketch import LeJEPALoss, LeWMLoss, SIGReg, VISRegLoss
from .solo import (byol_loss_func, mocov3_loss_func, nnclr_loss_func, ressl_loss_func,
                   simsiam_loss_func)
from .spectral import EMPSSLLoss, FroSSLLoss, MMCRLoss, TiCoLoss, Whitening2d, WMSELoss
from .tokens import CAPILoss, IBOTPlusPlusPatchLoss, positionwise_sinkhorn_knopp
from .similarity import (DirectCLRLoss, HypersphereLoss, NegativeCosineSimilarity,
                         SymNegCosineSimilarity, SymNegCosineSimilarityLoss)

__all__ = ["NTXentLoss", "InfoNCELoss", "ClipLoss", "SigLipLoss", "MoCoQueue",
           "BarlowTwinsLoss", "VICRegLoss", "NegativeCosineSimilarity", "DirectCLRLoss",
           "HypersphereLoss", "SymNegCosineSimilarityLoss", "SymNegCosineSimilarity",
           "CO2Regularizer", "DSERegularizer", "MMCRLoss", "EMPSSLLoss", "Whitening2d",
           "WMSELoss", "FroSSLLoss", "TiCoLoss", "SIGReg", "LeJEPALoss", "LeWMLoss", "VISRegLoss",
           "mocov3_loss_func", "nnclr_loss_func", "ressl_loss_func", "byol_loss_func",
           "simsiam_loss_func", "IBOTPlusPlusPatchLoss", "CAPILoss",
           "positionwise_sinkhorn_knopp", "MSNLoss", "PMSNLoss", "PMSNCustomLoss",
           "VICRegLLoss", "PatchKernelAlignmentLoss", "roi_resample_to_grid"]
