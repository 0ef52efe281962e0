"""The option sets of dct_at_loss (docs/DESIGN.md §3.3) and their validation, shared by every backend."""

from typing import Any, Dict

OPTION_NAMES = ("p", "map_norm", "center", "transform", "coef_abs", "coef_norm", "distance", "eps")
NORMS = ("minmax", "max", "l2", "none")
TRANSFORMS = ("dct", "fft_real", "identity")
DISTANCES = ("l2", "mse", "sse")
REDUCTIONS = ("mean", "sum", "none")

PRESETS: Dict[str, Dict[str, Any]] = {
    # the paper's method with a true orthonormal DCT
    "dct": dict(p=2.0, map_norm="minmax", center=True, transform="dct", coef_abs=True, coef_norm="minmax",
                distance="l2", eps=1e-8),
    # the authors' released code, two versions of it (to fp32 rounding): |Re FFT2| with maps and
    # coefficients normalised by (x - min) / max (branch dev, "Code for submission"), and Re FFT2 with
    # (x - min) / (max - min) (branch main, "Final version of paper"); "paper" is the first's older name
    "fft-abs-max": dict(p=2.0, map_norm="max", center=True, transform="fft_real", coef_abs=True, coef_norm="max",
                        distance="l2", eps=0.0),
    "fft-real-minmax": dict(p=2.0, map_norm="minmax", center=True, transform="fft_real", coef_abs=False,
                            coef_norm="minmax", distance="l2", eps=0.0),
    # attention transfer as RepDistiller / mdistiller / torchdistill compute it
    "at": dict(p=2.0, map_norm="l2", center=False, transform="identity", coef_abs=False, coef_norm="none",
               distance="mse", eps=1e-12),
}
PRESETS["paper"] = PRESETS["fft-abs-max"]


def resolve_options(preset: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The preset's options with `overrides` applied, each checked; errors name the argument."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    unknown = sorted(set(overrides) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"dct_at_loss got unexpected keyword argument(s) {unknown}; options are {', '.join(OPTION_NAMES)}")
    opts = dict(PRESETS[preset])
    opts.update(overrides)
    for key, choices in (("map_norm", NORMS), ("coef_norm", NORMS), ("transform", TRANSFORMS), ("distance", DISTANCES)):
        if opts[key] not in choices:
            raise ValueError(f"{key}: expected one of {', '.join(choices)}, got {opts[key]!r}")
    for key in ("center", "coef_abs"):
        if not isinstance(opts[key], bool):
            raise TypeError(f"{key}: expected a bool, got {opts[key]!r}")
    for key in ("p", "eps"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], (int, float)):
            raise TypeError(f"{key}: expected a number, got {opts[key]!r}")
        opts[key] = float(opts[key])
    if not opts["p"] > 0:
        raise ValueError(f"p: expected a positive exponent, got {opts['p']}")
    if not opts["eps"] >= 0:
        raise ValueError(f"eps: expected a non-negative value, got {opts['eps']}")
    return opts
