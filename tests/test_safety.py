"""Nothing runs, nothing is lost: checkpoints that cannot carry code, results files under concurrent writers and
kill -9, strict reads, divergence, and one line + exit 2 for every bad input.

Faults are injected on purpose: a pickled ``__reduce__`` payload, two writer processes, SIGKILL at seeded points,
truncated and hand-edited results files, a failing disk under the report, a diverging learning rate."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_enc.attacks.config import AttackConfig
from robust_enc.attacks.evaluation import evaluate
from robust_enc.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from robust_enc.cli import main
from robust_enc.data import build_dataset
from robust_enc.errors import UserError
from robust_enc.io import sweep_stale_temps, write_text_atomic
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model
from robust_enc.reports import build_report
from robust_enc.results import ResultRow, read_results, write_results
from robust_enc.runtime.seeding import live_rng_state
from robust_enc.train.config import TrainConfig
from robust_enc.train.epoch import EXPLODED_LOSS_FACTOR, Progress, exploded_loss
from robust_enc.train.loop import train
from robust_enc.train.run_folder import write_metrics

REPO = Path(__file__).resolve().parent.parent
TINY = dict(model="resnet_tiny", dataset="digits", subset=64, val_subset=32, batch_size=32, device="cpu", seed=3)
TINY_ARGS = ["--model", "resnet_tiny", "--dataset", "digits", "--subset", "64", "--val-subset", "32",
             "--batch-size", "32", "--device", "cpu", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of ``robust-enc ARGV`` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own exit (its errors go through robust_enc.cli's one-line parser)
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code: int, err: list[str], *needles: str) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("robust-enc: error: "), err
    assert "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], err[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An untrained resnet_tiny for digits saved as a run folder (attacks and GBR need no accuracy here)."""
    torch.manual_seed(0)
    _, info = build_dataset("digits", "test")
    spec = ModelSpec("resnet_tiny", info.num_classes, info.input_shape, info.mean, info.std)
    folder = tmp_path_factory.mktemp("runs") / "tiny"
    save_checkpoint(folder / "checkpoint.pt", build_model(spec).eval(), spec, run_id="tiny", dataset_info=info)
    return folder


# ------------------------------------------------------------------------------------------------ checkpoints
class Payload:
    """Unpickling this calls os.mkdir(marker): the code a hostile checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def hostile_checkpoint(path: Path, marker: Path, like: Path) -> None:
    """A checkpoint shaped like ``like`` (a real one) with the payload in its metrics."""
    payload = torch.load(like, weights_only=True)
    payload["metrics"] = {"train_top1": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def test_the_payload_is_real(run_dir, tmp_path):
    """The reference for the test below: loading the file with pickle (torch.load(weights_only=False), what
    robust-enc did before) does run it."""
    hostile_checkpoint(tmp_path / "evil.pt", tmp_path / "ran", run_dir / "checkpoint.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "ran").is_dir()


def _reproduce_run_dir(out: Path) -> Path:
    from robust_enc.reproduce import load_preset, plan

    train_config, _ = plan(dataclasses.replace(load_preset("quick"), rows=["baseline"]), out, device="cpu")[0]
    return Path(train_config.out_dir) / train_config.run_id


@pytest.mark.parametrize("command", ["attack", "gbr", "train", "reproduce", "attack --weights", "gbr --weights"])
def test_a_pickle_payload_executes_nothing_through_any_command(command, run_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    runs = tmp_path / "runs"
    if command == "reproduce":
        evil = _reproduce_run_dir(tmp_path / "study") / "checkpoint.pt"
    else:
        evil = runs / "r" / "checkpoint.pt"
    hostile_checkpoint(evil, marker, run_dir / "checkpoint.pt")
    argv = {
        "attack": ["attack", "--checkpoint", evil.parent, "--device", "cpu"],
        "gbr": ["gbr", "--checkpoint", evil, "--device", "cpu"],
        "train": ["train", *TINY_ARGS, "--epochs", "1", "--out-dir", runs, "--run-id", "r"],
        "reproduce": ["reproduce", "--preset", "quick", "--rows", "baseline", "--out", tmp_path / "study",
                      "--device", "cpu"],
        "attack --weights": ["attack", "--model", "resnet_tiny", "--weights", evil, "--dataset", "digits",
                             "--device", "cpu", "--out", tmp_path / "r.csv"],
        "gbr --weights": ["gbr", "--model", "resnet_tiny", "--weights", evil, "--dataset", "digits", "--device", "cpu"],
    }[command]
    code, err = run_cli(capsys, *argv)
    if command == "reproduce":  # the study's banner comes first
        assert not any("Traceback" in line for line in err)
        err = [line for line in err if line.startswith("robust-enc: error: ")]
    assert_one_line(code, err, str(evil), "checkpoint convert")
    assert not marker.exists()
    assert not (tmp_path / "r.csv").exists()


def save_as_format_1(path: Path) -> None:
    """Rewrite a checkpoint the way robust-enc wrote format 1: numpy's and python's RNG states as the live tuples,
    torch's version as a TorchVersion object (both need pickle), format_version 1."""
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 1
    payload["versions"]["torch_version"] = torch.__version__
    payload["extra"]["rng"] = [live_rng_state(state) for state in payload["extra"]["rng"]]
    torch.save(payload, path)


def test_a_converted_format_1_checkpoint_resumes_bit_identically(tmp_path, stop_after, capsys):
    # cutmix draws from numpy's RNG, the crop augmentation from torch's: the converted states must restore both.
    config = TrainConfig(**TINY, epochs=2, regularizer="enc+cutmix", gbr_probe_size=4)
    whole = load_checkpoint(train(dataclasses.replace(config, out_dir=str(tmp_path / "whole"))))
    split = dataclasses.replace(config, out_dir=str(tmp_path / "split"))
    with pytest.raises(KeyboardInterrupt):
        train(split, progress=stop_after(1))
    folder = Path(split.out_dir) / whole.run_id
    save_as_format_1(folder / "checkpoint.pt")
    with pytest.raises(Exception, match="Unsupported global"):  # the reference: torch's own safe loader refuses it
        torch.load(folder / "checkpoint.pt", weights_only=True)
    code, err = run_cli(capsys, "train", *TINY_ARGS, "--reg", "enc+cutmix", "--epochs", "2", "--gbr-probe-size", "4",
                        "--out-dir", split.out_dir, "--resume")
    assert_one_line(code, err, f"robust-enc checkpoint convert {folder / 'checkpoint.pt'}")

    assert main(["checkpoint", "convert", str(folder)]) == 0
    assert "converted" in capsys.readouterr().out
    assert main(["checkpoint", "convert", str(folder)]) == 0
    assert "already in the safe format" in capsys.readouterr().out
    torch.load(folder / "checkpoint.pt", weights_only=True)
    torch.rand(7), np.random.rand(3), random.random()  # disturb every RNG: resume must restore them all
    resumed = load_checkpoint(train(dataclasses.replace(split, resume=True)))
    assert resumed.content_hash == whole.content_hash
    for key in whole.state_dict:
        assert torch.equal(whole.state_dict[key], resumed.state_dict[key]), key
    assert [f.name for f in folder.iterdir() if f.name.endswith(".tmp")] == []


# ------------------------------------------------------------------------------------------------ results files
def _row(**kw) -> ResultRow:
    base = dict(run_id="r", model="resnet_tiny", regularizer="baseline", dataset="digits", split="test", subset=0,
                attack="fgsm", norm="linf", eps=4 / 255, n=100, clean_top1=0.9, adv_top1=0.4, gbr=12.5,
                checkpoint_hash="0123456789ab", created_at="2026-01-02T03:04:05+00:00")
    return ResultRow(**{**base, **kw})


WRITER = """
import sys, time
from pathlib import Path
from robust_enc.results import ResultRow, append_results
out, who, start = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while not start.exists():
    time.sleep(0.005)
for i in range(15):
    rows = [ResultRow(run_id=who, model="resnet_tiny", regularizer="baseline", dataset="digits", split="test",
                      subset=0, attack="fgsm", norm="linf", eps=(5 * i + k + 1) / 1000, n=10, clean_top1=0.9,
                      adv_top1=0.5) for k in range(5)]
    append_results(out, rows)
"""


def test_two_writer_processes_into_one_large_results_file_keep_every_row(tmp_path):
    out = tmp_path / "results.csv"
    write_results(out, [_row(run_id=f"old{i}", eps=(i % 100) / 255, seed=i) for i in range(3000)])
    start = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), who, str(start)], env=env)
               for who in ("a", "b")]
    time.sleep(1.0)  # both imported and waiting
    start.touch()
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    rows = read_results(out)
    assert len(rows) == 3000 + 2 * 75
    assert {r.run_id for r in rows if r.run_id in ("a", "b")} == {"a", "b"}
    assert sum(r.run_id == "a" for r in rows) == sum(r.run_id == "b" for r in rows) == 75


def _valid_csv(tmp_path: Path) -> Path:
    path = tmp_path / "results.csv"
    write_results(path, [_row(attack="none", norm="none", eps=0.0, adv_top1=0.9), _row(adv_top1=0.79)])
    return path


def _edit(path: Path, row: int, column: str, value: str) -> None:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows[row - 1][column] = value
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("column,value,needle", [
    ("n", "inf", "'inf' is not an integer"),
    ("n", "-7", "-7 is below 1"),
    ("n", "0", "0 is below 1"),
    ("n", "7.9", "'7.9' is not an integer"),
    ("run_id", "", "empty"),
    ("adv_top1", "0.7x", "'0.7x' is not a number"),
    ("adv_top1", "", "required"),
    ("adv_top1", "0.95", "adv_top1 0.95 > clean_top1 0.9"),
    ("clean_top1", "nan", "required"),
    ("eps", "inf", "not a finite number"),
    ("gbr", "-1", "negative"),
    ("norm", "L3", "not one of"),
    ("created_at", "2026-01-0", "ISO date-time"),
])
def test_a_bad_cell_refuses_the_file_naming_row_and_column(tmp_path, column, value, needle):
    path = _valid_csv(tmp_path)
    _edit(path, 2, column, value)
    with pytest.raises(UserError) as err:
        read_results(path)
    message = str(err.value)
    assert message.startswith(f"{path}: row 2") and needle in message, message
    if column != "adv_top1" or "clean" not in needle:  # the invariant names both columns itself
        assert f"column {column!r}" in message, message


def test_a_file_truncated_inside_a_number_is_refused(tmp_path):
    """The reported case: cut inside the last row's adv_top1 (0.79 -> 0.7), the row read as 70% and a second seed."""
    path = _valid_csv(tmp_path)
    text = path.read_text()
    cut = text.rindex("0.79") + 3
    path.write_text(text[:cut])
    with pytest.raises(UserError, match=r"row 2, column 'gbr': missing .*truncated"):  # the cell after adv_top1
        read_results(path)
    path.write_text(text[:-5])  # inside the last column, the timestamp
    with pytest.raises(UserError, match=r"row 2, column 'created_at'.*truncated"):
        read_results(path)
    lines = text.split("\n")  # read_text turned the writer's \r\n into \n
    lines[1] += ",extra"
    path.write_text("\n".join(lines))
    with pytest.raises(UserError, match="row 1 has 1 more cells than the header"):
        read_results(path)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_an_overflowed_gbr_reads_back_as_inf_and_a_missing_one_as_nan(tmp_path, suffix):
    path = write_results(tmp_path / f"r{suffix}", [_row(gbr=math.inf, gbr_stderr=math.nan)])
    assert "inf" in path.read_text()
    [row] = read_results(path)
    assert row.gbr == math.inf and math.isnan(row.gbr_stderr)


def test_metrics_csv_writes_an_overflowed_gbr_as_inf_not_blank(tmp_path):
    from robust_enc.train.run_folder import METRIC_COLUMNS

    row = {name: 1.0 for name in METRIC_COLUMNS} | {"gbr": math.inf, "gbr_stderr": math.nan}
    write_metrics(tmp_path / "metrics.csv", [row])
    with (tmp_path / "metrics.csv").open(newline="") as f:
        [back] = list(csv.DictReader(f))
    assert float(back["gbr"]) == math.inf and back["gbr_stderr"] == ""


# ------------------------------------------------------------------------------------------------ temp files, report
def test_stale_temp_files_of_dead_writers_are_swept_on_the_next_write(tmp_path, dead_pid):
    dead, alive = dead_pid, os.getppid()
    stale = [tmp_path / f".results.csv.robust-enc-{dead}-abcd1234.tmp",
             tmp_path / f".checkpoint.pt.robust-enc-{dead}-x_9y8z7w.tmp"]
    # Only names with the suite's marker and a dead pid go: not a live writer's, not an unmarked one however old.
    old_unmarked = tmp_path / ".results.csv.k3j4h5g6.tmp"
    kept = [tmp_path / f".results.csv.robust-enc-{alive}-abcd1234.tmp", tmp_path / ".metrics.csv.q1w2e3r4.tmp",
            tmp_path / "results.csv.tmp", tmp_path / "notes.txt", old_unmarked]
    report_tmp = tmp_path / f".report.robust-enc-{dead}-zzzz1111.tmp"
    report_tmp.mkdir()
    (report_tmp / "index.md").write_text("half")
    for path in [*stale, *kept]:
        path.write_text("x")
    os.utime(old_unmarked, (0, 0))  # as old as a file can be: age alone never sweeps (no clock read here)
    write_text_atomic(tmp_path / "config.json", "{}")  # the first write of this process into the folder sweeps
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in kept), "config.json"])
    assert sweep_stale_temps(tmp_path) == []


def _results_for_report(tmp_path: Path) -> Path:
    path = tmp_path / "results.csv"
    rows = []
    for run, reg, clean, adv in (("base", "baseline", 0.9, 0.4), ("enc", "enc", 0.88, 0.6)):
        rows += [_row(run_id=run, regularizer=reg, attack="none", norm="none", eps=0.0, clean_top1=clean,
                      adv_top1=clean),
                 _row(run_id=run, regularizer=reg, clean_top1=clean, adv_top1=adv)]
    return write_results(path, rows)


def test_a_failing_disk_during_report_keeps_the_previous_report_whole(tmp_path, monkeypatch, capsys):
    from robust_enc.reports import plots

    results = _results_for_report(tmp_path)
    out = tmp_path / "report"
    build_report([results], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_accuracy_vs_eps", full_disk)  # fails after the tables are written
    code, err = run_cli(capsys, "report", results, "--out", out)
    assert_one_line(code, err, "No space left on device")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_report_refuses_to_replace_a_folder_that_is_not_a_report(tmp_path, capsys):
    results = _results_for_report(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    code, err = run_cli(capsys, "report", results, "--out", tmp_path / "mine")
    assert_one_line(code, err, "thesis.tex", "not a robust-enc report")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ divergence
def test_the_divergence_limit():
    assert exploded_loss(10) == pytest.approx(EXPLODED_LOSS_FACTOR * 2.302585, rel=1e-6)
    assert exploded_loss(1000) > exploded_loss(10) > 100 * math.log(10)  # far above any working run's loss


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """lr 1e4 from epoch 2 (the loss explodes while staying finite): a one-line UserError (exit 2 at the CLI), and
    the last good epoch's checkpoint and metrics kept byte for byte."""
    from robust_enc.train import loop

    set_lr = loop.set_lr
    calls = []

    def lr_then_explode(optimizer, factor):
        calls.append(factor)
        return set_lr(optimizer, factor if len(calls) == 1 else 1e4 * factor)

    monkeypatch.setattr(loop, "set_lr", lr_then_explode)
    config = TrainConfig(**TINY, epochs=4, gbr_probe_size=0, lr=0.1, out_dir=str(tmp_path))
    folder = tmp_path / loop.resolve_config(config).run_id
    kept: dict[str, bytes] = {}

    class Snapshot(Progress):
        def end_epoch(self, row: dict) -> None:
            kept.update({p.name: p.read_bytes() for p in folder.iterdir()})

    kept_line = r"at epoch \d.*the checkpoint of epoch \d \(the last good one\) is kept"
    with pytest.raises(UserError, match=kept_line) as err:
        train(config, progress=Snapshot())
    failed, kept_epoch = (int(n) for n in re.findall(r"epoch (\d)", str(err.value))[:2])
    assert failed >= 2 and kept_epoch == failed - 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept
    assert load_checkpoint(folder).extra["epoch"] == kept_epoch


def test_lr_1e3_from_the_command_line_exits_2_with_one_line(tmp_path, capsys):
    code, err = run_cli(capsys, "train", *TINY_ARGS, "--epochs", "2", "--lr", "1e3", "--gbr-probe-size", "0",
                        "--out-dir", tmp_path)
    assert_one_line(code, err, "above the divergence limit", "lower --lr")


# ------------------------------------------------------------------------------------------------ bad input table
def _no_spec(tmp_path: Path, run_dir: Path) -> list[str]:
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del payload["spec"]
    torch.save(payload, tmp_path / "nospec.pt")
    return ["attack", "--checkpoint", tmp_path / "nospec.pt", "--device", "cpu"]


def _garbage_out(tmp_path: Path, run_dir: Path) -> list[str]:
    (tmp_path / "garbage.csv").write_text("this is not,a results file\n1,2\n")
    return ["attack", "--checkpoint", run_dir, "--device", "cpu", "--out", tmp_path / "garbage.csv"]


def _folder_out(tmp_path: Path, run_dir: Path) -> list[str]:
    (tmp_path / "d.csv").mkdir()
    return ["attack", "--checkpoint", run_dir, "--device", "cpu", "--out", tmp_path / "d.csv"]


def _report_of(column: str, value: str) -> Callable[[Path, Path], list[str]]:
    def build(tmp_path: Path, run_dir: Path) -> list[str]:
        path = _valid_csv(tmp_path)
        _edit(path, 2, column, value)
        return ["report", path, "--out", tmp_path / "report"]
    return build


def _truncated_report(tmp_path: Path, run_dir: Path) -> list[str]:
    path = _valid_csv(tmp_path)
    text = path.read_text()
    path.write_text(text[:text.rindex("0.79") + 3])
    return ["report", path, "--out", tmp_path / "report"]


BAD_INPUTS = {  # case -> (argv builder, words the one line must hold)
    "checkpoint without spec": (_no_spec, ("no 'spec' entry",)),
    "attack --workers -1": (lambda t, r: ["attack", "--checkpoint", r, "--device", "cpu", "--workers", "-1",
                                          "--out", t / "o.csv"], ("--workers must be >= 0",)),
    "gbr --workers -1": (lambda t, r: ["gbr", "--checkpoint", r, "--device", "cpu", "--workers", "-1"],
                         ("--workers must be >= 0",)),
    "--eps -1/255": (lambda t, r: ["attack", "--checkpoint", r, "--eps", "-1/255", "--out", t / "o.csv"],
                     ("eps -1/255", "outside [0, 1]")),
    "checkpoint as --weights": (lambda t, r: ["attack", "--model", "resnet20", "--weights", r / "checkpoint.pt",
                                              "--dataset", "digits", "--device", "cpu", "--out", t / "o.csv"],
                                ("is a robust-enc checkpoint", "--checkpoint")),
    "--out is a folder": (lambda t, r: ["attack", "--checkpoint", r, "--device", "cpu", "--out", t],
                          ("must end in .csv or .json",)),
    "--out folder named .csv": (_folder_out, ("is a folder",)),
    "--out holds garbage": (_garbage_out, ("garbage.csv", "CSV header does not match")),
    "report: truncated inside a number": (_truncated_report, ("row 2", "missing")),
    "report: n=inf": (_report_of("n", "inf"), ("row 2, column 'n'",)),
    "report: n=-7": (_report_of("n", "-7"), ("row 2, column 'n'",)),
    "report: n=0": (_report_of("n", "0"), ("row 2, column 'n'",)),
    "report: empty run_id": (_report_of("run_id", ""), ("row 2, column 'run_id'",)),
    "convert a missing file": (lambda t, r: ["checkpoint", "convert", t / "nothing.pt"], ("no checkpoint at",)),
    "unknown option": (lambda t, r: ["attack", "--epss", "1/255"], ("unrecognized arguments",)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_bad_input_gets_one_line_and_exit_2_and_writes_nothing(case, run_dir, tmp_path, capsys):
    build, needles = BAD_INPUTS[case]
    argv = build(tmp_path, run_dir)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, err = run_cli(capsys, *argv)
    assert_one_line(code, err, *needles)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or changed


# ------------------------------------------------------------------------------------------------ kill -9
def _kill_at(command: list[str], ready, delay: float) -> int | None:
    """Start ``command``; once ``ready()`` holds, wait ``delay`` seconds and SIGKILL it. Returns its exit code when
    it finished first (None when killed). No deadline: however slow the machine, the run either reaches its kill point
    or exits, and both are handled; the outcome never depends on the clock, only where the kill lands does."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while process.poll() is None and not ready():
        time.sleep(0.01)
    if process.poll() is None:
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return None
    err = process.stderr.read().decode()
    assert process.returncode == 0, err[-2000:]
    return 0


def _same(value: object) -> object:
    """NaN compared equal to NaN (a metric not measured in both runs)."""
    return "nan" if isinstance(value, float) and math.isnan(value) else value


def _metrics_rows(folder: Path) -> int:
    try:
        return max(len((folder / "metrics.csv").read_text().splitlines()) - 1, 0)
    except FileNotFoundError:
        return 0


def test_kill_9_at_seeded_points_of_training_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Kill points drawn from a seeded RNG: after epoch e (1..3 of 4) is saved, plus 0-300 ms (mid-epoch, mid-write
    of checkpoint.pt or metrics.csv). Each resume continues from the last whole checkpoint."""
    rng = random.Random(13)
    epochs = 4
    config = TrainConfig(**TINY, epochs=epochs, regularizer="enc+cutmix", gbr_probe_size=4)
    whole = train(dataclasses.replace(config, out_dir=str(tmp_path / "whole")))
    out = tmp_path / "killed"
    folder = out / whole.name
    command = [sys.executable, "-m", "robust_enc.cli", "train", *TINY_ARGS, "--reg", "enc+cutmix", "--epochs",
               str(epochs), "--gbr-probe-size", "4", "--out-dir", str(out), "--resume"]
    kills = 0
    for epoch in sorted(rng.sample(range(1, epochs), 2)):
        if _kill_at(command, lambda e=epoch: _metrics_rows(folder) >= e, rng.uniform(0.0, 0.3)) is None:
            kills += 1
    assert kills >= 1
    if _metrics_rows(folder) < epochs or not (folder / "model_card.json").is_file():
        assert _kill_at(command, lambda: False, 0.0) == 0
    a, b = load_checkpoint(whole), load_checkpoint(folder)
    assert a.content_hash == b.content_hash
    timing = ("wall_s", "images_per_s")
    assert [{k: _same(v) for k, v in row.items() if k not in timing} for row in a.extra["history"]] == \
           [{k: _same(v) for k, v in row.items() if k not in timing} for row in b.extra["history"]]
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_kill_9_at_seeded_points_of_an_attack_then_resume_gives_the_uninterrupted_rows(run_dir, tmp_path):
    rng = random.Random(11)
    config = AttackConfig(checkpoint=str(run_dir), attacks=("fgsm", "pgd"), eps=(4 / 255, 16 / 255), steps=3,
                          batch_size=16, subset=160, device="cpu", out=str(tmp_path / "whole.csv"))
    whole = evaluate(config)
    out = tmp_path / "killed.csv"
    command = [sys.executable, "-m", "robust_enc.cli", "attack", "--checkpoint", str(run_dir), "--attack", "fgsm,pgd",
               "--eps", "4/255,16/255", "--steps", "3", "--batch-size", "16", "--subset", "160", "--device", "cpu",
               "--out", str(out)]

    def batches_done() -> int:
        import json

        for path in tmp_path.glob("killed.csv.progress.*.json"):
            try:
                return json.loads(path.read_text())["next_batch"]
            except (OSError, ValueError):
                return 0
        return 0

    kills = 0
    for batch in sorted(rng.sample(range(1, 10), 2)):
        if _kill_at(command, lambda b=batch: batches_done() >= b, rng.uniform(0.0, 0.2)) is None:
            kills += 1
    assert kills >= 1
    if not out.exists():
        assert _kill_at(command, lambda: False, 0.0) == 0
    measured = ("attack", "eps", "n", "clean_top1", "adv_top1", "steps", "step_size", "flags")
    as_tuples = [tuple(_same(getattr(r, f)) for f in measured) for r in read_results(out)]
    assert as_tuples == [tuple(_same(getattr(r, f)) for f in measured) for r in whole]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") or "killed.csv.progress" in p.name]
    assert leftovers == []


def test_save_checkpoint_payload_loads_with_weights_only(run_dir):
    """Every value torch's safe loader admits: the reference is torch.load(weights_only=True) itself."""
    payload = torch.load(io.BytesIO((run_dir / "checkpoint.pt").read_bytes()), weights_only=True)
    assert payload["format"] == FORMAT and payload["format_version"] == 2
    assert type(payload["versions"]["torch_version"]) is str
