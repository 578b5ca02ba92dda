"""Loaders for users' own data, all yielding ``(x, y, fg_mask)``.

* :class:`ImageFolderBoxes` — a torchvision ``ImageFolder`` tree (``root/<class>/<image>``)
  with Pascal-VOC XML boxes (``<stem>.xml`` next to the image, or in an annotation folder).
* :class:`CocoBoxes` — a folder of images and a COCO-style JSON file (``images``,
  ``annotations`` with ``bbox = [x, y, w, h]``, ``categories``).
* :class:`CifarFolder` — CIFAR-10 / CIFAR-100 from the local "python version" pickles (no
  download); the whole image is the foreground unless boxes are given.

All three apply one :class:`~nns_cuda.data.transforms.PairTransform` to the image and, in
continuous coordinates, to the boxes, so the mask of the output is the transformed box.
Boxes are validated when the data set is built: a box outside its image raises a
:class:`BoxOutOfImageError` naming the file and the box. Nothing is silently skipped.
"""
from __future__ import annotations

import json
import math
import pickle
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nns_cuda.data._io import PathLike
from nns_cuda.data.transforms import PairTransform

__all__ = [
    "DataFormatError",
    "BoxOutOfImageError",
    "ImageFolderBoxes",
    "CocoBoxes",
    "CifarFolder",
    "read_voc_xml",
    "load_image",
    "make_loaders",
    "IMG_EXTENSIONS",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataFormatError(ValueError):
    """A data or annotation file is unreadable or does not have the expected format."""


class BoxOutOfImageError(DataFormatError):
    """A box lies (partly) outside its image, or is empty."""


# ----------------------------------------------------------------------------- images
def _pil_mode(channels: int) -> str:
    if channels == 3:
        return "RGB"
    if channels == 1:
        return "L"
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def image_size(path: PathLike) -> Tuple[int, int]:
    """``(height, width)`` of an image file, reading only its header.

    Raises
    ------
    FileNotFoundError, DataFormatError
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataFormatError(f"cannot read image {path}: {e}") from e
    return int(h), int(w)


def load_image(path: PathLike, channels: int = 3) -> torch.Tensor:
    """Read an image file into a float tensor.

    Parameters
    ----------
    path : path
    channels : {3, 1}
        RGB or grey.

    Returns
    -------
    Tensor, float32 [channels, H, W] in [0, 1]

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    DataFormatError
        The file is not a readable image (corrupt or truncated), naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert(_pil_mode(channels)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataFormatError(f"cannot read image {path}: {e}") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32) / 255.0


# ----------------------------------------------------------------------------- base class
class _Sample(NamedTuple):
    source: Any            # path or index
    label: int
    boxes: torch.Tensor    # [K, 4] float64, continuous coordinates of the original image
    height: int
    width: int


def _check_box(box: Sequence[float], height: int, width: int, where: str,
               what: str, tol: float = 0.0) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise BoxOutOfImageError(f"{where}: {what} has non-finite coordinates")
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise BoxOutOfImageError(
            f"{where}: {what} lies outside the image of width {width} and height {height}")
    if x1 <= x0 or y1 <= y0:
        raise BoxOutOfImageError(f"{where}: {what} is empty (x1 <= x0 or y1 <= y0)")


class _BoxDataset(Dataset):
    """Shared ``__getitem__`` / ``__len__`` of the loaders."""

    classes: List[str]
    samples: List[_Sample]
    transform: PairTransform
    channels: int

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, sample: _Sample) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, torch.Tensor]:
        s = self.samples[index]
        img = self._read(s)
        if tuple(img.shape[-2:]) != (s.height, s.width):
            raise DataFormatError(f"{s.source}: image is {img.shape[-2]}x{img.shape[-1]} "
                                  f"(h x w) but was {s.height}x{s.width} when indexed")
        x, mask = self.transform(img, s.boxes)
        return x, s.label, mask

    @property
    def targets(self) -> List[int]:
        """Class index of every sample."""
        return [s.label for s in self.samples]

    def boxes(self, index: int) -> torch.Tensor:
        """Boxes of sample ``index`` in *output* coordinates, float64 ``[K, 4]``."""
        s = self.samples[index]
        return self.transform.transform_boxes(s.boxes, s.height, s.width)


# ----------------------------------------------------------------------------- VOC
def read_voc_xml(path: PathLike, *, box_origin: int = 1,
                 image_hw: Optional[Tuple[int, int]] = None,
                 image_name: Optional[str] = None) -> Tuple[List[str], torch.Tensor]:
    """Read a Pascal-VOC annotation file.

    Parameters
    ----------
    path : path
        The ``.xml`` file.
    box_origin : {1, 0}
        VOC boxes are 1-based inclusive pixel indices (``xmin=1`` is the first column); the
        continuous box is ``[xmin - 1, xmax)``. ILSVRC-DET style files are 0-based
        (``[xmin, xmax + 1)``): pass 0.
    image_hw : (int, int), optional
        The real image size; boxes are checked against it, and against the file's ``<size>``.
    image_name : str, optional
        Used in error messages.

    Returns
    -------
    names : list of str
        ``<name>`` of each object.
    boxes : Tensor, float64 [K, 4]
        Continuous ``(x0, y0, x1, y1)``.

    Raises
    ------
    FileNotFoundError, DataFormatError, BoxOutOfImageError
    """
    path = Path(path)
    if box_origin not in (0, 1):
        raise ValueError(f"box_origin must be 0 or 1, got {box_origin}")
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataFormatError(f"cannot parse VOC annotation {path}: {e}") from e
    where = f"{path}" + (f" (image {image_name})" if image_name else "")
    size = root.find("size")
    if size is not None and image_hw is not None:
        try:
            w_x = int(float(size.findtext("width", "nan")))
            h_x = int(float(size.findtext("height", "nan")))
        except ValueError:
            w_x = h_x = -1
        if (w_x > 0 and h_x > 0) and (h_x, w_x) != tuple(image_hw):
            raise DataFormatError(
                f"{where}: <size> says {w_x}x{h_x} (w x h) but the image is "
                f"{image_hw[1]}x{image_hw[0]}; the boxes refer to another resolution")
    names: List[str] = []
    boxes: List[Tuple[float, float, float, float]] = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            raise DataFormatError(f"{where}: object {k} ({name!r}) has no <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(t)) for t in  # type: ignore[arg-type]
                                      ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as e:
            raise DataFormatError(f"{where}: object {k} ({name!r}) has a missing or "
                                  f"non-numeric <bndbox> coordinate") from e
        off = 1.0 if box_origin == 1 else 0.0
        box = (xmin - off, ymin - off, xmax + 1.0 - off, ymax + 1.0 - off)
        if image_hw is not None:
            hint = ("" if box_origin == 0 or min(xmin, ymin) >= 1 else
                    "; VOC boxes are 1-based (pass box_origin=0 for 0-based files)")
            _check_box(box, image_hw[0], image_hw[1], where,
                       f"object {k} ({name!r}) box xmin={xmin:g} ymin={ymin:g} "
                       f"xmax={xmax:g} ymax={ymax:g}{hint}")
        names.append(name)
        boxes.append(box)
    return names, torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)


class ImageFolderBoxes(_BoxDataset):
    """A torchvision ``ImageFolder`` tree with Pascal-VOC boxes.

    Layout: ``root/<class>/<name>.<ext>`` (classes sorted alphabetically, as ImageFolder); the
    annotation of ``root/<class>/<name>.<ext>`` is the first existing of
    ``annotations/<class>/<name>.xml``, ``annotations/<name>.xml`` (``annotations`` defaults
    to ``root``).

    Parameters
    ----------
    root : path
    annotations : path, optional
        Folder of the XML files (default: next to the images).
    transform : PairTransform, optional
        Applied to image and boxes (default: none).
    channels : {3, 1}
    box_origin : {1, 0}
        See :func:`read_voc_xml`.
    foreground : {"all", "class"}
        Union of all objects' boxes, or only of those whose ``<name>`` is the image's class
        folder name.
    missing : {"error", "whole"}
        An image without an XML file (or without objects) raises an error, or gets the whole
        image as its foreground.

    Items
    -----
    ``(x float32 [C, H, W], y int, fg_mask bool [H, W])``
    """

    def __init__(self, root: PathLike, annotations: Optional[PathLike] = None, *,
                 transform: Optional[PairTransform] = None, channels: int = 3,
                 box_origin: int = 1, foreground: str = "all", missing: str = "error") -> None:
        from torchvision.datasets.folder import find_classes, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolderBoxes: root folder not found: {root}")
        if foreground not in ("all", "class"):
            raise ValueError(f"foreground must be 'all' or 'class', got {foreground!r}")
        if missing not in ("error", "whole"):
            raise ValueError(f"missing must be 'error' or 'whole', got {missing!r}")
        _pil_mode(channels)
        ann_root = Path(annotations) if annotations is not None else root
        if not ann_root.is_dir():
            raise FileNotFoundError(f"ImageFolderBoxes: annotation folder not found: {ann_root}")
        self.root, self.annotations = root, ann_root
        self.transform = transform or PairTransform()
        self.channels = channels
        self.classes, self.class_to_idx = find_classes(str(root))
        items = make_dataset(str(root), self.class_to_idx, extensions=IMG_EXTENSIONS)
        self.samples = []
        for path_s, label in items:
            path = Path(path_s)
            cls = self.classes[label]
            h, w = image_size(path)
            xml = next((p for p in (ann_root / cls / (path.stem + ".xml"),
                                    ann_root / (path.stem + ".xml")) if p.is_file()), None)
            if xml is None:
                if missing == "error":
                    raise FileNotFoundError(
                        f"no VOC annotation for image {path}: looked for "
                        f"{ann_root / cls / (path.stem + '.xml')} and "
                        f"{ann_root / (path.stem + '.xml')} (pass missing='whole' to use the "
                        "whole image as foreground)")
                boxes = torch.tensor([[0.0, 0.0, w, h]], dtype=torch.float64)
            else:
                names, boxes = read_voc_xml(xml, box_origin=box_origin, image_hw=(h, w),
                                            image_name=str(path))
                if foreground == "class":
                    keep = [i for i, n in enumerate(names) if n == cls]
                    boxes = boxes[keep]
                if boxes.shape[0] == 0:
                    if missing == "error":
                        which = f" of class {cls!r}" if foreground == "class" else ""
                        raise DataFormatError(
                            f"{xml}: no object boxes{which} for image {path} "
                            "(pass missing='whole' to use the whole image)")
                    boxes = torch.tensor([[0.0, 0.0, w, h]], dtype=torch.float64)
            self.samples.append(_Sample(path, label, boxes, h, w))

    def _read(self, sample: _Sample) -> torch.Tensor:
        return load_image(sample.source, self.channels)


# ----------------------------------------------------------------------------- COCO
class CocoBoxes(_BoxDataset):
    """Images with COCO-style JSON boxes, one sample per image.

    Parameters
    ----------
    images_dir : path
        Folder holding the ``file_name`` of every image entry.
    annotation_file : path
        JSON with ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations``
        (``image_id``, ``category_id``, ``bbox = [x, y, w, h]`` in continuous pixel
        coordinates) and ``categories`` (``id``, ``name``).
    transform : PairTransform, optional
    channels : {3, 1}
    foreground : {"all", "label"}
        Union of all the image's boxes, or of the boxes of its label's category.
    unannotated : {"error", "skip"}
        An image without annotations raises an error or is left out (and listed in
        ``self.skipped``).

    Notes
    -----
    The label of an image is the category of its largest box (area), as a class index into
    ``self.classes`` (categories sorted by id).
    """

    def __init__(self, images_dir: PathLike, annotation_file: PathLike, *,
                 transform: Optional[PairTransform] = None, channels: int = 3,
                 foreground: str = "all", unannotated: str = "error") -> None:
        images_dir, ann = Path(images_dir), Path(annotation_file)
        if not images_dir.is_dir():
            raise FileNotFoundError(f"CocoBoxes: image folder not found: {images_dir}")
        if not ann.is_file():
            raise FileNotFoundError(f"CocoBoxes: annotation file not found: {ann}")
        if foreground not in ("all", "label"):
            raise ValueError(f"foreground must be 'all' or 'label', got {foreground!r}")
        if unannotated not in ("error", "skip"):
            raise ValueError(f"unannotated must be 'error' or 'skip', got {unannotated!r}")
        _pil_mode(channels)
        try:
            doc = json.loads(ann.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataFormatError(f"cannot parse COCO annotation file {ann}: {e}") from e
        if not isinstance(doc, dict):
            raise DataFormatError(f"{ann}: expected a JSON object at the top level")
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc.get(key), list):
                raise DataFormatError(f"{ann}: missing or non-list key {key!r}")
        self.transform = transform or PairTransform()
        self.channels = channels
        try:
            cats = sorted(doc["categories"], key=lambda c: c["id"])
            self.category_ids = [int(c["id"]) for c in cats]
            self.classes = [str(c.get("name", c["id"])) for c in cats]
        except (KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"{ann}: every category needs an 'id' ({e})") from e
        cat_index = {cid: i for i, cid in enumerate(self.category_ids)}
        images: Dict[int, Dict[str, Any]] = {}
        for k, im in enumerate(doc["images"]):
            try:
                images[int(im["id"])] = im
                str(im["file_name"])
            except (KeyError, TypeError, ValueError) as e:
                raise DataFormatError(f"{ann}: images[{k}] needs 'id' and 'file_name'") from e
        per_image: Dict[int, List[Tuple[float, float, float, float, int]]] = {i: [] for i in images}
        for k, a in enumerate(doc["annotations"]):
            try:
                iid, cid = int(a["image_id"]), int(a["category_id"])
                x, y, w, h = (float(v) for v in a["bbox"])
            except (KeyError, TypeError, ValueError) as e:
                raise DataFormatError(f"{ann}: annotations[{k}] needs 'image_id', "
                                      "'category_id' and bbox [x, y, w, h]") from e
            if iid not in images:
                raise DataFormatError(f"{ann}: annotations[{k}] refers to unknown image_id {iid}")
            if cid not in cat_index:
                raise DataFormatError(f"{ann}: annotations[{k}] refers to unknown "
                                      f"category_id {cid}")
            per_image[iid].append((x, y, x + w, y + h, cat_index[cid]))
        self.samples = []
        self.skipped: List[str] = []
        for iid in sorted(images):
            im = images[iid]
            path = images_dir / str(im["file_name"])
            h, w = image_size(path)
            if "width" in im and "height" in im and (int(im["height"]), int(im["width"])) != (h, w):
                raise DataFormatError(
                    f"{ann}: image {path} is listed as {im['width']}x{im['height']} (w x h) but "
                    f"is {w}x{h}; the boxes refer to another resolution")
            anns = per_image[iid]
            if not anns:
                if unannotated == "error":
                    raise DataFormatError(f"{ann}: image {path} (id {iid}) has no annotations "
                                          "(pass unannotated='skip' to leave it out)")
                self.skipped.append(str(path))
                continue
            for x0, y0, x1, y1, _ in anns:
                _check_box((x0, y0, x1, y1), h, w, f"{ann} (image {path})",
                           f"bbox [x={x0:g}, y={y0:g}, w={x1 - x0:g}, h={y1 - y0:g}]",
                           tol=1e-3)
            areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in anns]
            label = anns[int(np.argmax(areas))][4]
            chosen = anns if foreground == "all" else [b for b in anns if b[4] == label]
            boxes = torch.tensor([b[:4] for b in chosen], dtype=torch.float64)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            self.samples.append(_Sample(path, label, boxes, h, w))

    def _read(self, sample: _Sample) -> torch.Tensor:
        return load_image(sample.source, self.channels)


# ----------------------------------------------------------------------------- CIFAR
class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR "python version" files: only plain containers and numpy
    arrays, never arbitrary code (a pickle can otherwise run anything)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def _load_cifar_pickle(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ...
        raise DataFormatError(f"cannot read CIFAR pickle {path}: {e}") from e
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


class CifarFolder(_BoxDataset):
    """CIFAR-10 / CIFAR-100 from the local "python version" folder (no download).

    Parameters
    ----------
    root : path
        ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or
        ``cifar-100-python`` (``train``, ``test``, ``meta``), or a folder containing one.
    split : {"train", "test"}
    label : {"fine", "coarse"}
        CIFAR-100 label set (ignored for CIFAR-10).
    boxes : mapping or path, optional
        Foreground boxes per sample: ``{index: [[x0, y0, x1, y1], ...]}`` in continuous
        32×32 pixel coordinates, or a JSON file with that content (keys as strings). Samples
        without an entry use the whole image.
    transform : PairTransform, optional
        E.g. ``PairTransform(upscale_to=224)`` (thesis §6.3.1).

    Notes
    -----
    Pickles are read with a restricted unpickler that only accepts containers and numpy
    arrays.
    """

    def __init__(self, root: PathLike, split: str = "train", *, label: str = "fine",
                 boxes: Optional[Union[PathLike, Mapping[Any, Sequence[Sequence[float]]]]] = None,
                 transform: Optional[PairTransform] = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"CifarFolder: folder not found: {root}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if label not in ("fine", "coarse"):
            raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
        folder = next((d for d in (root, root / "cifar-10-batches-py", root / "cifar-100-python")
                       if (d / "batches.meta").is_file() or (d / "meta").is_file()), None)
        if folder is None:
            raise FileNotFoundError(
                f"CifarFolder: no CIFAR meta file under {root}: expected batches.meta "
                "(CIFAR-10) or meta (CIFAR-100), possibly in cifar-10-batches-py/ or "
                "cifar-100-python/")
        self.root = folder
        self.transform = transform or PairTransform()
        self.channels = 3
        if (folder / "batches.meta").is_file():
            self.variant = "cifar10"
            meta = _load_cifar_pickle(folder / "batches.meta")
            names_key, label_key = "label_names", "labels"
            files = ([folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train"
                     else [folder / "test_batch"])
        else:
            self.variant = "cifar100"
            meta = _load_cifar_pickle(folder / "meta")
            names_key = "fine_label_names" if label == "fine" else "coarse_label_names"
            label_key = "fine_labels" if label == "fine" else "coarse_labels"
            files = [folder / split]
        if names_key not in meta:
            raise DataFormatError(f"{folder}: meta file lacks {names_key!r}")
        self.classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n)
                        for n in meta[names_key]]
        datas, labels = [], []
        for f in files:
            d = _load_cifar_pickle(f)
            if "data" not in d or label_key not in d:
                raise DataFormatError(f"{f}: expected keys 'data' and {label_key!r}, "
                                      f"got {sorted(d)}")
            arr = np.asarray(d["data"])
            lab = np.asarray(d[label_key], dtype=np.int64)
            if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3072:
                raise DataFormatError(f"{f}: 'data' must be uint8 [N, 3072], got "
                                      f"{arr.dtype} {list(arr.shape)}")
            if lab.shape != (arr.shape[0],):
                raise DataFormatError(f"{f}: {arr.shape[0]} images but {lab.shape[0]} labels")
            if lab.size and (lab.min() < 0 or lab.max() >= len(self.classes)):
                raise DataFormatError(f"{f}: labels outside 0..{len(self.classes) - 1}")
            datas.append(arr)
            labels.append(lab)
        self.data = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32).copy())
        self.labels = torch.from_numpy(np.concatenate(labels))
        box_map = self._read_boxes(boxes)
        whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]], dtype=torch.float64)
        self.samples = []
        src = str(boxes) if boxes is not None and not isinstance(boxes, Mapping) else "boxes"
        for i in range(len(self.labels)):
            b = box_map.pop(i, None)
            if b is None:
                bt = whole
            else:
                bt = torch.tensor(b, dtype=torch.float64).reshape(-1, 4)
                for k, bb in enumerate(bt.tolist()):
                    _check_box(bb, 32, 32, f"{src} (sample {i} of {folder / split})",
                               f"box {k} {[round(v, 3) for v in bb]}")
            self.samples.append(_Sample(i, int(self.labels[i]), bt, 32, 32))
        if box_map:
            raise DataFormatError(f"{src}: boxes given for samples that do not exist: "
                                  f"{sorted(box_map)[:5]} (the split has {len(self.labels)})")

    @staticmethod
    def _read_boxes(boxes: Any) -> Dict[int, Any]:
        if boxes is None:
            return {}
        if not isinstance(boxes, Mapping):
            p = Path(boxes)
            if not p.is_file():
                raise FileNotFoundError(f"CifarFolder: box file not found: {p}")
            try:
                boxes = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataFormatError(f"cannot parse box file {p}: {e}") from e
            if not isinstance(boxes, dict):
                raise DataFormatError(f"{p}: expected a JSON object {{index: [[x0,y0,x1,y1]]}}")
        try:
            return {int(k): v for k, v in boxes.items()}
        except ValueError as e:
            raise DataFormatError(f"box keys must be sample indices: {e}") from e

    def _read(self, sample: _Sample) -> torch.Tensor:
        return self.data[sample.source].to(torch.float32) / 255.0


# ----------------------------------------------------------------------------- loaders
def make_loaders(train: Dataset, val: Optional[Dataset] = None, test: Optional[Dataset] = None,
                 *, batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0) -> Dict[str, DataLoader]:
    """DataLoaders for given data sets; the training loader shuffles with a seeded generator.

    Returns
    -------
    dict
        ``{"train": …, "val": …, "test": …}`` (only the data sets given); batches are
        ``(x [B,C,H,W], y [B], fg_mask [B,H,W])``.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = {"train": DataLoader(train, batch_size=batch_size, shuffle=True, generator=g,
                               num_workers=num_workers)}
    for name, ds in (("val", val), ("test", test)):
        if ds is not None:
            out[name] = DataLoader(ds, batch_size=batch_size, shuffle=False,
                                   num_workers=num_workers)
    return out
