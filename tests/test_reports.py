"""Report: Table 3 view, leaderboard, GBR correlation, renderers, plots, merging inputs from several machines, CLI.

Hand-built ResultRows (the paper's Table 2/3 numbers where it gives them) and hand-written run folders stand in for
real train + attack runs. Golden Markdown lives in tests/golden/; regenerate with ROBUST_ENC_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from robust_enc.cli import main
from robust_enc.errors import UserError
from robust_enc.reports import build_report, load_inputs, merge_rows, tables
from robust_enc.reports.render import format_eps, render_table
from robust_enc.results import (
    ADDED_IN_V2,
    ADDED_IN_V3,
    ADDED_IN_V4,
    ResultRow,
    append_results,
    read_results,
    write_results,
)
from robust_enc.results import parse_eps_value as parse_eps

GOLDEN = Path(__file__).parent / "golden"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAMP = "2025-01-01T00:00:00+00:00"

# (run id, regularizer, clean top-1, FGSM 8/255 top-1, GBR): clean from the paper's Table 2, FGSM from Table 3;
# the GBR values are made up (lower for the more robust rows, as the paper argues).
PAPER = [("r50-baseline", "baseline", 0.7654, 0.1754, 41.0), ("r50-enc", "enc", 0.7744, 0.2987, 23.0),
         ("r50-cutmix", "cutmix", 0.7657, 0.3294, 19.5), ("r50-ls", "ls", 0.7675, 0.2711, 26.0)]


def _row(run_id: str, regularizer: str, attack: str = "none", eps: float = 0.0, *, clean: float,
         adv: float | None = None, model: str = "resnet50", dataset: str = "imagenet", **kw) -> ResultRow:
    return ResultRow(run_id=run_id, model=model, regularizer=regularizer, dataset=dataset, split="val", subset=0,
                     attack=attack, norm="none" if attack == "none" else kw.pop("norm", "linf"), eps=eps,
                     n=kw.pop("n", 1000), clean_top1=clean, adv_top1=clean if adv is None else adv,
                     created_at=kw.pop("created_at", STAMP), **kw)


def _paper_rows(**kw) -> list[ResultRow]:
    rows = []
    for run_id, reg, clean, fgsm8, gbr in PAPER:
        rows.append(_row(run_id, reg, clean=clean, gbr=gbr, gbr_stderr=gbr / 50, weight_sq_norm=gbr * 3,
                         train_top1=clean + gbr / 1000, **kw))
        rows.append(_row(run_id, reg, "fgsm", 2 / 255, clean=clean, adv=(clean + fgsm8) / 2, **kw))
        rows.append(_row(run_id, reg, "fgsm", 8 / 255, clean=clean, adv=fgsm8, **kw))
    return rows


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("ROBUST_ENC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == text, f"{name} changed (regenerate: ROBUST_ENC_UPDATE_GOLDEN=1)"


def _write_run(folder: Path, run_id: str, regularizer: str, rows: list[ResultRow], gbr_by_epoch: list[float],
               *, dataset: str = "imagenet", checkpoint_hash: str = "") -> Path:
    """A run folder as train + attack leave it: results.csv, metrics.csv (per epoch), model_card.json."""
    folder.mkdir(parents=True)
    write_results(folder / "results.csv", rows)
    epochs = range(1, len(gbr_by_epoch) + 1)
    pd.DataFrame({"epoch": list(epochs), "lr": [0.1] * len(gbr_by_epoch), "train_loss": [2.0 / e for e in epochs],
                  "train_top1": [0.5 + 0.1 * e for e in epochs], "val_top1": [0.45 + 0.1 * e for e in epochs],
                  "val_top5": [0.9] * len(gbr_by_epoch), "weight_sq_norm": [3 * g for g in gbr_by_epoch],
                  "gbr": gbr_by_epoch, "gbr_stderr": [g / 50 for g in gbr_by_epoch],
                  "wall_s": [1.5 * e for e in epochs], "norm:net.conv1": [1.0] * len(gbr_by_epoch)}
                 ).to_csv(folder / "metrics.csv", index=False)
    card = {"run_id": run_id, "model": "resnet50", "regularizer": regularizer, "dataset": dataset,
            "epochs": len(gbr_by_epoch), "val_top1": 0.76, "val_top5": 0.93, "train_top1": 0.81,
            "gbr": gbr_by_epoch[-1], "gbr_stderr": 0.5, "weight_sq_norm": 3 * gbr_by_epoch[-1],
            "checkpoint_hash": checkpoint_hash, "config": {}, "versions": {}}
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


# ------------------------------------------------------------------ Table 3 view
def test_table3_view_matches_golden_and_paper_differences():
    table = tables.table3(tables.results_frame(_paper_rows()), order=[p[1] for p in PAPER])
    assert list(table["label"]) == [p[0] for p in PAPER]  # baseline first, then the given (the paper's) order
    assert table["is_baseline"].tolist() == [True, False, False, False]
    fgsm8 = tables.Threat("fgsm", "linf", 8 / 255).column
    assert table[fgsm8].tolist() == [p[3] for p in PAPER]  # fractions, not percent
    assert table[f"{fgsm8}:delta"].iloc[1] == pytest.approx(0.2987 - 0.1754)
    assert table["gbr"].tolist() == [p[4] for p in PAPER]
    assert table["gen_gap"].tolist() == pytest.approx([p[4] / 1000 for p in PAPER])
    assert "clean_top1:std" not in table  # one seed each: no spread columns
    text = render_table(table, "table3", "md")
    assert "| 29.87 (+12.33) |" in text  # the paper's own "29.87 (+12.3)", with two decimals
    _check_golden("table3.md", text)


def test_seeds_are_grouped_with_mean_std_and_count(caplog):
    rows = []
    for seed, (clean, adv, gbr) in enumerate([(0.90, 0.40, 10.0), (0.92, 0.46, 14.0), (0.91, 0.43, 12.0)]):
        run_id = f"tiny-enc-seed{seed}"
        rows += [_row(run_id, "enc", clean=clean, gbr=gbr, model="resnet_tiny", dataset="digits"),
                 _row(run_id, "enc", "fgsm", 8 / 255, clean=clean, adv=adv, model="resnet_tiny", dataset="digits")]
    rows += [_row(name, "baseline", clean=0.9, model="resnet_tiny", dataset="digits") for name in ("b1", "b2")]
    table = tables.table3(tables.results_frame(rows))
    assert len(table) == 2
    enc = table[table["regularizer"] == "enc"].iloc[0]
    assert enc["label"] == "tiny-enc" and enc["n_seeds"] == 3
    column = tables.Threat("fgsm", "linf", 8 / 255).column
    assert enc[column] == pytest.approx(np.mean([0.40, 0.46, 0.43]))
    assert enc[f"{column}:std"] == pytest.approx(np.std([0.40, 0.46, 0.43], ddof=1))
    assert enc["gbr:std"] == pytest.approx(2.0)
    # Run ids that differ by more than a seed suffix are still seeds of one model + regularizer, with a note.
    assert any("b1, b2" in note for note in table.attrs["notes"])
    # "±" shows the 95% Student-t interval of the mean over the seeds (3 seeds: t(0.975, 2) * std / sqrt(3)).
    half = stats.t.ppf(0.975, 2) / math.sqrt(3)
    assert enc[f"{column}:ci"] == pytest.approx(half * 0.03)
    text = render_table(table, "table3", "md")
    assert "| Seeds |" in text and f"43.00 ± {100 * half * 0.03:.2f}" in text and f"12.00 ± {half * 2:.2f}" in text


def test_differences_to_the_baseline_carry_welch_intervals_and_companions_correlate():
    """The interval of enc - baseline is scipy's Welch t-test interval; each scale-free GBR measure gets its own
    correlation rows, over every trained model (seeds are points)."""
    base_clean, enc_clean = [0.80, 0.83, 0.81], [0.86, 0.90, 0.87]
    rows = []
    for seed in range(3):
        for reg, clean, gbr, spread in (("baseline", base_clean[seed], 40.0 + seed, 10.0 + seed),
                                        ("enc", enc_clean[seed], 12.0 + seed, 4.0 + 2 * seed)):
            extra = dict(logit_spread=spread, gbr_scale_free=gbr / spread, gbr_loss=gbr / 10)
            rows += [_row(f"m-{reg}-s{seed}", reg, clean=clean, gbr=gbr, **extra),
                     _row(f"m-{reg}-s{seed}", reg, "fgsm", 8 / 255, clean=clean, adv=clean - gbr / 100, **extra)]
    frame = tables.results_frame(rows)
    table = tables.table3(frame)
    enc = table[table["regularizer"] == "enc"].iloc[0]
    reference = stats.ttest_ind(enc_clean, base_clean, equal_var=False).confidence_interval(0.95)
    assert enc["clean_top1:delta"] == pytest.approx(np.mean(enc_clean) - np.mean(base_clean))
    assert enc["clean_top1:delta_ci"] == pytest.approx((reference.high - reference.low) / 2)
    text = render_table(table, "table3", "md")
    assert "GBR / spread" in text and "Logit spread" in text and "Loss GBR" in text
    corr = tables.correlation(tables.replicates(frame))
    assert set(corr["x"]) == {"gbr", "gbr_scale_free", "logit_spread", "gbr_loss"}
    clean = corr[(corr["x"] == "logit_spread") & (corr["y"] == "clean_top1")].iloc[0]
    spreads = [10.0, 4.0, 11.0, 6.0, 12.0, 8.0]
    cleans = [base_clean[0], enc_clean[0], base_clean[1], enc_clean[1], base_clean[2], enc_clean[2]]
    assert clean["n"] == 6 and clean["pearson_r"] == pytest.approx(stats.pearsonr(spreads, cleans).statistic)
    assert "Measure" in render_table(corr, "correlation", "md")


def test_several_step_counts_get_separate_columns_and_the_leaderboard_takes_the_most_steps():
    rows = _paper_rows()
    for run_id, reg, clean, fgsm8, _ in PAPER:
        rows += [_row(run_id, reg, "pgd", 8 / 255, clean=clean, adv=fgsm8 / 2, steps=10),
                 _row(run_id, reg, "pgd", 8 / 255, clean=clean, adv=fgsm8 / 3, steps=50)]
    frame = tables.results_frame(rows)
    names = {t.attack for _, t in tables.threat_columns(tables.table3(frame))}
    assert names == {"fgsm", "pgd-10", "pgd-50"}
    board = tables.leaderboard(frame)
    assert board.attrs["threat"]["attack"] == "pgd-50"
    assert board["adv_top1"].tolist() == sorted((p[3] / 3 for p in PAPER), reverse=True)


def test_a_threat_evaluated_on_fewer_images_than_the_clean_pass_says_how_many_in_its_header():
    # The Fashion-MNIST preset: FGSM and the clean pass on 1,000 images, AutoAttack on 500 (8/255) and 100 (2/255),
    # each evaluation with its own clean row of its own size; ENC's AutoAttack 2/255 is missing on one seed.
    rows = []
    for seed in (0, 1):
        for run_id, reg, clean, fgsm8, _ in PAPER[:2]:
            rid = f"{run_id}-s{seed}"
            rows += [_row(rid, reg, clean=clean), _row(rid, reg, "fgsm", 8 / 255, clean=clean, adv=fgsm8),
                     _row(rid, reg, clean=clean, n=500), _row(rid, reg, "autoattack", 8 / 255, clean=clean, n=500,
                                                                adv=fgsm8 / 4)]
            if not (reg == "enc" and seed == 1):
                rows += [_row(rid, reg, clean=clean, n=100),
                         _row(rid, reg, "autoattack", 2 / 255, clean=clean, adv=fgsm8 / 2, n=100)]
    table = tables.table3(tables.results_frame(rows))
    assert table["n_clean"].tolist() == [1000, 1000]
    assert table[f"n:{tables.Threat('autoattack', 'linf', 2 / 255).column}"].tolist() == [100, 100]
    headers = [h.strip() for h in render_table(table, "table3", "md").splitlines()[0].split("|")]
    assert [h for h in headers if "top-1" in h or "L∞" in h] == [
        "Clean top-1 (%)", "FGSM L∞ 8/255 (%)", "AutoAttack L∞ 2/255 (%, 100 images)",
        "AutoAttack L∞ 8/255 (%, 500 images)"]


def test_one_run_id_on_two_data_sets_gives_two_labelled_rows_with_their_own_baselines():
    rows = [_row(run_id, reg, attack, eps, clean=clean, adv=adv, dataset=dataset)
            for dataset in ("digits", "fashion-mnist")
            for run_id, reg, clean, adv in [("base", "baseline", 0.9, 0.3), ("enc", "enc", 0.92, 0.4)]
            for attack, eps in [("none", 0.0), ("fgsm", 8 / 255)]]
    table = tables.table3(tables.results_frame(rows))
    assert sorted(table["label"]) == ["base@digits", "base@fashion-mnist", "enc@digits", "enc@fashion-mnist"]
    assert table.set_index("label")["baseline"].to_dict() == {
        "base@digits": "base@digits", "enc@digits": "base@digits",
        "base@fashion-mnist": "base@fashion-mnist", "enc@fashion-mnist": "base@fashion-mnist"}
    assert "| Data set |" in render_table(table, "table3", "md")


def test_row_order_baseline_first_then_given_order_else_sorted():
    frame = tables.results_frame(list(reversed(_paper_rows())))  # read in any order, e.g. alphabetical folders
    assert list(tables.table3(frame)["label"]) == ["r50-baseline", "r50-cutmix", "r50-enc", "r50-ls"]
    # A preset's rows as written ("ls", "enc"): matched through the regularizer registry; rows not named come last.
    assert list(tables.table3(frame, order=["ls", "enc"])["label"]) == ["r50-baseline", "r50-ls", "r50-enc",
                                                                        "r50-cutmix"]


def test_seed_suffix_of_default_run_ids_with_a_subset_is_grouped():
    rows = [_row(f"resnet_tiny-digits-enc-s{seed}-n100", "enc", clean=0.5 + seed / 10, model="resnet_tiny",
                 dataset="digits") for seed in range(2)]
    table = tables.table3(tables.results_frame(rows))
    assert table["label"].tolist() == ["resnet_tiny-digits-enc-n100"] and table["n_seeds"].tolist() == [2]
    assert not any("grouped as seeds" in n for n in table.attrs["notes"])


# ------------------------------------------------------------------ baseline handling
def test_missing_baseline_gives_table_without_differences_and_a_note(caplog):
    rows = [r for r in _paper_rows() if r.regularizer != "baseline"]
    with caplog.at_level(logging.WARNING):
        table = tables.table3(tables.results_frame(rows))
    assert not any(c.endswith(":delta") for c in table.columns)
    assert any("no baseline row" in n for n in table.attrs["notes"]) and "no baseline row" in caplog.text
    assert "(+" not in render_table(table, "table3", "md")


def test_named_baseline_by_regularizer_or_run_id_and_unknown_name():
    frame = tables.results_frame(_paper_rows())
    by_reg = tables.table3(frame, baseline="cutmix")
    by_run = tables.table3(frame, baseline="r50-cutmix")
    assert by_reg["label"].iloc[0] == "r50-cutmix" and by_reg["is_baseline"].sum() == 1
    pd.testing.assert_frame_equal(by_reg, by_run)
    clean_delta = by_reg.set_index("label")["clean_top1:delta"]
    assert clean_delta["r50-baseline"] == pytest.approx(0.7654 - 0.7657)
    with pytest.raises(UserError, match="--baseline 'dropout' names no run id or regularizer"):
        tables.table3(frame, baseline="dropout")


@pytest.mark.parametrize("name", ["cutmix", "cutmix:prob=1.0", "cutmix:alpha=1.0,prob=1.0"])
def test_named_baseline_matches_the_canonical_specs_that_real_results_record(name):
    """train and attack write the canonical spec ("cutmix:alpha=1.0,prob=1.0"); users type the short name."""
    from robust_enc.regularizers import canonical_spec

    rows = [ResultRow(**{**r.to_dict(), "regularizer": canonical_spec(r.regularizer)}) for r in _paper_rows()]
    table = tables.table3(tables.results_frame(rows), baseline=name)
    assert table["label"].iloc[0] == "r50-cutmix" and table["is_baseline"].sum() == 1
    assert table["regularizer"].iloc[0] == "cutmix:alpha=1.0,prob=1.0"
    default = tables.table3(tables.results_frame(rows))
    assert default["label"].iloc[0] == "r50-baseline" and "clean_top1:delta" in default


# ------------------------------------------------------------------ leaderboard
def test_leaderboard_ranks_by_strongest_attack_at_largest_eps_and_matches_golden(caplog):
    rows = _paper_rows(checkpoint_hash="abc123def456")
    board = tables.leaderboard(tables.results_frame(rows))
    assert board.attrs["threat"] == {"attack": "fgsm", "norm": "linf", "eps": 8 / 255}
    assert board["run_id"].tolist() == ["r50-cutmix", "r50-enc", "r50-ls", "r50-baseline"]
    # 1,000 images: cutmix 32.94% [30.0, 35.9] and enc 29.87% [27.1, 32.8] overlap (a shared rank); ls 27.11%
    # [24.4, 30.0] lies wholly below cutmix only, baseline below all three.
    assert board["rank"].tolist() == [1, 1, 2, 4] and board["tied"].tolist() == [True, True, False, False]
    assert (board["adv_top1"] <= board["clean_top1"]).all()
    _check_golden("leaderboard.md", render_table(board, "leaderboard", "md"))
    # An explicit eps as the CLI gives it; "worst" is preferred once present.
    at2 = tables.leaderboard(tables.results_frame(rows), eps=[parse_eps("2/255")])
    assert at2.attrs["threat"]["eps"] == 2 / 255
    worst = rows + [_row("r50-enc", "enc", "worst", 8 / 255, clean=0.7744, adv=0.01, checkpoint_hash="abc123def456")]
    with caplog.at_level(logging.INFO, logger="robust_enc"):
        board = tables.leaderboard(tables.results_frame(worst))
    assert board.attrs["threat"]["attack"] == "worst" and board["run_id"].tolist() == ["r50-enc"]
    assert any("not ranked" in n for n in board.attrs["notes"])
    # Rows attacked with cheaper threats only are a note for the reader, not a warning on the terminal.
    unranked = [r for r in caplog.records if "not ranked" in r.getMessage()]
    assert unranked and all(r.levelno < logging.WARNING for r in unranked)
    with pytest.raises(UserError, match="no results for it; attacks in the results: fgsm"):
        tables.leaderboard(tables.results_frame(rows), attack="square")


# ------------------------------------------------------------------ correlation
def test_correlation_matches_scipy_on_known_data():
    rng = np.random.default_rng(0)
    gbr = np.array([40.0, 31.0, 22.0, 18.0, 12.0, 9.0])
    adv = np.clip(0.5 - gbr / 100 + rng.normal(0, 0.02, gbr.size), 0, 0.6)
    train = np.array([0.99, 0.97, 0.96, 0.95, 0.95, 0.94])
    rows = []
    for i, (g, a, t) in enumerate(zip(gbr, adv, train)):
        rows += [_row(f"m{i}", f"reg{i}", clean=0.8 - i * 0.01, gbr=float(g), train_top1=float(t)),
                 _row(f"m{i}", f"reg{i}", "pgd", 4 / 255, clean=0.8 - i * 0.01, adv=float(a))]
    table = tables.table3(tables.results_frame(rows))
    corr = tables.correlation(table).set_index("y")
    column = tables.Threat("pgd", "linf", 4 / 255).column
    pearson, spearman = stats.pearsonr(gbr, adv), stats.spearmanr(gbr, adv)
    assert corr.loc[column, "n"] == 6
    assert corr.loc[column, "pearson_r"] == pytest.approx(pearson.statistic, abs=1e-12)
    assert corr.loc[column, "pearson_p"] == pytest.approx(pearson.pvalue, rel=1e-9)
    assert corr.loc[column, "spearman_rho"] == pytest.approx(spearman.statistic, abs=1e-12)
    assert corr.loc[column, "spearman_p"] == pytest.approx(spearman.pvalue, rel=1e-9)
    gap = train - np.array([0.8 - i * 0.01 for i in range(6)])
    for name, y in [("gen_gap", gap), ("clean_top1", np.array([0.8 - i * 0.01 for i in range(6)]))]:
        pearson, spearman = stats.pearsonr(gbr, y), stats.spearmanr(gbr, y)
        assert corr.loc[name, "pearson_r"] == pytest.approx(pearson.statistic, abs=1e-12)
        assert corr.loc[name, "pearson_p"] == pytest.approx(pearson.pvalue, rel=1e-9)
        assert corr.loc[name, "spearman_rho"] == pytest.approx(spearman.statistic, abs=1e-12)
        assert corr.loc[name, "spearman_p"] == pytest.approx(spearman.pvalue, rel=1e-9)
    assert corr.loc[column, "pearson_r"] < -0.9  # the synthetic data were built with a strong negative relation
    constant = tables.table3(tables.results_frame([r for r in rows if r.attack == "none"]))
    constant["clean_top1"] = [0.1 + 0.2] + [0.3] * (len(constant) - 1)  # float noise (5.6e-17) is not a spread
    note = tables.correlation(constant).set_index("y").loc["clean_top1", "note"]
    assert note == "constant values: correlation undefined"


def test_correlation_golden_and_too_few_models_is_a_note_not_a_crash(caplog):
    table = tables.table3(tables.results_frame(_paper_rows()))
    _check_golden("correlation.md", render_table(tables.correlation(table), "correlation", "md"))
    two = tables.table3(tables.results_frame([r for r in _paper_rows() if r.run_id in ("r50-enc", "r50-ls")]))
    with caplog.at_level(logging.WARNING):
        corr = tables.correlation(two)
    assert len(corr) > 0 and corr["pearson_r"].isna().all() and (corr["n"] == 2).all()
    assert corr["note"].str.contains("at least 3 models").all() and "at least 3 models" in caplog.text
    assert "needs at least 3 models" in render_table(corr, "correlation", "md")


# ------------------------------------------------------------------ merging inputs from several machines
def test_exact_duplicates_merge_and_conflicts_keep_newest(tmp_path, caplog):
    rows = _paper_rows()
    write_results(tmp_path / "machine_a.csv", rows)
    copied = [ResultRow(**{**r.to_dict(), "created_at": "2025-02-01T00:00:00+00:00", "wall_s": 9.0}) for r in rows]
    write_results(tmp_path / "machine_b.json", copied)  # same measurements, another machine and time: a duplicate
    data = load_inputs([tmp_path / "machine_a.csv", tmp_path / "machine_b.json"])
    assert data.rows_read == 2 * len(rows) and len(data.rows) == len(rows) and data.conflicts == []

    changed = rows[2]  # r50-baseline FGSM 8/255
    older = ResultRow(**{**changed.to_dict(), "adv_top1": 0.15, "created_at": "2024-06-01T00:00:00+00:00"})
    newer = ResultRow(**{**changed.to_dict(), "adv_top1": 0.16, "created_at": "2025-03-01T12:00:00+01:00"})
    write_results(tmp_path / "machine_c.csv", [older, newer])
    with caplog.at_level(logging.WARNING):
        data = load_inputs([tmp_path / "machine_a.csv", tmp_path / "machine_c.csv"])
    assert len(data.rows) == len(rows) and len(data.conflicts) == 1
    conflict = data.conflicts[0]
    assert conflict.kept.adv_top1 == 0.16 and sorted(r.adv_top1 for r in conflict.dropped) == [0.15, 0.1754]
    assert "conflicting results" in caplog.text and "r50-baseline" in caplog.text
    assert next(r for r in data.rows if r.key() == changed.key()).adv_top1 == 0.16
    # The report lists the conflict for the reader.
    out = build_report([tmp_path / "machine_a.csv", tmp_path / "machine_c.csv"], tmp_path / "report")
    assert "conflicting duplicate rows" in out["index.md"].read_text()


def _run_rows(run_id: str, checkpoint_hash: str, clean: float, created_at: str = STAMP) -> list[ResultRow]:
    return [_row(run_id, "enc", clean=clean, checkpoint_hash=checkpoint_hash, created_at=created_at),
            _row(run_id, "enc", "fgsm", 8 / 255, clean=clean, adv=clean / 2, checkpoint_hash=checkpoint_hash,
                 created_at=created_at)]


def test_rows_of_a_retrained_runs_earlier_checkpoint_are_not_counted_as_seeds(tmp_path):
    """``reproduce --epochs 2`` after ``--epochs 1``: the run's results.csv holds rows of both checkpoints."""
    root = tmp_path / "runs"
    # The model card names the current checkpoint; it wins even over older rows written later (a clock skew).
    rows = _run_rows("r-enc-s0", "old", 0.5, "2025-03-01T00:00:00+00:00") + _run_rows("r-enc-s0", "new", 0.7)
    _write_run(root / "r-enc-s0", "r-enc-s0", "enc", rows, [2.0], checkpoint_hash="new")
    _write_run(root / "r-enc-s1", "r-enc-s1", "enc", _run_rows("r-enc-s1", "h1", 0.6), [2.0], checkpoint_hash="h1")
    data = load_inputs([root])
    assert {(r.run_id, r.checkpoint_hash) for r in data.rows} == {("r-enc-s0", "new"), ("r-enc-s1", "h1")}
    assert any("earlier checkpoint(s) old left out" in n for n in data.notes)
    table = tables.table3(tables.results_frame(data.rows))
    assert table["n_seeds"].tolist() == [2] and table["clean_top1"].iloc[0] == pytest.approx(0.65)
    # A results file without a model card: the newest checkpoint by created_at.
    write_results(tmp_path / "one.csv", rows)
    data = load_inputs([tmp_path / "one.csv"])
    assert {r.checkpoint_hash for r in data.rows} == {"old"} and len(data.notes) == 1


def test_one_run_id_with_two_checkpoints_on_two_machines_is_a_conflict_not_two_seeds(tmp_path):
    write_results(tmp_path / "machine_a.csv", _run_rows("r-enc-s0", "aaa", 0.5))
    write_results(tmp_path / "machine_b.csv", _run_rows("r-enc-s0", "bbb", 0.7, "2025-02-01T00:00:00+00:00"))
    # Also a duplicate row that differs only in GBR: a conflicting measurement.
    gbr_rows = [_row("r-ls", "ls", clean=0.6, gbr=gbr, checkpoint_hash="ls1") for gbr in (10.0, 12.0)]
    write_results(tmp_path / "gbr_a.csv", gbr_rows[:1])
    write_results(tmp_path / "gbr_b.csv", gbr_rows[1:])
    inputs = [tmp_path / name for name in ("machine_a.csv", "machine_b.csv", "gbr_a.csv", "gbr_b.csv")]
    data = load_inputs(inputs)
    assert {r.checkpoint_hash for r in data.rows if r.run_id == "r-enc-s0"} == {"bbb"}
    assert any(n.startswith("conflict: run id r-enc-s0") and "machine_a.csv" in n for n in data.notes)
    assert len(data.conflicts) == 1 and data.conflicts[0].kept.gbr == 12.0  # read last on a tie of created_at
    assert tables.table3(tables.results_frame(data.rows)).set_index("label")["n_seeds"].to_dict() == {
        "r-enc-s0": 1, "r-ls": 1}
    written = build_report(inputs, tmp_path / "report")
    for name in ("table3.json", "leaderboard.json", "correlation.json"):  # every JSON file carries them
        notes = json.loads(written[name].read_text())["notes"]
        assert any(n.startswith("conflict: run id r-enc-s0") for n in notes), name
        assert any("conflicting duplicate rows" in n and "gbr=10" in n for n in notes), name


def test_append_results_replaces_the_rows_of_an_earlier_checkpoint(tmp_path):
    """Rows of a run folder's checkpoint (weights "checkpoint"); other sources are never replaced by another hash's
    (test_provenance)."""
    def run_rows(*args) -> list[ResultRow]:
        return [ResultRow(**{**r.to_dict(), "weights": "checkpoint"}) for r in _run_rows(*args)]

    path = tmp_path / "results.csv"
    append_results(path, run_rows("r-enc-s0", "old", 0.5) + run_rows("r-enc-s1", "h1", 0.6))
    append_results(path, run_rows("r-enc-s0", "new", 0.7)[:1])
    assert sorted((r.run_id, r.checkpoint_hash, r.attack) for r in read_results(path)) == [
        ("r-enc-s0", "new", "none"), ("r-enc-s1", "h1", "fgsm"), ("r-enc-s1", "h1", "none")]


def test_merge_rows_tie_on_created_at_keeps_the_row_read_last():
    first = _row("r", "baseline", "fgsm", 8 / 255, clean=0.9, adv=0.3)
    second = ResultRow(**{**first.to_dict(), "adv_top1": 0.2})
    merged, conflicts = merge_rows([first, second])
    assert [r.adv_top1 for r in merged] == [0.2] and len(conflicts) == 1


# ------------------------------------------------------------------ run folders, plots, files
def _study(tmp_path: Path) -> Path:
    """Two machines' output folders holding run folders; results rows without GBR (filled from the model card)."""
    root = tmp_path / "runs"
    for i, (run_id, reg, clean, fgsm8, gbr) in enumerate(PAPER):
        rows = [_row(run_id, reg, clean=clean, checkpoint_hash=f"hash{i}"),
                _row(run_id, reg, "fgsm", 2 / 255, clean=clean, adv=(clean + fgsm8) / 2, checkpoint_hash=f"hash{i}"),
                _row(run_id, reg, "fgsm", 8 / 255, clean=clean, adv=fgsm8, checkpoint_hash=f"hash{i}")]
        machine = "machine_a" if i % 2 else "machine_b"
        folder = _write_run(root / machine / "out" / run_id, run_id, reg, rows, [gbr * 4, gbr * 2, gbr],
                            checkpoint_hash=f"hash{i}")
        (folder / "checkpoint.pt").write_bytes(b"")  # only its path is reported
    return root


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0


def test_build_report_from_run_folders_writes_tables_plots_and_index(tmp_path):
    out = tmp_path / "report"
    written = build_report([_study(tmp_path)], out, formats=("md", "csv", "json", "latex", "html"))
    expected_tables = {f"{t}.{s}" for t in ("table3", "leaderboard", "correlation")
                       for s in ("md", "csv", "json", "tex", "html")}
    assert expected_tables <= set(written)
    plots = {k for k in written if k.startswith("plots/")}
    assert plots == {"plots/adv_vs_eps_fgsm_linf.png", "plots/gbr_vs_fgsm_linf_8-255.png", "plots/gbr_epochs.png"}
    for key in plots:
        _assert_png(written[key])
    assert all(p.is_file() and p.stat().st_size > 0 for p in written.values())
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries

    # GBR came from the model cards (the results rows had none); the card link is relative to the report.
    table3 = pd.read_csv(written["table3.csv"]).set_index("label")
    assert table3["gbr"].to_dict() == {p[0]: p[4] for p in PAPER}
    board = json.loads(written["leaderboard.json"].read_text())
    assert board["threat"] == {"attack": "fgsm", "norm": "linf", "eps": 8 / 255}
    first = board["rows"][0]
    assert first["run_id"] == "r50-cutmix" and first["checkpoint_hash"] == "hash2"
    assert (out / first["model_card"]).resolve() == (tmp_path / "runs/machine_b/out/r50-cutmix/model_card.json")
    assert (out / first["checkpoint"]).resolve() == (tmp_path / "runs/machine_b/out/r50-cutmix/checkpoint.pt")
    # The HTML leaderboard links each model card; the checkpoint file sits beside its hash.
    board_html = written["leaderboard.html"].read_text()
    assert f'<a href="{first["model_card"]}">card</a>' in board_html and "&lt;a" not in board_html
    assert "<th>Checkpoint file</th>" in board_html and first["checkpoint"] in board_html
    assert f"[card]({first['model_card']})" in written["leaderboard.md"].read_text()
    index = written["index.md"].read_text()
    for name in ("table3.md", "leaderboard.csv", "plots/gbr_epochs.png", "29.87 (+12.33)"):
        assert name in index
    assert r"$\pm$" in written["table3.tex"].read_text() and "<table" in written["table3.html"].read_text()


def test_json_and_csv_keep_numbers_as_numbers(tmp_path):
    written = build_report([_study(tmp_path)], tmp_path / "report")
    payload = json.loads(written["table3.json"].read_text())
    for record in payload["rows"]:
        for key, value in record.items():
            if key.startswith(("clean_top1", "adv:")) and not key.endswith(":delta"):
                assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)
    for name in ("table3.csv", "leaderboard.csv", "correlation.csv", "table3.json", "leaderboard.json"):
        text = written[name].read_text()
        assert "/255" not in text and "%" not in text and "±" not in text, name


def test_plots_are_skipped_with_notes_when_there_is_no_data(tmp_path):
    write_results(tmp_path / "clean.csv", [_row("only", "baseline", clean=0.9)])
    written = build_report([tmp_path / "clean.csv"], tmp_path / "report")
    assert not any(k.startswith("plots/") for k in written)
    index = written["index.md"].read_text()
    assert "accuracy-vs-eps plots skipped" in index and "GBR-over-epochs plot skipped" in index
    assert "leaderboard is empty" in index


def test_training_only_run_folders_give_empty_tables_and_the_gbr_curve(tmp_path):
    """Before any attack ran: run folders with metrics.csv and a model card only (also given as one of its files)."""
    for run_id, reg, *_, gbr in PAPER[:2]:
        folder = _write_run(tmp_path / "runs" / run_id, run_id, reg, [], [gbr * 2, gbr])
        (folder / "results.csv").unlink()
    inputs = [tmp_path / "runs" / PAPER[0][0], tmp_path / "runs" / PAPER[1][0] / "metrics.csv"]
    written = build_report(inputs, tmp_path / "report", formats=("md", "csv", "json", "latex", "html"))
    assert {k for k in written if k.startswith("plots/")} == {"plots/gbr_epochs.png"}
    _assert_png(written["plots/gbr_epochs.png"])
    assert json.loads(written["table3.json"].read_text())["rows"] == []
    index = written["index.md"].read_text()
    assert "Table 3 is empty" in index and "leaderboard is empty" in index


def test_a_run_still_training_is_drawn_with_its_data_set_from_its_training_config(tmp_path):
    """A run folder without a model card yet (config.json and metrics.csv only) belongs to its config's data set:
    one GBR-over-epochs plot, not a second one for an "unknown" data set."""
    for run_id, reg, *_, gbr in PAPER[:2]:
        folder = _write_run(tmp_path / "runs" / run_id, run_id, reg, [], [gbr * 2, gbr])
        (folder / "results.csv").unlink()
    training = tmp_path / "runs" / PAPER[1][0]
    (training / "model_card.json").unlink()
    (training / "config.json").write_text(json.dumps({"model": "resnet50", "dataset": "imagenet", "epochs": 5}))
    written = build_report([tmp_path / "runs"], tmp_path / "report")
    assert {k for k in written if k.startswith("plots/")} == {"plots/gbr_epochs.png"}
    (training / "config.json").write_text("{not json")  # unreadable: the curve is still drawn, under "unknown"
    written = build_report([tmp_path / "runs"], tmp_path / "report2")
    assert {k for k in written if k.startswith("plots/")} == {"plots/gbr_epochs_imagenet.png",
                                                               "plots/gbr_epochs_unknown.png"}


def test_single_model_report_has_clear_messages(tmp_path):
    rows = [r for r in _paper_rows() if r.run_id == "r50-enc"]
    write_results(tmp_path / "one.json", rows)
    written = build_report([tmp_path / "one.json"], tmp_path / "report")
    index = written["index.md"].read_text()
    assert "at least 3 models" in index and "no baseline row" in index
    _assert_png(written["plots/adv_vs_eps_fgsm_linf.png"])


def test_user_errors_for_bad_inputs(tmp_path):
    write_results(tmp_path / "r.csv", _paper_rows())
    for kwargs, message in [({"formats": ("md", "pdf")}, "unknown report format 'pdf'"),
                            ({"attack": "pgd"}, "--attack 'pgd'"),
                            ({"eps": ["4/255"]}, "no results at that eps; available"),
                            ({"eps": ["8"]}, "write e.g. 8/255")]:
        with pytest.raises(UserError, match=message):
            build_report([tmp_path / "r.csv"], tmp_path / "report", **kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run folder"):
        load_inputs([tmp_path / "empty"])
    with pytest.raises(UserError, match="does not exist"):
        load_inputs([tmp_path / "missing.csv"])


def test_parse_and_format_eps():
    assert parse_eps("8/255") == 8 / 255 and parse_eps(" 0.5 ") == 0.5 and parse_eps(0.25) == 0.25
    assert format_eps(8 / 255) == "8/255" and format_eps(0.5, "l2") == "0.5" and format_eps(0.03, "linf") == "0.03"
    for bad in ("8", "-1/255", "abc", "1/0", "nan"):
        with pytest.raises(UserError):
            parse_eps(bad)


# ------------------------------------------------------------------ CLI
def test_cli_report_on_a_folder_of_run_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # rich wraps table cells to the terminal width
    out = tmp_path / "report"
    code = main(["report", str(_study(tmp_path)), "--out", str(out), "--format", "md,csv,latex",
                 "--attack", "fgsm", "--eps", "2/255", "8/255"])
    assert code == 0
    captured = capsys.readouterr()
    assert "report written to" in captured.out and "29.87 (+12.33)" in captured.out
    for name in ("table3.md", "table3.csv", "table3.tex", "leaderboard.md", "correlation.md", "index.md",
                 "plots/gbr_epochs.png"):
        assert (out / name).is_file(), name
    assert not (out / "table3.json").exists()


def _bad_json_rows(tmp_path: Path) -> list[str]:
    (tmp_path / "r.json").write_text(json.dumps({"schema": "robust-enc/results", "version": 1, "rows": [1]}))
    return ["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "report")]


def _non_utf8(tmp_path: Path) -> list[str]:
    (tmp_path / "r.csv").write_bytes(b"\xff\xfe" + "run_id".encode("utf-16-le"))
    return ["report", str(tmp_path / "r.csv"), "--out", str(tmp_path / "report")]


def _out_is_a_file(tmp_path: Path) -> list[str]:
    write_results(tmp_path / "r.csv", _paper_rows())
    (tmp_path / "taken").write_text("not a folder")
    return ["report", str(tmp_path / "r.csv"), "--out", str(tmp_path / "taken")]


def _preset(tmp_path: Path, **changes) -> list[str]:
    preset = {"description": "x", "model": "resnet_tiny", "dataset": "digits", "rows": ["baseline"], **changes}
    (tmp_path / "p.json").write_text(json.dumps(preset))
    return ["reproduce", "--preset", str(tmp_path / "p.json"), "--out", str(tmp_path / "study")]


@pytest.mark.parametrize("make_argv, message", [
    (_bad_json_rows, "a results row must be an object"),
    (_non_utf8, "not a UTF-8 text file"),
    (_out_is_a_file, "is a file, not a folder"),
    (lambda p: _preset(p, seeds=["a"]), '"seeds" must be integers'),
    (lambda p: _preset(p, rows="baseline"), '"rows" must be a list'),
], ids=["json-rows-not-objects", "non-utf8", "out-is-a-file", "preset-seed-not-int", "preset-rows-a-string"])
def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, make_argv, message):
    assert main(make_argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "report").exists() and not (tmp_path / "study").exists()


def test_cli_inf_gbr_and_text_in_metrics_are_missing_values_not_crashes(tmp_path, capsys):
    rows = [ResultRow(**{**r.to_dict(), "gbr": float("inf") if r.run_id == "r50-enc" else r.gbr})
            for r in _paper_rows()]
    folder = _write_run(tmp_path / "runs" / "r50-enc", "r50-enc", "enc", rows, [2.0, 1.0])
    metrics = pd.read_csv(folder / "metrics.csv").astype({"gbr": object})
    metrics.loc[0, "gbr"] = "oops"
    metrics.to_csv(folder / "metrics.csv", index=False)
    assert main(["report", str(folder), "--out", str(tmp_path / "report"), "--format", "md,json,html"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    table3 = json.loads((tmp_path / "report" / "table3.json").read_text())["rows"]
    assert {r["label"]: r["gbr"] for r in table3}["r50-enc"] is None  # JSON has no inf: null
    _assert_png(tmp_path / "report" / "plots" / "gbr_epochs.png")  # the one numeric epoch is drawn


def test_cli_wrong_schema_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "results.csv"
    bad.write_text("model,top1\nresnet50,76.5\n")
    assert main(["report", str(bad), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results schema" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()


def test_a_v1_results_file_reads_with_the_companions_not_measured(tmp_path):
    """Results written before the scale-free companions existed (schema v1: no such columns) still read; the
    companions are NaN (not measured), every other value is kept."""
    row = _row("r1", "enc", clean=0.9, gbr=12.5, model="resnet_tiny", dataset="digits")
    # A v1 file lacks every column added since: v2's companions, v3's precision, v4's provenance.
    frame = tables.results_frame([row]).drop(columns=[*ADDED_IN_V2, *ADDED_IN_V3, *ADDED_IN_V4])
    frame.to_csv(tmp_path / "v1.csv", index=False)
    (back,) = read_results(tmp_path / "v1.csv")
    assert back.gbr == 12.5 and back.clean_top1 == 0.9 and back.run_id == "r1"
    assert all(math.isnan(getattr(back, n)) for n in ("logit_spread", "gbr_scale_free", "gbr_loss"))
    frame.drop(columns=["gbr"]).to_csv(tmp_path / "broken.csv", index=False)  # any other missing column: refused
    with pytest.raises(UserError, match="header does not match"):
        read_results(tmp_path / "broken.csv")
