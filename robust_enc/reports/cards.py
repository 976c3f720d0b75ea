"""One card per trained model for the report page, and its RobustBench-style ``model_info`` JSON.

A card carries what a number is about: the checkpoint hash, the image set (digest), n, the preprocessing, where the
pixels came from and which weights ran, beside the model's clean accuracy and each threat's robust accuracy, every
accuracy with the clean accuracy of the same images and a 95% Clopper-Pearson interval.

The model-info JSON follows RobustBench's ``model_info/<dataset>/<threat>/<name>.json`` fields (name, architecture,
dataset, threat_model "Linf", eps "8/255", clean_acc and autoattack_acc in percent, additional_notes), with numbers
as numbers, plus a ``robust_enc`` object holding the suite's own provenance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from robust_enc.reports.stats import accuracy_interval
from robust_enc.reports.tables import REPLICATE, Threat, replicates, threat_columns
from robust_enc.reports.threats import CLEAN, attack_order
from robust_enc.runtime.progress import format_eps

PROVENANCE = ("split", "subset", "seed", "preprocessing", "pixels", "weights", "precision", "robust_enc_version",
              "torch_version", "art_version", "created_at")
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # RobustBench's names


@dataclass
class Measured:
    """One threat's result for one model: robust and clean top-1 of the same ``n`` images."""
    attack: str
    norm: str
    eps: float
    n: int
    clean_top1: float
    adv_top1: float
    adv_lo: float
    adv_hi: float
    image_set: str


@dataclass
class ModelCard:
    run_id: str
    model: str
    regularizer: str
    dataset: str
    checkpoint_hash: str
    image_set: str
    n: int  # images of the largest clean evaluation
    clean_top1: float
    clean_lo: float
    clean_hi: float
    gbr: float
    gbr_stderr: float
    weight_sq_norm: float
    provenance: dict[str, str] = field(default_factory=dict)
    results: list[Measured] = field(default_factory=list)
    checkpoint: str = ""  # link relative to the report folder
    model_card: str = ""


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def model_cards(frame: pd.DataFrame, links: pd.DataFrame | None = None) -> list[ModelCard]:
    """A card per trained model of the results frame; ``links``: the leaderboard-style run folder links (columns
    run_id, checkpoint_hash, checkpoint, model_card)."""
    reps = replicates(frame)
    cards = []
    for _, rep in reps.iterrows():
        rows = frame[(frame["run_id"] == rep["run_id"]) & (frame["checkpoint_hash"] == rep["checkpoint_hash"])
                     & (frame["dataset"] == rep["dataset"])]
        first = rows.sort_values("n", ascending=False, kind="stable").iloc[0]
        lo, hi = accuracy_interval(rep["clean_top1"], rep["n_clean"])
        card = ModelCard(**{k: str(rep[k]) for k in REPLICATE}, image_set=_text(rep.get("image_set")),
                         n=int(rep["n_clean"]), clean_top1=float(rep["clean_top1"]), clean_lo=lo, clean_hi=hi,
                         gbr=float(rep["gbr"]), gbr_stderr=float(rep["gbr_stderr"]),
                         weight_sq_norm=float(rep["weight_sq_norm"]),
                         provenance={k: _text(first.get(k)) for k in PROVENANCE if _text(first.get(k))})
        for column, threat in sorted(threat_columns(reps), key=lambda ct: (attack_order(ct[1].attack), ct[1].eps)):
            if pd.isna(rep[column]):
                continue
            n = int(rep[f"n:{column}"])
            adv_lo, adv_hi = accuracy_interval(rep[column], n)
            card.results.append(Measured(threat.attack, threat.norm, threat.eps, n, float(rep[f"clean:{column}"]),
                                         float(rep[column]), adv_lo, adv_hi, _text(rep[f"image_set:{column}"])))
        if links is not None and len(links):
            match = links[(links["run_id"] == card.run_id) & (links["checkpoint_hash"] == card.checkpoint_hash)]
            if len(match):
                card.checkpoint, card.model_card = str(match["checkpoint"].iloc[0]), str(match["model_card"].iloc[0])
        cards.append(card)
    return cards


def _percent(fraction: float) -> float | None:
    return None if math.isnan(fraction) else round(fraction * 100, 2)


def model_info(card: ModelCard, threat: Threat | None) -> dict[str, Any]:
    """The RobustBench-style JSON object of ``card``. ``autoattack_acc`` is its AutoAttack top-1 at ``threat``'s eps
    when ``threat`` is AutoAttack, else at its largest Linf AutoAttack eps, else null (the leaderboard's own attack
    then goes into ``robust_enc``); ``clean_acc`` is measured on the same images as ``autoattack_acc``."""
    autoattack = [m for m in card.results if m.attack == "autoattack" and m.norm == "linf"]
    if threat is not None and threat.attack == "autoattack":
        autoattack = [m for m in autoattack if abs(m.eps - threat.eps) <= 1e-9] or autoattack
    chosen = max(autoattack, key=lambda m: m.eps) if autoattack else None
    shown = chosen or next((m for m in card.results if threat is not None and m.attack == threat.attack
                            and m.norm == threat.norm and abs(m.eps - threat.eps) <= 1e-9), None)
    notes = [f"regularizer {card.regularizer}"]
    if shown is not None:
        notes.append(f"{shown.attack} {format_eps(shown.eps, shown.norm)} on {shown.n} images of {card.dataset}; "
                     "clean_acc on those same images")
    return {
        "name": card.run_id, "architecture": card.model, "dataset": card.dataset,
        "threat_model": THREAT_MODELS.get(shown.norm, shown.norm) if shown else "",
        "eps": format_eps(shown.eps, shown.norm) if shown else None,
        "clean_acc": _percent(shown.clean_top1 if shown else card.clean_top1),
        "autoattack_acc": _percent(chosen.adv_top1) if chosen else None,
        "additional_data": False, "number_forward_passes": 1, "additional_notes": "; ".join(notes),
        "robust_enc": {"checkpoint_hash": card.checkpoint_hash, "regularizer": card.regularizer,
                       "image_set": shown.image_set if shown else card.image_set, "n": shown.n if shown else card.n,
                       "attack": shown.attack if shown else CLEAN,
                       "robust_acc": _percent(shown.adv_top1) if shown else None,
                       "robust_acc_ci95": [_percent(shown.adv_lo), _percent(shown.adv_hi)] if shown else None,
                       "clean_acc_all_images": _percent(card.clean_top1), "n_all_images": card.n,
                       "gbr": None if math.isnan(card.gbr) or math.isinf(card.gbr) else card.gbr,
                       **card.provenance},
    }
