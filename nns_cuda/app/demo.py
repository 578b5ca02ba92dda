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
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from nns_cuda.app._demo_stages import (
    Engine,
    data_batches,
    fq_stage,
    gmm_stage,
    knowledge_stage,
    model_stage,
    one_line,
    scan_stage,
    tip_stage,
)
from nns_cuda.engine.memory import parse_bytes  # the one parser of sizes (re-exported here)

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


# ----------------------------------------------------------------------------- model helpers
def _leaf_calls(model: nn.Module, x: torch.Tensor) -> List[Tuple[str, nn.Module, Tuple[int, ...]]]:
    """(name, module, output shape without batch) of every leaf-module call, in order, with
    ``name:k`` for modules called more than once (docs/spec.md §0); hooks removed."""
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


# ----------------------------------------------------------------------------- stage runner
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
            reason = one_line(e)
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
    eng = Engine(backend=backend, max_memory=parse_bytes(max_memory), progress=progress)
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
            ctx["eval"] = data_batches(test, list(range(n_eval)), cfg.batch_size, dev)
            results["meta"]["n_eval_samples"] = n_eval

        # 2. model ------------------------------------------------------------------------
        with st.stage("model", "training", "learned_images", "knowledge", "fq", "tip", "gmm"):
            if "test" not in ctx:
                raise RuntimeError("no data (see the data stage)")
            ctx.update(model_stage(cfg, dev, cache_dir, retrain, progress, tmp))
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
            results["learned_images"] = scan_stage(cfg, ctx, eng)
        results["meta"]["backend"] = eng.used.get("backend")
        results["meta"]["strategy"] = eng.used.get("strategy")

        # 4.-7. Chapter 3 (knowledge quantity), FQ (Chapter 4, and the C^l part of Chapter 3),
        # TIP (Chapter 5), GMM (Chapter 6) ---------------------------------------------------------
        for name, key, stage in (("chapter3", "knowledge", knowledge_stage), ("fq", "fq", fq_stage),
                                 ("tip", "tip", tip_stage), ("gmm", "gmm", gmm_stage)):
            with st.stage(name, key):
                if not have_model:
                    raise RuntimeError("no model (see the model stage)")
                results[key] = stage(cfg, ctx, eng)

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
