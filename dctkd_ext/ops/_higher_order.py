"""Higher-order gradients of the ops. The kernels' backward formulas are not themselves differentiable
(their outputs come from other custom kernels), so a backward that runs under grad mode, which is what
`torch.autograd.grad(..., create_graph=True)` and `backward(create_graph=True)` do, goes through the
op's plain-PyTorch float formulation instead: the same first-order gradients, as a graph that autograd
can differentiate again. Ordinary training never takes this path (the engine runs backward with grad
mode off, also when torch.compile traces it)."""

from typing import Callable, Sequence

import torch


def wants_graph() -> bool:
    """True inside a backward that must itself be differentiable (create_graph=True)."""
    return torch.is_grad_enabled()


def grads_through(
    formula: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    needs_grad: Sequence[bool],
    grad_output: torch.Tensor,
):
    """d formula(*inputs) / d inputs[i] contracted with grad_output, for every i with needs_grad[i]
    (None for the others), built with create_graph=True, so second derivatives flow to the inputs
    and to grad_output. `inputs` are the op's own saved inputs (they carry the autograd history)."""
    wanted = [i for i, need in enumerate(needs_grad) if need and inputs[i].requires_grad]
    out = [None] * len(inputs)
    if not wanted:
        return out
    with torch.enable_grad():
        y = formula(*inputs)
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_output, create_graph=True, allow_unused=True)
    for i, g in zip(wanted, grads):
        out[i] = torch.zeros_like(inputs[i]) if g is None else g
    return out
