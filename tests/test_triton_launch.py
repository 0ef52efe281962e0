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
