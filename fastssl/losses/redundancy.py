"""Redundancy reduction as modules: Barlow Twins and VICReg."""
from torch import Tensor, nn

from fastssl import _checks
from fastssl import functional as F

from ._common import _gather_flag


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins with lightly's signature: ``forward(z_a, z_b)``.

    ``normalize="global"`` reproduces the reference implementation under DDP (global-batch
    statistics and C over the global batch); ``formulation`` is "auto", "gram" or "dxd".
    See ``fastssl.functional.barlow_twins``.
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False,
                 normalize: str = "local", formulation: str = "auto"):
        super().__init__()
        self.lambda_param = _checks.number(lambda_param, "lambda_param")
        self.gather_distributed = _gather_flag(gather_distributed, "BarlowTwinsLoss")
        self.normalize = _checks.choice(normalize, "normalize", ("local", "global"))
        F.check_formulation(formulation)
        self.formulation = formulation

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return F.barlow_twins(z_a, z_b, self.lambda_param, self.gather_distributed,
                              self.normalize, self.formulation)


class VICRegLoss(nn.Module):
    """VICReg with lightly's signature: ``forward(z_a, z_b)`` on (N, D) or (N, L, D).

    See ``fastssl.functional.vicreg``.
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 1e-4, formulation: str = "auto"):
        super().__init__()
        self.lambda_param = _checks.number(lambda_param, "lambda_param")
        self.mu_param = _checks.number(mu_param, "mu_param")
        self.nu_param = _checks.number(nu_param, "nu_param")
        self.gather_distributed = _gather_flag(gather_distributed, "VICRegLoss")
        self.eps = _checks.number(eps, "eps", lo=0.0)
        F.check_formulation(formulation)
        self.formulation = formulation

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return F.vicreg(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, self.eps,
                        self.gather_distributed, self.formulation)
