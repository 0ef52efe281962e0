"""Mixed precision with the spectral family's modules at the map sizes real networks give (7, 14, 28: not
powers of two): under torch.autocast fp16 and bf16 the FFTs run in fp32, the FAM global branch and
GlobalFilter are fp32, and the results and gradients match the fp32 computation on the same
(half-rounded) inputs; a training step with FAM under autocast and a GradScaler, and the GradScaler's
complex gradients. (dct_at_loss under autocast: tests/test_dct_at.py.)"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dctkd_ext
from dctkd_ext.nn import FrequencyAttention, GlobalFilter

from conftest import DEVICES, HALF, HALF_COMPUTE_TOL, assert_rel_close, rel_err

SIZES = [7, 14, 28]


class FFTDtypes(TorchDispatchMode):
    """Records the tensor-argument dtypes of every op that does an FFT: aten's _fft_* and this
    package's own ops (whose kernels do the FFTs inside)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("_fft_") or func.namespace.startswith("dctkd_ext"):
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.seen.append((name, a.dtype))
        return func(*args, **(kwargs or {}))


def _half_features(b, c, s, dtype, device, gen):
    # what a conv under autocast hands the loss: half-precision maps
    return (torch.randn(b, c, s, s, generator=gen, dtype=torch.float64) + 0.1).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("size", SIZES)
def test_frequency_attention_under_autocast(size, dtype, device, gen):
    if device == "cpu" and dtype == torch.float16 and not torch.backends.mkldnn.is_available():
        pytest.skip("CPU autocast fp16 needs oneDNN")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = FrequencyAttention(16, 24, size).to(device)
    x = _half_features(2, 16, size, dtype, device, gen).requires_grad_(True)
    with FFTDtypes() as rec, torch.autocast(device, dtype=dtype):
        g = m.global_branch(x)
        y = m(x)
    assert rec.seen and all(dt in (torch.float32, torch.complex64) for _, dt in rec.seen), rec.seen
    assert g.dtype == torch.float32, "the FFT branch stays fp32 under autocast"
    # fp32 computation on the same (half-rounded) input: the global branch is that, to fp32 rounding
    x32 = x.detach().float().requires_grad_(True)
    g32 = m.global_branch(x32)
    assert rel_err(g, g32) <= 1e-5, rel_err(g, g32)
    y32 = m(x32)
    assert_rel_close(y.float(), y32, HALF_COMPUTE_TOL[dtype], "FAM output under autocast")  # the 1x1 conv branch is half
    y.float().square().mean().backward()
    gw = m.weights1.grad.clone()
    gx = x.grad.float()
    m.zero_grad()
    y32.square().mean().backward()
    assert m.weights1.grad.dtype == torch.complex64 and torch.isfinite(torch.view_as_real(gw)).all()
    assert rel_err(torch.view_as_real(gw), torch.view_as_real(m.weights1.grad)) <= 5e-2
    assert rel_err(gx, x32.grad) <= 5e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("size", SIZES)
def test_global_filter_under_autocast(size, dtype, device, gen):
    gf = GlobalFilter(8, size, size).to(device)
    x = torch.randn(2, size, size, 8, generator=gen).to(device=device, dtype=dtype)
    with FFTDtypes() as rec, torch.autocast(device, dtype=dtype):
        y = gf(x)
    assert rec.seen and all(dt in (torch.float32, torch.complex64) for _, dt in rec.seen), rec.seen
    assert y.dtype == torch.float32
    assert rel_err(y, gf(x.float())) <= 1e-5


@pytest.mark.parametrize("dtype", HALF)
def test_a_training_step_under_autocast_with_a_grad_scaler(dtype, gen):
    # a conv stem at 28 px, FAM at 28 and 14, DCT-KD against fixed teacher maps: finite, decreasing loss
    torch.manual_seed(0)
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    down = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
    fam1, fam2 = FrequencyAttention(8, 8, 28), FrequencyAttention(16, 16, 14)
    params = [*stem.parameters(), *down.parameters(), *fam1.parameters(), *fam2.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    scaler = dctkd_ext.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    x = torch.randn(4, 3, 28, 28, generator=gen)
    t = [torch.randn(4, 8, 28, 28, generator=gen).relu(), torch.randn(4, 16, 14, 14, generator=gen).relu()]
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=dtype):
            a = stem(x)
            b = down(a)
            feats = [fam1(a), fam2(b)]
            loss = dctkd_ext.dct_at_loss(feats, t)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_grad_scaler_unscales_complex_gradients():
    # torch's GradScaler cannot unscale complex grads (FrequencyAttention.weights1); dctkd_ext.amp's does
    torch.manual_seed(0)
    fam = FrequencyAttention(4, 4, 7)
    x = torch.randn(2, 4, 7, 7)

    def grads(scaler):
        opt = torch.optim.SGD(fam.parameters(), lr=0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(fam(x).square().mean()).backward()
        scaler.unscale_(opt)
        return opt, {n: p.grad.clone() for n, p in fam.named_parameters()}

    with pytest.raises(NotImplementedError, match="ComplexFloat"):
        grads(torch.amp.GradScaler("cpu", init_scale=1024.0))
    fam.zero_grad(set_to_none=True)
    fam(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in fam.named_parameters()}
    scaler = dctkd_ext.amp.GradScaler("cpu", init_scale=1024.0)
    opt, got = grads(scaler)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-9)
    before = fam.weights1.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(fam.weights1.detach(), before) and scaler.get_scale() == 1024.0
    # a non-finite complex gradient skips the step and backs the scale off
    opt.zero_grad(set_to_none=True)
    scaler.scale(fam(x).square().mean()).backward()
    fam.weights1.grad[0, 0, 0, 0] = complex(float("inf"), 0.0)
    before = [p.detach().clone() for p in fam.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, fam.parameters()))
    assert scaler.get_scale() == 512.0
