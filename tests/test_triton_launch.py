"""Host-side logic of the Triton launches that needs no GPU: which device a launch runs on, and
which integer arguments the JIT may specialise on. The kernels themselves are tested in
test_triton_dct_at.py / test_spectral.py (interpreter here, compiled on a GPU)."""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from dctkd_ext.triton import _common  # noqa: E402


class _Recorder:
    """A stand-in for wrap_triton(kernel): records the current device at launch time."""

    def __init__(self, current):
        self.current = current
        self.seen = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.seen.append((grid, self.current[0]))

        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.current_device / torch.cuda.device replaced by a device counter (no GPU needed)."""
    current = [0]

    @contextlib.contextmanager
    def device(d):
        prev = current[0]
        current[0] = torch.device(d).index
        try:
            yield
        finally:
            current[0] = prev

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    return current


def test_launch_runs_on_the_tensors_device(fake_cuda):
    with FakeTensorMode():
        x1 = torch.empty(4, device="cuda:1")
        x0 = torch.empty(4, device="cuda:0")
    k = _Recorder(fake_cuda)
    _common.launch(k, (3,), x1, 5, 1.0, BLOCK=16)
    assert k.seen == [((3,), 1)]
    assert fake_cuda[0] == 0, "the current device is restored after the launch"
    _common.launch(k, (2,), 7, x0)  # the first tensor decides, wherever it is in the arguments
    assert k.seen[-1] == ((2,), 0)
    _common.launch(k, (0,), x1)  # empty grid: no launch
    assert len(k.seen) == 2


def test_launch_on_cpu_tensors_needs_no_device(fake_cuda, monkeypatch):
    def no_device(d):
        raise AssertionError("no device switch for CPU tensors")

    monkeypatch.setattr(torch.cuda, "device", no_device)
    k = _Recorder(fake_cuda)
    _common.launch(k, (1,), torch.zeros(2), 3)
    assert k.seen == [((1,), 0)]
    assert _common.launch_device([3, 1.0]) is None


def _no_interpret_env():
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return env


@pytest.mark.parametrize("family", ["dct_at", "spectral"])
def test_new_batch_size_compiles_no_new_variant(family):
    """The JIT's own specialisation keys (its binder, nothing compiled) of every launch at batch 16,
    17 and 5 are the same: batch-dependent integers are not specialised (do_not_specialize), so an
    odd last batch does not compile new kernels."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "dctkd_ext.triton._compile_check", "--family", family, "--batch-invariance"],
                       capture_output=True, text=True,
                       env=_no_interpret_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "new at batch 17 or 5: 0" in r.stdout


_SIGNATURE_SCRIPT = """
import torch
from dctkd_ext.triton import _compile_check as cc
c = cc.Compiler(90, verbose=False, compile=False)
cc.install(c)
from dctkd_ext.triton import load
ops = load()
for dt in (torch.float64, torch.float32):
    s = [torch.randn(2, 3, 5, 6, dtype=dt)]
    t = [torch.randn(2, 4, 5, 6, dtype=dt)]
    ops.dct_at_loss(s, t, [0.1], 1.5, "minmax", True, "dct", True, "minmax", "l2", 1e-8)
    ops.attention_map_backward(torch.randn(2, 5, 6, dtype=dt), s[0], 1.5, "mean")
for key, sig in c.signatures.items():
    print(key[0], sig.get("eps"), sig.get("w0"), sig.get("p"))
"""


def test_float_scalars_are_passed_as_fp64():
    """eps, the level weights and p reach the kernels as fp64 (the JIT's signature), so an fp64 loss
    sees them exactly (an fp32 argument rounds a weight of 0.1 by 1.5e-8); fp32 kernels round them once."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _SIGNATURE_SCRIPT], capture_output=True, text=True,
                       env=_no_interpret_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines()]
    phi = [row for row in rows if row[0] == "phi_kernel"]
    maps = [row for row in rows if row[0] in ("reduce_kernel", "backward_kernel")]
    assert phi and maps, r.stdout
    assert all(row[1:3] == ["fp64", "fp64"] for row in phi), r.stdout
    assert all(row[3] == "fp64" for row in maps), r.stdout
