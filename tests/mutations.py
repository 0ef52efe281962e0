"""Mutation check of the test suite: plants plausible bugs one at a time in the Python layer (no
rebuild) and asserts that the tests named for each one catch it.

    python tests/mutations.py               # every mutation, then a summary table
    python tests/mutations.py --list        # the mutations and the tests that must catch them
    python tests/mutations.py NAME [NAME..] # some of them

First the selected tests run unmutated and must pass; then, for each mutation, a fresh pytest process
runs them with this module loaded as a plugin (`-p mutations`, DCTKD_MUTATION=NAME), which plants the
bug when pytest configures; every named test must then fail (at least one of its parametrised cases).
The exit status is 0 when every mutation is caught.

The plants act on behaviour that stays put while the implementation changes: the public functions
and modules, the preset table and the reference module (rebinding a function everywhere it is
imported, wrapping a method, hooking a gradient). A plant whose target does not exist is reported
as not applicable, not as caught.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

MUTATIONS = {}


def mutation(name, description, tests, k=None, optional=False):
    """Register a plant: `tests` are node ids (file::function) that must each fail under it; `k`
    narrows the parametrised cases run (a pytest -k expression)."""

    def register(plant):
        MUTATIONS[name] = dict(description=description, tests=tests, k=k, plant=plant, optional=optional)
        return plant

    return register


class NotApplicable(Exception):
    pass


def _rebind_everywhere(old, new):
    """Point every module-level name bound to `old` in the project's modules at `new` (modules that
    imported it by name included); test modules imported afterwards get `new`."""
    for modname, mod in list(sys.modules.items()):
        if mod is None or not modname.startswith(("dctkd_ext", "dctkd_train")):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)


# ------------------------------------------------------------------------------------------ plants
@mutation("auto_cpu_reference", "`auto` on the CPU resolves to the plain-PyTorch reference",
          ["tests/test_dct_at.py::test_auto_routes_to_the_cpu_kernels",
           "tests/test_spectral.py::test_auto_routes_to_the_cpu_kernels"])
def _():
    from dctkd_ext import _backend

    original = _backend.resolve

    def resolve(device_type, *args, **kwargs):
        name = original(device_type, *args, **kwargs)
        return "reference" if _backend.get_backend() == "auto" and device_type == "cpu" else name

    _rebind_everywhere(original, resolve)


@mutation("dct_preset_map_norm", "the `dct` preset's map_norm changed from minmax to max",
          ["tests/test_presets.py::test_preset_options_are_the_documented_ones",
           "tests/test_presets.py::test_loss_matches_numpy_formula",
           "tests/test_presets.py::test_one_pinned_value_per_preset"])
def _():
    import dctkd_ext

    dctkd_ext.PRESETS["dct"]["map_norm"] = "max"


@mutation("reference_drops_1_over_c", "the reference loss sums the attention map over channels (drops 1/C)",
          ["tests/test_dct_at.py::test_loss_matches_reference",
           "tests/test_presets.py::test_loss_matches_numpy_formula"], k="none")
def _():
    from dctkd_ext import reference
    from dctkd_ext.presets import OPTION_NAMES, resolve_options

    original = reference.dct_at_loss

    def dct_at_loss(student_feats, teacher_feats, *, preset="dct", **kwargs):
        p = resolve_options(preset, {k: v for k, v in kwargs.items() if k in OPTION_NAMES})["p"]
        # sum_c |x|^p = mean_c |C^(1/p) x|^p
        scale = lambda feats: [x * x.shape[1] ** (1.0 / p) for x in feats]  # noqa: E731
        return original(scale(student_feats), scale(teacher_feats), preset=preset, **kwargs)

    _rebind_everywhere(original, dct_at_loss)


@mutation("backward_batch_mean", "the loss's backward uses the batch mean of the per-sample upstream gradient",
          ["tests/test_dct_at.py::test_loss_matches_reference"], k="float32")
def _():
    import torch

    from dctkd_ext.ops import dct_at

    original = dct_at.dct_at_loss

    class BatchMeanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g.mean().expand_as(g)

    def dct_at_loss(student_feats, teacher_feats, *, sample_weight=None, reduction="mean", **kwargs):
        per_sample = BatchMeanGrad.apply(original(student_feats, teacher_feats, reduction="none", **kwargs))
        if sample_weight is not None:
            per_sample = per_sample * sample_weight.to(per_sample.dtype)
        return {"mean": per_sample.mean, "sum": per_sample.sum}.get(reduction, lambda: per_sample)()

    _rebind_everywhere(original, dct_at_loss)


@mutation("fam_ignores_cuton", "FrequencyAttention.forward(x, cuton) ignores cuton",
          ["tests/test_spectral.py::test_frequency_attention_forward_cuton"])
def _():
    from dctkd_ext.nn import FrequencyAttention

    original = FrequencyAttention.forward

    def forward(self, x, cuton=None):
        if isinstance(x, tuple):
            x = x[0]
        return original(self, x)

    FrequencyAttention.forward = forward


@mutation("fusion_gate_swapped", "the trainer's ABF fusion gate weights swapped",
          ["tests/test_train_methods.py::test_abf_fusion_gate_formula"])
def _():
    sys.path.insert(0, str(ROOT / "python"))
    from dctkd_train import methods

    if not hasattr(methods, "ABF"):
        raise NotApplicable("dctkd_train.methods has no ABF")
    original = methods.ABF.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if getattr(self, "att_conv", None) is not None:  # the two gate channels in the other order
            self.att_conv.register_forward_hook(lambda module, inputs, out: out.flip(1))

    methods.ABF.__init__ = __init__


@mutation("fam_weight_grad_nyquist",
          "FrequencyAttention's weight gradient counts the Nyquist column twice (the c2r multiplicity)",
          ["tests/test_spectral.py::test_frequency_attention_matches_released_fp64"])
def _():
    from dctkd_ext.nn import FrequencyAttention

    original = FrequencyAttention.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        s = self.size
        if s % 2 == 0:
            def double_nyquist(g):
                g = g.clone()
                g[..., s // 2] *= 2
                return g

            self.weights1.register_hook(double_nyquist)

    FrequencyAttention.__init__ = __init__


@mutation("c2r_multiplicity", "the c2r multiplicity of the FAM backward forgets the Nyquist column",
          ["tests/test_spectral.py::test_fam_global_op_gradcheck_and_opcheck",
           "tests/test_spectral.py::test_frequency_attention_matches_released_fp64"], optional=True)
def _():
    from dctkd_ext.ops import fam_global

    original = getattr(fam_global, "_c2r_multiplicity", None)
    if original is None:
        raise NotApplicable("dctkd_ext.ops.fam_global has no _c2r_multiplicity")

    def c2r_multiplicity(s, device, dtype):
        m = original(s, device, dtype)
        m[1:] = 2.0
        return m

    _rebind_everywhere(original, c2r_multiplicity)


@mutation("dct2d_transposed", "dct2d applies the transposed basis (a DCT-III)",
          ["tests/test_dct_at.py::test_dct2d_matches_scipy_oracle"])
def _():
    from dctkd_ext.ops import dct_at

    dct2d, idct2d = dct_at.dct2d, dct_at.idct2d
    _rebind_everywhere(dct2d, lambda a: idct2d(a))


@mutation("mask_grad_no_conj", "the mask gradient of the spectral ops misses a conj",
          ["tests/test_spectral.py::test_backward_matches_autograd_of_reference"])
def _():
    import torch

    from dctkd_ext.ops import spectral

    class Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, mask):
            ctx.save_for_backward(z, mask)
            return z * mask

        @staticmethod
        def backward(ctx, g):
            z, mask = ctx.saved_tensors
            return g * mask, (g * z).real.sum(dim=(0, 1)).to(mask.dtype)  # conj(z) forgotten

    def with_bad_mask_grad(original):
        def op(xf, w, mask=None):
            if not isinstance(mask, torch.Tensor) or not mask.requires_grad:
                return original(xf, w, mask)
            return Masked.apply(original(xf, w, None), mask)

        return op

    for name in ("global_filter", "spectral_conv"):
        original = getattr(spectral, name)
        _rebind_everywhere(original, with_bad_mask_grad(original))


@mutation("half_map_in_bf16", "the attention map of fp16/bf16 features is accumulated in bf16",
          ["tests/test_dct_at.py::test_attention_map_matches_reference"], k="float16 or bfloat16")
def _():
    import torch

    from dctkd_ext.ops import dct_at

    original = dct_at.attention_map

    def attention_map(x, p=2.0, reduce="mean"):
        if x.dtype not in (torch.float16, torch.bfloat16):
            return original(x, p, reduce)
        a = x.to(torch.bfloat16).abs().pow(p)
        return (a.mean(1, dtype=torch.bfloat16) if reduce == "mean" else a.sum(1, dtype=torch.bfloat16)).float()

    _rebind_everywhere(original, attention_map)


@mutation("reference_hides_nan", "the reference's L2 distance turns a NaN distance into 0",
          ["tests/test_dct_at.py::test_non_finite_loss_is_never_hidden",
           "tests/test_dct_at.py::test_loss_bad_input"], k="reference")
def _():
    import torch

    from dctkd_ext import reference

    original = reference._distance

    def _distance(zs, zt, kind):
        if kind != "l2":
            return original(zs, zt, kind)
        ss = (zs - zt).pow(2).sum(1)
        safe = torch.where(ss > 0, ss, torch.ones_like(ss))
        return torch.where(ss > 0, safe.sqrt(), torch.zeros_like(ss))

    reference._distance = _distance


# -------------------------------------------------------------------------------- pytest plugin
def pytest_configure(config):
    name = os.environ.get("DCTKD_MUTATION")
    if name:
        if name not in MUTATIONS:
            raise SystemExit(f"DCTKD_MUTATION: unknown mutation {name!r}; known: {', '.join(MUTATIONS)}")
        try:
            MUTATIONS[name]["plant"]()
        except NotApplicable as e:
            _write_report({"not_applicable": str(e)})
            raise SystemExit(f"mutation {name} not applicable: {e}") from None


def pytest_runtest_logreport(report):
    outcomes = getattr(_config_holder, "outcomes", None)
    if outcomes is None:
        return
    if report.failed:
        outcomes[report.nodeid] = "failed"
    elif report.when == "call" or report.skipped:
        outcomes.setdefault(report.nodeid, "skipped" if report.skipped else "passed")


class _config_holder:
    outcomes = None


def pytest_sessionstart(session):
    _config_holder.outcomes = {}


def pytest_sessionfinish(session, exitstatus):
    _write_report({"outcomes": _config_holder.outcomes or {}})


def _write_report(data):
    path = os.environ.get("DCTKD_MUTATION_REPORT")
    if path:
        Path(path).write_text(json.dumps(data))


# -------------------------------------------------------------------------------------- runner
def run_selection(tests, k, mutation_name=None):
    """Runs pytest on `tests` (node ids), mutated or not; returns {"outcomes": {nodeid: outcome}} or
    {"not_applicable": why}, and the seconds it took."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
        env["DCTKD_MUTATION_REPORT"] = str(report)
        env.pop("DCTKD_MUTATION", None)
        if mutation_name:
            env["DCTKD_MUTATION"] = mutation_name
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "mutations", "-p", "no:cacheprovider", *tests]
        cmd += ["-k", k] if k else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if not report.exists():
            raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        data = json.loads(report.read_text())
        data["stdout"] = proc.stdout
        return data, seconds


def failed_tests(outcomes, test):
    return [n for n, o in outcomes.items() if o == "failed" and (n == test or n.startswith(test + "["))]


def ran_tests(outcomes, test):
    return [n for n, o in outcomes.items() if o in ("passed", "failed") and (n == test or n.startswith(test + "["))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and their tests")
    args = ap.parse_args(argv)
    if args.list:
        for name, m in MUTATIONS.items():
            print(f"{name}: {m['description']}" + (" (optional)" if m["optional"] else ""))
            for t in m["tests"]:
                print(f"    {t}" + (f"  -k {m['k']!r}" if m["k"] else ""))
        return 0
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        ap.error(f"unknown mutation(s) {unknown}; see --list")
    names = args.names or list(MUTATIONS)

    # 1. unmutated, the named tests pass (so a failure under a mutation is the mutation's doing): one
    # run of every named test, all its cases
    ok = True
    union = sorted({t for name in names for t in MUTATIONS[name]["tests"]})
    data, sec = run_selection(union, None)
    outcomes = data["outcomes"]
    bad = sorted(n for n, o in outcomes.items() if o == "failed")
    empty = [t for t in union if not ran_tests(outcomes, t)]
    print(f"unmutated: {len(outcomes)} tests, {len(bad)} failing [{sec:.0f} s]", flush=True)
    if bad or empty:
        print(f"the named tests must pass unmutated; failing: {bad}; ran nothing: {empty}\n" + data["stdout"][-3000:])
        return 1

    # 2. each mutation is caught by each of its tests
    rows = []
    for name in names:
        m = MUTATIONS[name]
        data, sec = run_selection(m["tests"], m["k"], name)
        if "not_applicable" in data:
            rows.append((name, "not applicable: " + data["not_applicable"], sec))
            if not m["optional"]:
                ok = False
            continue
        idle = [t for t in m["tests"] if not ran_tests(data["outcomes"], t)]
        missed = [t for t in m["tests"] if not failed_tests(data["outcomes"], t)]
        if idle:
            ok = False
            rows.append((name, "RAN NOTHING of " + ", ".join(t.split("::")[-1] for t in idle) + " (check -k)", sec))
        elif missed:
            ok = False
            rows.append((name, "MISSED by " + ", ".join(t.split("::")[-1] for t in missed), sec))
        else:
            n = sum(len(failed_tests(data["outcomes"], t)) for t in m["tests"])
            rows.append((name, f"caught ({n} failing tests)", sec))
        print(f"{name}: {rows[-1][1]} [{sec:.0f} s]", flush=True)

    print("\n| mutation | what it plants | result | tests |")
    print("|---|---|---|---|")
    for name, result, _ in rows:
        m = MUTATIONS[name]
        tests = "<br>".join(t.replace("tests/", "") for t in m["tests"])
        print(f"| {name} | {m['description']} | {result} | {tests} |")
    print("\nall mutations caught" if ok else "\nSOME MUTATIONS ARE NOT CAUGHT (or a baseline failed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
