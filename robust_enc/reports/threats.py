"""The threats of a report's adversarial columns: ``Threat`` (attack, norm, eps) and its ``adv:<attack>:<norm>:<eps>``
column, their order in tables, and choosing or selecting threats (``--attack``, ``--eps``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import pandas as pd

from robust_enc.errors import UserError
from robust_enc.runtime.progress import format_eps

CLEAN = "none"  # the attack name of the clean row (eps 0)
# Default leaderboard attack, strongest first (the per-example worst case, as RobustBench ranks by AutoAttack).
STRONGEST_FIRST = ("autoattack", "worst", "pgd", "fgsm")
# Column order, weakest to strongest; attacks not listed follow alphabetically.
ATTACK_ORDER = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "square", "autoattack", "worst")
NORM_ORDER = ("linf", "l2")
EPS_TOL = 1e-6  # "8/255" typed on the CLI vs 0.0313725490196078 read back from a CSV


class Threat(NamedTuple):
    attack: str  # attack name, with "-<steps>" appended when the results hold several step counts for it
    norm: str
    eps: float  # pixel units

    @property
    def column(self) -> str:
        return f"adv:{self.attack}:{self.norm}:{self.eps!r}"


def parse_threat_column(name: str) -> Threat | None:
    """The threat of an ``adv:<attack>:<norm>:<eps>`` column; None for any other column (``:std``, ``:delta``...)."""
    parts = name.split(":")
    if len(parts) != 4 or parts[0] != "adv":
        return None
    return Threat(parts[1], parts[2], float(parts[3]))


def threat_columns(table: pd.DataFrame) -> list[tuple[str, Threat]]:
    return [(c, t) for c in table.columns if (t := parse_threat_column(str(c))) is not None]


def with_notes(table: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    table.attrs["notes"] = list(notes)
    return table


def attack_order(attack: str) -> tuple:
    base, _, steps = attack.rpartition("-") if re.search(r"-\d+$", attack) else (attack, "", "0")
    rank = ATTACK_ORDER.index(base) if base in ATTACK_ORDER else len(ATTACK_ORDER)
    return (rank, base, int(steps))


def threat_order(threat: Threat) -> tuple:
    norm_rank = NORM_ORDER.index(threat.norm) if threat.norm in NORM_ORDER else len(NORM_ORDER)
    return (*attack_order(threat.attack), norm_rank, threat.norm, threat.eps)


def label_threats(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``_attack`` (attack, or attack-steps where one attack ran with several step counts, e.g. PGD-10 and
    PGD-50) and ``_eps`` (one canonical float per eps, so 8/255 from two machines lands in one column)."""
    adv = frame[frame["attack"] != CLEAN]
    step_counts = adv.groupby(["attack", "norm"])["steps"].nunique()
    several = {key for key, count in step_counts.items() if count > 1}
    attack = [f"{a}-{s}" if (a, n) in several else a for a, n, s in zip(frame["attack"], frame["norm"], frame["steps"])]
    eps_key = frame["eps"].astype(float).round(9)
    canonical = frame["eps"].astype(float).groupby(eps_key).first()
    return frame.assign(_attack=attack, _eps=eps_key.map(canonical).astype(float))


def _attack_matches(label: str, attack: str) -> bool:
    return re.fullmatch(rf"{re.escape(attack)}(-\d+)?", label) is not None


def _eps_text(values: Iterable[float]) -> str:
    return ", ".join(format_eps(e) for e in sorted(set(values)))


def base_column(name: str) -> str:
    """The threat column a derived column belongs to: ``adv:a:n:e`` for ``adv:a:n:e:std``, ``n:adv:a:n:e``...;
    any other name as it is."""
    parts = str(name).split(":")
    start = next((i for i, part in enumerate(parts) if part == "adv"), None)
    return ":".join(parts[start:start + 4]) if start is not None and len(parts) >= start + 4 else str(name)


def select_threats(table: pd.DataFrame, *, attack: str | None = None,
                   eps: Sequence[float] | None = None) -> pd.DataFrame:
    """Keep only the adversarial columns of one attack and/or some eps (with their :std/:delta columns). Asking for
    an attack or eps the table lacks raises a UserError listing what it has."""
    threats = threat_columns(table)
    keep = threats
    if attack is not None:
        keep = [(c, t) for c, t in keep if _attack_matches(t.attack, attack)]
        if not keep:
            known = sorted({t.attack for _, t in threats}, key=attack_order)
            raise UserError(f"--attack {attack!r}: no results for it; attacks in the results: "
                            f"{', '.join(known) or 'none'}")
    if eps is not None:
        wanted = [float(e) for e in eps]
        missing = [e for e in wanted if not any(abs(t.eps - e) <= EPS_TOL for _, t in keep)]
        if missing:
            raise UserError(f"--eps {_eps_text(missing)}: no results at that eps; available: "
                            f"{_eps_text(t.eps for _, t in keep) or 'none'}")
        keep = [(c, t) for c, t in keep if any(abs(t.eps - e) <= EPS_TOL for e in wanted)]
    dropped = {c for c, _ in threats} - {c for c, _ in keep}
    columns = [c for c in table.columns if base_column(c) not in dropped]
    return with_notes(table[columns].copy(), table.attrs.get("notes", []))


def choose_threat(frame: pd.DataFrame, *, attack: str | None = None,
                  eps: Sequence[float] | None = None) -> Threat | None:
    """The leaderboard's threat: the given attack, else the strongest present ("worst", else pgd, else fgsm, else the
    attack with the lowest mean accuracy); linf when it has linf rows; the largest (given) eps. None without attacks."""
    adv = label_threats(frame[frame["attack"] != CLEAN])
    if adv.empty:
        if attack is not None:
            raise UserError(f"--attack {attack!r}: the results hold no adversarial rows")
        return None
    labels = sorted(adv["_attack"].unique(), key=attack_order)
    if attack is not None:
        matching = [a for a in labels if _attack_matches(a, attack)]
        if not matching:
            raise UserError(f"--attack {attack!r}: no results for it; attacks in the results: {', '.join(labels)}")
        chosen = matching[-1]  # the most steps
    else:
        chosen = next((a for name in STRONGEST_FIRST for a in reversed(labels) if _attack_matches(a, name)), None)
        if chosen is None:
            chosen = str(adv.groupby("_attack")["adv_top1"].mean().idxmin())
    rows = adv[adv["_attack"] == chosen]
    norms = sorted(rows["norm"].unique(), key=lambda n: (NORM_ORDER.index(n) if n in NORM_ORDER else 9, n))
    rows = rows[rows["norm"] == norms[0]]
    available = sorted(rows["_eps"].unique())
    if eps:
        present = [e for e in available if any(abs(e - float(w)) <= EPS_TOL for w in eps)]
        if not present:
            raise UserError(f"--eps {_eps_text(float(e) for e in eps)}: no {chosen} {norms[0]} results there; "
                            f"available: {_eps_text(available)}")
        available = present
    return Threat(chosen, norms[0], float(max(available)))
