"""Tests of the embedded data set (cluttered digits), the pair transform and the loaders.

Oracles that share no code with the implementation: scikit-learn's digits with a numpy
re-implementation of the bicubic (Keys, a = -0.75) kernel; torchvision.transforms.v2 for
resize / centre crop of images, masks and boxes; hand-written fixture files (PNG via PIL,
VOC XML, COCO JSON, CIFAR pickles).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nns_cuda import data
from nns_cuda.data import cluttered as C
from nns_cuda.data.loaders import BoxOutOfImageError, DataFormatError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nns_cache")


@pytest.fixture(scope="module")
def splits(cache):
    return {s: data.cluttered_digits(s, seed=0, cache_dir=cache) for s in ("train", "val", "test")}


def _images_digest(d) -> str:
    h = hashlib.sha256()
    for s in ("train", "val", "test"):
        for k in ("images", "labels", "boxes", "alpha"):
            h.update(d[s][k].numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def keys_bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """Independent bicubic (Keys) interpolation matrix, half-pixel centres, clamped borders."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        f = np.floor(src)
        t = src - f
        for k in range(-1, 3):
            d = abs(t - k)
            if d <= 1:
                w = (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
            elif d < 2:
                w = a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
            else:
                w = 0.0
            m[i, int(min(max(f + k, 0), n_in - 1))] += w
    return m


# ----------------------------------------------------------------------------- generation
def test_generation_is_deterministic_across_processes_and_seed_dependent(splits):
    fresh = data.generate_cluttered_digits(0, splits=("val", "test"))
    # in-process: same seed -> identical bytes, identical to what the cache returned
    for s in ("val", "test"):
        for k in ("images", "labels", "boxes", "alpha", "source_index"):
            assert torch.equal(fresh[s][k], getattr(splits[s], k))
    # another process with another hash seed renders the same bytes
    code = ("import hashlib; from nns_cuda import data\n"
            "d = data.generate_cluttered_digits(0, splits=('val',))['val']\n"
            "print(hashlib.sha256(d['images'].numpy().tobytes()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    assert out.stdout.strip() == hashlib.sha256(splits["val"].images.numpy().tobytes()).hexdigest()
    # a different seed renders different images from the same source digits
    other = data.generate_cluttered_digits(1, splits=("val",))["val"]
    assert torch.equal(other["source_index"], splits["val"].source_index)
    assert (other["images"] == splits["val"].images).float().mean().item() < 0.2
    assert not torch.equal(other["boxes"], splits["val"].boxes)


def test_boxes_are_tight_boxes_of_the_digit_recomputed_independently(splits):
    from sklearn.datasets import load_digits

    digits = load_digits().images / 16.0
    for ds in (splits["val"], splits["train"].subset(torch.arange(300))):
        S = ds.images.shape[-1]
        for i in range(len(ds)):
            s = int(ds.size[i])
            oy, ox = (int(v) for v in ds.offset[i])
            assert 10 <= s <= 20
            centre = (S - s) / 2
            assert abs(oy - centre) <= 2 and abs(ox - centre) <= 2
            m = keys_bicubic_matrix(8, s)
            up = np.clip(m @ digits[int(ds.source_index[i])] @ m.T, 0, 1)
            up[up < C.ALPHA_THRESHOLD] = 0
            alpha = np.zeros((S, S))
            alpha[oy:oy + s, ox:ox + s] = np.rint(up * 255)
            stored = ds.alpha[i].numpy().astype(np.float64)
            assert np.abs(stored - alpha).max() <= 1
            assert np.array_equal(stored > 0, alpha > 0)
            rows = np.flatnonzero(alpha.any(1))
            cols = np.flatnonzero(alpha.any(0))
            box = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
            assert ds.boxes[i].tolist() == box
            mask = ds.masks[i].numpy()
            expect = np.zeros((S, S), bool)
            expect[box[1]:box[3], box[0]:box[2]] = True
            assert np.array_equal(mask, expect)
            assert not (alpha > 0)[~mask].any()          # every digit pixel is in the box
            # fully opaque digit pixels carry the digit colour
            opaque = stored == 255
            if opaque.any():
                img = ds.images[i].numpy().astype(np.float64)
                diff = np.abs(img[:, opaque] - 255 * ds.colour[i].numpy()[:, None].astype(np.float64))
                assert diff.max() <= 0.51
        x, _, fg = ds.tensors()
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_splits_are_fixed_disjoint_stratified_and_small_split_is_a_subset(splits, cache):
    from sklearn.datasets import load_digits

    target = load_digits().target
    idx = {s: set(ds.source_index.tolist()) for s, ds in splits.items()}
    assert not (idx["train"] & idx["val"]) and not (idx["train"] & idx["test"])
    assert not (idx["val"] & idx["test"])
    assert len(idx["train"] | idx["val"] | idx["test"]) == 1797
    for ds in splits.values():
        assert np.array_equal(ds.labels.numpy(), target[ds.source_index.numpy()])
    # the partition does not depend on the rendering seed
    other = data.generate_cluttered_digits(3)
    for s in ("train", "val", "test"):
        assert torch.equal(other[s]["source_index"], splits[s].source_index)
    small = data.cluttered_digits("train", seed=0, small_train=True, cache_dir=cache)
    assert len(small) == data.SMALL_TRAIN_SIZE == 300
    assert np.bincount(small.labels.numpy(), minlength=10).tolist() == [30] * 10
    assert torch.equal(small.images, splits["train"].images[:300])
    n37 = data.cluttered_digits("train", seed=0, n_train=37, cache_dir=cache)
    assert len(n37) == 37 and np.bincount(n37.labels.numpy()).max() <= 4


def test_items_loaders_and_transform(splits, cache):
    ds = splits["test"]
    x, y, m = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y <= 9
    assert m.shape == (32, 32) and m.dtype == torch.bool
    assert torch.equal(x, ds.images[5].float() / 255)
    lo = data.cluttered_digits_loaders(seed=0, batch_size=16, n_train=40, cache_dir=cache)
    xb, yb, mb = next(iter(lo.train))
    assert xb.shape == (16, 3, 32, 32) and yb.dtype == torch.int64 and mb.shape == (16, 32, 32)
    assert len(lo.train.dataset) == 40 and len(lo.val.dataset) == len(splits["val"])
    # 224x224 bicubic up-scaling (thesis §6.3.1): 224 = 7 * 32, so the box scales by 7 exactly
    up = data.cluttered_digits("test", seed=0, cache_dir=cache,
                               transform=data.PairTransform(upscale_to=224))
    xu, yu, mu = up[5]
    assert xu.shape == (3, 224, 224) and yu == y and 0 <= xu.min() and xu.max() <= 1
    x0, y0, x1, y1 = ds.boxes[5].tolist()
    expect = torch.zeros(224, 224, dtype=torch.bool)
    expect[7 * y0:7 * y1, 7 * x0:7 * x1] = True
    assert torch.equal(mu, expect)


def test_cache_is_keyed_reused_atomic_and_recovers_from_corruption(cache, splits, tmp_path,
                                                                   monkeypatch):
    (name,) = [p.name for p in cache.iterdir() if p.name.startswith("cluttered_digits_")]
    assert name.startswith(f"cluttered_digits_v{C.GENERATOR_VERSION}_") and name.endswith(".pt")
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    # the key covers every generation parameter
    st = C._resolve_style(None)
    k0 = C._cache_key(0, 32, (10, 20), st)[0]
    assert name == f"cluttered_digits_v{C.GENERATOR_VERSION}_{k0}.pt"
    assert len({k0, C._cache_key(1, 32, (10, 20), st)[0], C._cache_key(0, 32, (12, 20), st)[0],
                C._cache_key(0, 32, (10, 20), C._resolve_style({"noise": 0.1}))[0]}) == 4
    # $NNS_CACHE_DIR is honoured and a cached file is read, not regenerated
    (tmp_path / name).write_bytes((cache / name).read_bytes())
    monkeypatch.setenv("NNS_CACHE_DIR", str(tmp_path))
    with monkeypatch.context() as mp:
        mp.setattr(C, "generate_cluttered_digits",
                   lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
        b = data.cluttered_digits("val", seed=0)
    assert torch.equal(b.images, splits["val"].images)
    # a corrupt file is regenerated (with a warning) and rewritten
    (tmp_path / name).write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="cannot read cache file"):
        c = data.cluttered_digits("val", seed=0)
    assert torch.equal(c.images, splits["val"].images)
    assert torch.load(tmp_path / name, weights_only=True)["params"]["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_cluttered_digits_bad_arguments(cache):
    with pytest.raises(ValueError, match="split must be one of"):
        data.cluttered_digits("training", cache_dir=cache)
    with pytest.raises(ValueError, match="training"):
        data.cluttered_digits("val", small_train=True, cache_dir=cache)
    with pytest.raises(ValueError, match="n_train must be in 1..1258"):
        data.cluttered_digits("train", n_train=5000, cache_dir=cache)
    with pytest.raises(ValueError, match="unknown style key 'colour'"):
        data.cluttered_digits("val", style={"colour": 1}, use_cache=False)
    with pytest.raises(ValueError, match="seed"):
        data.cluttered_digits("val", seed=-1, cache_dir=cache)


# ----------------------------------------------------------------------------- transforms
def test_pair_transform_agrees_with_torchvision_v2():
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 30, 50, generator=g)
    box = torch.tensor([[7.0, 4.0, 31.0, 19.0]])  # x0, y0, x1, y1
    for resize, crop in ((20, 18), ((15, 25), (10, 20)), ((60, 100), 44), (None, (30, 30))):
        tf = data.PairTransform(resize=resize, center_crop=crop)
        out, mask = tf(img, box)
        ref = img
        steps = []
        if resize is not None:
            steps.append(v2.Resize(resize, antialias=True))
        steps.append(v2.CenterCrop(crop))
        pipe = v2.Compose(steps)
        bb = tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(30, 50))
        full = torch.zeros(1, 30, 50, dtype=torch.uint8)
        full[:, 4:19, 7:31] = 1
        r_img, r_box, r_mask = pipe(ref, bb, tv_tensors.Mask(full))
        assert out.shape == r_img.shape
        torch.testing.assert_close(out, r_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(tf.transform_boxes(box, 30, 50).float(),
                                   r_box.as_subclass(torch.Tensor).float(), atol=1e-4, rtol=0)
        # the mask is the rasterised transformed box (pixel-centre rule)
        bx0, by0, bx1, by1 = tf.transform_boxes(box, 30, 50)[0].tolist()
        yy, xx = torch.meshgrid(torch.arange(out.shape[1]) + 0.5,
                                torch.arange(out.shape[2]) + 0.5, indexing="ij")
        assert torch.equal(mask, (xx >= bx0) & (xx < bx1) & (yy >= by0) & (yy < by1))
        # and agrees with torchvision's nearest-neighbour mask except on the box border
        diff = mask ^ r_mask[0].bool()
        border = torch.zeros_like(mask)
        for v in (bx0, bx1):
            border[:, max(int(v) - 1, 0):int(v) + 1] = True
        for v in (by0, by1):
            border[max(int(v) - 1, 0):int(v) + 1, :] = True
        assert not (diff & ~border).any()
    # by hand: halving maps the box to [3.5, 15.5) x [2, 9.5); pixel centres j + 0.5 in it
    # are columns 3..14 and rows 2..8
    tf = data.PairTransform(resize=(15, 25))
    _, mask = tf(img, box)
    expect = torch.zeros(15, 25, dtype=torch.bool)
    expect[2:9, 3:15] = True
    assert torch.equal(mask, expect)
    # bicubic up-scaling equals torchvision's bicubic resize (clamped)
    small = torch.rand(3, 32, 32, generator=g)
    out, _ = data.PairTransform(upscale_to=224)(small, torch.tensor([[0.0, 0, 32, 32]]))
    ref = TF.resize(small, [224, 224], interpolation=v2.InterpolationMode.BICUBIC,
                    antialias=False).clamp(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="larger than the image"):
        data.PairTransform(center_crop=64)(small, torch.tensor([[0.0, 0, 32, 32]]))


# ----------------------------------------------------------------------------- loaders
def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _voc(path: Path, w: int, h: int, objects) -> None:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
        f"<ymax>{d}</ymax></bndbox></object>" for n, (a, b, c, d) in objects)
    path.write_text(f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth>"
                    f"</size>{objs}</annotation>")


def _box_image(h: int, w: int, box, seed: int) -> np.ndarray:
    """Dark random image with a bright rectangle at the half-open box (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 250
    return arr


def test_imagefolder_with_voc_boxes(tmp_path):
    root = tmp_path / "train"
    specs = {("cat", "a"): (40, 30, (5, 6, 20, 18)), ("cat", "b"): (40, 30, (0, 0, 40, 30)),
             ("dog", "c"): (24, 36, (10, 3, 22, 33))}
    arrays = {}
    for (cls, name), (w, h, box) in specs.items():
        arr = _box_image(h, w, box, seed=len(arrays))
        arrays[(cls, name)] = arr
        _png(root / cls / f"{name}.png", arr)
        x0, y0, x1, y1 = box  # half-open -> VOC 1-based inclusive
        _voc(root / cls / f"{name}.xml", w, h, [(cls, (x0 + 1, y0 + 1, x1, y1))])
    ds = data.ImageFolderBoxes(root)
    assert ds.classes == ["cat", "dog"] and len(ds) == 3 and ds.targets == [0, 0, 1]
    for i, ((cls, name), (w, h, box)) in enumerate(sorted(specs.items())):
        x, y, m = ds[i]
        assert y == ds.classes.index(cls)
        assert torch.equal(x, torch.from_numpy(arrays[(cls, name)]).permute(2, 0, 1).float() / 255)
        expect = torch.zeros(h, w, dtype=torch.bool)
        expect[box[1]:box[3], box[0]:box[2]] = True
        assert torch.equal(m, expect)
    # same transform on image and mask: resize by 1/2 then centre-crop
    tf = data.PairTransform(resize=(15, 20), center_crop=(12, 16))
    dst = data.ImageFolderBoxes(root, transform=tf)
    x, y, m = dst[0]
    # cat/a: box (5, 6, 20, 18) -> x1/2 -> (2.5, 3, 10, 9) -> crop offsets top 2, left 2
    # -> (0.5, 1, 8, 7): pixel centres j + 0.5 in [0.5, 8) and i + 0.5 in [1, 7)
    expect = torch.zeros(12, 16, dtype=torch.bool)
    expect[1:7, 0:8] = True
    assert torch.equal(m, expect)
    # the bright rectangle of the transformed image lies inside the transformed mask
    bright = x.mean(0) > 0.6
    assert bright.any() and not (bright & ~m).any()
    # class-only foreground, grey channel
    g = data.ImageFolderBoxes(root, channels=1, foreground="class")
    assert g[0][0].shape == (1, 30, 40)


def test_imagefolder_bad_inputs(tmp_path):
    root = tmp_path / "r"
    _png(root / "cat" / "a.png", _box_image(30, 40, (1, 1, 5, 5), 0))
    with pytest.raises(FileNotFoundError, match="a.xml"):
        data.ImageFolderBoxes(root)
    assert torch.all(data.ImageFolderBoxes(root, missing="whole")[0][2])
    _voc(root / "cat" / "a.xml", 40, 30, [("cat", (30, 10, 41, 20))])
    with pytest.raises(BoxOutOfImageError) as e:
        data.ImageFolderBoxes(root)
    assert "a.xml" in str(e.value) and "xmax=41" in str(e.value) and "a.png" in str(e.value)
    _voc(root / "cat" / "a.xml", 40, 30, [("cat", (0, 10, 20, 20))])
    with pytest.raises(BoxOutOfImageError, match="box_origin=0"):
        data.ImageFolderBoxes(root)
    assert len(data.ImageFolderBoxes(root, box_origin=0)) == 1
    _voc(root / "cat" / "a.xml", 80, 60, [("cat", (1, 1, 20, 20))])
    with pytest.raises(DataFormatError, match="another resolution"):
        data.ImageFolderBoxes(root)
    (root / "cat" / "a.xml").write_text("<annotation><object>")
    with pytest.raises(DataFormatError, match="cannot parse VOC annotation .*a.xml"):
        data.ImageFolderBoxes(root)
    _voc(root / "cat" / "a.xml", 40, 30, [("cat", (1, 1, 20, 20))])
    (root / "cat" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DataFormatError, match="cannot read image .*b.png"):
        data.ImageFolderBoxes(root, missing="whole")
    with pytest.raises(FileNotFoundError, match="root folder not found"):
        data.ImageFolderBoxes(tmp_path / "missing")


def _coco_fixture(tmp_path: Path):
    imgs = tmp_path / "images"
    _png(imgs / "one.png", _box_image(20, 30, (2, 3, 12, 15), 1))
    _png(imgs / "two.png", _box_image(32, 32, (0, 0, 8, 8), 2))
    doc = {
        "images": [{"id": 7, "file_name": "one.png", "width": 30, "height": 20},
                   {"id": 3, "file_name": "two.png", "width": 32, "height": 32}],
        "categories": [{"id": 10, "name": "ten"}, {"id": 2, "name": "two"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 10, "bbox": [2, 3, 10, 12]},   # area 120
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [20, 0, 5, 5]},     # area 25
            {"id": 3, "image_id": 3, "category_id": 2, "bbox": [0, 0, 8, 8]},
            {"id": 4, "image_id": 3, "category_id": 10, "bbox": [16.5, 16.5, 4, 4]},
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    return imgs, ann, doc


def test_coco_boxes(tmp_path):
    imgs, ann, _ = _coco_fixture(tmp_path)
    ds = data.CocoBoxes(imgs, ann)
    assert ds.classes == ["two", "ten"]  # sorted by category id
    assert len(ds) == 2
    # images sorted by id: id 3 ("two.png") first; its largest box is category 2 ("two")
    x, y, m = ds[0]
    assert y == 0 and x.shape == (3, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    ref = ((xx < 8) & (yy < 8)) | ((xx >= 16.5) & (xx < 20.5) & (yy >= 16.5) & (yy < 20.5))
    assert torch.equal(m, ref)
    x, y, m = ds[1]
    assert y == 1 and x.shape == (3, 20, 30)
    ref = ((xx[:20, :30] >= 2) & (xx[:20, :30] < 12) & (yy[:20, :30] >= 3) & (yy[:20, :30] < 15)) \
        | ((xx[:20, :30] >= 20) & (xx[:20, :30] < 25) & (yy[:20, :30] < 5))
    assert torch.equal(m, ref)
    only = data.CocoBoxes(imgs, ann, foreground="label")
    assert int(only[1][2].sum()) == 120
    # transformed: up-scaling x2 keeps the boxes aligned
    up = data.CocoBoxes(imgs, ann, transform=data.PairTransform(upscale_to=(40, 60)))
    assert int(up[1][2].sum()) == 4 * (120 + 25)


def test_coco_bad_inputs(tmp_path):
    imgs, ann, doc = _coco_fixture(tmp_path)
    bad = json.loads(json.dumps(doc))
    bad["annotations"][1]["bbox"] = [26, 0, 5, 5]
    ann.write_text(json.dumps(bad))
    with pytest.raises(BoxOutOfImageError) as e:
        data.CocoBoxes(imgs, ann)
    assert "one.png" in str(e.value) and "x=26" in str(e.value) and "ann.json" in str(e.value)
    ann.write_text("{not json")
    with pytest.raises(DataFormatError, match="cannot parse COCO annotation file .*ann.json"):
        data.CocoBoxes(imgs, ann)
    bad = json.loads(json.dumps(doc))
    del bad["categories"]
    ann.write_text(json.dumps(bad))
    with pytest.raises(DataFormatError, match="'categories'"):
        data.CocoBoxes(imgs, ann)
    bad = json.loads(json.dumps(doc))
    bad["annotations"] = bad["annotations"][:2]
    ann.write_text(json.dumps(bad))
    with pytest.raises(DataFormatError, match="two.png .*no annotations"):
        data.CocoBoxes(imgs, ann)
    assert len(data.CocoBoxes(imgs, ann, unannotated="skip")) == 1
    ann.write_text(json.dumps(doc))
    (imgs / "two.png").unlink()
    with pytest.raises(FileNotFoundError, match="two.png"):
        data.CocoBoxes(imgs, ann)


def _cifar10_fixture(root: Path, n_per_batch: int = 2):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        d = {b"batch_label": name.encode(),
             b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
             b"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
             b"filenames": [f"f{k}_{i}.png".encode() for i in range(n_per_batch)]}
        batches[name] = d
        with open(root / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)],
                     b"num_vis": 3072}, f, protocol=2)
    return batches


def test_cifar10_and_cifar100_folders(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    batches = _cifar10_fixture(root)
    ds = data.CifarFolder(tmp_path, "train")
    assert ds.variant == "cifar10" and ds.classes[3] == "c3" and len(ds) == 10
    x, y, m = ds[3]  # data_batch_2, second image
    raw = batches["data_batch_2"][b"data"][1]
    assert torch.equal(x, torch.from_numpy(raw.reshape(3, 32, 32).astype(np.float32)) / 255)
    assert y == batches["data_batch_2"][b"labels"][1]
    assert m.all() and m.shape == (32, 32)
    test = data.CifarFolder(root, "test")
    assert len(test) == 2 and test.targets == batches["test_batch"][b"labels"]
    # boxes from a JSON file; with the §6.3.1 up-scaling to 224 (x7)
    bfile = tmp_path / "boxes.json"
    bfile.write_text(json.dumps({"1": [[4, 8, 12, 20]]}))
    up = data.CifarFolder(root, "test", boxes=bfile, transform=data.PairTransform(upscale_to=224))
    x, _, m = up[1]
    assert x.shape == (3, 224, 224)
    expect = torch.zeros(224, 224, dtype=torch.bool)
    expect[56:140, 28:84] = True
    assert torch.equal(m, expect)
    assert up[0][2].all()
    # CIFAR-100 layout, protocol 4 pickles, coarse labels
    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    for split, n in (("train", 3), ("test", 2)):
        with open(c100 / split, "wb") as f:
            pickle.dump({"data": np.zeros((n, 3072), np.uint8), "fine_labels": list(range(n)),
                         "coarse_labels": [n - 1] * n}, f, protocol=4)
    with open(c100 / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"k{i}" for i in range(20)]}, f, protocol=4)
    d100 = data.CifarFolder(c100.parent, "train", label="coarse")
    assert d100.variant == "cifar100" and len(d100.classes) == 20 and d100.targets == [2, 2, 2]


def test_cifar_bad_inputs(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _cifar10_fixture(root)
    with pytest.raises(BoxOutOfImageError) as e:
        data.CifarFolder(root, "test", boxes={1: [[4, 8, 40, 20]]})
    assert "sample 1" in str(e.value) and "40" in str(e.value)
    with pytest.raises(DataFormatError, match="do not exist"):
        data.CifarFolder(root, "test", boxes={5: [[0, 0, 4, 4]]})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(DataFormatError, match="refusing to load .*system"):
        data.CifarFolder(root, "test")
    (root / "test_batch").write_bytes(b"\x80\x02truncated")
    with pytest.raises(DataFormatError, match="cannot read CIFAR pickle .*test_batch"):
        data.CifarFolder(root, "test")
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.CifarFolder(root, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no CIFAR meta file"):
        data.CifarFolder(empty, "train")
