"""Every number carries its provenance: the report never averages different image sets, reads symlinked run folders,
leaves the user's temp-looking files alone; the CLI exits 3 on sanity flags, 143 on SIGTERM with one line, 2 on an
``--order`` name that matches nothing, and prints user text (run ids, regularizers) literally, never as markup.

Results files are written by hand (``ResultRow``), so every expected number is known before the report runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from robust_enc.checkpoint import save_checkpoint
from robust_enc.cli import main
from robust_enc.data import build_dataset
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model
from robust_enc.reports import load_inputs
from robust_enc.results import ResultRow, read_results, write_results

REPO = Path(__file__).resolve().parent.parent
OLD, NEW = "2025-01-01T00:00:00+00:00", "2025-01-02T00:00:00+00:00"
FGSM8 = f"adv:fgsm:linf:{8 / 255!r}"


def _row(run_id: str, attack: str, *, n: int, subset: int, clean: float, adv: float | None = None,
         created_at: str = OLD, **kw) -> ResultRow:
    return ResultRow(run_id=run_id, model="resnet_tiny", regularizer=kw.pop("regularizer", "baseline"),
                     dataset="digits", split="test", subset=subset, attack=attack,
                     norm="none" if attack == "none" else "linf", eps=0.0 if attack == "none" else 8 / 255, n=n,
                     clean_top1=clean, adv_top1=clean if adv is None else adv,
                     checkpoint_hash=kw.pop("checkpoint_hash", f"hash-{run_id}"), created_at=created_at, **kw)


def _evaluation(run_id: str, *, n: int, subset: int, clean: float, adv: float, **kw) -> list[ResultRow]:
    """What one ``attack --attack fgsm --eps 8/255`` run writes: the clean row and the FGSM row."""
    return [_row(run_id, "none", n=n, subset=subset, clean=clean, **kw),
            _row(run_id, "fgsm", n=n, subset=subset, clean=clean, adv=adv, **kw)]


def _report(tmp_path: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> tuple[int, dict]:
    out = tmp_path / "report"
    code = main(["report", *map(str, inputs), "--out", str(out), "--format", "json", *extra])
    table3 = json.loads((out / "table3.json").read_text()) if code == 0 else {}
    return code, table3


def _cells(table3: dict, label: str) -> dict:
    return next(r for r in table3["rows"] if r["label"] == label)


# ------------------------------------------------------------------------------------------------ image sets
def test_attack_on_30_images_then_on_450_reports_the_450_image_numbers_not_their_mean(tmp_path, capsys):
    """``attack --subset 30`` then ``attack`` (450 images) into one results.csv: 29/30 and 401/450 robust were
    averaged into one cell labelled n = 450. The cell must be the 450-image number, with a note on the 30 left out."""
    results = tmp_path / "results.csv"
    write_results(results, _evaluation("tiny", n=30, subset=30, clean=1.0, adv=29 / 30)
                  + _evaluation("tiny", n=450, subset=0, clean=430 / 450, adv=401 / 450, created_at=NEW))
    code, table3 = _report(tmp_path, results)
    assert code == 0
    tiny = _cells(table3, "tiny")
    assert tiny[FGSM8] == pytest.approx(401 / 450) and tiny["clean_top1"] == pytest.approx(430 / 450)
    assert tiny["n_clean"] == 450 and tiny[f"n:{FGSM8}"] == 450
    left_out = [n for n in table3["notes"] if "30 images of digits/test (subset 30) left out" in n]
    assert len(left_out) == 1 and "clean, fgsm linf 8/255" in left_out[0], table3["notes"]


def test_the_largest_image_set_wins_even_when_older_and_a_tie_goes_to_the_newest(tmp_path):
    # Recorded digests: same size, different images (e.g. two --subset-list files): the newest measurement is kept.
    rows = (_evaluation("tiny", n=450, subset=0, clean=0.9, adv=0.5, image_set="aaaa")
            + _evaluation("tiny", n=30, subset=30, clean=1.0, adv=0.9, created_at=NEW)
            + _evaluation("tiny", n=450, subset=0, clean=0.8, adv=0.4, image_set="bbbb", created_at=NEW))
    write_results(tmp_path / "r.csv", rows)
    data = load_inputs([tmp_path / "r.csv"])
    assert sorted((r.attack, r.image_set, r.adv_top1) for r in data.rows) == [("fgsm", "bbbb", 0.4),
                                                                             ("none", "bbbb", 0.8)]
    assert data.conflicts == []  # different images are not a conflict about one measurement
    assert sum("left out" in n for n in data.notes) == 2  # the 30-image set and image set aaaa, each named
    assert any("image set aaaa" in n for n in data.notes)


def test_a_threat_measured_only_on_a_subset_stays_and_its_clean_row_is_not_reported_as_left_out(tmp_path):
    """The presets' design: FGSM on every image, AutoAttack on a subset, each evaluation with its own clean row."""
    rows = _evaluation("tiny", n=450, subset=0, clean=0.9, adv=0.5) + [
        _row("tiny", "none", n=40, subset=40, clean=0.95),
        ResultRow(**{**_row("tiny", "fgsm", n=40, subset=40, clean=0.95, adv=0.2).to_dict(), "attack": "autoattack"})]
    write_results(tmp_path / "r.csv", rows)
    data = load_inputs([tmp_path / "r.csv"])
    assert sorted((r.attack, r.n) for r in data.rows) == [("autoattack", 40), ("fgsm", 450), ("none", 450)]
    assert data.notes == [] and data.mixed == []


def test_models_compared_on_different_image_sets_are_marked(tmp_path):
    """A baseline measured on 30 images beside ENC on 450: shown, but the comparison is marked."""
    write_results(tmp_path / "r.csv", _evaluation("base", n=30, subset=30, clean=1.0, adv=0.9)
                  + _evaluation("enc", n=450, subset=0, clean=0.95, adv=0.7, regularizer="enc"))
    code, table3 = _report(tmp_path, tmp_path / "r.csv")
    assert code == 0 and _cells(table3, "enc")[FGSM8] == pytest.approx(0.7)
    [mixed] = load_inputs([tmp_path / "r.csv"]).mixed
    assert mixed.threats == ["clean", "fgsm linf 8/255"]
    assert mixed.image_sets == {"base": "30 images of digits/test (subset 30)", "enc": "450 images of digits/test"}
    assert any("compare models measured on different image sets" in n and "base on 30 images" in n
               for n in table3["notes"])


def test_conflicting_rows_of_one_model_image_set_and_threat_keep_the_newest(tmp_path):
    older = _evaluation("tiny", n=450, subset=0, clean=0.9, adv=0.5)
    newer = _evaluation("tiny", n=450, subset=0, clean=0.9, adv=0.6, created_at=NEW)
    other_model = _evaluation("tiny", n=450, subset=0, clean=0.7, adv=0.1, checkpoint_hash="retrained")
    write_results(tmp_path / "a.csv", older)
    write_results(tmp_path / "b.csv", newer)
    data = load_inputs([tmp_path / "a.csv", tmp_path / "b.csv"])
    assert [c.kept.adv_top1 for c in data.conflicts] == [0.6] and [d.adv_top1 for d in data.conflicts[0].dropped] == [
        0.5]
    assert "on 450 images of digits/test" in data.conflicts[0].describe()
    # Another checkpoint of the run is another model: never a conflict with these rows, never averaged with them.
    write_results(tmp_path / "c.csv", newer + other_model)
    data = load_inputs([tmp_path / "c.csv"])
    assert data.conflicts == [] and {r.checkpoint_hash for r in data.rows} == {"hash-tiny"}


# ------------------------------------------------------------------------------------------------ run folders
def _run_folder(folder: Path, run_id: str, regularizer: str, adv: float) -> Path:
    folder.mkdir(parents=True)
    write_results(folder / "results.csv", _evaluation(run_id, n=450, subset=0, clean=0.9, adv=adv,
                                                      regularizer=regularizer))
    return folder


def test_a_symlinked_run_folder_is_read_and_a_link_loop_ends(tmp_path, capsys):
    study = tmp_path / "study"
    _run_folder(study / "base", "base", "baseline", 0.3)
    elsewhere = _run_folder(tmp_path / "disk2" / "enc", "enc", "enc", 0.6)
    (study / "enc").symlink_to(elsewhere, target_is_directory=True)
    (study / "loop").symlink_to(study, target_is_directory=True)  # a link back up the tree
    (study / "gone").symlink_to(tmp_path / "nowhere")
    code, table3 = _report(tmp_path, study)
    assert code == 0
    assert {r["label"]: r[FGSM8] for r in table3["rows"]} == pytest.approx({"base": 0.3, "enc": 0.6})
    assert any("loop" in n and "searched already" in n for n in table3["notes"])
    assert any("gone" in n and "does not exist" in n for n in table3["notes"])


# ------------------------------------------------------------------------------------------------ --order
def test_order_naming_no_row_is_one_line_and_exit_2(tmp_path, capsys):
    write_results(tmp_path / "r.csv", _evaluation("base", n=450, subset=0, clean=0.9, adv=0.3)
                  + _evaluation("enc", n=450, subset=0, clean=0.9, adv=0.6, regularizer="enc"))
    code, _ = _report(tmp_path, tmp_path / "r.csv", extra=("--order", "enc,nosuch"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--order nosuch" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "report").exists()
    assert _report(tmp_path, tmp_path / "r.csv", extra=("--order", "enc"))[0] == 0


# ------------------------------------------------------------------------------------------------ temp sweep
def test_report_beside_a_users_old_tmp_folders_removes_only_its_own_dead_writers_temps(tmp_path, capsys, dead_pid):
    """``report --out`` sweeps its folder's parent: a user's ``.x.XXXXXXXX.tmp`` folder, however old, and a temp name
    of an older robust-enc (pid but no marker) are not this run's to delete; a marked temp of a dead writer is."""
    dead = dead_pid
    users = [tmp_path / ".x.abcdefgh.tmp", tmp_path / f".report.{dead}.abcd1234.tmp"]
    ours = tmp_path / f".report.robust-enc-{dead}-abcd1234.tmp"
    for folder in (*users, ours):
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
        os.utime(folder, (0, 0))  # as old as a file can be: age alone never sweeps (no clock read here)
    results = tmp_path / "inputs" / "r.csv"  # elsewhere: a process sweeps a folder once, at its first write there
    write_results(results, _evaluation("tiny", n=450, subset=0, clean=0.9, adv=0.3))
    assert _report(tmp_path, results)[0] == 0
    assert all((folder / "keep.txt").read_text() == "mine" for folder in users)
    assert not ours.exists()


# ------------------------------------------------------------------------------------------------ exit codes
@pytest.fixture(scope="module")
def flagged_run(tmp_path_factory) -> Path:
    """A run folder whose model has all weights zero: constant logits, so every input gradient is zero and the
    zero-gradient sanity check flags each attack. Its run id is rich markup, printed in the table and the panel."""
    _, info = build_dataset("digits", "test")
    spec = ModelSpec("resnet_tiny", info.num_classes, info.input_shape, info.mean, info.std)
    model = build_model(spec).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    folder = tmp_path_factory.mktemp("runs") / "zero"
    save_checkpoint(folder / "checkpoint.pt", model, spec, run_id="[/red]zero", dataset_info=info)
    return folder


def test_attack_exits_3_on_sanity_flags_after_writing_its_rows_and_0_with_allow_flags(flagged_run, tmp_path,
                                                                                     capsys):
    out = tmp_path / "r.csv"
    argv = ["attack", "--checkpoint", str(flagged_run), "--attack", "fgsm", "--eps", "8/255", "--subset", "20",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 3
    captured = capsys.readouterr()
    rows = read_results(out)  # written before the exit
    assert [r.attack for r in rows] == ["none", "fgsm"] and "zero_gradient" in rows[1].flags
    assert "[/red]zero on digits" in captured.out  # a run id that looks like markup is printed as it is
    assert "[/red]zero fgsm" in captured.err and "exit 3" in captured.err and "--allow-flags" in captured.err
    assert main([*argv, "--allow-flags"]) == 0
    assert "exit 3" not in capsys.readouterr().err


def test_reproduce_exits_3_when_its_results_hold_flags_and_prints_the_preset_text_literally(tmp_path, capsys):
    preset = {"description": "[/bold] a tiny study", "model": "resnet_tiny", "dataset": "digits",
              "rows": ["baseline"], "seeds": [0],
              "train": {"epochs": 1, "batch_size": 32, "subset": 64, "val_subset": 32, "gbr_probe_size": 0},
              "attack": {"attacks": ["fgsm"], "eps": ["8/255"], "subset": 20, "batch_size": 20}}
    (tmp_path / "tiny.json").write_text(json.dumps(preset))
    argv = ["reproduce", "--preset", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "study"), "--device", "cpu"]
    assert main([*argv, "--allow-flags"]) == 0
    assert "[/bold] a tiny study" in capsys.readouterr().err
    [results] = (tmp_path / "study" / "runs").glob("*/results.csv")
    write_results(results, [ResultRow(**{**r.to_dict(), "flags": "zero_gradient=1.000" if r.attack == "fgsm" else ""})
                            for r in read_results(results)])
    assert main(argv) == 3  # everything is done already: the study only reports, and its flag exits 3
    assert "zero_gradient=1.000" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ markup
def test_run_ids_and_regularizers_that_look_like_markup_print_as_text(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")
    write_results(tmp_path / "r.csv", _evaluation("[/red]", n=450, subset=0, clean=0.9, adv=0.3,
                                                  regularizer="[/bold]"))
    assert _report(tmp_path, tmp_path / "r.csv")[0] == 0
    assert "[/bold]" in capsys.readouterr().out  # the regularizer column (one model: no label column)


def test_the_progress_display_shows_markup_like_descriptions_as_text():
    from robust_enc.runtime.progress import display, task

    with display(show=True):
        with task("attack [/red] (fgsm)", 2) as bar:
            bar.update(advance=1, info="robust [/bold] 50%")


# ------------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_during_an_attack_is_one_line_exit_143_and_keeps_its_progress(flagged_run, tmp_path):
    out = tmp_path / "stopped.csv"
    command = [sys.executable, "-m", "robust_enc.cli", "attack", "--checkpoint", str(flagged_run), "--attack", "pgd",
               "--eps", "8/255", "--steps", "10", "--batch-size", "10", "--subset", "200", "--device", "cpu",
               "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def batches_done() -> int:
        for path in tmp_path.glob("stopped.csv.progress.*.json"):
            try:
                return json.loads(path.read_text())["next_batch"]
            except (OSError, ValueError):
                return 0
        return 0

    while process.poll() is None and batches_done() < 2:  # no deadline: the outcome must not depend on the clock
        time.sleep(0.01)
    assert process.poll() is None, "the attack finished before it could be stopped: give it more batches"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate()
    assert process.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("robust-enc:")]
    assert lines == [f"robust-enc: stopped by SIGTERM; results written so far are kept in {out}; rerun the command "
                     "to resume"], err[-2000:]
    assert "Traceback" not in err
    assert batches_done() >= 2  # the resume state is whole (its JSON reads) and keeps the finished batches
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
