"""Independent oracles for the engine tests: plain autograd on the real model, frozen network by
hooks. None of them uses the engine's propagation: the dense autograd oracles of
:mod:`nns_cuda.engine.oracle` (re-exported here) share no code with it, and the helpers below
run the real model through module hooks (:mod:`nns_cuda._modules`)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from nns_cuda._modules import layer_outputs
from nns_cuda.engine.oracle import autograd_filter_images, autograd_learned_images, autograd_scan  # noqa: F401


def no_inplace(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "inplace"):
            mod.inplace = False
    return m


def module_output_fn(model: nn.Module, name: str, call: int = 0, post=None):
    """f(x) -> output of module `name` (its `call`-th call), optionally transformed by `post`."""
    address = f"{name}:{call}"

    def f(x):
        out = layer_outputs(model, x, [address])[1][address]
        return post(out) if post is not None else out

    return f


def autograd_li(model: nn.Module, x: torch.Tensor, name: str, call: int = 0, post=None) -> torch.Tensor:
    """x ⊙ ∂a/∂x for every neuron of the module output (per sample): [B, *shape, *x.shape[1:]]."""
    f = module_output_fn(model, name, call, post)
    with torch.no_grad():
        n_out = f(x[:1]).numel()
    n_in = x[:1].numel()
    outs = []
    for b in range(x.shape[0]):
        xb = x[b: b + 1]
        # forward-mode when there are fewer input entries than neurons, reverse-mode otherwise
        if n_in <= n_out:
            jac = torch.func.jacfwd(f)(xb)
        else:
            jac = torch.autograd.functional.jacobian(f, xb, vectorize=True)  # [1, *shape, 1, *in]
        jac = jac.squeeze(0)
        jac = jac.reshape(*jac.shape[:-len(xb.shape)], *xb.shape[1:])
        outs.append(jac * xb[0])
    return torch.stack(outs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class FrozenRecorder:
    """Frozen network with biases (docs/spec.md §1 identity 2): record ReLU gates and max-pool arg-max on x,
    then replay them on another input with every ReLU -> multiply by the recorded gate and every
    max-pool -> gather of the recorded arg-max."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.gates, self.idx = [], []

    def record(self, x):
        handles = []
        gates, idx = [], []
        for m in self.model.modules():
            if isinstance(m, nn.ReLU):
                handles.append(m.register_forward_hook(lambda mod, i, o: gates.append((i[0] > 0).to(i[0].dtype))))
            if isinstance(m, nn.MaxPool2d):
                def hk(mod, i, o, idx=idx):
                    _, ind = F.max_pool2d(i[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                          mod.ceil_mode, return_indices=True)
                    idx.append(ind)
                handles.append(m.register_forward_hook(hk))
        _run_hooked(self.model, x, handles)
        self.gates, self.idx = gates, idx

    def replay(self, x0, name: str, call: int = 0):
        """Output of module `name` in the frozen network with biases run on x0."""
        handles = []
        ci = {"g": 0, "p": 0}
        box = []
        for m in self.model.modules():
            if isinstance(m, nn.ReLU):
                def hr(mod, i, o):
                    g = self.gates[ci["g"]]
                    ci["g"] += 1
                    return i[0] * g
                handles.append(m.register_forward_hook(hr))
            if isinstance(m, nn.MaxPool2d):
                def hp(mod, i, o):
                    ind = self.idx[ci["p"]]
                    ci["p"] += 1
                    B, C = i[0].shape[:2]
                    return torch.gather(i[0].flatten(2), 2, ind.flatten(2)).view_as(ind)
                handles.append(m.register_forward_hook(hp))
        target = dict(self.model.named_modules())[name]
        handles.append(target.register_forward_hook(lambda m, i, o: box.append(o.clone())))
        _run_hooked(self.model, x0, handles)
        return box[call]


def _run_hooked(model: nn.Module, x: torch.Tensor, handles) -> None:
    """Run ``model(x)`` without autograd, then remove the hooks ``handles`` (whatever happens)."""
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
