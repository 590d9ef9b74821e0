"""EMA (momentum-encoder) updates over real models' parameter lists against the foreach
and per-tensor loops, as bandwidth and its fraction of a measured copy."""
import torch

from .timing import noop, time_each, time_one



def resnet50_shapes():
    """Parameter shapes of ResNet-50 (161 tensors, 25.6 M parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inp = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inp, 1, 1), (width,), (width,), (width, width, 3, 3), (width,),
                       (width,), (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inp, 1, 1), (4 * width,), (4 * width,)]
            inp = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def vit_b16_shapes():
    """Parameter shapes of ViT-B/16 (152 tensors, 86.6 M parameters)."""
    d = 768
    shapes = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d),
                   (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,), (1000, d), (1000,)]


def _timm_model_ema(online, m):
    """timm's ``ModelEmaV3`` on a module holding the online tensors (its own copy is the
    EMA), updated as a training loop calls it."""
    from timm.utils import ModelEmaV3
    model = torch.nn.ParameterList([torch.nn.Parameter(o, requires_grad=False) for o in online])
    ema = ModelEmaV3(model, decay=m)
    return lambda: ema.update(model)


def _ema_methods(ema, online, m, log=None):
    from fastssl.ema import ema_
    flat_e = torch.cat([t.flatten() for t in ema])
    flat_o = torch.cat([t.flatten() for t in online])

    def loop():
        for e, o in zip(ema, online):
            e.mul_(m).add_(o, alpha=1 - m)

    methods = {
        "fastssl": lambda: ema_(ema, online, m),
        "python loop": loop,
        "foreach mul+add (lightly)": lambda: (torch._foreach_mul_(ema, m),
                                              torch._foreach_add_(ema, online, alpha=1 - m)),
        "foreach lerp (timm)": lambda: torch._foreach_lerp_(ema, online, 1 - m),
        "flat lerp_ (one buffer)": lambda: flat_e.lerp_(flat_o, 1 - m),
    }
    try:
        methods["timm ModelEmaV3"] = _timm_model_ema(online, m)
    except Exception as e:
        if log:
            log(f"note: timm ModelEmaV3 not benchmarked ({type(e).__name__}: {str(e)[:200]})")
    return methods


def bench_ema(quick, log, save=noop):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    src = torch.ones(1 << 28 if cuda else 1 << 25, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_one(lambda: dst.copy_(src), cuda, 5)
    copy_gbs = 2 * src.numel() * 4 / copy_ms / 1e6  # one read and one write per element
    del src, dst
    log(f"measured copy bandwidth: {copy_gbs:.0f} GB/s (copy_ of a "
        f"{(1 << 28 if cuda else 1 << 25) * 4 >> 20} MiB tensor)")
    rows = []
    models = {"resnet50": resnet50_shapes()}
    if cuda or not quick:  # both lists are the GPU target's; a second on the CPU is slow
        models["vit_b16"] = vit_b16_shapes()
    for name, shapes in models.items():
        g = torch.Generator().manual_seed(0)
        ema = [torch.randn(sh, generator=g).to(device) for sh in shapes]
        online = [torch.randn(sh, generator=g).to(device) for sh in shapes]
        params = sum(t.numel() for t in ema)
        log(f"{name}: {len(shapes)} tensors, {params / 1e6:.1f} M parameters (fp32)")
        for impl, ms in time_each(_ema_methods(ema, online, 0.996, log), cuda).items():
            gbs = 12 * params / ms / 1e6
            row = {"op": "ema", "impl": impl, "model": name, "tensors": len(shapes),
                   "params": params, "ms": ms, "gb_per_s": gbs,
                   "fraction_of_copy_bandwidth": gbs / copy_gbs}
            rows.append(row)
            log(f"  {impl:>28}: {ms:8.3f} ms  {gbs:7.1f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)")
            save(rows)
    return rows, {"copy_gb_per_s": copy_gbs}
