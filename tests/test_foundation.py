"""Registry, data sets, model zoo, checkpoints, results schema and CLI errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from robust_enc.checkpoint import (
    load_checkpoint,
    load_plain_weights,
    model_from_checkpoint,
    save_checkpoint,
    state_hash,
)
from robust_enc.cli import main
from robust_enc.data import DATASETS, balanced_subset_indices, build_dataset, build_loader
from robust_enc.errors import UserError
from robust_enc.images import unreadable_count
from robust_enc.models import MODELS, ModelSpec, NormalizedModel, weight_norms
from robust_enc.registry import Registry
from robust_enc.regularizers import build_model
from robust_enc.results import FIELD_NAMES, ResultRow, append_results, read_results, write_results

FASHION = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------ registry
def test_registry_rejects_duplicates_and_suggests_names():
    reg: Registry[int] = Registry("thing")
    reg.register("alpha")(1)
    with pytest.raises(ValueError, match="duplicate"):
        reg.register("alpha")(2)
    with pytest.raises(UserError, match="Did you mean 'alpha'"):
        reg.get("alpah")


def test_registry_argument_forms():
    entry, arg = DATASETS.lookup("synthetic:3x8x8:4:16")
    assert entry.name == "synthetic" and arg == "3x8x8:4:16"
    with pytest.raises(UserError, match="needs an argument"):
        DATASETS.lookup("folder")


# ------------------------------------------------------------------ data sets
SMALL_DATASETS = ["digits", "synthetic:3x16x16:5:40"] + (["fashion-mnist"] if FASHION.is_dir() else [])


@pytest.mark.parametrize("name", SMALL_DATASETS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_dataset_images_in_unit_range_with_metadata(name, split):
    ds, info = build_dataset(name, split, subset=40)
    assert len(ds) == info.size == 40
    x, y = next(iter(build_loader(ds, batch_size=40)))
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == info.input_shape
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < info.num_classes
    assert len(info.mean) == len(info.std) == info.input_shape[0]


def test_digits_split_is_deterministic_stratified_and_disjoint():
    train_a, info = build_dataset("digits", "train")
    train_b, _ = build_dataset("digits", "test")
    again, _ = build_dataset("digits", "train")
    assert torch.equal(train_a.x, again.x) and torch.equal(train_a.y, again.y)
    assert info.size + len(train_b) == 1797
    from sklearn.datasets import load_digits

    expected = torch.bincount(torch.tensor(load_digits().target)) * len(train_b) / 1797
    assert (torch.bincount(train_b.y, minlength=10) - expected).abs().max() <= 1  # stratified
    flat_train = {tuple(v.flatten().tolist()) for v in train_a.x}
    overlap = sum(tuple(v.flatten().tolist()) in flat_train for v in train_b.x)
    assert overlap < 10  # digits has a few duplicate images; the splits do not share indices


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_path():
    ds, info = build_dataset("fashion-mnist", "test")
    assert len(ds) == 10_000 and info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert abs(float(ds.x.mean()) - 0.2860) < 0.01  # test-set mean is close to the training mean


def test_balanced_subset_is_deterministic_and_balanced():
    targets = [i % 7 for i in range(700)]
    a = balanced_subset_indices(targets, 50)
    assert a == balanced_subset_indices(targets, 50) and len(set(a)) == 50
    counts = torch.bincount(torch.tensor([targets[i] for i in a]))
    assert int(counts.max() - counts.min()) <= 1


def _write_image_folder(root: Path, n_per_class: int = 3) -> None:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("RGB", (40, 30), color=(i * 40, 100, 200 if c == "cat" else 20)).save(root / c / f"{i}.JPEG")


def test_image_folder_counts_and_skips_a_corrupt_file(tmp_path, caplog):
    _write_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.JPEG").write_bytes(b"not a jpeg at all")
    ds, info = build_dataset(f"folder:{tmp_path}", "val", image_size=32)
    assert info.num_classes == 2 and info.input_shape == (3, 32, 32) and len(ds) == 7
    batches = list(build_loader(ds, batch_size=4))
    assert sum(len(y) for _, y in batches) == 6
    assert unreadable_count(ds) == 1
    assert "broken.JPEG" in caplog.text
    x = torch.cat([b[0] for b in batches])
    assert x.shape[1:] == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_imagenet_layout_and_balanced_subset(tmp_path):
    _write_image_folder(tmp_path / "val", n_per_class=4)
    for name, wnid in (("cat", "n02123045"), ("dog", "n02085620")):  # tabby cat (281), Chihuahua (151)
        (tmp_path / "val" / name).rename(tmp_path / "val" / wnid)
    ds, info = build_dataset("imagenet", "val", data_dir=str(tmp_path), subset=4, image_size=32)
    assert info.size == 4 and info.subset == 4 and info.num_classes == 1000  # canonical labels, whatever is on disk
    assert sorted(y for _, y in (ds[i] for i in range(4))) == [151, 151, 281, 281]


def test_unknown_dataset_and_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="Did you mean 'digits'"):
        build_dataset("digit", "test")
    with pytest.raises(UserError, match="cannot read image folder"):
        build_dataset(f"folder:{tmp_path / 'nope'}", "val")
    with pytest.raises(UserError, match="synthetic:CxHxW"):
        build_dataset("synthetic:abc", "test")
    with pytest.raises(UserError, match="not found"):
        build_dataset("cifar10", "test", data_dir=str(tmp_path))


# ------------------------------------------------------------------ model zoo
def _spec(name: str, size: int, channels: int = 3, classes: int = 5) -> ModelSpec:
    return ModelSpec(name, classes, (channels, size, size), (0.5,) * channels, (0.25,) * channels)


ZOO = [n for n in MODELS.names() if n != "timm"] + ["timm:resnet10t"]


@pytest.mark.parametrize("name", ZOO)
def test_every_model_builds_runs_and_passes_gradient_to_the_input(name):
    entry, _ = MODELS.lookup(name)
    size = max(entry.meta.get("min_size", 8), 8 if entry.meta.get("min_size", 8) <= 8 else 32)
    channels = 1 if name.startswith("resnet") else 3  # also exercises the stem swap for one-channel data
    model = build_model(_spec(name, size, channels)).eval()
    assert isinstance(model, NormalizedModel) and torch.equal(model.normalize.mean.flatten(),
                                                              torch.full((channels,), 0.5))
    x = torch.rand(2, channels, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_model_too_small_input_and_unknown_name():
    with pytest.raises(UserError, match="at least 32x32"):
        build_model(_spec("densenet201", 8))
    with pytest.raises(UserError, match="Did you mean 'resnet20'"):
        build_model(_spec("resnet2", 8))
    with pytest.raises(UserError, match="timm has no model"):
        build_model(_spec("timm:not_a_model_xyz", 32))


def test_weight_norms_cover_conv_and_linear():
    model = build_model(_spec("resnet_tiny", 8, 1))
    norms = weight_norms(model)
    assert "net.fc" in norms and "net.conv1" in norms and all(v > 0 for v in norms.values())


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_and_hash(tmp_path):
    spec = _spec("resnet_tiny", 8, 1, 10)
    model = build_model(spec)
    _, info = build_dataset("digits", "test")
    h = save_checkpoint(tmp_path / "run" / "checkpoint.pt", model, spec, run_id="run", dataset_info=info,
                        config={"lr": 0.1}, metrics={"val_top1": 0.5})
    ckpt = load_checkpoint(tmp_path / "run")  # a run folder resolves to its checkpoint.pt
    assert ckpt.content_hash == h == state_hash(model.state_dict()) and ckpt.dataset_info == info
    assert ckpt.config == {"lr": 0.1} and ckpt.metrics["val_top1"] == 0.5 and ckpt.versions["torch_version"]
    loaded = model_from_checkpoint(ckpt)
    x = torch.rand(3, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    assert not list(tmp_path.glob("run/.*tmp"))  # atomic write leaves no temporary files


def test_checkpoint_mismatch_names_first_bad_key(tmp_path):
    spec = _spec("resnet_tiny", 8, 1, 10)
    save_checkpoint(tmp_path / "c.pt", build_model(spec), spec, run_id="r")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    ckpt.spec = _spec("resnet_tiny", 8, 1, 7)
    with pytest.raises(UserError, match=r"does not fit the model: key 'net.fc.weight' has shape"):
        model_from_checkpoint(ckpt)
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_plain_torchvision_state_dict_loads(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=5)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model = load_plain_weights(_spec("resnet18", 32), tmp_path / "r18.pth")
    x = torch.rand(2, 3, 32, 32)
    net.eval()
    assert torch.allclose(model(x), net((x - 0.5) / 0.25), atol=1e-5)


# ------------------------------------------------------------------ results schema
def _row(**kw) -> ResultRow:
    base = dict(run_id="r", model="resnet_tiny", regularizer="baseline", dataset="digits", split="test", subset=0,
                attack="fgsm", norm="linf", eps=4 / 255, n=100, clean_top1=0.9, adv_top1=0.4)
    return ResultRow(**{**base, **kw})


def _same(a: object, b: object) -> bool:
    """Equal values, NaN equal to NaN, and the same type (an int must not come back as a float or a string)."""
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return type(a) is type(b) and (a == b or both_nan)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_results_round_trip(tmp_path, suffix):
    full = dict(steps=10, step_size=1 / 255, restarts=2, seed=7, n=100, clean_top5=0.99, gbr=12.5,
                gbr_stderr=0.5, gbr_output="logits", train_top1=0.97, weight_sq_norm=31.25, wall_s=1.5,
                images_per_s=66.7, flags="zero-gradients;probabilities", checkpoint_hash="0123456789ab",
                robust_enc_version="0.1.0", torch_version="2.9.1", art_version="1.20.1",
                created_at="2024-01-02T03:04:05+00:00", run_id="r, with \"quotes\"")
    rows = [_row(), _row(attack="none", norm="none", eps=0.0, adv_top1=0.9), _row(**full)]
    path = write_results(tmp_path / f"results{suffix}", rows)
    back = read_results(path)
    assert len(back) == len(rows)
    for row, read in zip(rows, back):
        for name in FIELD_NAMES:  # every field, NaN == NaN; floats exact (repr round-trips)
            assert _same(getattr(read, name), getattr(row, name)), (suffix, name, getattr(read, name))


def test_results_append_replaces_same_key(tmp_path):
    path = tmp_path / "r.csv"
    append_results(path, [_row(adv_top1=0.4)])
    append_results(path, [_row(adv_top1=0.3), _row(eps=8 / 255, adv_top1=0.2)])
    assert sorted(r.adv_top1 for r in read_results(path)) == [0.2, 0.3]


def test_results_reject_other_schema_and_invalid_rows(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("model,acc\nx,1\n")
    with pytest.raises(UserError, match="does not match the robust-enc"):
        read_results(bad)
    with pytest.raises(ValueError, match="adv_top1"):
        _row(adv_top1=0.95)
    with pytest.raises(ValueError, match="fraction"):
        _row(clean_top1=92.0)
    assert FIELD_NAMES[0] == "run_id"


# ------------------------------------------------------------------ CLI
def test_cli_lists_and_errors(capsys):
    assert main(["models"]) == 0 and "resnet20" in capsys.readouterr().out
    assert main(["datasets"]) == 0 and "fashion-mnist" in capsys.readouterr().out
    for argv, needle in [(["gbr", "--checkpoint", "/nonexistent/run"], "no checkpoint"),
                         (["attack", "--checkpoint", "/nonexistent/run"], "no checkpoint")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "attack", "gbr", "report", "models", "datasets"):
        assert command in out


def test_atomic_write_keeps_ordinary_permissions(tmp_path):
    from robust_enc.io import write_text_atomic

    path = write_text_atomic(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "x" and (path.stat().st_mode & 0o777) == (0o666 & ~mask)
