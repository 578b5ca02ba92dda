"""Tests of training: reproducibility, bit-exact resumption, checkpoints, selection."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from nns_cuda import data, models
from nns_cuda import train as T
from nns_cuda.train import TrainingHistory, demo_model, fit, loop

FIT = dict(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=8, seed=3, progress=False,
           num_threads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    tr = data.cluttered_digits("train", seed=0, n_train=40, cache_dir=cache)
    va = data.cluttered_digits("val", seed=0, cache_dir=cache).subset(torch.arange(30))
    return tr, va, cache


def net(seed: int) -> nn.Module:
    """Small model with dropout, so that the RNG state matters for resumption."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(4 * 15 * 15, 10))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_is_reproducible_and_restores_global_settings(tiny):
    tr, va, _ = tiny
    det, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    a, b, c = net(0), net(0), net(0)
    ha = fit(a, tr, va, epochs=3, **FIT)
    hb = fit(b, tr, va, epochs=3, **FIT)
    assert same_weights(a, b)
    assert ha.train_loss == hb.train_loss and ha.val_acc == hb.val_acc
    fit(c, tr, va, epochs=3, **dict(FIT, seed=4))
    assert not same_weights(a, c)
    assert torch.are_deterministic_algorithms_enabled() == det
    assert torch.get_num_threads() == threads
    assert ha.checkpoints == [None] * 3 and ha.best_checkpoint is None
    assert not a.training


def test_resume_is_bit_exact(tiny, tmp_path, monkeypatch):
    tr, va, _ = tiny
    full = net(0)
    hf = fit(full, tr, va, epochs=2, checkpoint_dir=tmp_path / "full", **FIT)
    # train 1 epoch, then resume into a differently initialised model with a disturbed RNG
    fit(net(0), tr, va, epochs=1, checkpoint_dir=tmp_path / "half", **FIT)
    torch.manual_seed(999)
    resumed = net(7)
    hr = fit(resumed, tr, va, epochs=2, checkpoint_dir=tmp_path / "half", resume=True, **FIT)
    assert same_weights(full, resumed)
    assert hr.epochs == [1, 2]
    assert hr.train_loss == hf.train_loss and hr.val_loss == hf.val_loss
    assert hr.train_acc == hf.train_acc and hr.val_acc == hf.val_acc
    of = T.load_checkpoint(hf.last_checkpoint)["optimizer"]["state"]
    orr = T.load_checkpoint(hr.last_checkpoint)["optimizer"]["state"]
    assert all(torch.equal(of[k]["momentum_buffer"], orr[k]["momentum_buffer"]) for k in of)
    # the check can fail: without restoring the RNG state the dropout masks differ
    fit(net(0), tr, va, epochs=1, checkpoint_dir=tmp_path / "norng", **FIT)
    monkeypatch.setattr(loop, "_set_rng_state", lambda *a, **k: None)
    torch.manual_seed(999)
    broken = net(0)
    fit(broken, tr, va, epochs=2, checkpoint_dir=tmp_path / "norng", resume=True, **FIT)
    assert not same_weights(full, broken)


def test_checkpoints_history_curve_and_load_model(tiny, tmp_path):
    tr, va, _ = tiny
    m = models.build("simple_cnn", seed=0)
    h = fit(m, tr, va, epochs=2, checkpoint_dir=tmp_path, **dict(FIT, optimizer="adam",
                                                                 lr=1e-3))
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_001.pt",
                                                                   "epoch_002.pt"]
    assert h.checkpoints == [str(tmp_path / "epoch_001.pt"), str(tmp_path / "epoch_002.pt")]
    assert h.last_checkpoint == h.checkpoints[-1]
    ck = T.load_checkpoint(h.last_checkpoint)
    assert ck["epoch"] == 2 and ck["config"]["optimizer"] == "adam"
    assert {"model", "optimizer", "rng", "history", "config"} <= set(ck)
    js = json.loads((tmp_path / "history.json").read_text())
    assert js["val_loss"] == h.val_loss and js["best_checkpoint"] == h.best_checkpoint
    assert js["phase_checkpoints"]["final"] == h.last_checkpoint
    png = (tmp_path / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert h.curve_png == str(tmp_path / "curve.png")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a training checkpoint loads into the zoo model and reproduces the trained model
    loaded = models.load_model("simple_cnn", weights=h.last_checkpoint)
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m.eval()(x), rtol=0, atol=0)
    # the per-epoch metrics are those of the saved models
    vl, vacc = T.evaluate(models.load_model("simple_cnn", weights=h.checkpoints[0]), va)
    assert vl == pytest.approx(h.val_loss[0], rel=1e-6) and vacc == h.val_acc[0]


def test_evaluate_matches_an_independent_computation(tiny):
    _, va, _ = tiny
    m = net(1).eval()
    loss, acc = T.evaluate(m, va, batch_size=7)
    x, y, _ = va.tensors()
    with torch.no_grad():
        logits = m(x).double().numpy()
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ref_loss = float(np.mean(lse - logits[np.arange(len(y)), y.numpy()]))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert acc == float(np.mean(logits.argmax(1) == y.numpy()))


def test_best_last_and_phase_selection():
    acc = [0.1, 0.5, 0.7, 0.7, 0.6, 0.7, 0.65, 0.6, 0.6, 0.55]
    loss = [2.0, 1.2, 0.9, 0.8, 1.0, 0.8, 1.1, 1.3, 1.4, 1.6]
    h = TrainingHistory(epochs=list(range(1, 11)), train_loss=[1.0 / e for e in range(1, 11)],
                        train_acc=[0.5] * 10, val_loss=loss, val_acc=acc,
                        epoch_seconds=[0.1] * 10, checkpoints=[f"e{e}.pt" for e in range(1, 11)])
    # independent: max accuracy, then min loss, then earliest epoch
    order = np.lexsort((np.arange(10), np.array(loss), -np.array(acc)))
    assert h.best_epoch == order[0] + 1 == 4
    assert h.best_checkpoint == "e4.pt" and h.last_checkpoint == "e10.pt"
    assert h.phase_epochs() == {"early": 1, "middle": 5, "final": 10}
    assert h.phase_checkpoints() == {"early": "e1.pt", "middle": "e5.pt", "final": "e10.pt"}
    h4 = TrainingHistory(epochs=[1, 2, 3, 4], train_loss=[1] * 4, train_acc=[0] * 4,
                         val_loss=[math.nan] * 4, val_acc=[math.nan] * 4,
                         epoch_seconds=[0] * 4, checkpoints=["a", "b", "c", "d"])
    assert h4.phase_epochs() == {"early": 1, "middle": 2, "final": 4}
    assert h4.best_epoch == 4 and h4.overfitting() == {}
    o = h.overfitting()
    assert o["min_val_loss_epoch"] == 4 and o["val_loss_rise"] == pytest.approx(0.8)
    back = TrainingHistory.from_dict(json.loads(json.dumps(h4.to_dict())))
    assert back.epochs == h4.epochs and all(math.isnan(v) for v in back.val_loss)


def test_fit_bad_input(tiny, tmp_path):
    tr, va, _ = tiny
    fit(net(0), tr, va, epochs=1, checkpoint_dir=tmp_path, **FIT)
    with pytest.raises(FileExistsError, match="resume=True"):
        fit(net(0), tr, va, epochs=2, checkpoint_dir=tmp_path, **FIT)
    with pytest.raises(ValueError, match="lr was 0.05, now 0.1"):
        fit(net(0), tr, va, epochs=2, checkpoint_dir=tmp_path, resume=True,
            **dict(FIT, lr=0.1))
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        fit(net(0), tr, va, epochs=1, resume=True, **FIT)
    with pytest.raises(ValueError, match="epochs"):
        fit(net(0), tr, va, epochs=0, **FIT)
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam'"):
        fit(net(0), tr, va, epochs=1, **dict(FIT, optimizer="rmsprop"))
    (tmp_path / "epoch_001.pt").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="cannot read checkpoint .*epoch_001.pt"):
        fit(net(0), tr, va, epochs=2, checkpoint_dir=tmp_path, resume=True, **FIT)
    h = fit(net(0), tr, va, epochs=1, checkpoint_dir=tmp_path, overwrite=True, **FIT)
    assert T.load_checkpoint(h.last_checkpoint)["epoch"] == 1
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        fit(net(0), tr, va, epochs=1, **dict(FIT, lr=1e30))


def test_default_demo_model_trains_once_then_reuses_the_cache(tiny, tmp_path, monkeypatch):
    _, _, cache = tiny
    small = dict(T.DEMO_CONFIG, model="simple_cnn", n_train=20, epochs=2, batch_size=10)
    monkeypatch.setattr(demo_model, "DEMO_CONFIG", small)
    # the demo data come from the given cache root: reuse the module's generated data
    for p in cache.glob("cluttered_digits_*.pt"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    first = T.default_demo_model(tmp_path, progress=False)
    assert first.name == "simple_cnn" and len(first.history) == 2
    assert first.checkpoint_dir.parent == tmp_path / "demo_model"
    calls = []
    monkeypatch.setattr(demo_model, "fit", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("retrained")))
    again = T.default_demo_model(tmp_path, progress=False)
    assert calls == [] and same_weights(first.model, again.model)
    assert again.history.val_loss == first.history.val_loss
    assert again.history.curve_png and again.history.best_checkpoint


@pytest.mark.slow
def test_default_demo_model_overfits_within_three_minutes(tmp_path):
    t0 = time.perf_counter()
    res = T.default_demo_model(tmp_path, progress=False)
    elapsed = time.perf_counter() - t0
    h = res.history
    o = h.overfitting()
    assert elapsed < 180
    assert o["min_val_loss_epoch"] < h.epochs[-1] - 10
    assert o["val_loss_rise"] > 0.2 and o["last_train_loss"] < 0.05 < o["train_loss_at_min"]
    assert h.best_epoch < h.epochs[-1] and o["best_val_acc"] > 0.4
