"""``nns train``: train a zoo model with per-epoch checkpoints (:func:`nns_cuda.train.fit`)."""
from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Tuple

from nns_cuda.app._common import CLIError, guarded

#: How the training API's messages name its arguments, and the options of this command for them.
_CLI_WORDS = (("resume=True", "--resume"), ("overwrite=True", "--overwrite"), ("checkpoint_dir", "--checkpoint-dir"),
              ("batch_size", "--batch-size"), ("weight_decay", "--weight-decay"), ("(lr=", "(--lr "))

HELP = "train a zoo model with per-epoch checkpoints"
DESCRIPTION = textwrap.dedent("""\
    Train a model of the zoo on the embedded digits or your data (ImageFolder + VOC boxes, COCO
    JSON, CIFAR pickles), with a checkpoint per epoch, the well-trained (best validation
    accuracy) and over-fitted (last) checkpoints, and the loss/accuracy curve.
    `nns train --demo` trains (or reuses) the demo's model.""")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns train`` options to ``parser`` (returns it)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="digits", choices=["digits", "imagefolder", "coco", "cifar"],
                   help="digits: the embedded cluttered digits (default); imagefolder: "
                        "ImageFolder + VOC XML; coco: COCO-style JSON; cifar: local CIFAR "
                        "pickles")
    g.add_argument("--data-seed", type=int, default=0, help="cluttered digits: rendering seed")
    g.add_argument("--small-train", action="store_true",
                   help="cluttered digits: the small training split (100 samples)")
    g.add_argument("--n-train", type=int, default=None,
                   help="cluttered digits: training-subset size")
    g.add_argument("--train-dir", help="imagefolder: training root; coco: training images")
    g.add_argument("--val-dir", help="imagefolder: validation root; coco: validation images")
    g.add_argument("--train-annotations", help="coco: training JSON; imagefolder: XML folder")
    g.add_argument("--val-annotations", help="coco: validation JSON; imagefolder: XML folder")
    g.add_argument("--cifar-root", help="cifar: folder of the python pickles (val = test split)")
    g.add_argument("--box-missing", default="error", choices=["error", "whole"],
                   help="imagefolder: image without XML → error or whole-image foreground")
    g.add_argument("--resize", type=int, default=None, help="resize the shorter side")
    g.add_argument("--center-crop", type=int, default=None, help="centre crop (square)")
    g.add_argument("--upscale-to", type=int, default=None,
                   help="bicubic up-scaling to this square size (thesis §6.3.1: 224)")
    t = parser.add_argument_group("model and training")
    t.add_argument("--model", default="simple_cnn", help="zoo model name (nns models)")
    t.add_argument("--num-classes", type=int, default=None,
                   help="default: the number of classes of the data")
    t.add_argument("--in-channels", type=int, default=3, help="input channels of folder images (1 or 3)")
    t.add_argument("--epochs", type=int, default=20, help="number of training epochs (with --resume: in all)")
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="sgd (with --momentum) or adam")
    t.add_argument("--lr", type=float, default=0.01, help="learning rate")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    t.add_argument("--batch-size", type=int, default=64, help="samples per training batch")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the sample order")
    t.add_argument("--no-deterministic", action="store_true", help="allow non-deterministic (faster) kernels")
    t.add_argument("--checkpoint-dir", default="nns_output/train", help="folder of the checkpoints and curves")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    t.add_argument("--overwrite", action="store_true", help="replace the checkpoints in --checkpoint-dir")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--num-threads", type=int, default=None,
                   help="torch threads during training (1 is fastest for small models)")
    t.add_argument("--demo", action="store_true",
                   help="train (or reuse) the demo's default model; other options ignored "
                        "except --cache-dir, --device, --no-progress")
    t.add_argument("--cache-dir", default=None, help="cache root (default $NNS_CACHE_DIR "
                                                     "or ~/.cache/nns_cuda)")
    return parser


def _datasets(args: argparse.Namespace) -> Tuple[object, object, int]:
    """``(training set, validation set, number of classes)`` from the data options."""
    from nns_cuda import data as D

    tf = None
    if args.resize or args.center_crop or args.upscale_to:
        tf = D.PairTransform(resize=args.resize, center_crop=args.center_crop,
                             upscale_to=args.upscale_to)
    if args.data == "digits":
        kw = dict(seed=args.data_seed, cache_dir=args.cache_dir, transform=tf)
        train = D.cluttered_digits("train", small_train=args.small_train, n_train=args.n_train,
                                   **kw)
        return train, D.cluttered_digits("val", **kw), 10
    if args.data == "cifar":
        if not args.cifar_root:
            raise ValueError("--data cifar needs --cifar-root")
        train = D.CifarFolder(args.cifar_root, "train", transform=tf)
        return train, D.CifarFolder(args.cifar_root, "test", transform=tf), len(train.classes)
    if not args.train_dir or not args.val_dir:
        raise ValueError(f"--data {args.data} needs --train-dir and --val-dir")
    ch = args.in_channels if args.in_channels in (1, 3) else 3
    if args.data == "imagefolder":
        train = D.ImageFolderBoxes(args.train_dir, args.train_annotations, transform=tf,
                                   channels=ch, missing=args.box_missing)
        val = D.ImageFolderBoxes(args.val_dir, args.val_annotations, transform=tf, channels=ch,
                                 missing=args.box_missing)
        return train, val, len(train.classes)
    if not args.train_annotations or not args.val_annotations:
        raise ValueError("--data coco needs --train-annotations and --val-annotations")
    train = D.CocoBoxes(args.train_dir, args.train_annotations, transform=tf, channels=ch)
    val = D.CocoBoxes(args.val_dir, args.val_annotations, transform=tf, channels=ch)
    return train, val, len(train.classes)


def run(args: argparse.Namespace) -> int:
    """Run ``nns train``: prints the per-epoch table and where the checkpoints and curves are.

    Messages speak the command line (``--resume``, ``--overwrite``, ``--checkpoint-dir``); an
    interrupted training says how to continue it.

    Returns
    -------
    int
        The exit status: 0, 2 on bad input (one line on stderr), 130 when interrupted.
    """
    return guarded("train", args, lambda: _run_cli(args))


def _cli_words(message: str) -> str:
    """``message`` of the training API with its argument names replaced by this command's options."""
    for api, cli in _CLI_WORDS:
        message = message.replace(api, cli)
    return message


def _run_cli(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (FileExistsError, ValueError, FloatingPointError) as e:
        raise CLIError(_cli_words(" ".join(str(e).split()))) from None
    except KeyboardInterrupt:
        if args.demo:
            how = "rerun `nns train --demo` to continue from the last finished epoch (it resumes from the cache)"
        else:
            with_resume = "with --resume in place of --overwrite" if args.overwrite else "with --resume"
            how = (f"rerun the same command {with_resume} to continue from the last finished epoch "
                   f"(checkpoints in {args.checkpoint_dir})")
        print(f"nns train: interrupted; {how}", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from nns_cuda import models
    from nns_cuda import train as nns_train

    if args.demo:
        hist = nns_train.default_demo_model(args.cache_dir, force=args.overwrite, progress=not args.no_progress,
                                            device=args.device).history
    else:
        train, val, n_cls = _datasets(args)
        x0 = train[0][0]
        model = models.build(args.model, args.num_classes or n_cls, in_channels=int(x0.shape[0]),
                             input_size=tuple(x0.shape[-2:]), seed=args.seed)
        hist = nns_train.fit(model, train, val, epochs=args.epochs, optimizer=args.optimizer, lr=args.lr,
                             momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
                             seed=args.seed, deterministic=not args.no_deterministic,
                             checkpoint_dir=args.checkpoint_dir, resume=args.resume, overwrite=args.overwrite,
                             device=args.device, progress=not args.no_progress, num_workers=args.num_workers,
                             num_threads=args.num_threads, title=f"{args.model} on {args.data}")
    print(hist.summary())
    print(f"well-trained (best val acc): {hist.best_checkpoint}")
    print(f"over-fitted (last):          {hist.last_checkpoint}")
    for k, v in hist.phase_checkpoints().items():
        print(f"phase {k:6s}: {v}")
    print(f"curve: {hist.curve_png}  history: {hist.curve_json}")
    return 0
