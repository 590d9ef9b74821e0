"""fastssl.pretext's sRGB <-> CIE L*a*b* against kornia's (0.9) ``kornia.color.rgb_to_lab``
and ``lab_to_rgb``: the same constants (D65 white 0.95047, 1, 1.08883; the BT.709 matrix;
the sRGB knee 0.04045; Lab's 0.008856 and 7.787), so the same values to float rounding.

What differs on purpose: kornia's inverse switches branch at the rounded 0.0031308 (sRGB)
and 0.2068966 (Lab), a little inside the upper branch of each forward curve; fastssl's in
the middle of the gap that the forward curve leaves at its knee, so that its round trip is
exact. The two inverses differ only for inputs in those slivers, by less than 1e-6 in sRGB."""
import pytest
import torch

from ._peers import need, rel

kornia = need("kornia")

from fastssl import pretext  # noqa: E402

TOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def images(shape, dtype, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 17, 9), (4, 3, 64, 64)])
def test_rgb_to_lab_is_kornias(shape, dtype):
    x = images(shape, dtype, sum(shape))
    got, want = pretext.rgb_to_lab(x), kornia.color.rgb_to_lab(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [True, False])
def test_lab_to_rgb_is_kornias(dtype, clip):
    inside = kornia.color.rgb_to_lab(images((3, 3, 31, 33), dtype, 1))
    g = torch.Generator().manual_seed(2)
    outside = torch.stack([100 * torch.rand(2, 20, 20, generator=g),
                           80 * torch.randn(2, 20, 20, generator=g),
                           80 * torch.randn(2, 20, 20, generator=g)], 1).to(dtype)
    for lab in (inside, outside):
        got = pretext.lab_to_rgb(lab, clip=clip)
        want = kornia.color.lab_to_rgb(lab, clip=clip)
        assert got.dtype == want.dtype and rel(got, want) < 10 * TOL[dtype]


def test_the_inverses_differ_only_in_the_slivers_at_the_knees():
    # grays whose Y / Yn lies just above Lab's 0.008856: f(Y) in (0.2068930, 0.2068966],
    # where kornia's inverse takes the linear branch for a value made by the cube branch
    t = torch.linspace(0.0088561, 0.0088564, 50, dtype=torch.float64)
    gray = (1.055 * t ** (1 / 2.4) - 0.055).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    lab = pretext.rgb_to_lab(gray)
    assert rel(lab, kornia.color.rgb_to_lab(gray)) < 1e-15
    ours, theirs = pretext.lab_to_rgb(lab), kornia.color.lab_to_rgb(lab)
    assert (ours - gray).abs().max() < 1e-14           # fastssl: the round trip is exact
    gap = (theirs - gray).abs().max()
    assert 1e-10 < gap < 1e-6                          # kornia: off by the branches' gap
