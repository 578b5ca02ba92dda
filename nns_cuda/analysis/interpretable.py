"""The estimator of ``T^k = mean_x P^k(x)`` (thesis eq. 5-7, docs/spec.md §4).

:class:`InterpretableProperties` streams a data set through a filter-image function (default
the engine's :func:`nns_cuda.engine.filter_images`) and averages the interpretable properties
of :mod:`nns_cuda.analysis.properties` per layer, region and property.

Decisions
---------
* Regions: ``"all"`` entries (``T``), the foreground box only (``T_f``) or the background only
  (``T_b``), the ``[H, W]`` mask broadcast over the ``D`` channels.
* A sample whose region is empty has no value there: it is left out of that region's mean,
  counted in ``n_samples_`` / ``n_empty_`` and warned about.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from nns_cuda.analysis._tip_eval import probe_layer
from nns_cuda.analysis._toolkit import (
    FilterFn,
    check_mask,
    eval_mode,
    make_filter_fn,
    model_device,
    resolve_module,
    split_call,
    to_jsonable,
    unpack_batch,
)
from nns_cuda.analysis.properties import PropertyNotFoundError, properties, property_names

__all__ = ["InterpretableProperties"]

_REGIONS = ("all", "foreground", "background")


def _region_list(region: Union[str, Sequence[str]]) -> List[str]:
    regs = [region] if isinstance(region, str) else list(region)
    if not regs:
        raise ValueError(f"InterpretableProperties: region is empty; choose from {list(_REGIONS)}.")
    for r in regs:
        if r not in _REGIONS:
            raise ValueError(f"InterpretableProperties: unknown region {r!r}; choose from {list(_REGIONS)} "
                             "(or a list of them).")
    return list(dict.fromkeys(regs))


class InterpretableProperties:
    """``T^k = mean_x P^k(x)`` (eq. 5-7) for chosen layers, streamed over a data set.

    Parameters
    ----------
    names : None, str or sequence of str
        Properties (``None``: all registered when :meth:`fit` runs).
    region : "all", "foreground", "background" or a sequence of them
        Entries the properties run over: all ``D·H·W`` entries (``T``), the foreground box only
        (``T_f``) or the background only (``T_b``). Foreground / background need ``fg_mask`` in
        the data batches.
    filter_fn : callable ``(model, x [B, D, H, W], layer) -> [B, C, D, H, W]``, optional
        Source of the filter learned images; default :func:`nns_cuda.engine.filter_images`.
    out_dir : str, optional
        Run as a data-set scan into this folder (:class:`nns_cuda.DatasetScan` with filter
        images; ``data`` a map-style data set): resumable, and shared among the ranks under
        ``torchrun`` (fitted attributes on rank 0; elsewhere ``T_`` is ``None``). ``filter_fn``
        does not apply.
    scan_options : dict, optional
        Options of the data-set scan (``block_size``, ``batch_size``, ``backend``, ``progress`` …).
    progress : bool
        A progress bar on stderr over the batches (default True); also the data-set scan's
        unless ``scan_options`` sets ``progress``.

    Attributes
    ----------
    names_ : list of str
        The fitted property names.
    regions_ : list of str
        The fitted regions.
    T_ : dict layer -> region -> name -> Tensor [C]
        ``T`` (float64, CPU).
    n_samples_ : dict layer -> region -> int
        Samples averaged (non-empty region).
    n_empty_ : dict layer -> region -> int
        Samples left out because their region was empty.
    channels_ : dict layer -> int
        Filters ``C`` per layer.

    Examples
    --------
    >>> ip = InterpretableProperties(region=["all", "foreground", "background"]).fit(model, data, ["features.9"])
    >>> ip.T("features.9", "mean", "foreground")   # Tensor [C]
    """

    def __init__(self, names: Union[None, str, Sequence[str]] = None,
                 region: Union[str, Sequence[str]] = "all", *,
                 filter_fn: Optional[FilterFn] = None, out_dir: Optional[str] = None,
                 scan_options: Optional[Dict[str, Any]] = None, progress: bool = True) -> None:
        self.names = names
        self.region = region
        self.filter_fn = filter_fn
        self.out_dir = out_dir
        self.scan_options = scan_options
        self.progress = progress

    def fit(self, model: nn.Module, data: Iterable, layers: Union[str, Sequence[str]], *,
            filter_fn: Optional[FilterFn] = None) -> "InterpretableProperties":
        """Stream over ``data`` and accumulate ``T`` per layer, region and property.

        Parameters
        ----------
        model : nn.Module
            Run in eval mode; every module's ``training`` flag is restored.
        data : iterable of batches ``(x [B, D, H, W], y [B], fg_mask [B, H, W] bool)``
            ``(x, y)`` or ``x`` suffice for ``region="all"``.
        layers : str or sequence of str
            Layer names (``model.named_modules()``; ``name:i`` per call).
        filter_fn : callable, optional
            Overrides the constructor's ``filter_fn``.

        Returns
        -------
        InterpretableProperties
            ``self``, with the fitted attributes set.

        Raises
        ------
        PropertyNotFoundError
            For an unknown property name.
        KeyError
            For an unknown layer.
        ValueError
            For an unknown region, a foreground / background region without ``fg_mask``, a layer
            without channels, filter images of the wrong shape, or data without samples.
        """
        names = property_names(self.names)
        regions = _region_list(self.region)
        fi = make_filter_fn(filter_fn or self.filter_fn)
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers:
            raise ValueError("InterpretableProperties.fit: layers is empty.")
        for l in layers:
            resolve_module(model, split_call(l)[0])
        if self.out_dir is not None:
            if (filter_fn or self.filter_fn) is not None:
                raise ValueError("InterpretableProperties.fit: filter_fn does not apply to a data-set scan (out_dir=); "
                                 "pass one of them")
            return self._fit_dataset(model, data, layers, names, regions)
        dev = model_device(model)
        sums: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
        counts = {l: {r: 0 for r in regions} for l in layers}
        empty = {l: {r: 0 for r in regions} for l in layers}
        channels: Dict[str, int] = {}
        seen = 0
        with eval_mode(model):
            for batch in tqdm(data, desc="TIP properties", unit="batch", leave=False, disable=not self.progress):
                x, _, fg = unpack_batch(batch, "InterpretableProperties.fit")
                x = x.to(dev)
                if fg is not None:
                    fg = check_mask(fg, x, "InterpretableProperties.fit", batched=True).to(dev)
                elif any(r != "all" for r in regions):
                    raise ValueError("InterpretableProperties.fit: region foreground/background needs fg_mask; "
                                     "data batches must be (x, y, fg_mask [B, H, W] bool).")
                if seen == 0:  # every layer must have channels (docs/spec.md §4: filters are channels)
                    for l in layers:
                        probe_layer(model, x[:2], l, "InterpretableProperties.fit")
                seen += x.shape[0]
                for l in layers:
                    L = fi(model, x, l)
                    if not isinstance(L, torch.Tensor) or L.dim() != 5:
                        raise ValueError(f"InterpretableProperties.fit: filter_fn returned "
                                         f"{list(L.shape) if isinstance(L, torch.Tensor) else type(L).__name__} "
                                         f"for layer {l!r}; expected [B, C, D, H, W].")
                    L = L.detach()
                    C = L.shape[1]
                    if channels.setdefault(l, C) != C:
                        raise ValueError(f"InterpretableProperties.fit: layer {l!r} gave {C} filters, earlier {channels[l]}.")
                    for r in regions:
                        if r == "all":
                            m, sel = None, None
                        else:
                            m = fg if r == "foreground" else ~fg
                            nonempty = m.flatten(1).any(1)
                            if not bool(nonempty.all()):
                                empty[l][r] += int((~nonempty).sum())
                                sel = nonempty.nonzero().flatten()
                                if sel.numel() == 0:
                                    continue
                            else:
                                sel = None
                        if sel is not None:
                            P = properties(L[sel], x[sel], names, m[sel])
                        else:
                            P = properties(L, x, names, m)
                        n_b = L.shape[0] if sel is None else int(sel.numel())
                        counts[l][r] += n_b
                        acc = sums.setdefault(l, {}).setdefault(r, {})
                        for n, v in P.items():
                            s = v.detach().to(torch.float64).sum(0).cpu()
                            acc[n] = acc[n] + s if n in acc else s
                    del L
        if seen == 0:
            raise ValueError("InterpretableProperties.fit: data has no samples.")
        T: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
        for l in layers:
            T[l] = {}
            for r in regions:
                if counts[l][r] == 0:
                    raise ValueError(f"InterpretableProperties.fit: the {r} region is empty in every sample "
                                     f"(layer {l!r}); no {r} property can be computed.")
                T[l][r] = {n: sums[l][r][n] / counts[l][r] for n in names}
        for l in layers:
            for r in regions:
                if empty[l][r]:
                    warnings.warn(f"InterpretableProperties.fit: {empty[l][r]} sample(s) have an empty {r} region "
                                  f"and are left out of T_{r[0]} (layer {l!r}); see n_empty_.", RuntimeWarning,
                                  stacklevel=2)
                    break
        self.names_ = names
        self.regions_ = regions
        self.T_ = T
        self.n_samples_ = counts
        self.n_empty_ = empty
        self.channels_ = channels
        return self

    def _fit_dataset(self, model: nn.Module, dataset: Any, layers: List[str], names: List[str],
                     regions: List[str]) -> "InterpretableProperties":
        """``T`` through a data-set scan: per region, the properties of each sample (0 where the
        region is empty) and the indicator of a non-empty region are per-sample measures; ``T``
        is the ratio of their sums."""
        from nns_cuda.engine.dataset_scan import DatasetScan

        def measure(region):
            def f(layer, lr, x, fg):
                if region == "all":
                    m, ok = None, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
                else:
                    if fg is None:
                        raise ValueError("InterpretableProperties.fit: region foreground/background needs fg_mask; "
                                         "the data set must yield (x, y, fg_mask [H, W] bool) items.")
                    m = fg if region == "foreground" else ~fg
                    ok = m.flatten(1).any(1)
                L = lr.filter_images
                P = properties(L, x, names, m)
                vals = torch.stack([torch.where(ok[:, None], P[n].double(), 0.0) for n in names], 1)  # [B, n, C]
                return torch.cat([vals, ok[:, None, None].double().expand(-1, 1, L.shape[1])], 1)
            return f

        opts = dict(self.scan_options or {})
        opts.setdefault("progress", self.progress)
        res = DatasetScan(model, layers, stats=False, filter_images=True,
                          measures={f"tip_{r}": measure(r) for r in regions}, **opts).run(dataset, self.out_dir,
                                                                                       resume=True)
        self.names_, self.regions_ = names, regions
        if res is None:
            self.T_ = self.n_samples_ = self.n_empty_ = self.channels_ = None
            return self
        n = res.samples
        self.T_, self.n_samples_, self.n_empty_, self.channels_ = {}, {}, {}, {}
        for l in layers:
            self.T_[l], self.n_samples_[l], self.n_empty_[l] = {}, {}, {}
            for r in regions:
                tot = res.measure_mean(l, f"tip_{r}") * n  # [n_names + 1, C]
                cnt = int(round(float(tot[-1, 0])))
                if cnt == 0:
                    raise ValueError(f"InterpretableProperties.fit: the {r} region is empty in every sample "
                                     f"(layer {l!r}); no {r} property can be computed.")
                self.T_[l][r] = {nm: tot[i] / cnt for i, nm in enumerate(names)}
                self.n_samples_[l][r], self.n_empty_[l][r] = cnt, n - cnt
            self.channels_[l] = int(tot.shape[-1])
        return self

    def T(self, layer: str, name: str = "mean", region: Optional[str] = None) -> torch.Tensor:
        """``T`` of one layer, property and region.

        Parameters
        ----------
        layer : str
            A fitted layer.
        name : str
            A fitted property (default ``"mean"``).
        region : str, optional
            A fitted region (default: the first fitted region).

        Returns
        -------
        Tensor [C]
            float64, CPU.

        Raises
        ------
        RuntimeError
            Before :meth:`fit`.
        KeyError
            For a layer, region or property (``PropertyNotFoundError``) that was not fitted.
        """
        self._check_fitted()
        if layer not in self.T_:
            raise KeyError(f"InterpretableProperties.T: layer {layer!r} was not fitted; fitted: {list(self.T_)}.")
        region = region or self.regions_[0]
        if region not in self.T_[layer]:
            raise KeyError(f"InterpretableProperties.T: region {region!r} was not fitted; fitted: {self.regions_}.")
        if name not in self.T_[layer][region]:
            raise PropertyNotFoundError(f"InterpretableProperties.T: property {name!r} was not fitted; fitted: {self.names_}.")
        return self.T_[layer][region][name]

    def _check_fitted(self) -> None:
        if not hasattr(self, "T_"):
            raise RuntimeError("InterpretableProperties: call fit(model, data, layers) first.")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe summary of the fit.

        Returns
        -------
        dict
            ``names``, ``regions``, ``T`` (layer -> region -> name -> list of ``C`` floats),
            ``n_samples``, ``n_empty``, ``channels``.

        Raises
        ------
        RuntimeError
            Before :meth:`fit`.
        """
        self._check_fitted()
        return to_jsonable({
            "names": self.names_,
            "regions": self.regions_,
            "T": {l: {r: {n: v.tolist() for n, v in d.items()} for r, d in rs.items()} for l, rs in self.T_.items()},
            "n_samples": self.n_samples_,
            "n_empty": self.n_empty_,
            "channels": self.channels_,
        })
