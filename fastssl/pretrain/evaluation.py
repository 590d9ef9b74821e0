"""Evaluation of a frozen encoder: features of one deterministic view per image, a weighted
kNN classifier, a linear probe, and the label-efficiency (low-shot) table.

kNN: cosine similarity, the k nearest training points vote with exp(s / 0.1). Linear
probe: multinomial logistic regression on standardised features (training-set
statistics), mean cross-entropy + wd * ||W||^2, full-batch L-BFGS. Low-shot: the same two
classifiers fitted on 1, 5 and 10 labelled training images per class (several seeded
draws; mean and standard deviation over the draws), tested on the whole held-out set.
"""
import torch
import torch.nn.functional as tF
from torch import nn

from fastssl import augment as A
from fastssl.pretrain.data import collate

SHOTS = (1, 5, 10)


@torch.no_grad()
def features(fn, dataset, indices, size, device, batch=256, workers=0):
    """``fn`` of one deterministic view per image of ``dataset[indices]`` (the whole image
    resized to ``size`` and normalised, as training views are), in the order given."""
    view = A.Augment(A.RandomResizedCrop(size, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
                     A.Normalize())
    chunks = [indices[i:i + batch].tolist() for i in range(0, len(indices), batch)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=workers,
                                         collate_fn=collate)
    out = []
    for images, _, _ in loader:
        out.append(fn(view(images.to(device))).float())
    return torch.cat(out)


def knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.1):
    """Weighted kNN: cosine similarity, the k nearest training points vote with exp(s/T)."""
    a, b = tF.normalize(train_x, dim=1), tF.normalize(test_x, dim=1)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for i in range(0, len(b), 1024):
        s = b[i:i + 1024] @ a.T
        sim, idx = s.topk(min(k, len(a)), dim=1)
        votes = torch.zeros(len(s), n_classes, device=s.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return 100.0 * correct / len(b)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, weight_decay=1e-4, iters=200):
    """Multinomial logistic regression on standardised features (training-set statistics),
    fitted by full-batch L-BFGS with an L2 penalty; test accuracy in percent."""
    mean = train_x.mean(0)
    std = train_x.std(0).nan_to_num(0.0).clamp_min(1e-6) if len(train_x) > 1 \
        else torch.ones_like(mean)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    layer = nn.Linear(xtr.shape[1], n_classes).to(xtr.device)
    nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = tF.cross_entropy(layer(xtr), train_y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return 100.0 * (layer(xte).argmax(1) == test_y).float().mean().item()


def few_shot_draw(train_y, shots, seed):
    """Positions of ``shots`` training images per class (all of a class's images when it
    has fewer), drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in train_y.unique():
        idx = (train_y == c).nonzero()[:, 0].cpu()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(picked).sort().values


def low_shot(train_x, train_y, test_x, test_y, knn_k, shots=SHOTS, draws=5, seed=0):
    """{"1": {"knn": [mean, std], "linear": [mean, std], "accuracies": {...}}, ...}: both
    classifiers on ``shots`` labelled images per class, over ``draws`` seeded draws."""
    table = {}
    for s in shots:
        knn, linear = [], []
        for d in range(draws):
            pick = few_shot_draw(train_y, s, seed * 1000 + 100 * s + d).to(train_x.device)
            x, y = train_x[pick], train_y[pick]
            knn.append(knn_accuracy(x, y, test_x, test_y, knn_k))
            linear.append(linear_probe_accuracy(x, y, test_x, test_y))
        table[str(s)] = {name: [float(torch.tensor(v, dtype=torch.float64).mean()),
                                float(torch.tensor(v, dtype=torch.float64).std())
                                if len(v) > 1 else 0.0]
                         for name, v in (("knn", knn), ("linear", linear))}
        table[str(s)]["accuracies"] = {"knn": knn, "linear": linear}
    return table


def evaluate(fn, dataset, train, test, size, knn_k, device, workers=0, draws=5):
    """kNN and linear probe with every training label, and the low-shot table."""
    everything = torch.cat([train, test])
    feats = features(fn, dataset, everything, size, device, workers=workers)
    y = dataset.labels[everything].to(feats.device)
    n = len(train)
    ftr, fte, ytr, yte = feats[:n], feats[n:], y[:n], y[n:]
    return {"knn": knn_accuracy(ftr, ytr, fte, yte, knn_k),
            "linear": linear_probe_accuracy(ftr, ytr, fte, yte),
            "dim": feats.shape[1],
            "low_shot": low_shot(ftr, ytr, fte, yte, knn_k, draws=draws)}
