"""The trainer's SGD (dctkd_train.optim): torch's fused kernel, complex parameters through their real views,
against torch.optim.SGD's for-loop step; zero_grad, state dicts of either form, and the trainer's choice."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train import optim  # noqa: E402

pytestmark = pytest.mark.skipif(not optim.fused_sgd_runs("cpu"), reason="this torch has no fused SGD on the CPU")


def _params(gen, dtype=torch.float32):
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    shapes = [((3, 4, 5, 5), cdt), ((7,), dtype), ((2, 3, 1, 1), cdt), ((4, 6), dtype)]
    return [torch.randn(s, generator=gen, dtype=t).requires_grad_() for s, t in shapes]


def _grads(gen, params):
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _run(opt_cls, params, grads, steps, **kw):
    opt = opt_cls(params, **kw)
    for g in grads[:steps]:
        opt.zero_grad(set_to_none=True)
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_steps_match_the_for_loop_sgd_on_real_and_complex_parameters(gen, dtype, nesterov):
    start = _params(gen, dtype)
    grads = [_grads(gen, start) for _ in range(4)]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    ours = [p.detach().clone().requires_grad_() for p in start]
    ref = [p.detach().clone().requires_grad_() for p in start]
    opt = _run(optim.SGD, ours, grads, 4, fused=True, **kw)
    assert opt.fused_step and opt.defaults["fused"]
    _run(torch.optim.SGD, ref, grads, 4, **kw)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for a, b, s in zip(ours, ref, start):
        assert a.dtype == s.dtype and a.shape == s.shape
        assert not torch.equal(a, s)  # it moved
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_without_fused_it_is_the_for_loop_sgd_bit_for_bit(gen):
    start = _params(gen)
    grads = [_grads(gen, start) for _ in range(3)]
    ours = [p.detach().clone().requires_grad_() for p in start]
    ref = [p.detach().clone().requires_grad_() for p in start]
    _run(optim.SGD, ours, grads, 3, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=False)
    _run(torch.optim.SGD, ref, grads, 3, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_zero_grad_clears_the_complex_parameters_gradients(gen):
    params = _params(gen)
    opt = optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    for p, g in zip(params, _grads(gen, params)):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    opt.step()  # no gradients: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("saved_fused", [False, True])
@pytest.mark.parametrize("loaded_fused", [False, True])
def test_a_state_dict_of_either_form_resumes_the_same_steps(gen, saved_fused, loaded_fused):
    start = _params(gen)
    grads = [_grads(gen, start) for _ in range(4)]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    straight = [p.detach().clone().requires_grad_() for p in start]
    _run(optim.SGD, straight, grads, 4, fused=loaded_fused, **kw)
    first = [p.detach().clone().requires_grad_() for p in start]
    saved = _run(optim.SGD, first, grads, 2, fused=saved_fused, **kw).state_dict()
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt = optim.SGD(resumed, fused=loaded_fused, **kw)
    opt.load_state_dict(saved)
    for g in grads[2:]:
        opt.zero_grad()
        for p, gp in zip(resumed, g):
            p.grad = gp.clone()
        opt.step()
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_parameter_groups_are_refused():
    with pytest.raises(TypeError, match="params"):
        optim.SGD([{"params": [torch.zeros(2, requires_grad=True)]}], lr=0.1)


def test_the_trainer_fuses_except_under_a_float16_grad_scaler():
    p = [torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False, device=torch.device("cpu"))
    assert optim.make_sgd(p, grad_scaler=False, **kw).fused_step
    assert not optim.make_sgd(p, grad_scaler=True, **kw).fused_step
