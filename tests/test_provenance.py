"""Every number carries its provenance and is checked against it: inputs that are well formed but not what the number
claims to be about (issue #26). Each case is reproduced end to end, against an independent reference: a hash taken by
hand with hashlib over the tensors' bytes, a fresh decode against the cache, the file a list line names."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robust_enc.checkpoint import load_checkpoint, save_checkpoint
from robust_enc.cli import main
from robust_enc.data import build_dataset
from robust_enc.errors import UserError
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model
from robust_enc.results import ResultRow, append_results, read_results, write_results

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code: int, err: list[str], *needles: str) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("robust-enc: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]


def hand_hash(state: dict[str, torch.Tensor]) -> str:
    """The reference content hash: sha256 over name|dtype|shape| and the raw bytes of each tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(bytes(t.reshape(-1).view(torch.uint8).tolist()))
    return digest.hexdigest()[:12]


DIGITS_SPEC = dict(num_classes=10, input_shape=(1, 8, 8))


def _digits_run(folder: Path, seed: int = 0, name: str = "checkpoint.pt", **metrics) -> Path:
    torch.manual_seed(seed)
    _, info = build_dataset("digits", "test")
    spec = ModelSpec("resnet_tiny", info.num_classes, info.input_shape, info.mean, info.std)
    save_checkpoint(folder / name, build_model(spec).eval(), spec, run_id=folder.name, dataset_info=info,
                    metrics=metrics)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _digits_run(tmp_path_factory.mktemp("runs") / "tiny")


def _attack(run: Path | str, out: Path, *extra) -> list[str]:
    return ["attack", "--checkpoint", run, "--device", "cpu", "--eps", "8/255", "--out", out, *extra]


# ------------------------------------------------------------------------------------------------ checkpoint hash
def test_the_stored_hash_is_the_hand_hash_of_the_tensors(run_dir):
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert payload["content_hash"] == hand_hash(payload["state_dict"])
    assert load_checkpoint(run_dir).content_hash == payload["content_hash"]


def test_one_flipped_bit_in_the_tensor_data_is_refused_naming_both_hashes(run_dir, tmp_path, capsys):
    folder = tmp_path / "flipped"
    shutil.copytree(run_dir, folder)
    path = folder / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    name = max(payload["state_dict"], key=lambda k: payload["state_dict"][k].numel())
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(payload["state_dict"][name].numpy().tobytes())
    assert at > 0
    raw[at + 5] ^= 0x10  # one bit of one float, in place: the zip still loads
    path.write_bytes(bytes(raw))
    flipped = torch.load(path, weights_only=True)["state_dict"]
    differs = [k for k in flipped if not torch.equal(flipped[k], payload["state_dict"][k])]
    assert differs == [name]  # the reference: the bit reached the tensor, and loading does not notice
    code, err = run_cli(capsys, *_attack(folder, tmp_path / "r.csv"))
    assert_one_line(code, err, str(path), payload["content_hash"], hand_hash(flipped))
    assert not (tmp_path / "r.csv").exists()


def test_negated_weights_under_the_old_hash_are_refused(run_dir, tmp_path, capsys):
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    payload["state_dict"] = {k: -v if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    (tmp_path / "neg").mkdir()
    torch.save(payload, tmp_path / "neg" / "checkpoint.pt")
    code, err = run_cli(capsys, *_attack(tmp_path / "neg", tmp_path / "r.csv"))
    assert_one_line(code, err, payload["content_hash"], hand_hash(payload["state_dict"]))
    code, err = run_cli(capsys, "gbr", "--checkpoint", tmp_path / "neg", "--device", "cpu")
    assert_one_line(code, err, "do not match the checkpoint's content hash")


# ------------------------------------------------------------------------------------------------ convert, --weights
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("shape", ["robust-enc shaped", "foreign torch file", "plain pickle"])
def test_convert_never_unpickles_a_file_that_is_not_a_robust_enc_checkpoint(shape, run_dir, tmp_path, capsys):
    marker, evil = tmp_path / "ran", tmp_path / "evil.pt"
    if shape == "robust-enc shaped":  # names the format: only its foreign global gives it away
        payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        payload["metrics"] = {"train_top1": Payload(marker)}
        torch.save(payload, evil)
    elif shape == "foreign torch file":
        torch.save({"weights": Payload(marker)}, evil)
    else:
        import pickle

        evil.write_bytes(pickle.dumps(Payload(marker)))
    torch.load(evil, weights_only=False) if shape != "plain pickle" else __import__("pickle").loads(evil.read_bytes())
    assert marker.is_dir()  # the reference: unpickling it does run the payload
    marker.rmdir()
    code, err = run_cli(capsys, "checkpoint", "convert", evil)
    assert code == 2 and len(err) == 1 and str(evil) in err[0], err
    assert not marker.exists()


@pytest.mark.parametrize("held", ["tensor", "list", "dict of lists"])
def test_weights_holding_no_state_dict_is_one_line(held, tmp_path, capsys):
    value = {"tensor": torch.ones(3), "list": [torch.ones(3)], "dict of lists": {"a": [1, 2]}}[held]
    torch.save(value, tmp_path / "w.pt")
    code, err = run_cli(capsys, "attack", "--model", "resnet_tiny", "--weights", tmp_path / "w.pt", "--dataset",
                        "digits", "--device", "cpu", "--out", tmp_path / "r.csv")
    assert_one_line(code, err, "not a state dict")


# ------------------------------------------------------------------------------------------------ the rows' provenance
def test_rows_record_the_exact_image_set_and_subset_beyond_the_split_records_what_ran(run_dir, tmp_path, capsys):
    out = tmp_path / "r.csv"
    for extra in ([], ["--subset", "100000"], ["--subset", "30"]):
        assert main([str(a) for a in _attack(run_dir, out, *extra)]) == 0
    rows = [r for r in read_results(out) if r.attack == "none"]
    assert [r.subset for r in rows] == [0, 450, 30] and [r.n for r in rows] == [450, 450, 30]
    everything = json.dumps({"dataset": "digits", "split": "test", "items": list(range(450))}, separators=(",", ":"))
    assert rows[0].image_set == rows[1].image_set == hashlib.sha256(everything.encode()).hexdigest()[:16]
    assert rows[2].image_set != rows[0].image_set
    assert {(r.weights, r.pixels) for r in rows} == {("checkpoint", "decoded")} and all(r.preprocessing for r in rows)


def test_two_weights_files_of_one_name_and_an_exported_model_keep_each_others_rows(run_dir, tmp_path, capsys):
    _digits_run(tmp_path / "run", seed=1)
    _digits_run(tmp_path / "run", seed=2, name="exported.pt")
    out = tmp_path / "r.csv"
    for i in (1, 2):
        torch.manual_seed(10 + i)
        spec = ModelSpec("resnet_tiny", 10, (1, 8, 8), (0.3,), (0.3,))
        (tmp_path / f"m{i}").mkdir()
        torch.save(build_model(spec).net.state_dict(), tmp_path / f"m{i}" / "model.pt")
        assert main(["attack", "--model", "resnet_tiny", "--weights", str(tmp_path / f"m{i}" / "model.pt"),
                     "--dataset", "digits", "--subset", "20", "--device", "cpu", "--eps", "8/255", "--out",
                     str(out)]) == 0
    for name in ("checkpoint.pt", "exported.pt"):
        assert main([str(a) for a in _attack(tmp_path / "run" / name, out, "--subset", "20")]) == 0
    rows = read_results(out)
    assert len(rows) == 8 and len({r.checkpoint_hash for r in rows}) == 4
    assert sorted({(r.run_id, r.weights) for r in rows}) == [("model", "model.pt"), ("run", "checkpoint"),
                                                             ("run", "exported.pt")]


def test_a_retrained_run_replaces_only_its_own_older_rows(tmp_path, capsys, caplog):
    run, out = _digits_run(tmp_path / "run", seed=1), tmp_path / "r.csv"
    assert main([str(a) for a in _attack(run, out, "--subset", "20")]) == 0
    _digits_run(tmp_path / "run", seed=1, name="exported.pt")
    assert main([str(a) for a in _attack(run / "exported.pt", out, "--subset", "20")]) == 0
    old = {r.checkpoint_hash for r in read_results(out) if r.weights == "checkpoint"}
    _digits_run(tmp_path / "run", seed=5)  # retrained in place: another checkpoint.pt
    with caplog.at_level(logging.WARNING):
        assert main([str(a) for a in _attack(run, out, "--subset", "20")]) == 0
    rows = read_results(out)
    assert {r.checkpoint_hash for r in rows if r.weights == "checkpoint"} == {load_checkpoint(run).content_hash}
    assert old != {load_checkpoint(run).content_hash}
    assert len([r for r in rows if r.weights == "exported.pt"]) == 2  # the export's rows stay
    assert "earlier checkpoint" in caplog.text


# ------------------------------------------------------------------------------------------------ the writer's checks
def _row(**kw) -> ResultRow:
    base = dict(run_id="r", model="resnet_tiny", regularizer="baseline", dataset="digits", split="test", subset=0,
                attack="fgsm", norm="linf", eps=4 / 255, n=100, clean_top1=0.9, adv_top1=0.4,
                checkpoint_hash="0123456789ab", image_set="feedfacecafebeef", weights="checkpoint")
    return ResultRow(**{**base, **kw})


def test_a_row_the_reader_would_refuse_is_refused_at_write_time(tmp_path, run_dir, capsys):
    with pytest.raises(UserError, match="column 'train_top1'.*negative"):
        write_results(tmp_path / "r.csv", [_row(train_top1=-0.5)])
    assert not (tmp_path / "r.csv").exists()
    _digits_run(tmp_path / "neg", train_top1=-0.5)
    code, err = run_cli(capsys, *_attack(tmp_path / "neg", tmp_path / "r.csv", "--subset", "10"))
    assert_one_line(code, err, "train_top1", "negative")
    assert not (tmp_path / "r.csv").exists()


def test_accuracies_must_be_counts_and_agree_with_the_clean_row(tmp_path):
    with pytest.raises(UserError, match="0.37 is not k/3"):
        append_results(tmp_path / "r.csv", [_row(attack="none", norm="none", eps=0.0, n=3, clean_top1=0.37,
                                                 adv_top1=0.37)])
    clean = _row(attack="none", norm="none", eps=0.0, clean_top1=0.9, adv_top1=0.9)
    with pytest.raises(UserError, match="contradicts the clean row"):
        append_results(tmp_path / "r.csv", [clean, _row(clean_top1=0.8, adv_top1=0.4)])
    assert not (tmp_path / "r.csv").exists()
    append_results(tmp_path / "r.csv", [clean, _row(), _row(image_set="0" * 16, clean_top1=0.8)])  # other images
    assert len(read_results(tmp_path / "r.csv")) == 3


def test_a_200_kb_cell_is_one_line(tmp_path, capsys):
    write_results(tmp_path / "r.csv", [_row()])
    with (tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    rows[0]["run_id"] = "x" * 200_000
    with (tmp_path / "r.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(UserError, match="field larger than field limit"):
        read_results(tmp_path / "r.csv")
    code, err = run_cli(capsys, "report", tmp_path / "r.csv", "--out", tmp_path / "rep")
    assert_one_line(code, err, "r.csv")


# ------------------------------------------------------------------------------------------------ non-finite numbers
def test_a_nan_model_is_one_line_for_attack_and_gbr_and_writes_no_row(run_dir, tmp_path, capsys):
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    payload["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                             for k, v in payload["state_dict"].items()}
    payload["content_hash"] = hand_hash(payload["state_dict"])  # a genuine NaN model, not a damaged file
    (tmp_path / "nan").mkdir()
    torch.save(payload, tmp_path / "nan" / "checkpoint.pt")
    code, err = run_cli(capsys, *_attack(tmp_path / "nan", tmp_path / "r.csv"))
    assert_one_line(code, err, "NaN/inf", "no row was written")
    assert not (tmp_path / "r.csv").exists()
    code, err = run_cli(capsys, "gbr", "--checkpoint", tmp_path / "nan", "--device", "cpu", "--subset", "10")
    assert_one_line(code, err, "GBR is NaN on 10 of 10 examples")


def test_finite_weights_with_non_finite_clean_outputs_write_no_row(run_dir, tmp_path, capsys):
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    payload["state_dict"]["normalize.std"] = torch.zeros_like(payload["state_dict"]["normalize.std"])  # x / 0
    payload["content_hash"] = hand_hash(payload["state_dict"])
    (tmp_path / "zero").mkdir()
    torch.save(payload, tmp_path / "zero" / "checkpoint.pt")
    model = build_model(load_checkpoint(tmp_path / "zero").spec)
    model.load_state_dict(payload["state_dict"])
    assert not torch.isfinite(model.eval()(torch.rand(4, 1, 8, 8))).all()  # the reference: its logits
    code, err = run_cli(capsys, *_attack(tmp_path / "zero", tmp_path / "r.csv", "--subset", "20"))
    assert_one_line(code, err, "outputs on clean images are NaN/inf")
    assert not (tmp_path / "r.csv").exists()
    assert not list(tmp_path.glob("*progress*"))


def test_an_overflowing_weight_norm_at_an_epochs_last_step_stops_training_keeping_the_last_finite_epoch(
        tmp_path, monkeypatch):
    """Epoch 2's last step leaves one weight at 1e30 (finite: its loss, taken before the update, was fine), so the
    squared weight norm is inf in float32: the run stops, and epoch 1's checkpoint is what is kept."""
    from robust_enc.train import loop
    from robust_enc.train.config import TrainConfig

    build_recipe, steps = loop.build_recipe, []

    def recipe_with_a_bad_last_step(*args, **kwargs):
        recipe = build_recipe(*args, **kwargs)
        step = recipe.train_step

        def train_step(model, x, y, optimizer, **kw):
            result = step(model, x, y, optimizer, **kw)
            steps.append(1)
            if len(steps) == 4:  # 64 images at batch 32: two steps an epoch, this is epoch 2's last
                with torch.no_grad():
                    next(p for p in model.parameters() if p.ndim == 4).view(-1)[0] = 1e30
            return result

        recipe.train_step = train_step
        return recipe

    monkeypatch.setattr(loop, "build_recipe", recipe_with_a_bad_last_step)
    config = TrainConfig(model="resnet_tiny", dataset="digits", subset=64, val_subset=32, batch_size=32,
                         device="cpu", seed=3, epochs=3, gbr_probe_size=0, lr=0.05, out_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"squared norm overflowed.* epoch 2 .*checkpoint of epoch 1"):
        loop.train(config)
    kept = load_checkpoint(tmp_path / loop.resolve_config(config).run_id)
    assert kept.extra["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept.state_dict.values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ image files
def _bmp(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), value, dtype=np.uint8)).save(path, "BMP")


def test_a_subset_list_line_with_a_folder_takes_that_folders_file(tmp_path):
    _bmp(tmp_path / "imgs" / "a" / "0000.bmp", 10)
    _bmp(tmp_path / "imgs" / "b" / "0000.bmp", 200)
    (tmp_path / "list.txt").write_text("b/0000.bmp\n")
    data, _ = build_dataset(f"folder:{tmp_path / 'imgs'}", "val", image_size=32, subset_list=str(tmp_path / "list.txt"))
    assert data.samples == [(str(tmp_path / "imgs" / "b" / "0000.bmp"), 1)]
    (tmp_path / "list.txt").write_text("0000.bmp\n")
    with pytest.raises(UserError, match="matches 2 images"):
        build_dataset(f"folder:{tmp_path / 'imgs'}", "val", image_size=32, subset_list=str(tmp_path / "list.txt"))


def _cached_and_fresh(root: Path, cache: Path, **kw) -> tuple[torch.Tensor, torch.Tensor, str]:
    name = f"folder:{root}"
    cached, info = build_dataset(name, "val", image_size=32, cache=str(cache), **kw)
    fresh, _ = build_dataset(name, "val", image_size=32)
    return (torch.stack([cached[i][0] for i in range(len(cached))]),
            torch.stack([fresh[i][0] for i in range(len(fresh))]), info.pixels)


def test_images_edited_in_place_with_the_same_size_are_never_served_stale(tmp_path, caplog):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    for i in range(4):
        _bmp(root / "ab"[i % 2] / f"{i:04d}.bmp", 40 * i)
    before, fresh, pixels = _cached_and_fresh(root, cache)
    assert torch.equal(before, fresh) and pixels.startswith("cache ")
    size = (root / "a" / "0000.bmp").stat().st_size
    _bmp(root / "a" / "0000.bmp", 250)  # other pixels, the same byte size
    assert (root / "a" / "0000.bmp").stat().st_size == size
    with caplog.at_level(logging.WARNING):
        after, fresh, _ = _cached_and_fresh(root, cache)
    assert "stale" in caplog.text and not torch.equal(after, before)
    assert torch.equal(after, fresh)  # the reference: a fresh decode


def test_a_damaged_images_npy_is_rebuilt_and_verify_reads_every_byte(tmp_path, caplog):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    for i in range(4):
        _bmp(root / "ab"[i % 2] / f"{i:04d}.bmp", 40 * i + 20)
    _cached_and_fresh(root, cache)
    (folder,) = list(cache.iterdir())
    images = folder / "images.npy"
    stat = images.stat()
    raw = bytearray(images.read_bytes())
    raw[-1] ^= 0xFF
    images.write_bytes(bytes(raw))
    os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only the bytes tell
    cached, fresh, _ = _cached_and_fresh(root, cache)
    assert not torch.equal(cached, fresh)  # the reference: the cheap check cannot see it ...
    with caplog.at_level(logging.WARNING):
        cached, fresh, _ = _cached_and_fresh(root, cache, verify_cache=True)  # ... the full one does
    assert "images.npy's bytes changed" in caplog.text and torch.equal(cached, fresh)
    images.write_bytes(images.read_bytes()[:-100])  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cached, fresh, _ = _cached_and_fresh(root, cache)
    assert "truncated" in caplog.text and torch.equal(cached, fresh)
    labels = next(cache.iterdir()) / "labels.npy"
    labels.write_bytes(labels.read_bytes()[:-8])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cached, fresh, _ = _cached_and_fresh(root, cache)
    assert "labels.npy has" in caplog.text and torch.equal(cached, fresh)


def test_attack_with_a_stale_cache_gives_the_fresh_decodes_rows(tmp_path, capsys):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    for i in range(6):
        _bmp(root / "ab"[i % 2] / f"{i:04d}.bmp", 30 * i + 10)
    torch.manual_seed(0)
    spec = ModelSpec("resnet_tiny", 2, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", build_model(spec).eval(), spec, run_id="run")
    common = ["attack", "--checkpoint", tmp_path / "run", "--dataset", f"folder:{root}", "--device", "cpu",
              "--eps", "8/255"]
    assert main([str(a) for a in [*common, "--cache", cache, "--out", tmp_path / "first.csv"]]) == 0
    for i in range(0, 6, 2):
        _bmp(root / "a" / f"{i:04d}.bmp", 255 - 30 * i)  # same byte sizes
    assert main([str(a) for a in [*common, "--cache", cache, "--out", tmp_path / "cached.csv"]]) == 0
    assert main([str(a) for a in [*common, "--out", tmp_path / "fresh.csv"]]) == 0
    cached, fresh = read_results(tmp_path / "cached.csv"), read_results(tmp_path / "fresh.csv")
    assert [(r.clean_top1, r.adv_top1, r.image_set) for r in cached] == \
        [(r.clean_top1, r.adv_top1, r.image_set) for r in fresh]
    assert cached[0].pixels.startswith("cache ") and fresh[0].pixels == "decoded"
