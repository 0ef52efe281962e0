"""Mutation check of the test suite: plants plausible bugs one at a time and asserts that the tests
named for each one catch it. Python plants act in the Python layer (no rebuild); C++ plants patch a
kernel's source and run the tests on a rebuilt copy of the extension.

    python tests/mutations.py               # every mutation, then a summary table
    python tests/mutations.py --list        # the mutations and the tests that must catch them
    python tests/mutations.py NAME [NAME..] # some of them
    python tests/mutations.py --python-only # only the Python plants (no build)

Python plants: first the selected tests run unmutated and must pass; then, for each mutation, a fresh
pytest process runs them with this module loaded as a plugin (`-p mutations`, DCTKD_MUTATION=NAME),
which plants the bug when pytest configures; every named test must then fail (at least one of its
parametrised cases). They act on behaviour that stays put while the implementation changes: the
public functions and modules, the preset table and the reference module (rebinding a function
everywhere it is imported, wrapping a method, hooking a gradient). A Python plant only reaches the
code that calls back into Python: the CPU kernels (the CPU fam_layer of the channel-mixing
FrequencyAttention among them) are planted in C++.

C++ plants: an exact text replacement in one file of csrc/ that must match exactly once (else the
plant is not applicable, which fails the check: the plant has to follow the code). They run on a copy
of the sources under build/mutants/src (--tree to put it elsewhere), kept between runs and synced by
content, so that ninja recompiles only what changed: its CPU extension is built in place
(DCTKD_NO_CUDA=1 python setup.py build_ext --inplace; MAX_JOBS sets the compile jobs), the named tests
run unmutated on that build and must pass, then each plant is patched in, the one file (and the one
restored from the plant before) recompiled and linked, and the named tests run with PYTHONPATH on the
copy (the plugin checks that the copy's extension is the one loaded). The first build of a fresh
copy compiles every CPU file (minutes); it runs while the Python plants are checked. Production code
has no test hooks: the plants are edits of it.

The exit status is 0 when every mutation is caught.
"""

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import threading
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


def cpp_mutation(name, description, tests, file, old, new, k=None):
    """Register a C++ plant: in `file` (relative to the checkout), the text `old`, which must occur
    exactly once, becomes `new`; the extension is rebuilt and `tests` must each fail."""
    MUTATIONS[name] = dict(description=description, tests=tests, k=k, plant=None, optional=False,
                           patch=(file, old, new))


def is_cpp(name):
    return "patch" in MUTATIONS[name]


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


# The Python c2r multiplicity serves the fam_global op (the depthwise FrequencyAttention on every
# backend) and the GPU / Triton composite of fam_layer; the channel-mixing module on the CPU runs the
# C++ fam_layer kernels, which have their own (the C++ plants fam_dense_inverse_nyquist and below).
@mutation("c2r_multiplicity", "the c2r multiplicity of the FAM backward forgets the Nyquist column (fam_global; "
          "the GPU composite of fam_layer)",
          ["tests/test_spectral.py::test_fam_global_op_gradcheck_and_opcheck",
           "tests/test_spectral.py::test_frequency_attention_depthwise",
           "tests/test_fam_layer.py::test_composite_equals_cpu_kernels"])
def _():
    from dctkd_ext.ops import spectral

    original = getattr(spectral, "c2r_multiplicity", None)
    if original is None:
        raise NotApplicable("dctkd_ext.ops.spectral has no c2r_multiplicity")

    def c2r_multiplicity(s, device, dtype):
        m = original(s, device, dtype)
        m[1:] = 2.0
        return m

    _rebind_everywhere(original, c2r_multiplicity)


# The one Python copy of the spectral ops' channels-last rule (the fake kernels and the Triton launchers);
# the C++ kernels keep their own (csrc/layout.h), so a wrong Python copy shows as a layout the kernels
# do not write.
@mutation("spectrum_layout_nchw", "the spectral ops' channels-last rule (Python copy) calls every spectrum NCHW",
          ["tests/test_spectral.py::test_global_filter_layouts",
           "tests/test_spectral.py::test_global_filter_opcheck"])
def _():
    from dctkd_ext import _shapes

    _rebind_everywhere(_shapes.spectrum_channels_last, lambda xf: False)


@mutation("dct2d_transposed", "dct2d applies the transposed basis (a DCT-III)",
          ["tests/test_dct_at.py::test_dct2d_matches_scipy_oracle"])
def _():
    from dctkd_ext.ops import dct_at

    dct2d, idct2d = dct_at.dct2d, dct_at.idct2d
    _rebind_everywhere(dct2d, lambda a: idct2d(a))


@mutation("mask_grad_no_conj", "the mask gradient of the spectral ops misses a conj",
          ["tests/test_spectral.py::test_global_filter_layouts",
           "tests/test_spectral.py::test_spectral_conv_layouts"])
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


# -------------------------------------------------------------------------------------- C++ plants
# Kept to a few, each in a class of bug the kernels could hide from tests that run only the easy cases;
# the plants of one file follow each other (one file recompiled between them).
cpp_mutation("fam_dense_inverse_nyquist",
             "the CPU fam_layer's dense inverse DFT of small maps (<= 14x14) counts the Nyquist column twice "
             "(the c2r multiplicity, a wrong constant of the small-map path)",
             ["tests/test_spectral.py::test_frequency_attention_matches_released_fp64",
              "tests/test_fam_layer.py::test_exact_against_authors_fp64"],
             "csrc/cpu/fam_layer.cpp",
             "sn = -std::sin(t) * scale, m = column_multiplicity<double>(k, W);",
             "sn = -std::sin(t) * scale, m = k == 0 ? 1.0 : 2.0;")

cpp_mutation("fam_drate2_no_bias",
             "the CPU fam_layer's drate2 misses the bias' share, sum_o b[o] sum dy[:, o] (a term of a "
             "parameter gradient)",
             ["tests/test_spectral.py::test_frequency_attention_matches_released_fp64",
              "tests/test_fam_layer.py::test_zero_rates_and_partial_gradients"],
             "csrc/cpu/fam_layer.cpp",
             "    if (has_bias) v = v + (w0_bias->to(at::kDouble) * gsum.to(at::kDouble)).sum();\n",
             "")

cpp_mutation("fam_transpose_conj_wrong_bit",
             "the CPU fam_layer's transposing copy conjugates by flipping bit 31 of each 64-bit word (the real "
             "part's sign in complex64, a mantissa bit of complex128's imaginary part) instead of bit 63: the "
             "conjugated spectrum the weight gradient reads is wrong",
             ["tests/test_spectral.py::test_frequency_attention_matches_released_fp64",
              "tests/test_fam_layer.py::test_exact_against_authors_fp64"],
             "csrc/cpu/fam_layer.cpp",
             "const uint64_t flip = conj ? uint64_t(1) << 63 : 0;",
             "const uint64_t flip = conj ? uint64_t(1) << 31 : 0;")

cpp_mutation("sweep_grad_tail",
             "the scalar tail of the vectorised NCHW gradient sweep (positions past the last whole vector of "
             "16) drops the 2 of d|x|^2/dx",
             ["tests/test_dct_at.py::test_attention_map_matches_reference",
              "tests/test_dct_at_fused.py::test_fused_matches_reference_and_two_pass"],
             "csrc/cpu/channel_sweep.cpp",
             "dc[i] = static_cast<in_t>((g[i] * scale) * (static_cast<float>(xc[i]) * 2.f));",
             "dc[i] = static_cast<in_t>((g[i] * scale) * static_cast<float>(xc[i]));")

cpp_mutation("grad_buffer_still_in_use",
             "the gradient-buffer cache hands a buffer out without taking it off its free list (memory of a "
             "live gradient handed out again)",
             ["tests/test_dct_at_fused.py::test_large_gradients_from_reused_buffers"],
             "csrc/cpu/grad_buffers.cpp",
             "        free_.erase(it);\n        cached_ -= nbytes;\n",
             "")


# -------------------------------------------------------------------------------- pytest plugin
def _check_loaded_from(tree):
    """The tests of a C++ plant must run the copy's build: dctkd_ext and its compiled library from `tree`."""
    import dctkd_ext
    from dctkd_ext import _C

    for what, path in (("dctkd_ext", dctkd_ext.__file__), ("its compiled library", _C.__file__)):
        if not Path(path).resolve().is_relative_to(Path(tree).resolve()):
            raise SystemExit(f"mutation check: {what} was loaded from {path}, not from the mutant tree {tree}")


def pytest_configure(config):
    name = os.environ.get("DCTKD_MUTATION")
    tree = os.environ.get("DCTKD_MUTANT_TREE")
    if tree:
        _check_loaded_from(tree)
    if name:
        if name not in MUTATIONS:
            raise SystemExit(f"DCTKD_MUTATION: unknown mutation {name!r}; known: {', '.join(MUTATIONS)}")
        if is_cpp(name):  # patched into the build the tests run on
            if not tree:
                raise SystemExit(f"DCTKD_MUTATION: {name} is a C++ plant; it runs on a rebuilt copy (DCTKD_MUTANT_TREE)")
            return
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
def run_selection(tests, k, mutation_name=None, tree=None):
    """Runs pytest on `tests` (node ids), mutated or not, in the checkout or (tree) in the mutant
    tree on its build; returns {"outcomes": {nodeid: outcome}} or {"not_applicable": why}, and the
    seconds it took."""
    root = tree or ROOT
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = dict(os.environ)
        paths = [root / "tests", root, root / "python"]
        env["PYTHONPATH"] = os.pathsep.join([str(p) for p in paths] + ([] if tree else [env.get("PYTHONPATH", "")]))
        env["DCTKD_MUTATION_REPORT"] = str(report)
        env.pop("DCTKD_MUTATION", None)
        env.pop("DCTKD_MUTANT_TREE", None)
        if mutation_name:
            env["DCTKD_MUTATION"] = mutation_name
        if tree:
            env["DCTKD_MUTANT_TREE"] = str(tree)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "mutations", "-p", "no:cacheprovider", *tests]
        cmd += ["-k", k] if k else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
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


class MutantTree:
    """A copy of the sources the CPU extension and the tests need, built in place: a C++ plant is
    patched into it, and only the patched file (and the one restored) recompiles. Synced from the
    checkout by content, so files that did not change keep their times and their objects."""

    PARTS = ("setup.py", "pyproject.toml", "build_tools", "csrc", "dctkd_ext", "python", "tests")
    SKIP_DIRS = {"__pycache__", ".pytest_cache", "build"}
    SKIP_FILES = ("_build_info.py",)
    SKIP_SUFFIXES = (".so", ".pyc", ".pyd", ".o")

    def __init__(self, path):
        self.path = Path(path).resolve()
        self.build_proc = self.build_log = None
        self.build_started = 0.0

    def _sources(self, base):
        out = set()
        for part in self.PARTS:
            top = base / part
            if top.is_file():
                out.add(Path(part))
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if d not in self.SKIP_DIRS and not d.endswith(".egg-info")]
                for f in filenames:
                    if f in self.SKIP_FILES or f.endswith(self.SKIP_SUFFIXES):
                        continue
                    out.add((Path(dirpath) / f).relative_to(base))
        return out

    def sync(self):
        """Make the copy's sources equal the checkout's (an interrupted run's plant is undone too)."""
        self.path.mkdir(parents=True, exist_ok=True)
        want = self._sources(ROOT)
        for rel in sorted(self._sources(self.path) - want):
            (self.path / rel).unlink()
        changed = 0
        for rel in sorted(want):
            src, dst = ROOT / rel, self.path / rel
            data = src.read_bytes()
            if not dst.exists() or dst.read_bytes() != data:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
                changed += 1
            if os.access(src, os.X_OK) != os.access(dst, os.X_OK):
                dst.chmod(src.stat().st_mode)
        return changed

    def apply(self, patch):
        """Plant `patch` (file, old, new); raises NotApplicable unless `old` occurs exactly once."""
        file, old, new = patch
        path = self.path / file
        if not path.exists():
            raise NotApplicable(f"{file} does not exist")
        text = path.read_text()
        n = text.count(old)
        if n != 1:
            raise NotApplicable(f"the text to replace occurs {n} times in {file}, not once")
        path.write_text(text.replace(old, new))

    def restore(self, file):
        """The checkout's text of `file` (a fresh write, so the build recompiles it)."""
        (self.path / file).write_bytes((ROOT / file).read_bytes())

    def start_build(self):
        env = dict(os.environ, DCTKD_NO_CUDA="1")
        env.pop("PYTHONPATH", None)
        self.build_log = tempfile.TemporaryFile(mode="w+")
        self.build_started = time.perf_counter()
        self.build_proc = subprocess.Popen([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=self.path,
                                           env=env, stdout=self.build_log, stderr=subprocess.STDOUT)
        self.build_ended = None
        proc = self.build_proc

        def note_end():  # when it ended, not when it was waited for
            proc.wait()
            self.build_ended = time.perf_counter()

        self.build_waiter = threading.Thread(target=note_end, daemon=True)
        self.build_waiter.start()

    def wait_build(self):
        """Seconds the build took; raises RuntimeError (with the log's tail) when it failed."""
        rc = self.build_proc.wait()
        self.build_waiter.join()
        seconds = self.build_ended - self.build_started
        self.build_log.seek(0)
        log = self.build_log.read()
        self.build_log.close()
        self.build_proc = None
        if rc != 0:
            raise RuntimeError(f"the build of the mutant tree {self.path} failed (exit {rc}):\n{log[-4000:]}")
        return seconds

    def build(self):
        self.start_build()
        return self.wait_build()


def judge(name, data):
    """(caught, result text) of a mutation's run."""
    m = MUTATIONS[name]
    if "not_applicable" in data:
        return m["optional"], "not applicable: " + data["not_applicable"]
    idle = [t for t in m["tests"] if not ran_tests(data["outcomes"], t)]
    missed = [t for t in m["tests"] if not failed_tests(data["outcomes"], t)]
    if idle:
        return False, "RAN NOTHING of " + ", ".join(t.split("::")[-1] for t in idle) + " (check -k)"
    if missed:
        return False, "MISSED by " + ", ".join(t.split("::")[-1] for t in missed)
    n = sum(len(failed_tests(data["outcomes"], t)) for t in m["tests"])
    return True, f"caught ({n} failing tests)"


def baseline(names, tree=None):
    """The named tests of `names` pass unmutated (so a failure under a mutation is the mutation's
    doing): one run of every named test, all its cases. Returns whether they did."""
    union = sorted({t for name in names for t in MUTATIONS[name]["tests"]})
    data, sec = run_selection(union, None, tree=tree)
    outcomes = data["outcomes"]
    bad = sorted(n for n, o in outcomes.items() if o == "failed")
    empty = [t for t in union if not ran_tests(outcomes, t)]
    where = "the mutant tree's build" if tree else "the checkout"
    print(f"unmutated, on {where}: {len(outcomes)} tests, {len(bad)} failing [{sec:.0f} s]", flush=True)
    if bad or empty:
        print(f"the named tests must pass unmutated; failing: {bad}; ran nothing: {empty}\n" + data["stdout"][-3000:])
        return False
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and their tests")
    ap.add_argument("--python-only", action="store_true", help="only the Python plants (no build)")
    ap.add_argument("--tree", default=str(ROOT / "build" / "mutants" / "src"),
                    help="where the C++ plants' copy of the sources lives (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.list:
        for name, m in MUTATIONS.items():
            kind = f"C++, {m['patch'][0]}" if is_cpp(name) else "Python"
            print(f"{name} ({kind}{', optional' if m['optional'] else ''}): {m['description']}")
            for t in m["tests"]:
                print(f"    {t}" + (f"  -k {m['k']!r}" if m["k"] else ""))
        return 0
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        ap.error(f"unknown mutation(s) {unknown}; see --list")
    names = args.names or list(MUTATIONS)
    if args.python_only:
        names = [n for n in names if not is_cpp(n)]
    py_names = [n for n in names if not is_cpp(n)]
    cpp_names = [n for n in names if is_cpp(n)]
    t_start = time.perf_counter()
    ok = True
    rows = []

    def record(name, caught, result, sec):
        nonlocal ok
        ok = ok and caught
        rows.append((name, result, sec))
        print(f"{name}: {result} [{sec:.0f} s]", flush=True)

    # the mutant tree's unmutated build runs while the Python plants are checked
    tree = MutantTree(args.tree) if cpp_names else None
    if tree:
        tree.path.mkdir(parents=True, exist_ok=True)
        lock = open(tree.path / ".lock", "w")  # one run at a time per tree; released when the process ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"another mutation check is using {tree.path}; wait for it or pass --tree")
            return 1
        changed = tree.sync()
        print(f"mutant tree {tree.path}: {changed} files updated from the checkout; building its CPU extension",
              flush=True)
        tree.start_build()

    try:
        if py_names:
            if not baseline(py_names):
                return 1
            for name in py_names:
                m = MUTATIONS[name]
                data, sec = run_selection(m["tests"], m["k"], name)
                record(name, *judge(name, data), sec)

        if tree:
            try:
                sec = tree.wait_build()
            except RuntimeError as e:
                print(e)
                return 1
            print(f"mutant tree built, unmutated [{sec:.0f} s]", flush=True)
            if not baseline(cpp_names, tree.path):
                return 1
            planted = None
            try:
                for name in cpp_names:
                    m = MUTATIONS[name]
                    if planted:
                        tree.restore(planted)
                        planted = None
                    t0 = time.perf_counter()
                    try:
                        tree.apply(m["patch"])
                    except NotApplicable as e:
                        record(name, *judge(name, {"not_applicable": str(e)}), 0.0)
                        continue
                    planted = m["patch"][0]
                    try:
                        build_sec = tree.build()
                    except RuntimeError as e:  # a plant that does not compile is a broken plant
                        print(e)
                        record(name, False, "BUILD FAILED (the plant does not compile)", time.perf_counter() - t0)
                        continue
                    data, _ = run_selection(m["tests"], m["k"], name, tree=tree.path)
                    caught, result = judge(name, data)
                    record(name, caught, f"{result}; build {build_sec:.0f} s", time.perf_counter() - t0)
            finally:
                if planted:
                    tree.restore(planted)  # the sources clean; the next run's build undoes the mutant objects
    finally:
        if tree and tree.build_proc is not None:
            tree.build_proc.kill()
            tree.build_proc.wait()

    print("\n| mutation | what it plants | result | tests |")
    print("|---|---|---|---|")
    for name, result, _ in rows:
        m = MUTATIONS[name]
        tests = "<br>".join(t.replace("tests/", "") for t in m["tests"])
        where = f" (C++: `{m['patch'][0]}`)" if is_cpp(name) else ""
        print(f"| {name} | {m['description']}{where} | {result} | {tests} |")
    print(f"\nwhole check: {time.perf_counter() - t_start:.0f} s")
    print("\nall mutations caught" if ok else "\nSOME MUTATIONS ARE NOT CAUGHT (or a baseline failed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
