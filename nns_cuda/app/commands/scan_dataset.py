"""``nns scan-dataset``: per-neuron statistics of a whole data set, resumable, on one process or many."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from nns_cuda.app._common import MAX_MEMORY_HELP, CLIError, guarded, load_model, samples_option

HELP = "per-neuron statistics of a whole data set (resumable; torchrun for several GPUs)"
DESCRIPTION = textwrap.dedent("""\
    Scan every sample of a data set and keep, per neuron of each layer: the sample count, the
    sum and sum of squares of the activation, how often it is positive, its maximum with the
    first sample reaching it, the top-k activations with their samples, and the sums of the
    fused learned-image statistics (docs/spec.md §2-§3) — see the README's file layout.

    The data set is cut into blocks of --block-size samples; each finished block is saved at
    once, so an interrupted scan continues with --resume and computes only what is missing.
    The result is the same for any number of processes.

    Several processes: `torchrun --nproc-per-node N -m nns_cuda scan-dataset ...` (one GPU per
    process with --device cuda; gloo on CPUs). Job arrays without a process group:
    `--shard i/n` per job, then `nns merge OUT`.

    Data: `digits` (the embedded cluttered digits, --split) or a folder root/<class>/<image>
    (with VOC XML boxes next to the images, else the whole image is the foreground),
    resized to --input-size.
    """)
EPILOG = "Example: nns scan-dataset --model vgg16_cifar --layers features.1 features.3 --out scans/vgg"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns scan-dataset`` options to ``p`` (returns it)."""
    p.add_argument("--model", default=None, help="zoo name, package.module:factory, or a torch.save'd model file "
                                                "(default: the demo model, well-trained checkpoint)")
    p.add_argument("--weights", default=None, help="state dict / checkpoint for the model")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a zoo model")
    p.add_argument("--data", default="digits", help="'digits' (embedded default) or an image folder root/<class>/<image>")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of the digits")
    p.add_argument("--input-size", type=int, default=None, help="resize folder images to this side (needed when "
                                                                "their sizes differ)")
    samples_option(p, default=None, help="scan only the first N samples (default: all)",
                   old=("--limit", "--max-samples"))
    p.add_argument("--layers", nargs="+", required=True, help="layer names from model.named_modules()")
    p.add_argument("--out", required=True, help="output folder (manifest.json, blocks/, result.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue the scan already in --out")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only blocks b with b %% N == I (no process group)")
    p.add_argument("--top-k", type=int, default=8, help="largest activations kept per neuron")
    p.add_argument("--block-size", type=int, default=256, help="samples per block (saving / resuming unit)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per scan call")
    p.add_argument("--filter-images", action="store_true", help="also sum the filter learned images (mean filter images)")
    p.add_argument("--device", default="cpu", help="cpu, cuda (under torchrun: the local rank's GPU) or cuda:N")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda"], help="learned-image backend")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp64", "tf32", "bf16", "fp16"],
                   help="learned-image precision (auto = the input's dtype)")
    p.add_argument("--max-memory", default=None, metavar="SIZE", help=MAX_MEMORY_HELP)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``nns scan-dataset``. Returns the exit status."""
    return guarded("scan-dataset", args, lambda: _run(args))


def dataset_from_args(args: argparse.Namespace):
    """The map-style data set named by ``--data`` (and a one-line description)."""
    if args.data == "digits":
        from nns_cuda import data as nns_data

        return nns_data.cluttered_digits(args.split, seed=0), f"cluttered digits, split {args.split!r}"
    if not os.path.isdir(args.data):
        raise CLIError(f"--data {args.data!r}: neither 'digits' nor an existing folder")
    from nns_cuda import data as nns_data

    tf = nns_data.PairTransform(upscale_to=args.input_size) if args.input_size else None
    ds = nns_data.ImageFolderBoxes(args.data, transform=tf, missing="whole")
    return ds, f"{len(ds)} images of {args.data}" + (f" at {args.input_size}x{args.input_size}" if args.input_size else "")


def _shard(s):
    if s is None:
        return None
    try:
        i, n = (int(v) for v in s.split("/"))
    except ValueError:
        raise CLIError(f"--shard {s!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise CLIError(f"--shard {s!r}: I must be in 0..N-1")
    return i, n


def _run(args: argparse.Namespace) -> int:
    import torch

    from nns_cuda.engine.memory import parse_bytes
    from nns_cuda.engine.dataset_scan import DatasetScan
    from nns_cuda.engine._scan_store import MANIFEST

    if args.resume and not os.path.exists(os.path.join(args.out, MANIFEST)) and args.shard is None:
        raise CLIError(f"--resume: {args.out} holds no scan to continue (no {MANIFEST}); drop --resume to start one")
    shard = _shard(args.shard)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    model, desc = load_model(args.model, args.weights, num_classes=args.num_classes, who="nns scan-dataset")
    ds, ddesc = dataset_from_args(args)
    if args.samples is not None:
        if args.samples < 1:
            raise CLIError(f"--samples must be at least 1, got {args.samples}")
        ds = torch.utils.data.Subset(ds, range(min(args.samples, len(ds))))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"nns scan-dataset: {desc}; {ddesc} ({len(ds)} samples); layers {args.layers}", file=sys.stderr)
    scan = DatasetScan(model.to(device), args.layers, top_k=args.top_k, block_size=args.block_size,
                       batch_size=args.batch_size, backend=args.backend, precision=args.precision,
                       max_memory=parse_bytes(args.max_memory), num_workers=args.num_workers,
                       filter_images=args.filter_images, progress=not args.no_progress)
    res = scan.run(ds, args.out, resume=args.resume or shard is not None, shard=shard)
    if res is not None and rank == 0:
        print(f"nns scan-dataset: wrote {os.path.join(args.out, 'result.safetensors')} ({res.samples} samples; "
              f"{res.blocks_computed} blocks computed, {res.blocks_skipped} already done)", file=sys.stderr)
    elif shard is not None:
        print(f"nns scan-dataset: shard {args.shard} done; run `nns merge {args.out}` when every shard is",
              file=sys.stderr)
    return 0
