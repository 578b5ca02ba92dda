"""The embedded default data set: "cluttered digits".

Made by code in about a second from scikit-learn's bundled handwritten digits
(``sklearn.datasets.load_digits``: 1,797 real 8×8 images, no download). Each digit is
up-scaled bicubically to a random size (10–20 px), given a random light colour, and placed
at a random position (within ±2 px of the centre by default, see :data:`DEFAULT_STYLE`) on
a 32×32 RGB canvas over a darker, textured, coloured background with clutter (random
strokes and fragments of other digits) that stays *outside* the digit's box. The digit's
bounding box — the tight box of its non-zero pixels after up-scaling — is the foreground mask
(docs/spec.md §3).

Determinism and splits
----------------------
* The train / validation / test partition of the 1,797 source digits is fixed (stratified by
  class, 70 / 15 / 15 %, independent of ``seed``), so the splits are disjoint for every seed,
  and the clutter of a split only uses fragments of that split's digits.
* ``seed`` drives the rendering. Each sample has its own random stream seeded by
  ``(seed, version, source index)``, so a sample looks the same whatever subset it is in:
  the small training split is a subset of the full one. Same seed → identical bytes.

Cache
-----
Generated tensors are cached in ``<cache>/cluttered_digits_v<version>_<key>.pt`` where
``<cache>`` is ``cache_dir``, ``$NNS_CACHE_DIR`` or ``~/.cache/nns_cuda`` and ``<key>``
hashes every generation parameter and the source digits. Files are written atomically.
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from nns_cuda.data._io import PathLike, atomic_save, default_cache_dir
from nns_cuda.data.transforms import PairTransform

__all__ = [
    "ClutteredDigits",
    "SplitLoaders",
    "cluttered_digits",
    "cluttered_digits_loaders",
    "generate_cluttered_digits",
    "source_split_indices",
    "interpolation_matrix",
    "GENERATOR_VERSION",
    "SMALL_TRAIN_SIZE",
    "ALPHA_THRESHOLD",
    "DEFAULT_STYLE",
    "SPLITS",
]

#: Bump when the rendering changes: part of the cache key.
GENERATOR_VERSION = 1
#: Fixed seed of the source-digit partition (independent of the rendering seed).
SPLIT_SEED = 20_260_101
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPLITS = ("train", "val", "test")
#: Size of the small training split (``small_train=True``): 30 per class.
SMALL_TRAIN_SIZE = 300
#: Up-scaled intensities below this are set to 0 (bicubic ringing); the remaining non-zero
#: pixels are "the digit's pixels" whose tight box is the foreground.
ALPHA_THRESHOLD = 0.05
#: Rendering style (part of the cache key): background / digit colour ranges per RGB
#: channel, minimum luminance contrast, texture / fine-noise amplitudes, and inclusive
#: ranges of the number of strokes and digit fragments.
#: ``max_shift`` bounds the distance (pixels) of the digit patch's centre from the canvas
#: centre. The defaults give light digits on darker, textured, coloured backgrounds near the
#: centre: with ~1.3k source digits, free placement anywhere on the canvas and both contrast
#: polarities make the task too hard for the thesis's small CNNs (they memorise instead of
#: generalising; measured ~20 % validation accuracy), while these defaults let
#: ``cnn_32_64_64`` reach ~60 % on the 300-sample small split before over-fitting.
DEFAULT_STYLE: Dict[str, Any] = {
    "bg_range": (0.0, 0.55), "digit_range": (0.45, 1.0), "contrast": 0.35,
    "texture": 0.12, "noise": 0.05, "strokes": (1, 3), "fragments": (1, 2),
    "max_shift": 2.0,
}
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test"}


# ----------------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=1)
def _source_digits() -> Tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float64 in [0, 1], labels [1797] int64) from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float64) / 16.0
    labels = np.asarray(d.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def source_split_indices() -> Dict[str, np.ndarray]:
    """Indices into ``load_digits()`` of each split's source digits.

    Returns
    -------
    dict
        ``{"train": int64 [1258], "val": int64 [269], "test": int64 [270]}``, disjoint,
        fixed (independent of the rendering seed). Within a split the order interleaves the
        classes (round-robin over per-class shuffled lists), so the first ``n`` entries are
        class-balanced: the small training split is the first ``n_train`` of them.
    """
    _, labels = _source_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    per_split: Dict[str, List[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_tr = int(round(SPLIT_FRACTIONS[0] * len(idx)))
        n_va = int(round(SPLIT_FRACTIONS[1] * len(idx)))
        per_split["train"].append(idx[:n_tr])
        per_split["val"].append(idx[n_tr:n_tr + n_va])
        per_split["test"].append(idx[n_tr + n_va:])
    out = {}
    for s, lists in per_split.items():
        order: List[int] = []
        for k in range(max(len(a) for a in lists)):
            order.extend(int(a[k]) for a in lists if k < len(a))
        out[s] = np.asarray(order, dtype=np.int64)
    return out


@functools.lru_cache(maxsize=64)
def interpolation_matrix(n_in: int, n_out: int, mode: str = "bicubic") -> np.ndarray:
    """1-D interpolation matrix of ``torch.nn.functional.interpolate``.

    Parameters
    ----------
    n_in, n_out : int
        Input and output lengths.
    mode : {"bicubic", "bilinear"}
        ``align_corners=False``, no anti-aliasing.

    Returns
    -------
    ndarray, shape [n_out, n_in], float64
        ``A`` such that the 2-D interpolation of an ``n_in × n_in`` image ``I`` is
        ``A @ I @ A.T`` (torch's bicubic / bilinear kernels are separable, with border
        indices clamped).
    """
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, 1, n_in)
    out = F.interpolate(eye, size=(1, n_out), mode=mode, align_corners=False)
    a = out.reshape(n_in, n_out).T.contiguous().numpy().copy()
    a.setflags(write=False)
    return a


def _upscale_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """Bicubic up-scaling of an 8×8 digit to ``size × size``, clipped to [0, 1] and
    thresholded at :data:`ALPHA_THRESHOLD`, quantised to uint8 (the stored alpha)."""
    a = interpolation_matrix(digit.shape[0], size, "bicubic")
    up = np.clip(a @ digit @ a.T, 0.0, 1.0)
    up[up < ALPHA_THRESHOLD] = 0.0
    return np.rint(up * 255.0).astype(np.uint8)


def _luminance(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


# ----------------------------------------------------------------------------- rendering
def _render_one(rng: np.random.Generator, digit: np.ndarray, pool: np.ndarray,
                images: np.ndarray, own: int, size: int,
                digit_size: Tuple[int, int], style: Dict[str, Any]) -> Dict[str, Any]:
    """Render one sample. ``images`` are all source digits, ``pool`` the indices of the
    split's digits usable as fragments. Returns uint8 image [3,S,S], uint8 alpha [S,S],
    box, parameters."""
    S = size
    smin, smax = digit_size
    # 1. the digit, up-scaled at a random size and position
    s = int(rng.integers(smin, smax + 1))
    alpha_patch = _upscale_digit(digit, s)
    centre = (S - s) / 2.0
    lo = int(max(0, np.ceil(centre - style["max_shift"])))
    hi = int(min(S - s, np.floor(centre + style["max_shift"])))
    oy, ox = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    alpha = np.zeros((S, S), dtype=np.uint8)
    alpha[oy:oy + s, ox:ox + s] = alpha_patch
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    # clutter may not touch the box nor its 1-pixel margin
    forbidden = np.zeros((S, S), dtype=bool)
    forbidden[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True

    # 2. textured background: a base colour + low-frequency noise + fine noise
    c_bg = rng.uniform(*style["bg_range"], size=3)
    g = int(rng.integers(3, 7))
    low = rng.normal(0.0, style["texture"], size=(3, g, g))
    b = interpolation_matrix(g, S, "bilinear")
    low_up = b @ low @ b.T
    fine = rng.normal(0.0, style["noise"], size=(3, S, S))
    canvas = np.clip(c_bg[:, None, None] + low_up + fine, 0.0, 1.0)

    # 3. digit colour with a luminance contrast to the background
    c_digit = None
    for _ in range(64):
        c = rng.uniform(*style["digit_range"], size=3)
        if abs(_luminance(c) - _luminance(c_bg)) >= style["contrast"]:
            c_digit = c
            break
    if c_digit is None:  # practically never; deterministic fallback
        c_digit = np.ones(3) if _luminance(c_bg) < 0.5 else np.zeros(3)

    # 4. random strokes outside the box
    n_strokes = int(rng.integers(style["strokes"][0], style["strokes"][1] + 1))
    for _ in range(n_strokes):
        p0 = rng.uniform(0.0, S, size=2)
        angle = rng.uniform(0.0, 2 * np.pi)
        length = rng.uniform(4.0, 14.0)
        p1 = p0 + length * np.array([np.sin(angle), np.cos(angle)])
        colour = rng.uniform(0.0, 1.0, size=3)
        opacity = rng.uniform(0.5, 1.0)
        t = np.linspace(0.0, 1.0, int(np.ceil(2 * length)) + 1)
        ys = np.floor(p0[0] + t * (p1[0] - p0[0])).astype(np.int64)
        xs = np.floor(p0[1] + t * (p1[1] - p0[1])).astype(np.int64)
        keep = (ys >= 0) & (ys < S) & (xs >= 0) & (xs < S)
        ys, xs = ys[keep], xs[keep]
        keep = ~forbidden[ys, xs]
        ys, xs = ys[keep], xs[keep]
        if len(ys):
            canvas[:, ys, xs] = (opacity * colour[:, None]
                                 + (1.0 - opacity) * canvas[:, ys, xs])

    # 5. fragments of other digits of the same split, outside the box
    n_frag = int(rng.integers(style["fragments"][0], style["fragments"][1] + 1))
    for _ in range(n_frag):
        j = int(pool[int(rng.integers(len(pool)))])
        if j == own and len(pool) > 1:
            j = int(pool[(int(np.flatnonzero(pool == own)[0]) + 1) % len(pool)])
        t_size = int(rng.integers(smin, smax + 1))
        frag_full = _upscale_digit(images[j], t_size)
        fh = int(rng.integers(4, min(9, t_size + 1)))
        fw = int(rng.integers(4, min(9, t_size + 1)))
        r0 = int(rng.integers(0, t_size - fh + 1))
        c0 = int(rng.integers(0, t_size - fw + 1))
        py = int(rng.integers(0, S - fh + 1))
        px = int(rng.integers(0, S - fw + 1))
        colour = rng.uniform(0.0, 1.0, size=3)
        fa = np.zeros((S, S), dtype=np.float64)
        fa[py:py + fh, px:px + fw] = frag_full[r0:r0 + fh, c0:c0 + fw] / 255.0
        fa[forbidden] = 0.0
        canvas = fa[None] * colour[:, None, None] + (1.0 - fa[None]) * canvas

    # 6. the digit on top
    a = alpha.astype(np.float64)[None] / 255.0
    canvas = a * c_digit[:, None, None] + (1.0 - a) * canvas
    image = np.rint(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
    return {
        "image": image, "alpha": alpha, "box": (x0, y0, x1, y1), "size": s,
        "offset": (oy, ox), "colour": c_digit.astype(np.float32),
    }


def _resolve_style(style: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    out = dict(DEFAULT_STYLE)
    for k, v in (style or {}).items():
        if k not in DEFAULT_STYLE:
            raise ValueError(f"unknown style key {k!r}; known: {', '.join(DEFAULT_STYLE)}")
        out[k] = tuple(v) if isinstance(v, (list, tuple)) else float(v)
    return out


def _cache_key(seed: int, image_size: int, digit_size: Tuple[int, int],
               style: Dict[str, Any]) -> Tuple[str, Dict]:
    images, labels = _source_digits()
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    params = {
        "generator_version": GENERATOR_VERSION, "seed": int(seed),
        "image_size": int(image_size), "digit_size": [int(digit_size[0]), int(digit_size[1])],
        "split_seed": SPLIT_SEED, "split_fractions": list(SPLIT_FRACTIONS),
        "alpha_threshold": ALPHA_THRESHOLD, "sources_sha256": h.hexdigest()[:16],
        "style": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(style.items())},
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return key, params


def _check_generation_args(seed: int, image_size: int, digit_size: Sequence[int]) -> Tuple[int, int]:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if len(digit_size) != 2:
        raise ValueError(f"digit_size must be (min, max), got {digit_size!r}")
    smin, smax = int(digit_size[0]), int(digit_size[1])
    if not (8 <= smin <= smax <= image_size):
        raise ValueError(f"digit_size must satisfy 8 <= min <= max <= image_size={image_size}, "
                         f"got {tuple(digit_size)}")
    return smin, smax


def generate_cluttered_digits(seed: int = 0, *, image_size: int = 32,
                              digit_size: Tuple[int, int] = (10, 20),
                              style: Optional[Dict[str, Any]] = None,
                              splits: Sequence[str] = SPLITS) -> Dict[str, Dict[str, torch.Tensor]]:
    """Render all three splits (no cache).

    Parameters
    ----------
    seed : int
        Rendering seed.
    image_size : int
        Canvas side ``S``.
    digit_size : (int, int)
        Inclusive range of the up-scaled digit's side, in pixels.
    style : dict, optional
        Overrides of :data:`DEFAULT_STYLE`.
    splits : sequence of str
        Which splits to render (each split's samples depend only on the seed, the style and
        that split's digits, so rendering fewer splits gives the same bytes).

    Returns
    -------
    dict
        ``{split: {"images": uint8 [N,3,S,S], "labels": int64 [N], "boxes": int64 [N,4]
        (x0, y0, x1, y1), half-open, "alpha": uint8 [N,S,S] (the digit's opacity ×255; its
        non-zero pixels are the digit's pixels), "source_index": int64 [N] (row of
        load_digits()), "size": int64 [N], "offset": int64 [N,2] (row, col of the up-scaled
        s×s patch), "colour": float32 [N,3]}}``.
    """
    smin, smax = _check_generation_args(seed, image_size, digit_size)
    st = _resolve_style(style)
    images, labels = _source_digits()
    parts = source_split_indices()
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        src = parts[split]
        rendered = [
            _render_one(np.random.default_rng([int(seed), GENERATOR_VERSION, int(i)]),
                        images[i], src, images, int(i), image_size, (smin, smax), st)
            for i in src
        ]
        out[split] = {
            "images": torch.from_numpy(np.stack([r["image"] for r in rendered])),
            "labels": torch.from_numpy(labels[src].copy()),
            "boxes": torch.tensor([r["box"] for r in rendered], dtype=torch.int64),
            "alpha": torch.from_numpy(np.stack([r["alpha"] for r in rendered])),
            "source_index": torch.from_numpy(src.copy()),
            "size": torch.tensor([r["size"] for r in rendered], dtype=torch.int64),
            "offset": torch.tensor([r["offset"] for r in rendered], dtype=torch.int64),
            "colour": torch.from_numpy(np.stack([r["colour"] for r in rendered])),
        }
    return out


def _load_or_generate(seed: int, image_size: int, digit_size: Tuple[int, int],
                      cache_dir: Optional[PathLike], use_cache: bool,
                      style: Optional[Dict[str, Any]]) -> Dict[str, Dict[str, torch.Tensor]]:
    _check_generation_args(seed, image_size, digit_size)
    st = _resolve_style(style)
    key, params = _cache_key(seed, image_size, digit_size, st)
    if not use_cache:
        return generate_cluttered_digits(seed, image_size=image_size, digit_size=digit_size,
                                         style=st)
    path = default_cache_dir(cache_dir) / f"cluttered_digits_v{GENERATOR_VERSION}_{key}.pt"
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("params") == params:
                return blob["splits"]
            warnings.warn(f"cluttered_digits: cache file {path} has other parameters; "
                          "regenerating it", RuntimeWarning, stacklevel=3)
        except Exception as e:  # corrupt / truncated cache: regenerate
            warnings.warn(f"cluttered_digits: cannot read cache file {path} ({e}); "
                          "regenerating it", RuntimeWarning, stacklevel=3)
    data = generate_cluttered_digits(seed, image_size=image_size, digit_size=digit_size,
                                     style=st)
    try:
        atomic_save({"params": params, "splits": data}, path)
    except OSError as e:
        warnings.warn(f"cluttered_digits: cannot write the cache {path} ({e}); "
                      "continuing without it (set NNS_CACHE_DIR or cache_dir=...)",
                      RuntimeWarning, stacklevel=3)
    return data


# ----------------------------------------------------------------------------- dataset
class ClutteredDigits(Dataset):
    """A split of the cluttered-digits data set.

    Items are ``(x, y, fg_mask)``: ``x`` float32 ``[3, S, S]`` in ``[0, 1]`` (``S = 32``
    unless a ``transform`` changes it), ``y`` int in ``0..9``, ``fg_mask`` bool ``[S, S]``,
    the digit's bounding box.

    Attributes
    ----------
    images : Tensor, uint8 [N, 3, S, S]
        The stored images (``x = images / 255`` before any transform).
    labels : Tensor, int64 [N]
    boxes : Tensor, int64 [N, 4]
        ``(x0, y0, x1, y1)``, half-open pixel ranges (columns ``x0..x1-1``, rows
        ``y0..y1-1``), in the 32×32 canvas.
    alpha : Tensor, uint8 [N, S, S]
        The digit's opacity × 255; its non-zero pixels are the digit's pixels.
    source_index : Tensor, int64 [N]
        Row of ``sklearn.datasets.load_digits()`` each sample was rendered from.
    size, offset, colour : Tensor
        Rendering parameters: up-scaled side ``[N]``, top-left ``(row, col)`` of the
        up-scaled patch ``[N, 2]``, digit colour ``[N, 3]``.
    classes : list of str
        ``["0", …, "9"]``.
    split : str
    seed : int
    transform : PairTransform or None
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, tensors: Dict[str, torch.Tensor], split: str, seed: int,
                 transform: Optional[PairTransform] = None) -> None:
        self.images = tensors["images"]
        self.labels = tensors["labels"]
        self.boxes = tensors["boxes"]
        self.alpha = tensors["alpha"]
        self.source_index = tensors["source_index"]
        self.size = tensors["size"]
        self.offset = tensors["offset"]
        self.colour = tensors["colour"]
        self.split = split
        self.seed = seed
        self.transform = transform
        self._masks: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def masks(self) -> torch.Tensor:
        """Foreground masks of the stored images, bool ``[N, S, S]`` (the boxes)."""
        if self._masks is None:
            s = self.images.shape[-1]
            r = torch.arange(s)
            b = self.boxes
            rows = (r[None, :] >= b[:, 1:2]) & (r[None, :] < b[:, 3:4])
            cols = (r[None, :] >= b[:, 0:1]) & (r[None, :] < b[:, 2:3])
            self._masks = rows[:, :, None] & cols[:, None, :]
        return self._masks

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, torch.Tensor]:
        x = self.images[index].to(torch.float32) / 255.0
        y = int(self.labels[index])
        if self.transform is None or self.transform.is_identity:
            return x, y, self.masks[index].clone()
        xt, mt = self.transform(x, self.boxes[index].reshape(1, 4))
        return xt, y, mt

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole split at once.

        Returns
        -------
        x : Tensor, float32 [N, 3, H, W]
        y : Tensor, int64 [N]
        fg_mask : Tensor, bool [N, H, W]
        """
        if self.transform is None or self.transform.is_identity:
            return self.images.to(torch.float32) / 255.0, self.labels.clone(), self.masks.clone()
        xs, ms = [], []
        for i in range(len(self)):
            x, _, m = self[i]
            xs.append(x)
            ms.append(m)
        return torch.stack(xs), self.labels.clone(), torch.stack(ms)

    def subset(self, indices: Union[Sequence[int], torch.Tensor]) -> "ClutteredDigits":
        """A new data set with the given rows (same split / seed / transform)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        t = {k: getattr(self, k)[idx] for k in
             ("images", "labels", "boxes", "alpha", "source_index", "size", "offset", "colour")}
        return ClutteredDigits(t, self.split, self.seed, self.transform)

    def __repr__(self) -> str:
        return (f"ClutteredDigits(split={self.split!r}, seed={self.seed}, n={len(self)}, "
                f"image={tuple(self.images.shape[1:])}, transform={self.transform})")


def cluttered_digits(split: str = "train", seed: int = 0, *, small_train: bool = False,
                     n_train: Optional[int] = None, cache_dir: Optional[PathLike] = None,
                     use_cache: bool = True, transform: Optional[PairTransform] = None,
                     image_size: int = 32, digit_size: Tuple[int, int] = (10, 20),
                     style: Optional[Dict[str, Any]] = None) -> ClutteredDigits:
    """The embedded default data set (see the module docstring).

    Parameters
    ----------
    split : {"train", "val", "test"}
        Fixed, disjoint partition of the source digits (1258 / 269 / 270 samples).
    seed : int
        Rendering seed; same seed → identical bytes.
    small_train : bool
        Use the small training split (:data:`SMALL_TRAIN_SIZE` = 300 samples, 30 per class)
        on which a small CNN over-fits quickly. Only with ``split="train"``.
    n_train : int, optional
        Any other training-subset size (class-balanced first ``n_train`` samples of the
        training order). Only with ``split="train"``; overrides ``small_train``.
    cache_dir : path, optional
        Cache directory (default ``$NNS_CACHE_DIR`` or ``~/.cache/nns_cuda``).
    use_cache : bool
        Read / write the cache (generation takes about a second without it).
    transform : PairTransform, optional
        Geometric transform applied to image and mask, e.g.
        ``PairTransform(upscale_to=224)`` for the 224×224 models (thesis §6.3.1).
    image_size : int
        Canvas side (default 32).
    digit_size : (int, int)
        Inclusive range of the up-scaled digit side (default 10–20 px).
    style : dict, optional
        Overrides of :data:`DEFAULT_STYLE` (colours, contrast, noise, clutter amounts).

    Returns
    -------
    ClutteredDigits
        Items ``(x float32 [3, S, S] in [0, 1], y int, fg_mask bool [S, S])``.
    """
    name = _SPLIT_ALIASES.get(str(split).lower())
    if name is None:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name != "train" and (small_train or n_train is not None):
        raise ValueError("small_train / n_train select a subset of the *training* split; "
                         f"got split={split!r}")
    data = _load_or_generate(seed, image_size, tuple(digit_size), cache_dir, use_cache, style)
    ds = ClutteredDigits(data[name], name, int(seed), transform)
    if name == "train" and (small_train or n_train is not None):
        n = SMALL_TRAIN_SIZE if n_train is None else int(n_train)
        if not 1 <= n <= len(ds):
            raise ValueError(f"n_train must be in 1..{len(ds)}, got {n}")
        ds = ds.subset(torch.arange(n))
    return ds


class SplitLoaders(NamedTuple):
    """Train / validation / test DataLoaders of ``(x [B,3,S,S], y [B], fg_mask [B,S,S])``."""

    train: DataLoader
    val: DataLoader
    test: DataLoader


def cluttered_digits_loaders(seed: int = 0, *, batch_size: int = 64, small_train: bool = False,
                             n_train: Optional[int] = None, shuffle_seed: Optional[int] = None,
                             cache_dir: Optional[PathLike] = None,
                             transform: Optional[PairTransform] = None,
                             num_workers: int = 0) -> SplitLoaders:
    """DataLoaders for the three splits of :func:`cluttered_digits`.

    Parameters
    ----------
    seed : int
        Rendering seed.
    batch_size : int
    small_train, n_train
        Training subset (see :func:`cluttered_digits`).
    shuffle_seed : int, optional
        Seed of the training loader's shuffling generator (default ``seed``); validation and
        test are not shuffled.
    cache_dir, transform
        As :func:`cluttered_digits`.
    num_workers : int

    Returns
    -------
    SplitLoaders
        ``(train, val, test)``; batches are ``(x float32 [B,3,H,W], y int64 [B],
        fg_mask bool [B,H,W])``.
    """
    g = torch.Generator().manual_seed(int(seed if shuffle_seed is None else shuffle_seed))
    common = dict(cache_dir=cache_dir, transform=transform)
    train = cluttered_digits("train", seed, small_train=small_train, n_train=n_train, **common)
    val = cluttered_digits("val", seed, **common)
    test = cluttered_digits("test", seed, **common)
    return SplitLoaders(
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g,
                   num_workers=num_workers),
        DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers),
        DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=num_workers),
    )
