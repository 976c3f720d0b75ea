"""ImageNet layouts, canonical labels, --subset-list, the decode cache, baked evaluation and the attack's time split.

Small real JPEG trees (generated images re-encoded as JPEG) in every layout; each image's label is checked against
its index in timm's sorted 1,000-wnid list, which the tests read independently of robust_enc.imagenet."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from robust_enc import cache as cache_module
from robust_enc.attacks import evaluate_model
from robust_enc.attacks.config import AttackConfig, BatchReport
from robust_enc.attacks.evaluation import evaluate
from robust_enc.checkpoint import save_checkpoint
from robust_enc.cli import main
from robust_enc.data import build_dataset, build_loader
from robust_enc.errors import UserError
from robust_enc.images import DatasetInfo
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model
from robust_enc.regularizers.enc import parametrized_layers

SYNSETS = Path(__import__("timm").__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
WNIDS = SYNSETS.read_text().split()  # the reference: the standard order, as shipped
CLASSES = [0, 7, 500, 999]  # a partial class set: indices must stay these, not 0..3
PER_CLASS = 2


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (50, 38)) -> None:
    """A smooth random RGB image, re-encoded as JPEG."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    low.resize(size, Image.BILINEAR).save(path, "JPEG", quality=90)


def _val_images() -> list[tuple[str, int]]:
    """(file name, canonical index): ILSVRC2012_val_%08d numbered in class order."""
    names = []
    for k, c in enumerate(CLASSES):
        for j in range(PER_CLASS):
            names.append((f"ILSVRC2012_val_{k * PER_CLASS + j + 1:08d}.JPEG", c))
    return names


def _wnid_tree(root: Path) -> None:
    for i, (name, c) in enumerate(_val_images()):
        _jpeg(root / WNIDS[c] / name, i)


def _flat(root: Path) -> Path:
    folder = root / "ILSVRC2012_img_val"
    for i, (name, _) in enumerate(_val_images()):
        _jpeg(folder / name, i)
    return folder


def _labels(root: Path, **kw) -> dict[str, int]:
    data, info = build_dataset("imagenet", "val", data_dir=str(root), image_size=32, **kw)
    assert info.num_classes == 1000 and info.class_names[0] == "tench"
    return {Path(p).name: label for p, label in data.samples}


def _expected() -> dict[str, int]:
    return dict(_val_images())


def test_val_wnid_folders_with_some_classes_keep_canonical_labels(tmp_path):
    _wnid_tree(tmp_path / "val")
    assert _labels(tmp_path) == _expected()
    assert _labels(tmp_path / "val") == _expected()  # --data-dir pointing at val/ itself


def test_torchvision_imagenet_root(tmp_path):
    _wnid_tree(tmp_path / "val")
    torch.save(({w: (w,) for w in WNIDS}, [WNIDS[c] for _, c in _val_images()]), tmp_path / "meta.bin")
    assert _labels(tmp_path) == _expected()


def test_flat_val_with_kaggle_solution_csv(tmp_path):
    _flat(tmp_path)
    with (tmp_path / "LOC_val_solution.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for name, c in reversed(_val_images()):  # row order must not matter
            writer.writerow([name.removesuffix(".JPEG"), f"{WNIDS[c]} 10 20 30 40 {WNIDS[c]} 1 2 3 4"])
    assert _labels(tmp_path) == _expected()


def test_flat_val_with_devkit_ground_truth_and_meta_mat(tmp_path):
    import scipy.io

    _flat(tmp_path)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    # The devkit's ILSVRC2012_IDs are not the sorted order: here ID = 1000 - canonical index, plus a non-leaf synset.
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    synsets = np.zeros(len(CLASSES) + 1, dtype=[(f, "O") for f in fields])
    for k, c in enumerate(CLASSES):
        synsets[k] = (1000 - c, WNIDS[c], f"class {c}", "", 0)
    synsets[-1] = (1001, "n00001740", "entity", "", 3)
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{1000 - c}\n" for _, c in _val_images()))
    assert _labels(tmp_path) == _expected()


def test_subset_list_keeps_its_order_and_names_missing_images(tmp_path):
    _wnid_tree(tmp_path / "val")
    chosen = [_val_images()[i] for i in (5, 0, 3)]
    listing = tmp_path / "list.txt"
    # RobustBench-style lines (wnid/file name); matched by file name.
    listing.write_text("".join(f"{WNIDS[c]}/{name}\n" for name, c in chosen))
    data, info = build_dataset("imagenet", "val", data_dir=str(tmp_path), image_size=32, subset_list=str(listing))
    assert [(Path(p).name, label) for p, label in data.samples] == chosen
    assert info.size == 3 and info.subset == 3
    listing.write_text("ILSVRC2012_val_00000001.JPEG\nILSVRC2012_val_09999999.JPEG\n")
    with pytest.raises(UserError, match=r"1 of the 2 images .*\(first: ILSVRC2012_val_09999999.JPEG\)"):
        build_dataset("imagenet", "val", data_dir=str(tmp_path), subset_list=str(listing))
    with pytest.raises(UserError, match="not both"):
        build_dataset("imagenet", "val", data_dir=str(tmp_path), subset=2, subset_list=str(listing))


def test_unreadable_layouts_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="looked for .*val/<wnid>/.*LOC_val_solution.csv") as err:
        build_dataset("imagenet", "val", data_dir=str(tmp_path))
    assert "\n" not in str(err.value)
    _jpeg(tmp_path / "val" / "cat" / "a.JPEG", 0)
    with pytest.raises(UserError, match="not ImageNet-1k wnids .*'cat'.*folder:"):
        build_dataset("imagenet", "val", data_dir=str(tmp_path))
    flat = tmp_path / "flat"
    _jpeg(flat / "ILSVRC2012_img_val" / "ILSVRC2012_val_00000001.JPEG", 0)
    with pytest.raises(UserError, match="holds images but no labels"):
        build_dataset("imagenet", "val", data_dir=str(flat))


# ------------------------------------------------------------------------------------------------ the cache
def test_cache_equals_decoding_bit_for_bit_and_is_reused(tmp_path, monkeypatch):
    root = tmp_path / "in"
    for i, (name, c) in enumerate(_val_images()):  # realistic aspect: 500x375 -> resize 73 -> crop 64
        _jpeg(root / "val" / WNIDS[c] / name, i, size=(100, 75))
    decoded, info = build_dataset("imagenet", "val", data_dir=str(root), image_size=64, subset=6)
    cached, cached_info = build_dataset("imagenet", "val", data_dir=str(root), image_size=64, subset=6,
                                        cache=str(tmp_path / "cache"))
    assert cached_info == info and len(cached) == len(decoded) == 6
    for i in range(len(decoded)):
        (x, y), (xc, yc) = decoded[i], cached[i]
        assert xc.dtype == torch.float32 and torch.equal(x, xc) and y == yc
    folders = [p for p in (tmp_path / "cache").iterdir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")  # no temporary folder left behind
    assert json.loads((folders[0] / "meta.json").read_text())["size"] == 6
    # Through DataLoader workers (the memory map is opened per process).
    batches = list(build_loader(cached, batch_size=4, workers=2))
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.stack([decoded[i][0] for i in range(6)]))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(cache_module, "build_cache", no_rebuild)
    again, _ = build_dataset("imagenet", "val", data_dir=str(root), image_size=64, subset=6,
                             cache=str(tmp_path / "cache"))
    assert again.folder == folders[0]
    with pytest.raises(AssertionError, match="rebuilt"):  # another file list is another key
        build_dataset("imagenet", "val", data_dir=str(root), image_size=64, subset=4, cache=str(tmp_path / "cache"))


def test_cache_leaves_out_a_corrupt_file_and_counts_it(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "BUILD_BATCH", 1)  # the corrupt file's batch is then empty
    _wnid_tree(tmp_path / "val")
    (tmp_path / "val" / WNIDS[7] / "ILSVRC2012_val_00000009.JPEG").write_bytes(b"not a jpeg")
    data, _ = build_dataset("imagenet", "val", data_dir=str(tmp_path), image_size=32, cache=str(tmp_path / "c"))
    assert len(data) == 8 and int(data.unreadable.value) == 1
    with pytest.raises(UserError, match="already in memory"):
        build_dataset("digits", "test", cache=str(tmp_path / "c"))


# ------------------------------------------------------------------------------------------------ evaluation
def _imagenet_model(tmp_path: Path, regularizer: str) -> Path:
    spec = ModelSpec("resnet_tiny", 1000, (3, 32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                     regularizer=regularizer)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    info = DatasetInfo("imagenet", "val", 1000, (3, 32, 32), spec.mean, spec.std, 8)
    run = tmp_path / f"run-{regularizer}"
    save_checkpoint(run / "checkpoint.pt", model, spec, run_id=run.name, dataset_info=info)
    return run


@pytest.mark.parametrize("regularizer", ["enc", "wn", "ws"])
def test_evaluation_runs_the_baked_model_with_the_parametrized_results(tmp_path, regularizer, monkeypatch):
    from robust_enc.attacks import evaluation
    from robust_enc.checkpoint import load_checkpoint, model_from_checkpoint

    _wnid_tree(tmp_path / "val")
    run = _imagenet_model(tmp_path, regularizer)
    parametrized = model_from_checkpoint(load_checkpoint(run))
    assert list(parametrized_layers(parametrized))
    seen = []
    real = evaluation.run_evaluation
    monkeypatch.setattr(evaluation, "run_evaluation", lambda model, *a, **k: seen.append(model) or real(model, *a, **k))
    config = AttackConfig(checkpoint=str(run), data_dir=str(tmp_path), attacks=("fgsm",), eps=(2 / 255,),
                          batch_size=4, device="cpu", out=str(tmp_path / "rows.csv"))
    rows = evaluate(config)
    (baked,) = seen
    assert not list(parametrized_layers(baked))
    data, info = build_dataset("imagenet", "val", data_dir=str(tmp_path), image_size=32)
    x = torch.stack([data[i][0] for i in range(len(data))]).requires_grad_(True)
    out_p, out_b = parametrized(x), baked(x)
    assert (out_p - out_b).abs().max() <= 1e-5
    grad_p, = torch.autograd.grad(out_p.logsumexp(1).sum(), x)
    xb = x.detach().requires_grad_(True)
    grad_b, = torch.autograd.grad(baked(xb).logsumexp(1).sum(), xb)
    assert (grad_p - grad_b).abs().max() <= 1e-5
    reference = evaluate_model(parametrized, data, info=info, attacks=("fgsm",), eps=(2 / 255,), batch_size=4,
                          device="cpu")
    assert [(r.attack, r.clean_top1, r.adv_top1) for r in rows] == [(r.attack, r.clean_top1, r.adv_top1)
                                                                    for r in reference]


class _FakeClock:
    """A perf_counter that moves only when told: the evaluation loop's time accounting without reading the clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class _SlowData(Dataset):
    """Tiny images whose loading takes a known (fake) time: the data wait must account for it."""

    delay = 0.05

    def __init__(self, clock: _FakeClock) -> None:
        self.clock = clock

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.clock.now += self.delay
        return torch.full((1, 8, 8), i / 8), i % 2


class _TimedModel(nn.Module):
    """A linear model whose every forward pass takes a known (fake) time."""

    cost = 0.001

    def __init__(self, clock: _FakeClock) -> None:
        super().__init__()
        self.clock, self.net = clock, nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
        self.forward_time = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.cost
        self.forward_time += self.cost
        return self.net(x)


def test_attack_summary_splits_data_wait_from_compute(monkeypatch):
    """The accounting, with a fake clock in the evaluation loop (no wall-clock reads): every second spent loading
    images is data wait, every second in the model's forward passes is compute, and the summary line reports both."""
    from robust_enc.attacks import evaluation

    clock = _FakeClock()
    monkeypatch.setattr(evaluation, "time", clock)
    info = DatasetInfo("slow", "test", 2, (1, 8, 8), (0.5,), (0.25,), 8)
    model = _TimedModel(clock)
    reports: list[BatchReport] = []
    evaluate_model(model, _SlowData(clock), info=info, attacks=("fgsm",), eps=(0.1,), batch_size=4, device="cpu",
                   on_batch=reports.append)
    last = reports[-1]
    assert last.session_images == 8 and len(reports) == 2
    assert last.data_wait_s == pytest.approx(8 * _SlowData.delay, rel=1e-9)
    assert last.compute_s == pytest.approx(model.forward_time, rel=1e-9) and last.compute_s > 0
    assert last.images_per_s == pytest.approx(8 / (clock.now - 1000.0), rel=1e-9)  # nothing after the last batch
    assert "img/s" in last.time_split() and "data wait 0.4 s" in last.time_split()


def test_attack_cli_with_subset_list_and_cache(tmp_path, capsys):
    _wnid_tree(tmp_path / "val")
    run = _imagenet_model(tmp_path, "enc")
    listing = tmp_path / "list.txt"
    listing.write_text("ILSVRC2012_val_00000008.JPEG\nILSVRC2012_val_00000001.JPEG\nILSVRC2012_val_00000004.JPEG\n")
    common = ["attack", "--checkpoint", str(run), "--data-dir", str(tmp_path), "--subset-list", str(listing),
              "--eps", "1/255", "--device", "cpu", "--batch-size", "2"]
    assert main(["cache", "--data-dir", str(tmp_path), "--subset-list", str(listing), "--image-size", "32",
                 "--cache", str(tmp_path / "cache")]) == 0
    assert "3 images of imagenet (val) cached" in capsys.readouterr().out
    assert main(common + ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "a.csv")]) == 0
    out = capsys.readouterr().out
    assert "data wait" in out and "model compute" in out
    assert main(common + ["--out", str(tmp_path / "b.csv")]) == 0
    a, b = (tmp_path / "a.csv").read_text().splitlines(), (tmp_path / "b.csv").read_text().splitlines()
    assert len(a) == 3
    strip = lambda lines: [line.split(",")[:12] for line in lines]  # noqa: E731 (accuracies, not wall times)
    assert strip(a) == strip(b)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the attack reused the cache the step built


def test_a_killed_cache_builds_temp_folder_is_swept_and_a_users_is_kept(tmp_path, monkeypatch, dead_pid):
    """A cache build writes into a temp folder marked with its pid (a kill -9 leaves one as large as the cache); the
    next build beside it removes a dead writer's marked folder and leaves an unmarked one (a user's) alone."""
    root = tmp_path / "in"
    _wnid_tree(root / "val")
    caches = tmp_path / "cache"
    killed = caches / f".0123456789abcdef.robust-enc-{dead_pid}-k1ll3d00.tmp"
    users = caches / ".mine.abcdefgh.tmp"
    for folder in (killed, users):
        folder.mkdir(parents=True)
        (folder / "images.npy").write_bytes(b"x" * 1000)
    renamed = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(src).name) or replace(src, dst))
    build_dataset("imagenet", "val", data_dir=str(root), image_size=32, cache=str(caches))
    assert len(renamed) == 1 and renamed[0].startswith(".") and f".robust-enc-{os.getpid()}-" in renamed[0]
    assert not killed.exists() and (users / "images.npy").exists()
