"""What a user would do without nns_cuda: three ways to get every conv neuron's
learned image ``LI_n = g_n · x ⊙ ∂z_n/∂x`` (docs/spec.md §1), each reduced on the fly to the same fused
statistics as the engine (``nns_cuda.ops.reference.stats.STAT_NAMES``), or, for filter images,
``L^k = x ⊙ VJP(g ⊙ a^k)``.

* :class:`CaptumLoop` — ``captum.attr.NeuronGradient``, one neuron per call (a batch of images
  per call), on a uniform random sample of neurons; the time is extrapolated linearly to all
  neurons (every call is an independent forward + backward of the whole model).
* :class:`ReverseVJP` — the input stacked ``k`` times, one forward with autograd, then one
  backward per chunk of ``k`` neurons (one one-hot cotangent per copy, chunks running through
  the layers in order; ``retain_graph``). Optionally only ``m`` evenly spaced chunks are run and
  the chunk time is extrapolated to all chunks (the forward is counted once).
* :class:`DenseForward` — ``torch.func.jvp`` + ``vmap`` over all ``D·H·W`` input tangents
  (one-hot tangents scaled by ``x``, chunked to a memory budget): every requested layer's
  tangent is every neuron's (ungated) learned image at that input entry; ReLU / max-pool gating
  happens inside the jvp. The statistics are reduced per chunk (in fp32) and accumulated.

All three run the real model (dense forward and the VJP a ``torch.fx`` copy truncated after the
last requested layer, which only makes them faster).
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from nns_cuda.engine.graph import ScanGraph, build_graph
from nns_cuda.ops.reference.stats import NUM_STATS

from .common import neuron_gates, precision, sync

__all__ = ["truncated_module", "CaptumLoop", "ReverseVJP", "DenseForward", "captum_available"]


def captum_available() -> Optional[str]:
    """None when captum imports, else the reason."""
    try:
        import captum.attr  # noqa: F401

        return None
    except Exception as e:  # ImportError, or a broken install
        return f"captum not importable ({type(e).__name__}: {e})"


def truncated_module(graph: ScanGraph, names: Sequence[str]) -> fx.GraphModule:
    """A ``torch.fx`` copy of the model that stops after the last of ``names`` and returns the
    tuple of their values."""
    targets = [graph.resolve(n).fx_node for n in names]
    last = max(graph.resolve(n).idx for n in names)
    stop = graph.nodes[last].fx_node
    g = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for n in graph.gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = g.node_copy(n, lambda a: env[a])
        if n is stop:
            break
    g.output(tuple(env[t] for t in targets))
    return fx.GraphModule(graph.gm, g)


def _timer(device: str):
    """A clock that synchronises the device first (for splits inside a timed run)."""
    def now() -> float:
        sync(device)
        return time.perf_counter()
    return now


class _Units:
    """A flat numbering of the neurons (or filters) of the requested layers, layer by layer."""

    def __init__(self, names: Sequence[str], sizes: Sequence[int]):
        self.names = list(names)
        self.sizes = list(sizes)
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.total = self.offsets[-1]

    def split(self, flat: torch.Tensor) -> List[Tuple[int, torch.Tensor]]:
        """Global indices -> [(layer position, local indices)] in order."""
        out = []
        for li in range(len(self.names)):
            lo, hi = self.offsets[li], self.offsets[li + 1]
            sel = flat[(flat >= lo) & (flat < hi)] - lo
            if sel.numel():
                out.append((li, sel))
        return out


#: How each statistic scales when the image is multiplied by the gate g (STAT_NAMES order):
#: "nz" by 1[g != 0], "abs" by |g|, "lin" by g, "sq" by g².
_GATE_KIND = ("nz", "nz", "abs", "lin", "sq", "lin", "lin", "sq", "nz", "nz", "lin")


def _reduce_stats(T: torch.Tensor, gate: Optional[torch.Tensor], xp: torch.Tensor, fgp: torch.Tensor) -> torch.Tensor:
    """Statistics contributions of ``cc`` input entries: ``T [cc, B, N]`` ungated images at those
    entries, ``gate [B, N]`` (None: 1), ``xp, fgp [cc, B]`` the input value and foreground flag of
    each entry. Returns ``[B, N, NUM_STATS]`` (STAT_NAMES order).

    One pass per product (nz, |T|, T², and T itself) and small GEMMs against the per-entry
    weights; the gate is applied to the reduced values (``nz(g·T) = nz(T)·1[g≠0]`` etc.)."""
    cc, B, N = T.shape
    one = torch.ones_like(xp)
    wn = torch.stack([fgp, 1 - fgp, xp * fgp, xp * xp * fgp], -1)           # [cc, B, 4]
    w1 = torch.stack([one, xp, fgp, xp * fgp], -1)
    w2 = torch.stack([one, fgp], -1)
    out = torch.empty(B, N, NUM_STATS, dtype=T.dtype, device=T.device)
    for b in range(B):
        t = T[:, b]                                                          # [cc, N]
        s_nz = wn[:, b].t() @ (t != 0).to(t.dtype)                           # [4, N]
        s_li = w1[:, b].t() @ t
        s_sq = w2[:, b].t() @ (t * t)
        s_abs = t.abs().sum(0)
        out[b] = torch.stack([s_nz[0], s_nz[1], s_abs, s_li[0], s_sq[0], s_li[1], s_li[2], s_sq[1],
                              s_nz[2], s_nz[3], s_li[3]], -1)
    if gate is not None:
        out *= _gate_factors(gate)
    return out


def _gate_factors(gate: torch.Tensor) -> torch.Tensor:
    """``[B, N, NUM_STATS]`` multipliers that turn statistics of T into those of gate·T."""
    f = {"nz": (gate != 0).to(gate.dtype), "abs": gate.abs(), "lin": gate, "sq": gate * gate}
    return torch.stack([f[k] for k in _GATE_KIND], -1)


def _dense_li_stats(li: torch.Tensor, x: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Statistics of dense images ``li [B, n, D, H, W]``: ``[B, n, NUM_STATS]`` — the same
    reduction as :func:`_reduce_stats`, written over the image axes."""
    B, n = li.shape[:2]
    P = li[0, 0].numel()
    D = x.shape[1]
    xp = x.reshape(B, P).t()                                               # [P, B]
    fgp = fg.to(x.dtype).unsqueeze(1).expand(B, D, *fg.shape[1:]).reshape(B, P).t()
    T = li.reshape(B, n, P).permute(2, 0, 1)                               # [P, B, n]
    return _reduce_stats(T, None, xp, fgp)


# ----------------------------------------------------------------------------- dense forward
class DenseForward:
    """Every requested layer's learned images by forward-mode AD over all input tangents.

    Parameters
    ----------
    model : nn.Module (eval)
    names : scan addresses of the layers (conv outputs)
    example : Tensor [B, D, H, W] (shape only)
    chunk : input tangents per ``vmap`` call (None: from ``budget_bytes``)
    budget_bytes : memory for one chunk's tangents
    """

    kind = "dense"

    def __init__(self, model: nn.Module, names: Sequence[str], example: torch.Tensor,
                 chunk: Optional[int] = None, budget_bytes: int = 1 << 30):
        self.graph = build_graph(model, example[:1])
        self.names = list(names)
        self.fm = truncated_module(self.graph, self.names)
        D, H, W = self.graph.input_shape
        self.P = D * H * W
        B = example.shape[0]
        n_req = sum(int(math.prod(self.graph.resolve(n).shape)) for n in self.names)
        last = max(self.graph.resolve(n).idx for n in self.names)
        n_max = max(int(math.prod(g.shape)) for g in self.graph.nodes[: last + 1] if g.kind != "aux")
        per_tangent = 4 * B * (n_req + 6 * n_max)
        self.chunk = int(chunk or max(1, min(self.P, budget_bytes // per_tangent)))
        self.notes = [f"{self.P} tangents in chunks of {self.chunk}"]

    def _gates(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outs = self.fm(x)
        vals = {self.graph.resolve(n).idx: o for n, o in zip(self.names, outs)}
        # the gate of a conv directly followed by ReLU is S(its own output)
        return neuron_gates(self.graph, self.names, vals)

    @torch.no_grad()
    def run(self, x: torch.Tensor, fg: torch.Tensor) -> Dict[str, torch.Tensor]:
        from torch.func import jvp, vmap

        B = x.shape[0]
        D, H, W = self.graph.input_shape
        P = self.P
        gates = {n: g.reshape(B, -1) for n, g in self._gates(x).items()}
        acc = {n: torch.zeros(B, gates[n].shape[1], NUM_STATS, dtype=x.dtype, device=x.device) for n in self.names}
        xf = x.reshape(B, P)
        fgf = fg.to(x.dtype).reshape(B, H * W)
        fm = self.fm

        def tangent_out(t):
            return jvp(fm, (x,), (t,))[1]

        for s in range(0, P, self.chunk):
            idx = torch.arange(s, min(P, s + self.chunk), device=x.device)
            cc = idx.numel()
            xp = xf[:, idx].t().contiguous()                                 # [cc, B]
            fgp = fgf[:, idx % (H * W)].t().contiguous()
            T = torch.zeros(cc, B, P, dtype=x.dtype, device=x.device)
            T[torch.arange(cc, device=x.device), :, idx] = xp
            outs = vmap(tangent_out)(T.view(cc, B, D, H, W))
            with precision("fp32"):
                for n, o in zip(self.names, outs):
                    acc[n] += _reduce_stats(o.reshape(cc, B, -1), gates[n], xp, fgp)
            del outs, T
        return {n: acc[n].reshape(B, *self.graph.resolve(n).shape, NUM_STATS) for n in self.names}


# ----------------------------------------------------------------------------- reverse VJP
class ReverseVJP:
    """Batched reverse mode: ``rows`` stacked copies of the batch (``k = rows // B`` per
    sample), one forward, one backward per chunk of ``k`` units.

    ``mode="neurons"``: a unit is one neuron, cotangent one-hot, output the statistics of
    ``g_n · x ⊙ grad``. ``mode="filters"``: a unit is one channel of a layer, cotangent
    ``g ⊙ a`` restricted to it, output the filter image ``x ⊙ grad``.

    ``chunks``: run only this many evenly spaced chunks (None: all); :meth:`extrapolate` scales
    the measured time to all chunks.
    """

    kind = "vjp"

    def __init__(self, model: nn.Module, names: Sequence[str], example: torch.Tensor, rows: int = 256,
                 chunks: Optional[int] = None, mode: str = "neurons"):
        if mode not in ("neurons", "filters"):
            raise ValueError(mode)
        self.mode = mode
        self.graph = build_graph(model, example[:1])
        self.names = list(names)
        self.fm = truncated_module(self.graph, self.names)
        B = example.shape[0]
        self.k = max(1, rows // B)
        shapes = [self.graph.resolve(n).shape for n in self.names]
        sizes = [int(math.prod(s)) if mode == "neurons" else s[0] for s in shapes]
        self.units = _Units(self.names, sizes)
        self.n_chunks = math.ceil(self.units.total / self.k)
        if chunks is None or chunks >= self.n_chunks:
            self.chunk_ids = list(range(self.n_chunks))
        else:
            m = max(1, chunks)
            self.chunk_ids = sorted({int(round(i * (self.n_chunks - 1) / max(1, m - 1))) for i in range(m)}) \
                if m > 1 else [self.n_chunks // 2]
        self.sampled = len(self.chunk_ids) < self.n_chunks
        self.split_times = (0.0, 0.0)
        what = "neurons" if mode == "neurons" else "filters"
        self.notes = [f"{self.units.total} {what} in {self.n_chunks} backward passes of {self.k}"
                      + (f"; {len(self.chunk_ids)} timed, extrapolated" if self.sampled else "")]

    def extrapolate(self, t_run: float) -> float:
        """Time of the full sweep from one measured run (forward once + chunks scaled)."""
        if not self.sampled:
            return t_run
        t_fwd, t_chunks = self.split_times
        scale = self.n_chunks / len(self.chunk_ids)
        return t_run - t_chunks + t_chunks * scale

    def run(self, x: torch.Tensor, fg: torch.Tensor):
        now = _timer(x.device.type)
        t0 = now()
        B = x.shape[0]
        D, H, W = self.graph.input_shape
        k = self.k
        xr = x.detach().repeat(k, 1, 1, 1).requires_grad_(True)
        with torch.enable_grad():
            outs = self.fm(xr)
        first = {self.graph.resolve(n).idx: o.detach()[:B] for n, o in zip(self.names, outs)}
        gates = neuron_gates(self.graph, self.names, first)
        cots = None
        if self.mode == "filters":  # g ⊙ a of each layer (per sample)
            cots = {n: gates[n] * first[self.graph.resolve(n).idx] for n in self.names}
        t1 = now()
        results: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in self.names}
        for c in self.chunk_ids:
            flat = torch.arange(c * k, min(self.units.total, (c + 1) * k), device=x.device)
            kk = flat.numel()
            parts = self.units.split(flat)
            sel_outs, gos = [], []
            row = 0
            for li, local in parts:
                n = self.names[li]
                o = outs[li]
                go = torch.zeros(k, B, *o.shape[1:], dtype=x.dtype, device=x.device)
                rows = torch.arange(row, row + local.numel(), device=x.device)
                if self.mode == "neurons":
                    go.view(k, B, -1)[rows, :, local] = 1
                else:  # copy rows[j] carries channel local[j]'s cotangent
                    go[rows, :, local] = cots[n][:, local].transpose(0, 1)
                sel_outs.append(o)
                gos.append(go.view_as(o))
                row += local.numel()
            with torch.enable_grad():
                (gr,) = torch.autograd.grad(sel_outs, xr, gos, retain_graph=True)
            gr = gr.detach().view(k, B, D, H, W)[:kk] * x.unsqueeze(0)          # x ⊙ grad
            row = 0
            for li, local in parts:
                n = self.names[li]
                g_ = gr[row: row + local.numel()].transpose(0, 1)                # [B, n, D, H, W]
                if self.mode == "neurons":
                    g_ = g_ * gates[n].reshape(B, -1)[:, local].reshape(B, -1, 1, 1, 1)
                    results[n].append((local, _dense_li_stats(g_, x, fg)))
                else:
                    results[n].append((local, g_.contiguous()))
                row += local.numel()
        del outs, xr
        t2 = now()
        self.split_times = (t1 - t0, t2 - t1)
        return {n: (torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v], 1))
                for n, v in results.items() if v}


# ----------------------------------------------------------------------------- captum
class CaptumLoop:
    """``captum.attr.NeuronGradient`` one neuron per call on ``n_sample`` uniformly drawn
    neurons (seeded); :meth:`extrapolate` scales to all neurons."""

    kind = "captum"

    def __init__(self, model: nn.Module, names: Sequence[str], example: torch.Tensor, n_sample: int = 100,
                 seed: int = 0):
        from captum.attr import NeuronGradient

        self.model = model
        self.graph = build_graph(model, example[:1])
        self.names = list(names)
        self.fm = truncated_module(self.graph, self.names)
        shapes = [self.graph.resolve(n).shape for n in self.names]
        self.shapes = shapes
        self.units = _Units(self.names, [int(math.prod(s)) for s in shapes])
        gen = torch.Generator().manual_seed(seed)
        n = min(n_sample, self.units.total)
        self.sample = torch.randperm(self.units.total, generator=gen)[:n].sort().values
        self.attr = {}
        for nm in self.names:
            g = self.graph.resolve(nm)
            if g.module is None:
                raise ValueError(f"captum baseline: {nm} is not a module")
            self.attr[nm] = NeuronGradient(model, g.module)
        self.notes = [f"{n} of {self.units.total} neurons sampled, extrapolated"]

    def extrapolate(self, t_run: float) -> float:
        return t_run * self.units.total / self.sample.numel()

    def run(self, x: torch.Tensor, fg: torch.Tensor):
        B = x.shape[0]
        with torch.no_grad():
            outs = self.fm(x)
        gates = neuron_gates(self.graph, self.names, {self.graph.resolve(n).idx: o for n, o in zip(self.names, outs)})
        res = {}
        for li, local in self.units.split(self.sample):
            n = self.names[li]
            shape = self.shapes[li]
            gflat = gates[n].reshape(B, -1)
            st = []
            for j in local.tolist():
                sel = tuple(int(v) for v in _unravel(j, shape))
                grad = self.attr[n].attribute(x, neuron_selector=sel)
                li_img = (grad * x * gflat[:, j].view(B, 1, 1, 1)).unsqueeze(1)
                st.append(_dense_li_stats(li_img, x, fg))
            res[n] = (local.to(x.device), torch.cat(st, 1))
        return res


def _unravel(j: int, shape: Sequence[int]) -> List[int]:
    out = []
    for s in reversed(shape):
        out.append(j % s)
        j //= s
    return list(reversed(out))
