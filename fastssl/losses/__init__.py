"""nn.Module losses with the incumbents' signatures, one module per family. They hold state
only (a memory bank, a queue); the math is in ``fastssl.functional``. Constructor arguments
are checked when the module is built, naming the argument (see ``fastssl._checks``)."""
from .contrastive import ClipLoss, InfoNCELoss, MoCoQueue, NTXentLoss, SigLipLoss
from .redundancy import BarlowTwinsLoss, VICRegLoss
from .regularizers import CO2Regularizer, DSERegularizer
from .spectral import EMPSSLLoss, FroSSLLoss, MMCRLoss, TiCoLoss, Whitening2d, WMSELoss
from .similarity import (DirectCLRLoss, HypersphereLoss, NegativeCosineSimilarity,
                         SymNegCosineSimilarity, SymNegCosineSimilarityLoss)

__all__ = ["NTXentLoss", "InfoNCELoss", "ClipLoss", "SigLipLoss", "MoCoQueue",
           "BarlowTwinsLoss", "VICRegLoss", "NegativeCosineSimilarity", "DirectCLRLoss",
           "HypersphereLoss", "SymNegCosineSimilarityLoss", "SymNegCosineSimilarity",
           "CO2Regularizer", "DSERegularizer", "MMCRLoss", "EMPSSLLoss", "Whitening2d",
           "WMSELoss", "FroSSLLoss", "TiCoLoss"]
