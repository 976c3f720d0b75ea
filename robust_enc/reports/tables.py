"""Pure DataFrame -> DataFrame pivots behind the report: the Table 3 view, the leaderboard and the GBR correlation.

Input is the results frame (one row per ``ResultRow``, columns ``FIELD_NAMES``; see ``results_frame``). Outputs keep
numbers as numbers: accuracies are fractions, eps is in [0, 1] pixel units, differences are fractions too. Only
``render`` turns them into percent and "8/255". Messages for the reader (no baseline, too few models) are logged and
kept in ``table.attrs["notes"]``; nothing here reads or writes files.

Adversarial columns are named ``adv:<attack>:<norm>:<eps>`` with the exact float (``Threat.column``), plus
``<column>:std`` and ``<column>:ci`` (over seeds, only when some row has several; ``:ci`` is the half-width of the
95% Student-t interval of the mean) and ``<column>:delta`` (minus the baseline row) with ``<column>:delta_ci`` (the
half-width of the 95% Welch interval of that difference, when both rows have two or more seeds), and ``<column>:lo``
/ ``<column>:hi`` for accuracies (the 95% Clopper-Pearson interval over the images of all seeds). No number averages
rows of two image sets (``image_set``, else n where it was not recorded).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from robust_enc.errors import UserError
from robust_enc.reports.stats import (
    accuracy_interval,
    correlate,
    multiple_comparisons_note,
    shared_ranks,
)
from robust_enc.reports.threats import (
    CLEAN,
    Threat,
    choose_threat,
    label_threats,
    threat_columns,
    threat_order,
    with_notes,
)
from robust_enc.results import FIELD_NAMES, ResultRow
from robust_enc.runtime.progress import format_eps

log = logging.getLogger(__name__)

BASELINE = "baseline"  # the regularizer spec of the plain weight-decay run
# "resnet20-enc-seed1", "resnet20-enc_s2" and the default run id's "...-s0-n100" (train.config.default_run_id puts the
# training subset after the seed): only the seed part is removed, so the label keeps "-n100".
SEED_SUFFIX = re.compile(r"[-_.]?(?:seed|s)[-_=]?\d+(?=(?:-n\d+)?$)")
GROUP = ["dataset", "model", "regularizer"]  # one Table 3 row; its runs are the seeds
REPLICATE = [*GROUP, "run_id", "checkpoint_hash"]  # one trained model
# GBR (eq. 18, logits) and its scale-free companions: the logits' spread, GBR divided by it, and the loss GBR.
GBR_MEASURES = ("gbr", "gbr_scale_free", "logit_spread", "gbr_loss")
RUN_VALUES = (*GBR_MEASURES, "gbr_stderr", "train_top1", "weight_sq_norm")  # properties of the weights, not an attack
CONFIDENCE = 0.95  # of the intervals over seeds (Student t) and of the differences to the baseline (Welch)


def results_frame(rows: Iterable[ResultRow]) -> pd.DataFrame:
    """One row per ResultRow, the schema's columns in order (also for no rows)."""
    return pd.DataFrame([r.to_dict() for r in rows], columns=FIELD_NAMES)


def _prefer(first: pd.Series, fallback: pd.Series) -> float:
    """Mean of the non-NaN values of ``first``, else of ``fallback``, else NaN."""
    for series in (first, fallback):
        values = series.astype(float).dropna()
        if len(values):
            return float(values.mean())
    return math.nan


def _one_image_set(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of one image set: the one with the most images (the inputs keep one per model; this is the guarantee
    that no number below averages two sets). Rows that recorded none ("", older files) are told apart by n."""
    sets = rows["image_set"].where(rows["image_set"] != "", "n=" + rows["n"].astype(str))
    if sets.nunique() <= 1:
        return rows
    largest = rows["n"].groupby(sets, sort=False).max().idxmax()
    return rows[sets == largest]


def replicates(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per trained model (run id + checkpoint hash + data set): clean top-1, GBR, weight norm, train top-1,
    generalization gap and one ``adv:...`` column per threat (mean over repeated rows, e.g. attack seeds), with
    ``n:<column>`` (its image count), ``clean:<column>`` (the clean top-1 of those same images: every attack row
    carries it) and ``image_set:<column>``."""
    frame = label_threats(frame if "image_set" in frame else frame.assign(image_set=""))
    frame = frame.assign(image_set=frame["image_set"].fillna("").astype(str))
    records = []
    for key, rows in frame.groupby(REPLICATE, sort=False):
        clean = rows[rows["attack"] == CLEAN]
        # A model evaluated twice (e.g. FGSM on every image, AutoAttack on a subset) has a clean row per evaluation:
        # the largest one's is the model's clean accuracy.
        clean = _one_image_set(clean[clean["n"] == clean["n"].max()]) if len(clean) else clean
        record = dict(zip(REPLICATE, key))
        record["clean_top1"] = _prefer(clean["clean_top1"], rows["clean_top1"])
        record["n_clean"] = int(clean["n"].max()) if len(clean) else int(rows["n"].max())
        record["image_set"] = str(clean["image_set"].iloc[0]) if len(clean) else ""
        for name in RUN_VALUES:
            record[name] = _prefer(clean[name], rows[name])
        record["gen_gap"] = record["train_top1"] - record["clean_top1"]  # train minus test accuracy
        adv = rows[rows["attack"] != CLEAN]
        for (attack, norm, eps), cell in adv.groupby(["_attack", "norm", "_eps"], sort=False):
            column = Threat(attack, norm, float(eps)).column
            cell = _one_image_set(cell)
            record[column] = float(cell["adv_top1"].astype(float).mean())
            record[f"n:{column}"] = int(cell["n"].max())
            record[f"clean:{column}"] = float(cell["clean_top1"].astype(float).mean())
            record[f"image_set:{column}"] = str(cell["image_set"].iloc[0])
        records.append(record)
    if not records:
        return pd.DataFrame(columns=[*REPLICATE, "clean_top1", "n_clean", "image_set", *RUN_VALUES, "gen_gap"])
    table = pd.DataFrame(records)
    threats = sorted({t for _, t in threat_columns(table)}, key=threat_order)
    front = [c for c in table.columns if not c.startswith(("adv:", "n:adv:", "clean:adv:", "image_set:adv:"))]
    return table[front + [t.column for t in threats] + [f"{p}:{t.column}" for p in ("n", "clean", "image_set")
                                                        for t in threats]]


def _group_label(rows: pd.DataFrame) -> tuple[str, str | None]:
    """A row's name: the run id, or the shared run id without its seed suffix; plus a note when the seeds' run ids
    differ by more than a seed suffix (they are still grouped: same model, regularizer and data set)."""
    run_ids = list(dict.fromkeys(rows["run_id"]))
    if len(run_ids) == 1:
        return run_ids[0], None
    stems = {SEED_SUFFIX.sub("", r) for r in run_ids}
    if len(stems) == 1:
        return stems.pop(), None
    model, regularizer, dataset = rows["model"].iloc[0], rows["regularizer"].iloc[0], rows["dataset"].iloc[0]
    note = (f"runs {', '.join(run_ids)} are grouped as seeds of {model} + {regularizer} on {dataset} "
            "(same model, regularizer and data set)")
    return f"{model}/{regularizer}", note


@functools.lru_cache(maxsize=1024)
def _spec_forms(spec: str) -> frozenset[str]:
    """The names a regularizer spec goes by: as written, canonical ("cutmix:alpha=1.0,prob=1.0") and the short run
    name ("cutmix"); just the text when the registry cannot read it (an unknown or older spec)."""
    from robust_enc.regularizers import canonical_spec, run_name

    try:
        return frozenset({spec, canonical_spec(spec), run_name(spec)})
    except UserError:
        return frozenset({spec})


def _matches(group: pd.Series, name: str) -> bool:
    """``name`` is the row's label, one of its run ids, or its regularizer in any form ("cutmix" matches results
    that record the canonical "cutmix:alpha=1.0,prob=1.0")."""
    if name == group["label"] or name in group["run_ids"].split(";"):
        return True
    return bool(_spec_forms(name) & _spec_forms(str(group["regularizer"])))


def _choose_baselines(groups: pd.DataFrame, baseline: str | None, notes: list[str]) -> list[int | None]:
    """For each row, the position of its baseline row: one that --baseline names (run id, label or regularizer),
    else the one whose regularizer is "baseline"; same model and data set first, else same data set."""
    candidates = [i for i in range(len(groups))
                  if (_matches(groups.iloc[i], baseline) if baseline else groups.iloc[i]["regularizer"] == BASELINE)]
    if baseline and not candidates:
        raise UserError(f"--baseline {baseline!r} names no run id or regularizer in the results; run ids: "
                        f"{', '.join(groups['run_ids'].str.split(';').explode().unique()[:12])}; regularizers: "
                        f"{', '.join(groups['regularizer'].unique()[:12])}")
    if not candidates:
        notes.append(f"no baseline row (no regularizer {BASELINE!r}): differences left out; "
                     "pass --baseline RUN_ID or --baseline REGULARIZER")
        return [None] * len(groups)
    chosen: list[int | None] = []
    missing = set()
    for i in range(len(groups)):
        row = groups.iloc[i]
        same_data = [c for c in candidates if groups.iloc[c]["dataset"] == row["dataset"]]
        same_model = [c for c in same_data if groups.iloc[c]["model"] == row["model"]]
        pick = same_model if same_model else same_data
        if len(pick) > 1 and baseline:
            raise UserError(f"--baseline {baseline!r} matches several rows for {row['model']} on {row['dataset']} "
                            f"({', '.join(groups.iloc[pick]['label'])}); give one run id")
        if len(pick) != 1:
            missing.add(row["dataset"])
        chosen.append(pick[0] if len(pick) == 1 else None)
    if missing:
        notes.append(f"no single baseline row for data set(s) {', '.join(sorted(missing))}: their differences are "
                     "left out; pass --baseline RUN_ID")
    return chosen


def _order_position(group: pd.Series, order: Sequence[str]) -> int:
    return next((i for i, name in enumerate(order) if _matches(group, name)), len(order))


def table3(frame: pd.DataFrame, *, baseline: str | None = None, order: Sequence[str] = ()) -> pd.DataFrame:
    """The paper's Table 3 view: one row per model + regularizer + data set (its runs are seeds: mean, ``:std`` and
    ``n_seeds``), clean top-1, adversarial top-1 per threat, differences to the baseline row (``:delta``), GBR with
    its error bar and the summed squared weight norms. Fractions throughout. ``n_clean`` and ``n:<column>`` are the
    image counts (largest over seeds) of the clean pass and of each threat.

    Row order per data set: the baseline, then the rows ``order`` names (regularizer specs in any form, run ids or
    labels; e.g. a preset's rows, the paper's order), then the rest sorted by label."""
    notes: list[str] = []
    reps = replicates(frame)
    threats = [c for c, _ in threat_columns(reps)]
    values = ["clean_top1", *threats, *GBR_MEASURES, "weight_sq_norm", "train_top1", "gen_gap"]
    records, seed_values = [], []
    for _, rows in reps.groupby(GROUP, sort=False):
        label, note = _group_label(rows)
        if note:
            notes.append(note)
        record = {"label": label, **{k: rows[k].iloc[0] for k in GROUP}, "n_seeds": len(rows),
                  "run_ids": ";".join(dict.fromkeys(rows["run_id"])),
                  "checkpoint_hashes": ";".join(h for h in dict.fromkeys(rows["checkpoint_hash"]) if h)}
        for name in values:
            column = rows[name].astype(float)
            record[name] = float(column.mean())  # NaN when no seed has it
            record[f"{name}:std"] = float(column.std(ddof=1)) if column.count() > 1 else math.nan
            record[f"{name}:ci"] = _t_half_width(column)
        for name in ["clean_top1", *threats]:
            record[f"{name}:lo"], record[f"{name}:hi"] = _pooled_interval(rows, name)
        record["gbr_stderr"] = float(rows["gbr_stderr"].astype(float).mean())  # one seed: the estimator's error bar
        # Image counts: a threat evaluated on a smaller subset than the clean pass (AutoAttack on CPU) says so.
        record["n_clean"] = int(rows["n_clean"].max())
        record.update({f"n:{c}": int(rows[f"n:{c}"].max()) for c in threats if rows[f"n:{c}"].notna().any()})
        records.append(record)
        seed_values.append({name: rows[name].astype(float).dropna().to_numpy() for name in values})
    if not records:
        empty = pd.DataFrame(columns=["label", *GROUP, "n_seeds", "run_ids", "clean_top1", "gbr", "weight_sq_norm"])
        notes.append("no result rows: Table 3 is empty")
        log.warning(notes[-1])
        return with_notes(empty, notes)
    groups = pd.DataFrame(records)
    _deduplicate_labels(groups)

    chosen = _choose_baselines(groups, baseline, notes)
    groups["is_baseline"] = [c == i for i, c in enumerate(chosen)]
    groups["baseline"] = [groups["label"].iloc[c] if c is not None else "" for c in chosen]
    compared = ["clean_top1", *threats, *GBR_MEASURES]
    if any(c is not None for c in chosen):
        for name in compared:
            base = [groups[name].iloc[c] if c is not None else math.nan for c in chosen]
            groups[f"{name}:delta"] = groups[name] - np.asarray(base, dtype=float)
            groups[f"{name}:delta_ci"] = [_welch_half_width(seed_values[i][name], seed_values[c][name])
                                          if c is not None and c != i else math.nan for i, c in enumerate(chosen)]

    # Sorted, not in the order the inputs were read (alphabetical run folders, or files from several machines).
    groups["_order"] = [_order_position(groups.iloc[i], order) for i in range(len(groups))]
    groups = groups.sort_values(["dataset", "is_baseline", "_order", "label"], ascending=[True, False, True, True],
                                kind="stable")
    several_seeds = bool((groups["n_seeds"] > 1).any())
    columns = ["label", *GROUP, "n_seeds", "run_ids", "checkpoint_hashes", "is_baseline", "baseline", "n_clean"]
    for name in values:
        columns.append(name)
        if several_seeds:
            columns += [f"{name}:std", f"{name}:ci"]
        if f"{name}:delta" in groups:
            columns.append(f"{name}:delta")
            if several_seeds:
                columns.append(f"{name}:delta_ci")
        if f"{name}:lo" in groups:
            columns += [f"{name}:lo", f"{name}:hi"]
        if name == "gbr":
            columns.append("gbr_stderr")
    columns += [f"n:{c}" for c in threats if f"n:{c}" in groups]
    for note in notes:
        log.warning(note)
    return with_notes(groups[columns].reset_index(drop=True), notes)


def _pooled_interval(rows: pd.DataFrame, name: str) -> tuple[float, float]:
    """The 95% Clopper-Pearson interval of an accuracy column over the images of all seeds together (k and n summed;
    the spread between seeds is the t-interval's job)."""
    n_column = "n_clean" if name == "clean_top1" else f"n:{name}"
    both = rows[[name, n_column]].astype(float).dropna()
    if both.empty:
        return math.nan, math.nan
    n = both[n_column].to_numpy()
    k = np.round(both[name].to_numpy() * n)
    return accuracy_interval(k.sum() / n.sum(), n.sum())


def _t_half_width(values: pd.Series) -> float:
    """Half-width of the CONFIDENCE Student-t interval of the mean of the non-NaN ``values``; NaN below 2."""
    values = values.dropna()
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))


def _welch_half_width(a: np.ndarray, b: np.ndarray) -> float:
    """Half-width of the CONFIDENCE Welch interval of mean(a) - mean(b) (unequal variances); NaN unless both have
    two or more values."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df) * math.sqrt(va + vb))


def _deduplicate_labels(groups: pd.DataFrame) -> None:
    """Labels name rows in notes, --baseline and plots: make them unique (a run id reused on two data sets)."""
    labels = list(groups["label"])
    labels = [f"{label}@{dataset}" if labels.count(label) > 1 else label
              for label, dataset in zip(labels, groups["dataset"])]
    groups["label"] = [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def leaderboard(frame: pd.DataFrame, runs: pd.DataFrame | None = None, *, attack: str | None = None,
                eps: Sequence[float] | None = None, threat: Threat | None = None) -> pd.DataFrame:
    """RobustBench-style ranking of trained models by adversarial top-1 at one threat (``threat``, else see
    ``choose_threat``), per data set. ``runs`` (columns run_id, checkpoint_hash, checkpoint, model_card) supplies each
    model's checkpoint file and the link to its model card.

    Clean and robust top-1 of a row come from the same images: the attack's own rows carry the clean accuracy of the
    images they attacked (a 40-image AutoAttack row is not put beside the clean accuracy of 450). Each has its 95%
    Clopper-Pearson interval (``*_lo``, ``*_hi``); models whose robust intervals overlap share a rank (``tied``)."""
    notes: list[str] = []
    columns = ["dataset", "rank", "tied", "run_id", "model", "regularizer", "attack", "norm", "eps", "n", "clean_top1",
               "clean_lo", "clean_hi", "adv_top1", "adv_lo", "adv_hi", "gbr", "image_set", "checkpoint_hash",
               "checkpoint", "model_card"]
    threat = threat or choose_threat(frame, attack=attack, eps=eps)
    if threat is None:
        notes.append("no adversarial rows: the leaderboard is empty")
        log.warning(notes[-1])
        return with_notes(pd.DataFrame(columns=columns), notes)
    reps = replicates(frame)
    ranked = reps[reps[threat.column].notna()].copy()
    unranked = reps.loc[reps[threat.column].isna(), "run_id"].tolist()
    if unranked:
        notes.append(f"not ranked (no {threat.attack} {threat.norm} eps {format_eps(threat.eps, threat.norm)} result): "
                     f"{', '.join(unranked)}")
    ranked["attack"], ranked["norm"], ranked["eps"] = threat.attack, threat.norm, threat.eps
    ranked["adv_top1"] = ranked[threat.column]
    ranked["clean_top1"] = ranked[f"clean:{threat.column}"]
    ranked["image_set"] = ranked[f"image_set:{threat.column}"]
    ranked["n"] = ranked[f"n:{threat.column}"].astype(int)
    for name in ("clean", "adv"):
        bounds = [accuracy_interval(v, n) for v, n in zip(ranked[f"{name}_top1"], ranked["n"])]
        ranked[f"{name}_lo"], ranked[f"{name}_hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    for name in ("checkpoint", "model_card"):
        ranked[name] = [_run_value(runs, r, h, name) for r, h in zip(ranked["run_id"], ranked["checkpoint_hash"])]
    ranked = ranked.sort_values(["dataset", "adv_top1", "clean_top1"], ascending=[True, False, False], kind="stable")
    ranked["rank"], ranked["tied"] = 0, False
    for _, rows in ranked.groupby("dataset", sort=False):
        ranks, tied = shared_ranks(rows["adv_top1"].tolist(), rows["adv_lo"].tolist(), rows["adv_hi"].tolist())
        ranked.loc[rows.index, "rank"], ranked.loc[rows.index, "tied"] = ranks, tied
    # Rows a study attacked with cheaper threats only (as the quick preset does) are expected: the note goes into the
    # leaderboard's files and the report's index, not into a warning.
    for note in notes:
        log.info(note)
    table = ranked[columns].reset_index(drop=True)
    table.attrs["threat"] = threat._asdict()
    return with_notes(table, notes)


def _run_value(runs: pd.DataFrame | None, run_id: str, checkpoint_hash: str, column: str) -> str:
    """``column`` of the run folder that holds this model (same run id; same checkpoint hash where both are known)."""
    if runs is None or runs.empty or column not in runs:
        return ""
    hash_fits = (runs["checkpoint_hash"] == checkpoint_hash) | (runs["checkpoint_hash"] == "") | (checkpoint_hash == "")
    same = runs[(runs["run_id"] == run_id) & hash_fits]
    return str(same[column].iloc[0]) if len(same) else ""


MIN_MODELS = 3  # Pearson/Spearman on 2 points is +-1 by construction


def correlation(table: pd.DataFrame) -> pd.DataFrame:
    """Across the rows of a Table 3 view or of ``replicates`` (one per trained model), per data set: Pearson and
    Spearman correlation, with p-values and n, between GBR and clean top-1, each adversarial top-1, the
    generalization gap (train - clean top-1, where the train accuracy is known) and the summed squared weight norms;
    the same for each scale-free companion of GBR (``GBR_MEASURES``) that at least 3 models have, so a reader sees
    whether a correlation survives removing the logits' scale. Fewer than 3 models: NaN and a note, no error; fewer
    than ``MIN_P_VALUE_MODELS``: the coefficients without p-values. ``attrs["tested"]``: how many p-values there are
    (a note says what that means for the smallest of them)."""
    notes: list[str] = []
    columns = ["dataset", "x", "y", "attack", "norm", "eps", "n", "pearson_r", "pearson_p", "spearman_rho",
               "spearman_p", "note"]
    targets = [("clean_top1", Threat(CLEAN, CLEAN, 0.0))] + threat_columns(table)
    targets += [(name, Threat("", "", math.nan)) for name in ("gen_gap", "weight_sq_norm")]
    records = []
    datasets = list(dict.fromkeys(table["dataset"])) if "dataset" in table else []
    for dataset in datasets:
        rows = table[table["dataset"] == dataset]
        with_gbr = int(rows["gbr"].notna().sum())
        if with_gbr < MIN_MODELS:
            notes.append(f"{dataset}: correlation with GBR needs at least {MIN_MODELS} models with a GBR value, "
                         f"found {with_gbr}")
        measures = ["gbr"] + [m for m in GBR_MEASURES[1:]
                              if m in rows and int(rows[m].astype(float).notna().sum()) >= MIN_MODELS]
        for measure in measures:
            for name, threat in targets:
                if name not in rows or (measure != "gbr" and name == "weight_sq_norm"):
                    continue
                both = rows[[measure, name]].astype(float).replace([np.inf, -np.inf], np.nan).dropna()  # diverged
                if name == "gen_gap" and both.empty:
                    continue  # no train accuracy known: nothing to say
                r, r_p, rho, rho_p, note = correlate(both[measure].to_numpy(), both[name].to_numpy(), MIN_MODELS)
                records.append({"dataset": dataset, "x": measure, "y": name, "attack": threat.attack,
                                "norm": threat.norm, "eps": threat.eps, "n": len(both), "pearson_r": r,
                                "pearson_p": r_p, "spearman_rho": rho, "spearman_p": rho_p, "note": note})
    if not datasets:
        notes.append("no models: no correlation")
    for note in notes:
        log.warning(note)
    table = pd.DataFrame(records, columns=columns)
    # Every p-value printed is a test: the reader needs the count to judge the smallest of them.
    table.attrs["tested"] = tested = int(table[["pearson_p", "spearman_p"]].notna().to_numpy().sum())
    if len(table):
        notes.append(multiple_comparisons_note(tested))
    return with_notes(table, notes)
