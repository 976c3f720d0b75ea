"""The training loop: exact resume, 2-process DDP with gloo, the CLI end to end, export, bad input, NaN handling.

Real training steps on tiny models (resnet_tiny on 8x8 digits subsets): a few seconds each on 2 CPU cores."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robust_enc.checkpoint import load_checkpoint, model_from_checkpoint
from robust_enc.cli import main
from robust_enc.errors import UserError
from robust_enc.models import weight_norms
from robust_enc.runtime.sharding import GlobalBatchSampler
from robust_enc.train.config import TrainConfig, lr_factor
from robust_enc.train.loop import train
from robust_enc.train.run_folder import METRIC_COLUMNS

TINY = dict(model="resnet_tiny", dataset="digits", subset=64, val_subset=32, batch_size=32, device="cpu", seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ---------------------------------------------------------------------------------------------- pure parts
def test_lr_schedules():
    step = TrainConfig(epochs=100, lr=0.1)
    assert [lr_factor(step, e) for e in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])
    cosine = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2)
    factors = [lr_factor(cosine, e) for e in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warmup, then the cosine from 1
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and 0 < factors[-1] < 0.05


@pytest.mark.parametrize("size,batch,world", [(1, 1, 1), (101, 32, 2), (96, 32, 2), (97, 32, 3), (65, 32, 1),
                                              (10, 4, 4), (33, 32, 2), (35, 32, 2)])
def test_global_batch_sampler_covers_each_example_once(size, batch, world):
    samplers = [GlobalBatchSampler(size, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        per_rank = []
        for s in samplers:
            s.set_epoch(epoch)
            per_rank.append(list(s))
        assert all(len(batches) == len(samplers[0]) for batches in per_rank)  # no rank waits in all-reduce
        assert all(len(b) > 0 for batches in per_rank for b in batches)
        if batch >= 2 * world:  # nor does the tail leave a rank one example (train-mode BN on 1x1 maps needs two)
            assert all(len(b) >= 2 for batches in per_rank for b in batches)
        seen = sorted(i for batches in per_rank for b in batches for i in b)
        assert seen == list(range(size))  # each example exactly once: no padding, no dropping
    orders = [list(GlobalBatchSampler(size, batch, seed=5, world_size=1)) for _ in range(2)]
    assert orders[0] == orders[1]  # a function of (seed, epoch) only: nothing to save for resume


# ---------------------------------------------------------------------------------------------- resume
def test_resume_is_bit_identical_and_finished_runs_are_skipped(tmp_path, stop_after):
    # cutmix draws from numpy's RNG (timm), the crop augmentation from torch's: both must be restored.
    config = TrainConfig(**TINY, epochs=2, regularizer="enc+cutmix", gbr_probe_size=4)
    whole = train(dataclasses.replace(config, out_dir=str(tmp_path / "whole")))

    split = dataclasses.replace(config, out_dir=str(tmp_path / "split"))
    with pytest.raises(KeyboardInterrupt):
        train(split, progress=stop_after(1))
    assert load_checkpoint(Path(split.out_dir) / whole.name).extra["epoch"] == 1
    with pytest.raises(UserError, match="unfinished run.*--resume"):
        train(split)
    with pytest.raises(UserError, match="different run.*lr"):
        train(dataclasses.replace(split, lr=0.05, resume=True))
    torch.rand(7), np.random.rand(3), random.random()  # disturb every RNG: resume must restore them all
    resumed = train(dataclasses.replace(split, resume=True))

    a, b = load_checkpoint(whole), load_checkpoint(resumed)
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    assert a.content_hash == b.content_hash
    timing = {"wall_s", "images_per_s"}
    rows_a, rows_b = read_metrics(whole)[1], read_metrics(resumed)[1]
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows_a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in rows_b]

    # A finished 1-epoch run extended to 2 ends as the 2-epoch run: the clean train top-1 measured at the end of
    # epoch 1 (its last) leaves weights, BN statistics and random streams alone.
    short = dataclasses.replace(config, epochs=1, out_dir=str(tmp_path / "extended"))
    train(short)
    extended = load_checkpoint(train(dataclasses.replace(short, epochs=2, resume=True)))
    assert extended.content_hash == a.content_hash

    before = (whole / "checkpoint.pt").stat().st_mtime_ns
    assert train(dataclasses.replace(config, out_dir=str(tmp_path / "whole"))) == whole  # finished: skipped
    assert (whole / "checkpoint.pt").stat().st_mtime_ns == before
    assert not (whole / "exported.pt").exists()
    train(dataclasses.replace(config, out_dir=str(tmp_path / "whole"), export=True))  # export asked for later
    assert load_checkpoint(whole / "exported.pt").spec.regularizer.startswith("cutmix:")
    assert (whole / "exported.ts").is_file()
    assert (whole / "checkpoint.pt").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_two_processes_with_gloo_see_every_example_once(tmp_path, torchrun):
    out = tmp_path / "runs"
    torchrun("robust_enc.cli", ["train", "--model", "resnet_tiny", "--dataset", "digits", "--subset", "37",
                                      "--val-subset", "15", "--epochs", "2", "--batch-size", "16", "--gbr-probe-size",
                                      "0", "--device", "cpu", "--out-dir", str(out), "--run-id", "ddp"], cwd=tmp_path)
    columns, rows = read_metrics(out / "ddp")
    assert [int(r["samples_seen"]) for r in rows] == [37, 37]  # batches of 16, 16, 5: 19 + 18, no padding
    card = json.loads((out / "ddp" / "model_card.json").read_text())
    assert card["world_size"] == 2 and 0 <= card["val_top1"] <= 1
    assert sorted(p.name for p in (out / "ddp").iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv",
                                                              "model_card.json"]  # rank 0 alone wrote


# ---------------------------------------------------------------------------------------------- CLI and export
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_cli_end_to_end_writes_the_run_folder_and_an_equivalent_export(tmp_path, capsys):
    argv = ["train", "--model", "resnet_tiny", "--dataset", "digits", "--subset", "64", "--val-subset", "40",
            "--epochs", "3", "--batch-size", "32", "--reg", "enc+ls", "--gbr-probe-size", "12", "--gbr-every", "2",
            "--device", "cpu",
            "--out-dir", str(tmp_path), "--export", "--set", "weight_decay=5e-4", "--set", "lr=0.05"]
    assert main(argv) == 0
    run_dir = tmp_path / "resnet_tiny-digits-enc+ls-s0-n64"
    printed = capsys.readouterr().out
    assert str(run_dir) in printed
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "checkpoint.pt", "metrics.csv", "model_card.json",
                                                  "exported.pt", "exported.ts"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["weight_decay"] == 5e-4 and config["lr"] == 0.05 and config["regularizer"].startswith("enc:")

    ckpt = load_checkpoint(run_dir)
    model = model_from_checkpoint(ckpt)
    columns, rows = read_metrics(run_dir)
    assert columns == [*METRIC_COLUMNS, *(f"norm:{k}" for k in weight_norms(model))]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and [float(r["lr"]) for r in rows] == [0.05] * 3
    assert [r["gbr"] != "" for r in rows] == [False, True, True]  # every 2nd epoch, and the last
    last = rows[-1]
    assert 0 <= float(last["train_top1"]) <= 1 and 0 <= float(last["val_top1"]) <= 1
    assert [r["train_top1"] == "" for r in rows] == [True, True, False]  # the clean one: measured at the end only
    assert all(0 <= float(r["train_top1_running"]) <= 1 for r in rows)
    assert last["val_top5"] == ""  # 10 classes: top-5 is NaN, written as an empty cell
    assert float(last["gbr"]) > 0 and float(last["gbr_stderr"]) >= 0 and int(last["samples_seen"]) == 64
    # The closing line gives the last epoch's numbers readably: top-1 in percent, GBR to 4 digits.
    assert f"val top-1 {100 * float(last['val_top1']):.2f}%, GBR {float(last['gbr']):.4g}," in printed
    # ENC (eq. 22, alpha 1): every constrained layer has ||W||_F^2 = 1, so the sum is the number of layers.
    norms = [float(last[c]) for c in columns if c.startswith("norm:")]
    assert norms == pytest.approx([1.0] * len(norms), rel=1e-5)
    assert float(last["weight_sq_norm"]) == pytest.approx(len(norms), rel=1e-5)
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["checkpoint_hash"] == ckpt.content_hash and card["val_top1"] == pytest.approx(float(last["val_top1"]))
    assert card["epochs"] == 3 and card["config"]["run_id"] == run_dir.name

    exported = load_checkpoint(run_dir / "exported.pt")
    assert exported.spec.regularizer == "ls:smoothing=0.1"  # ENC is baked into the weights
    plain = model_from_checkpoint(exported)
    assert not any("parametrizations" in k for k in plain.state_dict())
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))  # the baked weights are the very tensors ENC computed
        scripted = torch.jit.load(str(run_dir / "exported.ts"))  # plain torch: no robust-enc class inside
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-5)
    assert card["exported_torchscript"] == "exported.ts"


def test_train_top1_is_clean_accuracy_on_the_training_split(tmp_path):
    """With mixup+cutout the running accuracy is measured on mixed, masked inputs in train mode; the card's and the
    checkpoint's train_top1 is top-1 in eval mode on the (unaugmented) training examples."""
    from robust_enc.data import build_dataset, build_loader
    from robust_enc.train.epoch import evaluate

    config = TrainConfig(**TINY, epochs=2, regularizer="mixup+cutout", gbr_probe_size=0, out_dir=str(tmp_path))
    run_dir = train(config)
    ckpt = load_checkpoint(run_dir)
    train_set, _ = build_dataset("digits", "train", subset=TINY["subset"])
    clean = evaluate(model_from_checkpoint(ckpt), build_loader(train_set, batch_size=64), device=torch.device("cpu"))
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["train_top1"] == ckpt.metrics["train_top1"] == pytest.approx(clean["top1"], abs=1e-12)
    assert card["train_top1_running"] == ckpt.metrics["train_top1_running"] != card["train_top1"]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra,message", [
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--lr", "0"], "lr must be a positive number"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--batch-size", "0"], "batch size must be >= 1"),
    (["--reg", "enk"], "enc"),
    (["--reg", "enc:alpha=-1"], "alpha"),
    (["--reg", "cutmix", "--batch-size", "1"], "batch size"),
    (["--amp", "fp16"], "fp16 needs a GPU"),
    (["--set", "nonsense=1"], "no setting 'nonsense'"),
    (["--set", "epochs=two"], "epochs"),
    (["--model", "resnet_tin"], "resnet_tiny"),
])
def test_bad_input_exits_2_with_one_line_before_training(tmp_path, capsys, extra, message):
    argv = ["train", "--model", "resnet_tiny", "--subset", "32", "--epochs", "1", "--device", "cpu",
            "--out-dir", str(tmp_path / "runs"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("robust-enc: error:") and message in err
    assert not (tmp_path / "runs").exists()  # nothing written


def _write_idx_gz(path: Path, data: bytes) -> None:
    import gzip

    path.write_bytes(gzip.compress(data))


def _bad_paths(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Set up each bad-path case in tmp_path: name -> (extra argv, expected text of the one-line error)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    idx = tmp_path / "idx"
    idx.mkdir()
    header = bytes([0, 0, 8, 3]) + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    _write_idx_gz(idx / "train-images-idx3-ubyte.gz", header + bytes(28 * 28 * 10))  # 10 of the 100 images
    _write_idx_gz(idx / "train-labels-idx1-ubyte.gz", bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(100))
    magic = tmp_path / "magic"
    magic.mkdir()
    _write_idx_gz(magic / "train-images-idx3-ubyte.gz", b"<html>not found</html>")
    _write_idx_gz(magic / "train-labels-idx1-ubyte.gz", b"<html>not found</html>")
    plain, train_only = tmp_path / "plain", tmp_path / "train_only"
    for folder in (plain, train_only / "train"):
        for label in ("a", "b"):
            (folder / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), color=(60 * i, 90, 200)).save(folder / label / f"{i}.png")
    return {
        "out-dir is a file": (["--out-dir", str(a_file)], "is a file, not a folder"),
        "out-dir below a file": (["--out-dir", str(a_file / "runs")], "is a file, not a folder"),
        "missing data-dir": (["--data-dir", str(tmp_path / "nope")], "is not a folder"),
        "truncated idx": (["--dataset", "fashion-mnist", "--data-dir", str(idx)], "truncated or corrupt"),
        "bad idx magic": (["--dataset", "fashion-mnist", "--data-dir", str(magic)], "bad magic number"),
        "plain image folder": (["--dataset", f"folder:{plain}", "--image-size", "8"], "has no train/ subfolder"),
        "train/ without val/": (["--dataset", f"folder:{train_only}", "--image-size", "8"], "but no val/ subfolder"),
        "bn on 1x1 maps at batch 1": (["--model", "resnet18", "--batch-size", "1"], "--batch-size >= 2"),
        "unknown timm model": (["--model", "timm:resnet5O", "--dataset", "synthetic:3x32x32:4:32"],
                               "similar: resnet50"),
        "timm model without look-alikes": (["--model", "timm:qqqqqqqq", "--dataset", "synthetic:3x32x32:4:32"],
                                           "timm.list_models()"),
    }


def test_bad_paths_and_batch_sizes_exit_2_with_one_line(tmp_path, capsys):
    for case, (extra, message) in _bad_paths(tmp_path).items():
        argv = ["train", "--model", "resnet_tiny", "--subset", "32", "--epochs", "1", "--device", "cpu",
                "--gbr-probe-size", "0", "--out-dir", str(tmp_path / "runs"), *extra]
        assert main(argv) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("robust-enc: error:"), (case, err)
        assert message in err and "Traceback" not in err, (case, err)
        assert not (tmp_path / "runs").exists(), case  # nothing written


def test_oserrors_from_paths_are_one_line_errors(tmp_path, capsys):
    """Any other path the system refuses (here a folder name over the 255-byte limit) is one line, exit 2."""
    argv = ["train", "--model", "resnet_tiny", "--subset", "32", "--epochs", "1", "--device", "cpu",
            "--gbr-probe-size", "0", "--out-dir", str(tmp_path / ("x" * 300))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "File name too long" in err and "check the paths" in err


def test_nan_loss_stops_with_a_user_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # lr 1000 on this seed: epochs 1-2 finish, epoch 2's last update leaves inf/NaN weights -> stop in epoch 2. The
    # divergence limit would stop it earlier (epoch 1, loss 2e7; tested in test_safety.py): lifted to reach NaN.
    from robust_enc.train import loop

    monkeypatch.setattr(loop, "exploded_loss", lambda num_classes: math.inf)
    config = TrainConfig(**{**TINY, "subset": 64, "batch_size": 16}, epochs=4, lr=1000.0, gbr_probe_size=0,
                         out_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"(loss|weights) became .*(last good one|nothing was saved)") as err:
        train(config)
    run_dir = next(tmp_path.iterdir())
    if "nothing was saved" in str(err.value):  # epoch 1's weights are finite but its validation loss is NaN: diverged
        assert "validation loss became nan after epoch 1" in str(err.value)
        assert not (run_dir / "checkpoint.pt").exists()
        return
    ckpt = load_checkpoint(run_dir)
    assert 1 <= ckpt.extra["epoch"] < config.epochs
    assert all(torch.isfinite(t).all() for t in ckpt.state_dict.values() if t.is_floating_point())
    assert len(read_metrics(run_dir)[1]) == ckpt.extra["epoch"]
    assert all(math.isfinite(float(r["train_loss"])) for r in read_metrics(run_dir)[1])
    assert not (run_dir / "model_card.json").exists()  # not finished


@pytest.mark.gpu
def test_gpu_bf16_channels_last_step_trains(tmp_path):
    config = TrainConfig(**{**TINY, "device": "cuda"}, epochs=1, amp="bf16", channels_last=True, gbr_probe_size=8,
                         regularizer="enc", out_dir=str(tmp_path))
    run_dir = train(config)
    _, rows = read_metrics(run_dir)
    assert math.isfinite(float(rows[0]["train_loss"])) and int(rows[0]["samples_seen"]) == 64
