"""The demo pipeline behind ``nns demo`` / ``make demo``.

Embedded default data ("cluttered digits", made by code) → the demo model (trained once and
cached, or reused) → scan → Chapter 3 (knowledge quantity, feature-map ↔ learned-image
correlation) → FQ (Chapter 4) → TIP (Chapter 5) → GMM anomaly filters (Chapter 6) → an HTML
report with the thesis's figures and a Findings table (:mod:`nns_cuda.report`).

Every stage is timed (``metrics.json`` → ``timings``). A stage that fails — for example an
analysis module that is not available in this build — does not stop the demo: its report
sections say "not computed: <reason>" (nothing is ever filled in).

>>> from nns_cuda.demo import run_demo
>>> out = run_demo("nns_output/demo")          # doctest: +SKIP
>>> out["report"]                               # doctest: +SKIP
'nns_output/demo/report.html'

Sizes. The full demo analyses ``samples`` test images (default 100) with Chapters 3–5 and
clusters the filter images of ``gmm_samples`` training images (default 200) for Chapter 6, on the
well-trained (best validation accuracy) and over-fitted (last epoch) checkpoints of the demo
model and a few checkpoints in between (Fig. 6-4). ``quick=True`` trains a tiny model for a few
epochs in a temporary folder (the user's cache is not touched) and analyses a handful of
samples: it exercises every stage in well under a minute and is what the tests run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["DemoConfig", "run_demo", "parse_bytes", "scan_layers", "last_conv_activation"]


# ----------------------------------------------------------------------------- configuration
@dataclass
class DemoConfig:
    """Sizes of one demo run (see the module docstring)."""

    quick: bool = False
    samples: int = 100            #: test samples for Chapters 3–5
    gmm_samples: int = 200        #: training samples clustered in Chapter 6
    k_max: int = 10               #: largest number of GMM components
    n_images: int = 4             #: samples drawn in Fig. 3-7
    n_filters_drawn: int = 8      #: filter images drawn per layer
    aipc_step: float = 0.02       #: AIPC mask-ratio step (fraction)
    count_checkpoints: int = 4    #: checkpoints of Fig. 6-4 (incl. well-trained and over-fitted)
    random_filters: int = 10      #: R of the random single-filter baseline (Table 6-5)
    batch_size: int = 64
    # quick-mode tiny model
    quick_model: str = "simple_cnn"
    quick_epochs: int = 4
    quick_n_train: int = 60

    @classmethod
    def make(cls, quick: bool = False, samples: Optional[int] = None, gmm_samples: Optional[int] = None,
             batch_size: Optional[int] = None) -> "DemoConfig":
        if quick:
            c = cls(quick=True, samples=16, gmm_samples=24, k_max=5, n_images=2, n_filters_drawn=4,
                    aipc_step=0.1, count_checkpoints=3, random_filters=3, batch_size=16)
        else:
            c = cls()
        if samples is not None:
            if samples < 2:
                raise ValueError(f"--samples must be at least 2, got {samples}")
            c.samples = int(samples)
        if gmm_samples is not None:
            c.gmm_samples = int(gmm_samples)
        if c.gmm_samples <= c.k_max:
            raise ValueError(f"the GMM needs more samples than k_max={c.k_max}; got gmm_samples={c.gmm_samples}")
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"--batch-size must be positive, got {batch_size}")
            c.batch_size = int(batch_size)
        return c


def parse_bytes(s: Union[None, int, str]) -> Optional[int]:
    """``"2G"``, ``"512M"``, ``"64k"``, ``"1.5GiB"`` or a plain number of bytes -> int (None stays None)."""
    if s is None or isinstance(s, int):
        return s
    t = str(s).strip().lower().replace("ib", "").replace("b", "")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if t and t[-1] in mult:
            v = float(t[:-1]) * mult[t[-1]]
        else:
            v = float(t)
    except ValueError:
        raise ValueError(f"memory size {s!r} not understood; write e.g. 2G, 512M or a number of bytes") from None
    if v <= 0:
        raise ValueError(f"memory size must be positive, got {s!r}")
    return int(v)


# ----------------------------------------------------------------------------- model helpers
def _leaf_calls(model: nn.Module, x: torch.Tensor) -> List[Tuple[str, nn.Module, Tuple[int, ...]]]:
    """(name, module, output shape without batch) of every leaf-module call, in order, with
    ``name:k`` for modules called more than once (SPEC §0); hooks removed."""
    from nns_cuda.analysis._toolkit import trace_calls

    return [(c.name, c.module, c.out_shape) for c in trace_calls(model, x)]


_ACTS = (nn.ReLU, nn.LeakyReLU)


def scan_layers(model: nn.Module, x: torch.Tensor) -> List[str]:
    """Layers drawn in Fig. 3-7 and measured in Fig. 3-8: every ReLU / LeakyReLU output and the
    model's output layer, in forward order."""
    calls = _leaf_calls(model, x[:1])
    layers = [n for n, m, _ in calls if isinstance(m, _ACTS)]
    if calls and calls[-1][0] not in layers:
        layers.append(calls[-1][0])
    return layers


def last_conv_activation(model: nn.Module, x: torch.Tensor) -> str:
    """The last activation with a spatial ``[C, H, W]`` output (the thesis analyses the last conv
    layer's activations in Chapters 5 and 6)."""
    calls = _leaf_calls(model, x[:1])
    cands = [n for n, m, s in calls if isinstance(m, _ACTS) and len(s) == 3]
    if not cands:
        raise ValueError("the model has no ReLU with a [C, H, W] output; pass the layer explicitly")
    return cands[-1]


# ----------------------------------------------------------------------------- engine options
@dataclass
class _Engine:
    """Backend / memory options passed to every analysis through its injection points."""

    backend: str = "auto"
    max_memory: Optional[int] = None
    used: Dict[str, str] = field(default_factory=dict)

    def _note(self, res) -> None:
        b, s = getattr(res, "backend", None), getattr(res, "strategy", None)
        if b:
            self.used.setdefault("backend", b)
        if s:
            self.used.setdefault("strategy", s)

    def scan_fn(self, model, x, fg_mask, layers):
        from nns_cuda.engine.scanner import Scanner

        res = Scanner(model, list(layers), backend=self.backend, max_memory=self.max_memory, stats=True).scan(x, fg_mask)
        self._note(res)
        return res

    def filter_fn(self, model, x, layer):
        from nns_cuda.engine.scanner import Scanner

        res = Scanner(model, [layer], backend=self.backend, max_memory=self.max_memory, stats=False,
                      filter_images=True).scan(x)
        self._note(res)
        return res[layer].filter_images

    def li_fn(self, model, x, layer, neurons=None):
        from nns_cuda.engine.scanner import learned_images

        return learned_images(model, x, layer, neurons=neurons, backend=self.backend, max_memory=self.max_memory)


# ----------------------------------------------------------------------------- stage runner
def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class _Stages:
    def __init__(self, progress: bool, debug: bool, total: int):
        self.timings: Dict[str, float] = {}
        self.errors: Dict[str, str] = {}
        self.debug = debug
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="nns demo", unit="stage", file=sys.stderr, leave=True)
            except ImportError:  # pragma: no cover
                self.bar = None

    @contextlib.contextmanager
    def stage(self, name: str, *error_keys: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_description(f"nns demo: {name}")
        t0 = time.perf_counter()
        try:
            yield
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failed stage becomes "not computed: <reason>" in the report
            if self.debug:
                traceback.print_exc()
            reason = _one_line(e)
            for k in (error_keys or (name,)):
                self.errors[k] = f"stage '{name}' failed: {reason}"
            print(f"nns demo: {name}: not computed ({reason})", file=sys.stderr)
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_description("nns demo: done")
            self.bar.close()


def _need(module, name: str):
    """``module.name`` or an error saying that this piece is not available in this build."""
    fn = getattr(module, name, None)
    if fn is None:
        raise NotImplementedError(f"{module.__name__}.{name} is not available in this build")
    return fn


def _batches(ds, indices: Sequence[int], batch_size: int, device) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A re-iterable list of ``(x, y, fg_mask)`` batches of ``ds[indices]`` on ``device``."""
    out = []
    for s in range(0, len(indices), batch_size):
        items = [ds[i] for i in indices[s: s + batch_size]]
        x = torch.stack([it[0] for it in items]).to(device)
        y = torch.as_tensor([int(it[1]) for it in items], device=device)
        m = torch.stack([torch.as_tensor(it[2]) for it in items]).to(device)
        out.append((x, y, m))
    return out


def _versions() -> Dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        from nns_cuda._version import __version__
        from nns_cuda._extension import ext_info

        v["nns_cuda"] = __version__
        v["extension"] = json.dumps(ext_info())
    except Exception:  # pragma: no cover
        pass
    return v


# ----------------------------------------------------------------------------- the pipeline
def run_demo(out_dir: Union[str, "os.PathLike[str]"] = "nns_output/demo", quick: bool = False, device: str = "cpu",
             backend: str = "auto", *, batch_size: Optional[int] = None, max_memory: Union[None, int, str] = None,
             samples: Optional[int] = None, gmm_samples: Optional[int] = None, cache_dir: Optional[str] = None,
             retrain: bool = False, progress: bool = True, debug: bool = False) -> Dict[str, Any]:
    """Run the whole demo and write the report.

    Parameters
    ----------
    out_dir : folder for ``report.html``, its PNGs and ``metrics.json``
    quick : tiny run (a few-epoch model, a handful of samples; < 1 minute)
    device : "cpu" or "cuda[:i]"
    backend : engine backend ("auto", "reference", "cpu", "cuda")
    batch_size : analysis batch size (default 64; 16 with ``quick``)
    max_memory : engine memory budget (bytes or "2G"); None = the engine's default
    samples : test samples for Chapters 3–5 (default 100; 16 with ``quick``)
    gmm_samples : training samples clustered in Chapter 6 (default 200; 24 with ``quick``)
    cache_dir : cache root for the data and the demo model (default ``$NNS_CACHE_DIR`` or
        ``~/.cache/nns_cuda``)
    retrain : train the demo model again even if it is cached
    progress : progress bar on stderr
    debug : print tracebacks of failed stages

    Returns
    -------
    dict with ``report`` (path of report.html), ``metrics`` (path of metrics.json),
    ``results`` (the dict given to :func:`nns_cuda.report.write_report`), ``findings``,
    ``timings`` and ``errors`` (stage -> reason, empty when everything ran).
    """
    from nns_cuda.app import report as nns_report

    t_start = time.perf_counter()
    cfg = DemoConfig.make(quick, samples, gmm_samples, batch_size)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    eng = _Engine(backend=backend, max_memory=parse_bytes(max_memory))
    from nns_cuda.engine.scanner import resolve_backend

    resolve_backend(backend, dev)  # fail early on an impossible backend
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    st = _Stages(progress, debug, total=9)
    results: Dict[str, Any] = {
        "meta": {
            "title": "NNS demo report" + (" (quick run)" if cfg.quick else ""),
            "quick": cfg.quick,
            "device": str(dev),
            "backend_requested": backend,
            "max_memory": eng.max_memory,
            "config": asdict(cfg),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "data": "cluttered digits (embedded default: scikit-learn's 8x8 digits up-scaled on 32x32 RGB "
                    "clutter, digit bounding box = foreground)",
        },
        "errors": st.errors,
        "timings": st.timings,
    }
    tmp = tempfile.TemporaryDirectory(prefix="nns_quick_") if cfg.quick else None
    ctx: Dict[str, Any] = {}
    try:
        # 1. data ------------------------------------------------------------------------
        with st.stage("data", "data", "learned_images", "knowledge", "fq", "tip", "gmm"):
            from nns_cuda import data as nns_data

            test = nns_data.cluttered_digits("test", seed=0, cache_dir=cache_dir)
            ctx["test"] = test
            ctx["val"] = nns_data.cluttered_digits("val", seed=0, cache_dir=cache_dir)
            n_eval = min(cfg.samples, len(test))
            ctx["eval"] = _batches(test, list(range(n_eval)), cfg.batch_size, dev)
            results["meta"]["n_eval_samples"] = n_eval

        # 2. model ------------------------------------------------------------------------
        with st.stage("model", "training", "learned_images", "knowledge", "fq", "tip", "gmm"):
            if "test" not in ctx:
                raise RuntimeError("no data (see the data stage)")
            ctx.update(_model_stage(cfg, dev, cache_dir, retrain, progress, tmp))
            hist = ctx["history"]
            results["training"] = {"history": hist.to_dict(), "model": ctx["model_name"],
                                   "checkpoint_dir": str(ctx["checkpoint_dir"]),
                                   "trained_now": ctx["trained_now"],
                                   "overfitting": hist.overfitting() if hasattr(hist, "overfitting") else {}}
            results["meta"]["model"] = ctx["model_name"]
            results["meta"]["well_trained_epoch"] = hist.best_epoch
            results["meta"]["overfitted_epoch"] = hist.epochs[-1] if hist.epochs else None
            x0 = ctx["eval"][0][0]
            ctx["layers"] = scan_layers(ctx["wt"], x0)
            ctx["layer"] = last_conv_activation(ctx["wt"], x0)
            results["meta"]["layers"] = ctx["layers"]
            results["meta"]["filter_layer"] = ctx["layer"]

        have_model = "wt" in ctx
        # 3. scan: learned images for Fig. 3-7 -----------------------------------------------
        with st.stage("scan", "learned_images"):
            if not have_model:
                raise RuntimeError("no model (see the model stage)")
            results["learned_images"] = _scan_stage(cfg, ctx, eng)
        results["meta"]["backend"] = eng.used.get("backend")
        results["meta"]["strategy"] = eng.used.get("strategy")

        # 4. Chapter 3: knowledge quantity ----------------------------------------------------
        with st.stage("chapter3", "knowledge"):
            if not have_model:
                raise RuntimeError("no model (see the model stage)")
            from nns_cuda.analysis import chapter3

            kq = _need(chapter3, "KnowledgeQuantity")(batch_size=cfg.batch_size, scan_fn=eng.scan_fn,
                                                       max_samples=cfg.samples)
            results["knowledge"] = kq.fit(ctx["wt"], ctx["eval"], ctx["layers"]).to_dict()

        # 5. FQ (Chapter 4) and the C^l part of Chapter 3 ------------------------------------
        with st.stage("fq", "fq"):
            if not have_model:
                raise RuntimeError("no model (see the model stage)")
            from nns_cuda.analysis import fq

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results["fq"] = _need(fq, "findings")(
                    ctx["wt"], ctx["eval"], max_samples=cfg.samples, batch_size=cfg.batch_size, scan_fn=eng.scan_fn,
                    li_fn=eng.li_fn, filter_fn=eng.filter_fn, localisation=False, top2=False, ablation=False)

        # 6. TIP (Chapter 5) -------------------------------------------------------------------
        with st.stage("tip", "tip"):
            if not have_model:
                raise RuntimeError("no model (see the model stage)")
            results["tip"] = _tip_stage(cfg, ctx, eng)

        # 7. GMM (Chapter 6) -------------------------------------------------------------------
        with st.stage("gmm", "gmm"):
            if not have_model:
                raise RuntimeError("no model (see the model stage)")
            results["gmm"] = _gmm_stage(cfg, ctx, eng, cache_dir)

        # 8. report ------------------------------------------------------------------------------
        results["timings"]["total_before_report"] = round(time.perf_counter() - t_start, 3)
        paths: Dict[str, Any] = {}
        with st.stage("report", "report"):
            paths["report"] = nns_report.write_report(results, out_dir)
        if "report" not in paths:  # the report itself failed: still leave metrics behind
            paths["report"] = None
        results["timings"]["total"] = round(time.perf_counter() - t_start, 3)
        with st.stage("metrics", "metrics"):
            paths["metrics"] = nns_report.write_metrics(results, out_dir)
    finally:
        st.close()
        if tmp is not None:
            tmp.cleanup()
    return {"report": paths.get("report"), "metrics": paths.get("metrics"), "results": results,
            "findings": results.get("findings"), "timings": results["timings"], "errors": results["errors"]}


# ----------------------------------------------------------------------------- stages
def _model_stage(cfg: DemoConfig, dev, cache_dir, retrain: bool, progress: bool, tmp) -> Dict[str, Any]:
    from nns_cuda import models
    from nns_cuda import train as nns_train

    if cfg.quick:
        from nns_cuda import data as nns_data

        ckdir = os.path.join(tmp.name, "model")
        tr = nns_data.cluttered_digits("train", seed=0, n_train=cfg.quick_n_train, cache_dir=cache_dir)
        va = nns_data.cluttered_digits("val", seed=0, cache_dir=cache_dir)
        model = models.build(cfg.quick_model, 10, seed=0)
        hist = _need(nns_train, "fit")(model, tr, va, epochs=cfg.quick_epochs, optimizer="adam", lr=3e-3,
                                       batch_size=20, seed=0, checkpoint_dir=ckdir, overwrite=True, device=dev,
                                       progress=False, num_threads=1, title=f"quick model {cfg.quick_model}")
        name, trained_now, train_ds = cfg.quick_model, True, tr
    else:
        t0 = time.time()
        demo = _need(nns_train, "default_demo_model")(cache_dir, force=retrain, progress=progress, device=dev)
        hist, name, ckdir = demo.history, demo.name, demo.checkpoint_dir
        last = hist.last_checkpoint
        trained_now = bool(last) and os.path.isfile(last) and os.path.getmtime(last) >= t0 - 1
        cfgd = getattr(nns_train, "DEMO_CONFIG", {})
        from nns_cuda import data as nns_data

        train_ds = nns_data.cluttered_digits("train", seed=cfgd.get("data_seed", 0), n_train=cfgd.get("n_train"),
                                             cache_dir=cache_dir)
    wt = models.load_model(name, weights=hist.best_checkpoint).to(dev).eval()
    of = models.load_model(name, weights=hist.last_checkpoint).to(dev).eval()
    return {"history": hist, "model_name": name, "checkpoint_dir": ckdir, "trained_now": trained_now,
            "wt": wt, "of": of, "train_ds": train_ds}


def _scan_stage(cfg: DemoConfig, ctx: Dict[str, Any], eng: _Engine) -> Dict[str, Any]:
    from nns_cuda.engine.scanner import Scanner

    test, model, layers = ctx["test"], ctx["wt"], ctx["layers"]
    # one sample per class first, so the figure shows different digits
    picked: List[int] = []
    seen = set()
    for i in range(len(test)):
        y = int(test[i][1])
        if y not in seen:
            seen.add(y)
            picked.append(i)
        if len(picked) >= cfg.n_images:
            break
    dev = ctx["eval"][0][0].device
    x = torch.stack([test[i][0] for i in picked]).to(dev)
    y = [int(test[i][1]) for i in picked]
    res = Scanner(model, layers, backend=eng.backend, max_memory=eng.max_memory, stats=False,
                  filter_images=True).scan(x)
    eng._note(res)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1).tolist()
    samples = []
    for b in range(len(picked)):
        layer_images, filters = {}, {}
        for l in layers:
            L = res[l].filter_images[b]            # [K, D, H, W]
            layer_images[l] = L.sum(0).cpu()
            a = res[l].activations[b]
            score = a.reshape(a.shape[0], -1).sum(1) if a.dim() > 1 else a
            k = min(cfg.n_filters_drawn, L.shape[0])
            top = torch.argsort(score, descending=True, stable=True)[:k].tolist()
            filters[l] = {"indices": top, "images": L[top].cpu(),
                          "activation": [float(score[i]) for i in top]}
        samples.append({"index": picked[b], "x": x[b].cpu(), "label": y[b], "pred": int(pred[b]),
                        "layer_images": layer_images, "filters": filters})
    # the winner neuron's learned image (predicted class) — SPEC §2 "winner neuron"
    out_layer = layers[-1]
    try:
        from nns_cuda.engine.scanner import learned_images

        for b, s in enumerate(samples):
            li = learned_images(model, x[b: b + 1], out_layer, neurons=[(s["pred"],)], backend=eng.backend,
                                max_memory=eng.max_memory)
            s["winner"] = li[0, 0].cpu()
    except Exception as e:  # the winner column is optional
        for s in samples:
            s["winner_error"] = _one_line(e)
    return {"layers": layers, "samples": samples, "backend": res.backend, "strategy": res.strategy,
            "output_layer": out_layer}


def _tip_stage(cfg: DemoConfig, ctx: Dict[str, Any], eng: _Engine) -> Dict[str, Any]:
    from nns_cuda.analysis import tip

    layer = ctx["layer"]
    hist = ctx["history"]
    phases = hist.phase_checkpoints() if hasattr(hist, "phase_checkpoints") else None
    out: Dict[str, Any] = {"layer": layer, "checkpoints": phases}
    f = _need(tip, "findings")(ctx["wt"], ctx["eval"], layer, checkpoints=phases, filter_images_fn=eng.filter_fn)
    out["findings"] = f
    T = (f.get("details") or {}).get("T") or {}
    if T:
        n = int(round(1 / cfg.aipc_step))
        ratios = [round(i * cfg.aipc_step, 10) for i in range(n + 1)]
        curves = _need(tip, "aipc_curves")(ctx["wt"], ctx["eval"], layer,
                                           {k: torch.as_tensor(v, dtype=torch.float64) for k, v in T.items()}, ratios)
        out["aipc"] = {k: c.to_dict() for k, c in curves.items()}
    else:
        out["aipc_error"] = "tip.findings returned no per-filter T values"
    return out


class _Memo:
    """Wrap a GMMAnalysis so that the same (model, data, layer) is analysed only once per demo."""

    def __init__(self, analysis):
        self.analysis = analysis
        self.cache: Dict[Tuple[int, int, str], Any] = {}

    def fit(self, model, data, layer):
        key = (id(model), id(data), layer)
        if key not in self.cache:
            self.cache[key] = self.analysis.fit(model, data, layer)
        return self.cache[key]

    def __getattr__(self, name):
        return getattr(self.analysis, name)


def _gmm_stage(cfg: DemoConfig, ctx: Dict[str, Any], eng: _Engine, cache_dir) -> Dict[str, Any]:
    from nns_cuda.analysis import gmm
    from nns_cuda import models

    layer, hist = ctx["layer"], ctx["history"]
    wt, of = ctx["wt"], ctx["of"]
    dev = ctx["eval"][0][0].device
    tr = ctx["train_ds"]
    S = min(cfg.gmm_samples, len(tr))
    adata = _batches(tr, list(range(S)), max(cfg.batch_size, 50), dev)
    train_all = _batches(tr, list(range(len(tr))), 100, dev)
    val_all = _batches(ctx["val"], list(range(len(ctx["val"]))), 100, dev)
    analysis = _Memo(_need(gmm, "GMMAnalysis")(k_max=cfg.k_max, seed=0, image_fn=eng.filter_fn))
    out: Dict[str, Any] = {"layer": layer, "n_samples": S, "samples": "training samples (the thesis clusters "
                                                                       "training samples)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = _need(gmm, "findings")(wt, of, layer, train_all, val_all, analysis_data=adata, analysis=analysis,
                                   R=cfg.random_filters, seed=0)
    out["findings"] = f
    out["well_trained_epoch"], out["overfitted_epoch"] = hist.best_epoch, (hist.epochs[-1] if hist.epochs else None)
    # Fig. 6-2: an anomaly filter and a normal filter of the over-fitted model
    r = analysis.fit(of, adata, layer)
    out["scatter"] = _scatter_panels(r)
    # Fig. 6-4: anomaly-filter counts over the training checkpoints
    epochs = _count_epochs(hist, cfg.count_checkpoints)
    rows = []
    counter = _need(gmm, "anomaly_counts_over_checkpoints")
    for e in epochs:
        if e == hist.best_epoch:
            m = wt
        elif e == hist.epochs[-1]:
            m = of
        else:
            m = models.load_model(ctx["model_name"], weights=hist.checkpoint(e)).to(dev).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = counter({f"epoch {e}": m}, adata, layer, analysis)[0]
        row["epoch"] = e
        rows.append(row)
    out["counts"] = rows
    out["count_epochs_note"] = "well-trained = best validation accuracy, over-fitted = last epoch"
    return out


def _count_epochs(hist, n: int) -> List[int]:
    """``n`` epochs for Fig. 6-4: the well-trained and the over-fitted ones, then farthest-point
    fill (each added epoch is the one farthest from those chosen; ties to the earlier)."""
    eps = list(hist.epochs)
    if not eps:
        return []
    want = {eps[-1]}
    if hist.best_epoch is not None:
        want.add(hist.best_epoch)
    while len(want) < min(n, len(eps)):
        e = max((e for e in eps if e not in want), key=lambda e: (min(abs(e - w) for w in want), -e))
        want.add(e)
    return sorted(want)


def _scatter_panels(r) -> Dict[str, Any]:
    an = r.anomaly
    anomalous = an.anomalous.cpu()
    act = an.mean_activation.double().cpu()
    panels: Dict[str, Any] = {"layer": r.layer, "n_anomalous": int(anomalous.sum())}

    def panel(f: int, kind: str) -> Dict[str, Any]:
        return {"filter": int(f), "kind": kind, "points": r.points[f].cpu(), "labels": an.labels[f].cpu(),
                "outliers": an.outlier_samples[f].tolist() if kind == "anomaly" else [],
                "k": int(an.k[f]), "ch": float(an.ch[f]) if math.isfinite(float(an.ch[f])) else None,
                "mean_activation": float(act[f])}

    if bool(anomalous.any()):
        idx = torch.nonzero(anomalous).flatten()
        n_out = torch.tensor([an.outlier_samples[int(i)].numel() for i in idx])
        f_an = int(idx[int(torch.argmax(n_out))])
        panels["anomaly"] = panel(f_an, "anomaly")
    else:
        panels["anomaly"] = None
        panels["anomaly_note"] = "no anomaly filter in the over-fitted model"
    normal = torch.nonzero(~anomalous).flatten()
    if normal.numel():
        f_n = int(normal[int(torch.argmax(act[normal]))])  # the most active normal filter
        panels["normal"] = panel(f_n, "normal")
    else:
        panels["normal"] = None
    return panels
