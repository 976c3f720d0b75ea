"""Sanity checks every attack run makes on its own results (after AutoAttack's ``checks.py`` and ``flags_doc.md``).

A failed check becomes a short flag in the row's ``flags`` field (';'-separated); the evaluation logs one line per run
and the command line ends with one panel of every flag. The checks:

- ``perturbation_exceeds_eps``: the largest perturbation (L-inf: max |x_adv - x|; L2: max per-example norm) is
  above eps + 1e-6 (float32 arithmetic overshoots by ~2e-9, never by 1e-6).
- ``outside_box``: an adversarial pixel is outside [0, 1] by more than 1e-6.
- ``non_finite=K``: K adversarial images came back with NaN or inf pixels.
- ``eps0_differs_from_clean``: at eps 0 an attack changed the accuracy; or, on every run and every attack row,
  ``eps0_differs_from_clean(art_predict=K/N)``: ART's ``predict`` (the numpy round trip every attack's forward
  passes take) disagreed with the suite's clean pass on K of N examples (the first 16 examples each process sees:
  a conversion bug is systematic, and a check per batch would cost a forward pass per batch). Attacking at eps 0
  itself proves nothing: the suite skips the attack there.

The three comparisons between attacks (or eps) are made per example, not on the totals, with an exact one-sided
McNemar test: of the examples where the two disagree, the supposedly weaker side broke b and the stronger side c;
the flag fires when P(X >= b) < 0.01 for X ~ Binomial(b + c, 1/2), so a one- or two-image difference (random starts,
ties) never fires, while a systematic one does (b >= 7 with c = 0). The per-example counts come from the evaluation
(``counting``).

- ``accuracy_increases_with_eps``: an attack broke significantly more examples at the previous eps than at this one.
- ``iterative_weaker_than_fgsm``: one FGSM step broke significantly more examples than PGD/APGD/AutoAttack at the
  same eps: the iterative attack is misconfigured (step size, steps) or the gradients are obfuscated. Without an
  ``fgsm`` row the evaluation computes an FGSM reference from the per-batch gradient below.
- ``black_box_stronger_than_white_box``: the score-based square attack broke significantly more examples than the
  per-example worst case of the iterative gradient attacks (PGD/APGD/AutoAttack) run at the same eps: the white-box
  gradients are probably masked (Athalye et al. 2018). One FGSM step is no yardstick here: a 1,000-query square
  attack beats it on healthy models too.
- ``zero_gradient=F``: a fraction F > 1% of the attacked examples had an all-zero clean loss gradient w.r.t. the
  input (one gradient per batch, FGSM's own when FGSM runs): gradient masking. A property of the model, so every
  attack row at eps > 0 carries it (on a black-box row: gradient attacks are masked on this model).
- ``outputs_look_like_probabilities``: the model's outputs sum to 1 and lie in [0, 1]: a softmax inside the model
  flattens the cross-entropy gradient; attacks want logits.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace

from robust_enc.results import ResultRow
from robust_enc.runtime.progress import format_eps

log = logging.getLogger(__name__)

TOLERANCE = 1e-6  # pixel units
ZERO_GRADIENT_LIMIT = 0.01  # fraction of attacked examples
PROBABILITY_LIMIT = 0.99  # fraction of examples whose outputs look like probabilities
SIGNIFICANCE = 0.01  # one-sided exact McNemar test on the disagreeing examples


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
    roundtrip_checked: int = 0  # examples whose ART predict was compared with the suite's clean pass
    roundtrip_mismatch: int = 0  # of those, with a different top-1 label
    ref_only: int = 0  # examples the reference (FGSM; for black-box rows the white-box worst case) broke, this not
    self_only: int = 0  # examples this attack broke and the reference did not
    prev_eps_only: int = 0  # examples this attack broke at the previous eps but not at this one
    this_eps_only: int = 0  # examples it broke at this eps but not at the previous one


def mcnemar_p(weaker_only: int, stronger_only: int) -> float:
    """One-sided exact McNemar p-value that the weaker side breaks more: P(X >= weaker_only), X ~ Binomial(n, 1/2)
    over the n = weaker_only + stronger_only disagreeing examples (1.0 when they never disagree)."""
    from scipy.stats import binomtest

    n = weaker_only + stronger_only
    return 1.0 if n == 0 else float(binomtest(weaker_only, n, 0.5, alternative="greater").pvalue)


def _significant(weaker_only: int, stronger_only: int) -> str:
    """"" when the weaker side did not break significantly more, else the numbers for the flag."""
    p = mcnemar_p(weaker_only, stronger_only)
    return f"{weaker_only} vs {stronger_only},p={p:.2g}" if p < SIGNIFICANCE else ""


def check_rows(rows: list[ResultRow], stats: list[RowStats]) -> list[ResultRow]:
    """Return copies of ``rows`` with ``flags`` filled in."""
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
            if found := _significant(stats[cur].prev_eps_only, stats[cur].this_eps_only):
                flags[cur].append(f"accuracy_increases_with_eps(from={rows[prev].adv_top1:.4f},{found})")

    for i in attack_rows:
        row, st = rows[i], stats[i]
        if row.eps == 0:
            continue
        if st.white_box and st.iterative and (found := _significant(st.ref_only, st.self_only)):
            flags[i].append(f"iterative_weaker_than_fgsm(fgsm broke {found})")
        if not st.white_box and (found := _significant(st.self_only, st.ref_only)):
            flags[i].append(f"black_box_stronger_than_white_box(square broke {found})")

    if stats and stats[0].probability_fraction >= PROBABILITY_LIMIT:
        for f in flags:
            f.append("outputs_look_like_probabilities")

    return [replace(row, flags=";".join(f)) for row, f in zip(rows, flags)]


def flag_lines(rows: list[ResultRow]) -> list[str]:
    """"run attack eps: flag" for every flag of ``rows``, for a summary panel or log line."""
    return [f"{r.run_id} {r.attack} eps={format_eps(r.eps, r.norm)}: {flag}"
            for r in rows if r.flags for flag in r.flags.split(";")]
