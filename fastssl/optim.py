"""LARS, the layer-wise adaptive optimiser of large-batch SSL recipes (SimCLR, BYOL, Barlow
Twins at batch 4096), with foreach ops.

For each parameter p with gradient g (one "layer"), weight decay wd, trust coefficient eta,
momentum mu and learning rate lr:

    u     = g + wd * p                                   (weight decay into the update)
    trust = eta * ||p|| / ||u||    if ||p|| > 0 and ||u|| > 0, else 1
    v     = mu * v + trust * u                           (momentum buffer, starts at 0)
    p     = p - lr * v

Parameters with one dimension (biases, BatchNorm/LayerNorm scales and shifts) take neither
the weight decay nor the trust ratio (u = g, trust = 1), as in the recipes; pass
``exclude_1d=False`` to adapt them too, or use parameter groups with their own settings.
"""
import torch

from fastssl import _checks


class LARS(torch.optim.Optimizer):
    """``LARS(params, lr, momentum=0.9, weight_decay=1e-6, eta=1e-3, exclude_1d=True)``."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=1e-3, exclude_1d=True):
        lr = _checks.number(lr, "lr", lo=0.0)
        momentum = _checks.number(momentum, "momentum", lo=0.0, hi=1.0)
        weight_decay = _checks.number(weight_decay, "weight_decay", lo=0.0)
        eta = _checks.number(eta, "eta", lo=0.0)
        exclude_1d = _checks.flag(exclude_1d, "exclude_1d")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, exclude_1d=exclude_1d))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
            adapt = [p for p in params if not (group["exclude_1d"] and p.dim() <= 1)]
            plain = [p for p in params if group["exclude_1d"] and p.dim() <= 1]
            updates = [p.grad.clone() for p in adapt]
            if adapt:
                if group["weight_decay"]:
                    torch._foreach_add_(updates, adapt, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(adapt))
                u_norm = torch.stack(torch._foreach_norm(updates))
                ratio = group["eta"] * p_norm / u_norm
                trust = torch.where((p_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
                torch._foreach_mul_(updates, list(trust.unbind()))
            params = adapt + plain
            updates = updates + [p.grad for p in plain]
            if not params:
                continue
            bufs = []
            for p, u in zip(params, updates):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss
