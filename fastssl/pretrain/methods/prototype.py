"""The prototype methods: DINO and SwAV, multi-crop, on fastssl's fused prototype loss
(no rows x K matrix)."""
import torch
import torch.nn.functional as tF
from torch import nn

import fastssl
from fastssl.pretrain.methods.base import Method, crops
from fastssl.pretrain.models import mlp


class PrototypeHead(nn.Module):
    """MLP to a bottleneck, L2-normalised, and K prototypes used weight-normalised (unit
    rows): the head of DINO and SwAV without its last linear layer, whose cosine scores
    the fused loss computes tile by tile. ``forward`` returns the unit bottleneck rows. The
    MLP is Linear-BN-ReLU-Linear, or Linear-GELU-Linear with ``batch_norm=False``."""

    def __init__(self, dim, prototypes, bottleneck=64, hidden=256, batch_norm=True):
        super().__init__()
        # a ViT's head (DINO's own) has no BatchNorm: it also scores patch tokens, whose
        # count varies per image
        self.mlp = mlp([dim, hidden, bottleneck]) if batch_norm else nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.weight = nn.Parameter(torch.randn(prototypes, bottleneck) / bottleneck ** 0.5)

    def prototypes(self):
        return tF.normalize(self.weight, dim=1)

    def forward(self, h):
        return tF.normalize(self.mlp(h), dim=1)


class DINO(Method):
    """DINO: the student sees every crop, the ``EMA`` teacher (cosine momentum schedule) the
    two global crops; the teacher's centred, sharpened distribution over the prototypes is
    the target of every other student crop. The teacher temperature warms up linearly over
    the first ``warmup`` fraction of the steps."""
    name, epochs, views = "dino", 60, "multi_crop"

    def __init__(self, encoder, prototypes=256, momentum=0.99, student_temp=0.1,
                 teacher_temp=(0.02, 0.03), warmup=0.3, teacher_target="softmax",
                 batch_norm=True, distributed=False):
        super().__init__()
        self.encoder = encoder
        self.student = nn.Sequential(encoder, PrototypeHead(encoder.dim, prototypes,
                                                            batch_norm=batch_norm))
        self.teacher = fastssl.EMA(self.student, momentum=momentum, final_momentum=1.0)
        self.criterion = fastssl.PrototypeCrossEntropy(
            output_dim=prototypes, student_temp=student_temp, teacher_crops=2,
            warmup_teacher_temp=teacher_temp[0], teacher_temp=teacher_temp[1],
            teacher_target=teacher_target)
        self.temps, self.warmup = teacher_temp, warmup
        self.register_buffer("progress", torch.zeros(()))  # fraction of the steps done

    def teacher_temp(self):
        lo, hi = self.temps
        done = float(self.progress)
        return hi if done >= self.warmup else lo + (hi - lo) * done / self.warmup

    def forward(self, views):
        s = crops(self.student, views)
        with torch.no_grad():
            t = crops(self.teacher.module, views[:2])
            V = self.teacher.module[1].prototypes()
        return self.criterion(s, t, self.student[1].prototypes(), V,
                              teacher_temp=self.teacher_temp())

    def after_step(self, step, total):
        self.teacher.update(step, total)
        self.progress.fill_((step + 1) / total)


class SwAV(Method):
    """SwAV: every crop's softmax over the prototypes (temperature 0.1) predicts the
    Sinkhorn-Knopp codes (epsilon 0.05, 3 iterations) of the other global crops; the codes
    come from the same network without gradient, in factored form."""
    name, epochs, views = "swav", 50, "multi_crop"

    def __init__(self, encoder, prototypes=128, temperature=0.1, epsilon=0.02, iterations=3,
                 distributed=False):
        super().__init__()
        self.encoder = encoder
        self.net = nn.Sequential(encoder, PrototypeHead(encoder.dim, prototypes))
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, iterations

    def forward(self, views):
        z = crops(self.net, views)
        W = self.net[1].prototypes()
        B = views[0].shape[0]
        return fastssl.prototype_cross_entropy(
            z, z[:2 * B].detach(), W, W.detach(), self.temperature, self.epsilon,
            teacher_crops=2, teacher_target="sinkhorn", sinkhorn_iterations=self.iterations,
            gather_distributed=True)
