"""The presets of dct_at_loss pinned: their option values as documented (docs/DESIGN.md §3.3), and the
loss of every backend against an independent numpy/scipy statement of the formula (not the
reference module, which reads the same PRESETS table as the kernels)."""

import numpy as np
import pytest
import scipy.fft
import torch

import dctkd_ext
from dctkd_ext import reference as ref

from conftest import features

# The documented table (docs/DESIGN.md §3.3), written out: a change of PRESETS must change this too.
DOCUMENTED = {
    "dct": dict(p=2.0, map_norm="minmax", center=True, transform="dct", coef_abs=True, coef_norm="minmax",
                distance="l2", eps=1e-8),
    "fft-abs-max": dict(p=2.0, map_norm="max", center=True, transform="fft_real", coef_abs=True, coef_norm="max",
                        distance="l2", eps=0.0),
    "fft-real-minmax": dict(p=2.0, map_norm="minmax", center=True, transform="fft_real", coef_abs=False,
                            coef_norm="minmax", distance="l2", eps=0.0),
    "paper": dict(p=2.0, map_norm="max", center=True, transform="fft_real", coef_abs=True, coef_norm="max",
                  distance="l2", eps=0.0),
    "at": dict(p=2.0, map_norm="l2", center=False, transform="identity", coef_abs=False, coef_norm="none",
               distance="mse", eps=1e-12),
}


def test_preset_options_are_the_documented_ones():
    assert set(dctkd_ext.PRESETS) == set(DOCUMENTED)
    for name, opts in DOCUMENTED.items():
        assert dict(dctkd_ext.PRESETS[name]) == opts, name


# ------------------------------------------------------------------------------- the numpy oracle
def np_normalise(a, kind, eps):
    """Rows of a (B, N)."""
    if kind == "none":
        return a
    if kind == "l2":
        return a / (np.sqrt((a * a).sum(1, keepdims=True)) + eps)
    lo, hi = a.min(1, keepdims=True), a.max(1, keepdims=True)
    if kind == "minmax":
        return (a - lo) / (hi - lo + eps)
    if kind == "max":
        return (a - lo) / (hi + eps)
    raise ValueError(kind)


def np_coefficients(x, p, map_norm, center, transform, coef_abs, coef_norm, eps):
    """x (B, C, H, W) float64 -> (B, H*W): map, normalise, centre, transform, |.|, normalise."""
    b, _, h, w = x.shape
    a = (np.abs(x) ** p).mean(axis=1).reshape(b, h * w)
    u = np_normalise(a, map_norm, eps)
    if center:
        u = u - u.mean(1, keepdims=True)
    u = u.reshape(b, h, w)
    if transform == "dct":
        c = scipy.fft.dctn(u, type=2, norm="ortho", axes=(-2, -1))
    elif transform == "fft_real":
        c = np.fft.fft2(u, axes=(-2, -1)).real
    else:
        c = u
    c = c.reshape(b, h * w)
    if coef_abs:
        c = np.abs(c)
    return np_normalise(c, coef_norm, eps)


def np_dct_at_loss(student, teacher, opts, weights=None, sample_weight=None, reduction="mean"):
    per_sample = 0.0
    weights = weights or [1.0] * len(student)
    keys = ("p", "map_norm", "center", "transform", "coef_abs", "coef_norm", "eps")
    for s, t, wl in zip(student, teacher, weights):
        zs = np_coefficients(s, **{k: opts[k] for k in keys})
        zt = np_coefficients(t, **{k: opts[k] for k in keys})
        sq = (zs - zt) ** 2
        d = {"l2": np.sqrt(sq.sum(1)), "mse": sq.mean(1), "sse": sq.sum(1)}[opts["distance"]]
        per_sample = per_sample + wl * d
    if sample_weight is not None:
        per_sample = per_sample * sample_weight
    return {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]


# Each preset as is, and with the scale-dependent options (no normalisation: the 1/C of the map
# and the scale of the transform count).
CASES = [("dct", {}), ("paper", {}), ("fft-real-minmax", {}), ("at", {}),
         ("dct", dict(map_norm="none", coef_norm="none")),
         ("paper", dict(map_norm="none", coef_norm="none", distance="sse")),
         ("at", dict(map_norm="none", p=3.0))]


@pytest.mark.parametrize("preset,over", CASES, ids=[f"{p}-{','.join(f'{k}={v}' for k, v in o.items()) or 'as-is'}"
                                                     for p, o in CASES])
def test_loss_matches_numpy_formula(backend, preset, over, gen):
    _, device = backend
    # two levels, channels differ between student and teacher (so the 1/C of the map matters)
    shapes = [((3, 4, 6, 5), (3, 7, 6, 5)), ((3, 2, 4, 4), (3, 9, 4, 4))]
    s = [features(*a, dtype=torch.float64, generator=gen) for a, _ in shapes]
    t = [features(*b, dtype=torch.float64, generator=gen) for _, b in shapes]
    sw = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    opts = dict(dctkd_ext.PRESETS[preset])
    opts.update(over)
    expect = np_dct_at_loss([x.numpy() for x in s], [x.numpy() for x in t], {**DOCUMENTED[preset], **over},
                            weights=[1.0, 2.5], sample_weight=sw.numpy(), reduction="none")
    got = dctkd_ext.dct_at_loss([x.to(device) for x in s], [x.to(device) for x in t], preset=preset,
                                weights=[1.0, 2.5], sample_weight=sw.to(device), reduction="none", **over)
    np.testing.assert_allclose(got.detach().cpu().numpy(), expect, rtol=1e-9, atol=1e-12)
    # and the float64 reference that every other test compares against
    r = ref.dct_at_loss(s, t, preset=preset, weights=[1.0, 2.5], sample_weight=sw, reduction="none", **over)
    np.testing.assert_allclose(r.numpy(), expect, rtol=1e-9, atol=1e-12)


def test_one_pinned_value_per_preset():
    """A fixed input whose loss is worked out by hand in the numpy formula: one 2x2 map per side."""
    # student map (1/C) sum_c x^2 over C = 2 channels, teacher over C = 1
    s = np.array([[[[1.0, 2.0], [3.0, 0.5]], [[1.0, 0.0], [1.0, 0.5]]]])  # A_s = [[1, 2], [5, .25]]
    t = np.array([[[[1.0, 1.0], [2.0, 3.0]]]])  # A_t = [[1, 1], [4, 9]]
    st, tt = torch.from_numpy(s), torch.from_numpy(t)
    for preset in DOCUMENTED:
        expect = np_dct_at_loss([s], [t], DOCUMENTED[preset])
        assert float(dctkd_ext.dct_at_loss([st], [tt], preset=preset)) == pytest.approx(float(expect), rel=1e-12)
    # the at preset written out: A / ||A||, mean of squared differences over the 4 positions
    a_s = np.array([1.0, 2.0, 5.0, 0.25])
    a_t = np.array([1.0, 1.0, 4.0, 9.0])
    at = (((a_s / np.linalg.norm(a_s)) - (a_t / np.linalg.norm(a_t))) ** 2).mean()
    assert float(dctkd_ext.dct_at_loss([st], [tt], preset="at")) == pytest.approx(at, rel=1e-12)


# ------------------------------------------------------- the two released DCT-KD losses, in float64
# alexlopezcifuentes/Distillation-Attention, `Distillation Zoo/DFTOurs.py`: reference.released_dct_loss
# restates branch dev's file, reference.released_dct_loss_main branch main's, line by line.
RELEASED = [("fft-abs-max", ref.released_dct_loss), ("paper", ref.released_dct_loss),
            ("fft-real-minmax", ref.released_dct_loss_main)]


@pytest.mark.parametrize("preset,released", RELEASED, ids=[p for p, _ in RELEASED])
def test_released_dct_presets_equal_their_branch_in_float64(backend, preset, released, gen):
    _, device = backend
    shapes = [((4, 5, 8, 8), (4, 11, 8, 8)), ((4, 3, 6, 5), (4, 7, 6, 5)), ((4, 2, 3, 3), (4, 6, 3, 3))]
    s = [features(*a, dtype=torch.float64, generator=gen, requires_grad=True) for a, _ in shapes]
    t = [features(*b, dtype=torch.float64, generator=gen) for _, b in shapes]
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    sd = [x.detach().to(device).requires_grad_() for x in s]
    ours = dctkd_ext.dct_at_loss(sd, [x.to(device) for x in t], preset=preset, sample_weight=mask.to(device))
    theirs = released(s, t, mask)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-10)
    for a, b in zip(torch.autograd.grad(ours, sd), torch.autograd.grad(theirs, s)):
        np.testing.assert_allclose(a.cpu().numpy(), b.numpy(), rtol=1e-8, atol=1e-12)


def test_the_two_released_dct_losses_differ(gen):
    """Without the absolute value and with (max - min) the loss is another function of the features."""
    s = [features(3, 4, 7, 7, dtype=torch.float64, generator=gen)]
    t = [features(3, 6, 7, 7, dtype=torch.float64, generator=gen)]
    dev, main = ref.released_dct_loss(s, t), ref.released_dct_loss_main(s, t)
    assert abs(float(dev) - float(main)) > 1e-3 * abs(float(dev))
    # and each differs from the other's preset: the presets are not interchangeable
    assert float(dctkd_ext.dct_at_loss(s, t, preset="fft-abs-max")) == pytest.approx(float(dev), rel=1e-10)
    assert float(dctkd_ext.dct_at_loss(s, t, preset="fft-abs-max")) != pytest.approx(float(main), rel=1e-6)
