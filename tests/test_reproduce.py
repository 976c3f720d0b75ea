"""The main job end to end: a reduced `quick` study (three rows, one epoch, small subsets) in a temporary folder."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

import robust_enc.reports
from robust_enc.cli import main
from robust_enc.reproduce import PRESET_NAMES, _attack_done, load_preset, plan, sweep_plan
from robust_enc.results import read_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SMALL = {
    "description": "reduced quick preset for tests",
    "model": "resnet_tiny",
    "dataset": "digits",
    "rows": ["baseline", "enc", "enc+ls"],
    "seeds": [0],
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0005, "schedule": "cosine",
              "subset": 300, "val_subset": 100, "gbr_probe_size": 32},
    "attack": [{"attacks": ["fgsm", "pgd"], "eps": ["4/255", "16/255"], "steps": 3, "subset": 60, "batch_size": 60},
               {"attacks": ["aa"], "eps": ["32/255"], "steps": 5, "subset": 20, "batch_size": 20}],
    "report": {"baseline": "baseline"},
}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_shipped_presets_load_and_plan(tmp_path, name):
    preset = load_preset(name)
    assert "baseline" in preset.rows and "enc" in preset.rows
    pairs = plan(preset, tmp_path)  # validates every spec and setting, touches no data
    # FGSM/PGD sweep on every row, then AutoAttack sections (on every row or on the rows a section names)
    autoattack_rows = sum(len(section.get("rows", preset.rows)) for section in preset.attack[1:])
    assert len(pairs) == (len(preset.rows) + autoattack_rows) * len(preset.seeds)
    assert "fgsm" in pairs[0][1].attacks and pairs[1][1].attacks == ("autoattack",)
    assert [a.gbr for _, a in pairs[:2]] == [True, False]  # GBR measured once per model
    sweep = sweep_plan(preset, tmp_path)
    assert all(c.regularizer == "baseline" and "-wd" in c.run_id for c in sweep)
    assert not any(tmp_path.iterdir())


def test_reduced_quick_study_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    preset_file = tmp_path / "small.json"
    preset_file.write_text(json.dumps(SMALL))
    out = tmp_path / "study"
    monkeypatch.setenv("COLUMNS", "100")  # the end-of-study tables fit a 100-column terminal (also when piped)
    builds = []  # the report is built once per run (not once to write and again to print: warnings twice)
    make_report = robust_enc.reports.make_report
    monkeypatch.setattr(robust_enc.reports, "make_report", lambda *a, **kw: builds.append(1) or make_report(*a, **kw))
    assert main(["reproduce", "--preset", str(preset_file), "--out", str(out), "--device", "cpu"]) == 0
    assert len(builds) == 1
    captured = capsys.readouterr()
    printed = captured.out
    assert "sanity checks" in captured.err  # the one end-of-study panel (or its "no flag" line)
    assert "report:" in printed and "enc" in printed and "…" not in printed
    assert max(len(line) for line in printed.splitlines() if not line.startswith("report:")) <= 100
    # The terminal's Table 3 view: differences to the baseline as in the paper, and the GBR column.
    assert re.search(r"\([+-]\d+\.\d\d\)", printed) and "GBR" in printed and "FGSM" in printed
    report = out / "report"
    for name in ("index.md", "table3.md", "table3.csv", "leaderboard.md", "correlation.csv"):
        assert (report / name).is_file(), name
    plots = sorted((report / "plots").glob("*.png"))
    for kind in ("adv_vs_eps_fgsm", "adv_vs_eps_pgd", "gbr_vs_", "gbr_epochs"):  # every plot kind is drawn
        assert any(p.name.startswith(kind) for p in plots), (kind, plots)
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in plots)
    runs = sorted(p for p in (out / "runs").iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["resnet_tiny-digits-baseline-s0-n300", "resnet_tiny-digits-enc+ls-s0-n300",
                                      "resnet_tiny-digits-enc-s0-n300"]
    for run in runs:
        rows = read_results(run / "results.csv")
        assert {(r.attack, round(r.eps * 255)) for r in rows} >= {("none", 0), ("fgsm", 4), ("pgd", 16),
                                                                 ("autoattack", 32)}
        assert all(not math.isnan(r.gbr) and r.gbr > 0 and r.n == 60 for r in rows if r.subset == 60)
        assert all(r.n == 20 for r in rows if r.subset == 20) and len([r for r in rows if r.n == 20]) == 2
        assert all(r.adv_top1 <= r.clean_top1 for r in rows)
    # Two clean rows per model (60 and 20 images): the model's clean accuracy is the 60-image one.
    from robust_enc.reports import tables

    every = [r for run in runs for r in read_results(run / "results.csv")]
    clean = {r.run_id: r.clean_top1 for r in every if r.attack == "none" and r.n == 60}
    replicated = tables.replicates(tables.results_frame(every))
    assert dict(zip(replicated["run_id"], replicated["clean_top1"])) == pytest.approx(clean)
    table3 = (report / "table3.md").read_text()
    # The preset's row order (the paper's), not the run folders' alphabetical one (enc+ls before enc).
    assert [line.split(" | ")[1] for line in table3.splitlines()[2:]] == ["baseline", "enc", "enc+ls"]

    # Attacks count as done only for the same threat settings and with the GBR measured.
    _, attack_config = [pair for pair in plan(load_preset(str(preset_file)), out, device="cpu")
                        if "pgd" in pair[1].attacks][1]  # enc's FGSM + PGD evaluation
    assert _attack_done(attack_config)
    for change in ({"steps": 5}, {"norm": "l2"}, {"restarts": 2}, {"step_size": 0.01}, {"subset": 30}, {"seed": 1}):
        assert not _attack_done(dataclasses.replace(attack_config, **change)), change

    # A rerun finds every training and attack finished: nothing is trained or attacked again.
    stamps = {p: p.stat().st_mtime_ns for run in runs for p in (run / "checkpoint.pt", run / "results.csv")}
    assert main(["reproduce", "--preset", str(preset_file), "--out", str(out), "--device", "cpu"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(builds) == 2
    capsys.readouterr()
    # Under torchrun only rank 0 builds and prints the report.
    monkeypatch.setenv("RANK", "1")
    assert main(["reproduce", "--preset", str(preset_file), "--out", str(out), "--device", "cpu"]) == 0
    assert len(builds) == 2 and "report:" not in capsys.readouterr().out


def test_an_evaluation_runs_only_on_the_rows_it_names(tmp_path, capsys):
    small = {**SMALL, "attack": [SMALL["attack"][0], {**SMALL["attack"][1], "rows": ["enc+ls", "baseline"]}]}
    preset_file = tmp_path / "small.json"
    preset_file.write_text(json.dumps(small))
    preset = load_preset(str(preset_file))
    planned = [(t.run_id.split("-")[2], a.attacks) for t, a in plan(preset, tmp_path / "o")]
    assert planned == [("baseline", ("fgsm", "pgd")), ("baseline", ("autoattack",)), ("enc", ("fgsm", "pgd")),
                       ("enc+ls", ("fgsm", "pgd")), ("enc+ls", ("autoattack",))]
    # --rows keeps a subset of the preset's rows: an evaluation's own list is filtered with it, not refused.
    planned = [(t.run_id.split("-")[2], a.attacks) for t, a in plan(dataclasses.replace(preset, rows=("enc",)),
                                                                     tmp_path / "o")]
    assert planned == [("enc", ("fgsm", "pgd"))]
    for rows in (["baseline", "encc"], "enc"):  # not a row of the preset; a string, not a list
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**small, "attack": [SMALL["attack"][0], {**SMALL["attack"][1], "rows": rows}]}))
        assert main(["reproduce", "--preset", str(bad), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\"rows\" must be a list of the preset's rows" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_reproduce_bad_input_is_one_line(tmp_path, capsys):
    assert main(["reproduce", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SMALL, "rows": ["baseline", "encc"]}))
    assert main(["reproduce", "--preset", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "encc" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main(["reproduce", "--rows", "cutmixx"]) == 2
    assert "not rows of preset quick" in capsys.readouterr().err


def test_weight_decay_sweep_trains_each_lambda_and_plots_gbr_beside_enc(tmp_path, monkeypatch):
    """The preset's sweep (the paper's Figures 1 and 3): the swept row once per weight decay under wd-sweep/, not in
    Table 3; one plot of GBR per epoch with every lambda, the row at the preset's lambda and ENC."""
    import robust_enc.reports.plots as plots

    preset = {**SMALL, "rows": ["baseline", "enc"], "train": {**SMALL["train"], "subset": 200},
              "attack": {"attacks": ["fgsm"], "eps": ["8/255"], "subset": 30, "batch_size": 30},
              "sweep": {"weight_decay": [0, 0.01], "row": "baseline", "against": "enc"}}
    preset_file = tmp_path / "sweep.json"
    preset_file.write_text(json.dumps(preset))
    drawn = []  # the legend of each GBR-over-epochs plot (the report draws one for all runs, the sweep its own)
    draw = plots.plot_gbr_over_epochs
    monkeypatch.setattr(plots, "plot_gbr_over_epochs",
                        lambda h, path, **kw: drawn.append(list(h)) or draw(h, path, **kw))
    out = tmp_path / "study"
    assert main(["reproduce", "--preset", str(preset_file), "--out", str(out), "--device", "cpu"]) == 0
    sweep = sorted(p.name for p in (out / "wd-sweep").iterdir())
    assert sweep == ["resnet_tiny-digits-baseline-wd0-s0", "resnet_tiny-digits-baseline-wd0.01-s0"]
    for name, wd in zip(sweep, (0.0, 0.01)):
        assert json.loads((out / "wd-sweep" / name / "config.json").read_text())["weight_decay"] == wd
    assert drawn[-1] == ["baseline λ=0", "baseline λ=0.0005", "baseline λ=0.01", "enc"]  # the legend's order
    assert (out / "report" / "plots" / "gbr_weight_decay.png").read_bytes()[:8] == PNG_SIGNATURE
    table3 = (out / "report" / "table3.md").read_text()
    assert "wd0" not in table3 and len(table3.strip().splitlines()) == 4  # header, rule, baseline, enc
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**preset, "sweep": {"weight_decay": "0.01"}}))
    assert main(["reproduce", "--preset", str(bad), "--out", str(tmp_path / "o")]) == 2
