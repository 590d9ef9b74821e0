"""The joint-embedding methods: contrastive (SimCLR, MoCo v2) and non-contrastive (BYOL,
SimSiam, Barlow Twins, VICReg), two views each."""
import torch
import torch.nn.functional as tF
from torch import nn

import fastssl
from fastssl.pretrain.methods.base import Method
from fastssl.pretrain.models import mlp


class SimCLR(Method):
    name, views = "simclr", "simclr"

    def __init__(self, encoder, temperature=0.2, distributed=False):
        super().__init__()
        self.encoder, self.head = encoder, mlp([encoder.dim, 256, 64])
        self.criterion = fastssl.NTXentLoss(temperature=temperature,
                                            gather_distributed=distributed)

    def forward(self, views):
        z0, z1 = (self.head(self.encoder(v)) for v in views)
        return self.criterion(z0, z1)


class MoCo(Method):
    """MoCo v2: queries from the student, keys from its momentum copy, a queue of past
    keys as extra negatives (plus the batch's other keys), both view orders."""
    name, epochs, views = "moco", 80, "moco"

    def __init__(self, encoder, temperature=0.2, queue_size=1024, momentum=0.99,
                 distributed=False):
        super().__init__()
        self.encoder = encoder
        self.query = nn.Sequential(encoder, mlp([encoder.dim, 256, 64]))
        self.key = fastssl.EMA(self.query, momentum=momentum, final_momentum=1.0)
        self.queue = fastssl.MoCoQueue(64, queue_size, gather_distributed=distributed)
        self.criterion = fastssl.InfoNCELoss(temperature=temperature,
                                             gather_distributed=distributed)
        self._keys = None

    def forward(self, views):
        q0, q1 = (self.query(v) for v in views)
        with torch.no_grad():
            k0, k1 = (self.key(v) for v in views)
        negatives = self.queue.negatives()
        self._keys = (k0, k1)
        return 0.5 * (self.criterion(q0, k1, negatives) + self.criterion(q1, k0, negatives))

    def after_step(self, step, total):
        self.key.update(step, total)
        for k in self._keys:  # view by view: the queue's order does not depend on the ranks
            self.queue.enqueue(tF.normalize(k, dim=1))


class BYOL(Method):
    name, epochs = "byol", 80

    def __init__(self, encoder, momentum=0.99, distributed=False):
        super().__init__()
        self.encoder = encoder
        self.online = nn.Sequential(encoder, mlp([encoder.dim, 256, 64]))
        self.predictor = mlp([64, 256, 64])
        self.target = fastssl.EMA(self.online, momentum=momentum, final_momentum=1.0)
        self.criterion = fastssl.NegativeCosineSimilarity()

    def forward(self, views):
        p0, p1 = (self.predictor(self.online(v)) for v in views)
        with torch.no_grad():
            t0, t1 = (self.target(v) for v in views)
        return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))

    def after_step(self, step, total):
        self.target.update(step, total)


class SimSiam(Method):
    name, views = "simsiam", "moco"

    def __init__(self, encoder, distributed=False):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp([encoder.dim, 256, 256], last_bn=True)
        self.predictor = mlp([256, 64, 256])
        self.criterion = fastssl.NegativeCosineSimilarity()

    def forward(self, views):
        z0, z1 = (self.projector(self.encoder(v)) for v in views)
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))


class Barlow(Method):
    name = "barlow"

    def __init__(self, encoder, lambda_param=5e-3, distributed=False):
        super().__init__()
        self.encoder, self.projector = encoder, mlp([encoder.dim, 512, 512, 512])
        self.criterion = fastssl.BarlowTwinsLoss(
            lambda_param=lambda_param, gather_distributed=distributed,
            normalize="global" if distributed else "local")

    def forward(self, views):
        z0, z1 = (self.projector(self.encoder(v)) for v in views)
        return self.criterion(z0, z1)


class VICReg(Method):
    name = "vicreg"

    def __init__(self, encoder, distributed=False):
        super().__init__()
        self.encoder, self.projector = encoder, mlp([encoder.dim, 512, 512, 512])
        self.criterion = fastssl.VICRegLoss(gather_distributed=distributed)

    def forward(self, views):
        z0, z1 = (self.projector(self.encoder(v)) for v in views)
        return self.criterion(z0, z1)
