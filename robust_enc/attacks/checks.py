"""Sanity checks every attack run makes on its own results (after AutoAttack's ``checks.py`` and ``flags_doc.md``).

A failed check becomes a short flag in the row's ``flags`` field (';'-separated) and a warning. The checks:

- ``perturbation_exceeds_eps``: the largest perturbation (L-inf: max |x_adv - x|; L2: max per-example norm) is
  above eps + 1e-6 (float32 arithmetic overshoots by ~2e-9, never by 1e-6).
- ``outside_box``: an adversarial pixel is outside [0, 1] by more than 1e-6.
- ``non_finite=K``: K adversarial images came back with NaN or inf pixels.
- ``eps0_differs_from_clean``: at eps 0 an attack changed the accuracy; or, on every run and every attack row,
  ``eps0_differs_from_clean(art_predict=K/N)``: ART's ``predict`` (the numpy round trip every attack's forward
  passes take) disagreed with the suite's clean pass on K of N examples (the first 16 examples each process sees:
  a conversion bug is systematic, and a check per batch would cost a forward pass per batch). Attacking at eps 0
  itself proves nothing: the suite skips the attack there.
- ``accuracy_increases_with_eps``: robust accuracy went up from the previous eps of the same attack.
- ``iterative_weaker_than_fgsm``: PGD/APGD left more examples robust than one FGSM step at the same eps: the
  iterative attack is misconfigured (step size, steps) or the gradients are obfuscated. Without an ``fgsm`` row the
  runner computes an FGSM reference from the per-batch gradient below (``RowStats.fgsm_reference``).
- ``black_box_stronger_than_white_box``: the score-based square attack beat every iterative gradient attack
  (PGD/APGD) run at the same eps: the white-box gradients are probably masked (Athalye et al. 2018). One FGSM step
  is no yardstick here: a 1,000-query square attack beats it on healthy models too.
- ``zero_gradient=F``: a fraction F > 1% of the attacked examples had an all-zero clean loss gradient w.r.t. the
  input (one gradient per batch, FGSM's own when FGSM runs): gradient masking. A property of the model, so every
  attack row at eps > 0 carries it (on a black-box row: gradient attacks are masked on this model).
- ``outputs_look_like_probabilities``: the model's outputs sum to 1 and lie in [0, 1]: a softmax inside the model
  flattens the cross-entropy gradient; attacks want logits.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, replace

from robust_enc.results import ResultRow

log = logging.getLogger(__name__)

TOLERANCE = 1e-6  # pixel units
ZERO_GRADIENT_LIMIT = 0.01  # fraction of attacked examples
PROBABILITY_LIMIT = 0.99  # fraction of examples whose outputs look like probabilities


@dataclass(frozen=True)
class RowStats:
    """What the checks need beyond the row itself."""

    max_perturbation: float = 0.0  # pixel units, in the row's norm
    box_excess: float = 0.0  # how far the farthest adversarial pixel lies outside [0, 1]
    attacked: int = 0  # examples the attack ran on (clean-correct ones)
    zero_gradient: int = 0  # of those, with an all-zero clean loss gradient w.r.t. the input
    white_box: bool = True
    iterative: bool = False
    probability_fraction: float = 0.0  # examples whose clean outputs look like probabilities (same for every row)
    non_finite: int = 0  # adversarial images with NaN/inf pixels
    fgsm_reference: float = math.nan  # robust top-1 of one FGSM step at this eps when no fgsm row exists; NaN = none
    roundtrip_checked: int = 0  # examples whose ART predict was compared with the suite's clean pass
    roundtrip_mismatch: int = 0  # of those, with a different top-1 label


def check_rows(rows: list[ResultRow], stats: list[RowStats]) -> list[ResultRow]:
    """Return copies of ``rows`` with ``flags`` filled in; log one warning per failed check."""
    flags: list[list[str]] = [[] for _ in rows]
    attack_rows = [i for i, r in enumerate(rows) if r.attack not in ("none", "worst")]
    for i in attack_rows:
        row, st = rows[i], stats[i]
        if st.max_perturbation > row.eps + TOLERANCE:
            flags[i].append(f"perturbation_exceeds_eps(max={st.max_perturbation:.3g})")
        if st.box_excess > TOLERANCE:
            flags[i].append(f"outside_box(by={st.box_excess:.3g})")
        if st.non_finite:
            flags[i].append(f"non_finite={st.non_finite}")
        if row.eps == 0 and abs(row.adv_top1 - row.clean_top1) > 1e-12:
            flags[i].append("eps0_differs_from_clean")
        if st.roundtrip_mismatch:
            flags[i].append(f"eps0_differs_from_clean(art_predict={st.roundtrip_mismatch}/{st.roundtrip_checked})")
        if row.eps > 0 and st.attacked and st.zero_gradient / st.attacked > ZERO_GRADIENT_LIMIT:
            flags[i].append(f"zero_gradient={st.zero_gradient / st.attacked:.3f}")

    by_attack: dict[str, list[int]] = defaultdict(list)
    for i in attack_rows:
        by_attack[rows[i].attack].append(i)
    for indices in by_attack.values():
        indices.sort(key=lambda i: rows[i].eps)
        for prev, cur in zip(indices, indices[1:]):
            if rows[cur].adv_top1 > rows[prev].adv_top1 + 1e-12:
                flags[cur].append(f"accuracy_increases_with_eps(from={rows[prev].adv_top1:.4f})")

    at_eps: dict[float, list[int]] = defaultdict(list)
    for i in attack_rows:
        at_eps[rows[i].eps].append(i)
    for eps, indices in at_eps.items():
        if eps == 0:
            continue
        fgsm = [rows[i].adv_top1 for i in indices if rows[i].attack == "fgsm"]
        fgsm += [stats[i].fgsm_reference for i in indices if not math.isnan(stats[i].fgsm_reference)][:1]
        white = [rows[i].adv_top1 for i in indices if stats[i].white_box and stats[i].iterative]
        for i in indices:
            if fgsm and stats[i].iterative and stats[i].white_box and rows[i].adv_top1 > fgsm[0] + 1e-12:
                flags[i].append(f"iterative_weaker_than_fgsm(fgsm={fgsm[0]:.4f})")
            if white and not stats[i].white_box and rows[i].adv_top1 < min(white) - 1e-12:
                flags[i].append(f"black_box_stronger_than_white_box(white={min(white):.4f})")

    if stats and stats[0].probability_fraction >= PROBABILITY_LIMIT:
        for f in flags:
            f.append("outputs_look_like_probabilities")

    out = []
    for row, f in zip(rows, flags):
        for flag in f:
            log.warning("sanity check failed: %s eps=%.5g: %s", row.attack, row.eps, flag)
        out.append(replace(row, flags=";".join(f)))
    return out
