"""Data-set feature quantity (FQ) over many images: time and memory (the 1,000-image acceptance run).

``nns_cuda.fq.FeatureQuantity().fit`` on ``vgg16_cifar`` (random weights, seed 0) over the first
``--images`` samples of the embedded cluttered-digits training split (generated on the spot),
for the first 13 ReLU layers (every conv neuron's activation: 276,480 neurons per image), with the
best available backend (the engine's ``"auto"``). The fit streams: per-neuron running max /
arg-max / sums, never the images.

Recorded per batch: elapsed time, resident set size (``/proc/self/statm``), peak RSS so far (``ru_maxrss``)
and the load average — the evidence that memory does not grow with the number of images.

    python -m benchmarks.bench_fq --images 1000 --json benchmarks/results/fq_vgg16_cpu.json
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see common.py)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, Iterator, List, Optional  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from .common import env_info, rss_bytes, write_json  # noqa: E402


def _rss_gib() -> float:
    return rss_bytes() / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def run(images: int, batch: int, model_name: str = "vgg16_cifar", n_layers: int = 13,
        device: str = "cpu", log_every: int = 5, verbose: bool = True) -> Dict[str, Any]:
    from nns_cuda import data, models
    from nns_cuda.analysis import fq

    torch.manual_seed(0)
    model = models.build(model_name).eval().to(device)
    relus = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)][:n_layers]
    ds = data.cluttered_digits("train")
    if images > len(ds):
        raise ValueError(f"bench_fq: --images {images} exceeds the {len(ds)} training samples of the embedded set")
    loader = DataLoader(Subset(ds, range(images)), batch)
    log: List[Dict[str, float]] = []
    rss0, t0 = _rss_gib(), time.perf_counter()

    def logged(it) -> Iterator:
        seen = 0
        for b in it:
            log.append({"images_before": seen, "t": time.perf_counter() - t0, "rss_gib": _rss_gib(),
                        "peak_gib": _peak_gib(), "load": os.getloadavg()[0]})
            if verbose and len(log) % log_every == 0:
                print(json.dumps(log[-1]), flush=True)
            seen += b[0].shape[0]
            yield b

    res = fq.FeatureQuantity(batch_size=batch).fit(model, logged(loader), relus).result_
    seconds = time.perf_counter() - t0
    last = res[relus[-1]]
    return {
        "config": {"model": model_name, "layers": relus, "images": images, "batch": batch, "device": device},
        "env": env_info(device),
        "n_samples": res.n_samples,
        "neurons_per_image": int(sum(res[l].fq.numel() for l in relus)),
        "seconds": seconds,
        "s_per_image": seconds / max(1, res.n_samples),
        "rss_at_start_gib": rss0,
        "peak_rss_gib": _peak_gib(),
        "final_rss_gib": _rss_gib(),
        "last_layer": {"name": relus[-1], "mean_fq": float(last.fq.mean()), "pearson_r": float(last.pearson_r)},
        "log": log,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model", default="vgg16_cifar")
    p.add_argument("--layers", type=int, default=13, help="first N ReLU layers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out = run(a.images, a.batch, a.model, a.layers, a.device)
    summary = {k: v for k, v in out.items() if k not in ("log", "env")}
    print(json.dumps(summary, indent=1))
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
