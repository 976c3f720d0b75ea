"""Adversarial evaluation through IBM ART: AutoAttack, FGSM, PGD, APGD, Square over a data set, an eps sweep,
sanity checks.

``evaluate(AttackConfig(...))`` runs a checkpoint (what ``robust-enc attack`` and ``reproduce`` call);
``benchmark(model, dataset, attacks=..., eps=...)`` is the RobustBench-style one call for any ``nn.Module``.
Only ``art_adapter`` imports ART.
"""

from robust_enc.attacks.registry import ATTACKS, AttackSettings, parse_attacks, parse_eps
from robust_enc.attacks.runner import AttackConfig, benchmark, evaluate, results_path

__all__ = ["ATTACKS", "AttackConfig", "AttackSettings", "benchmark", "evaluate", "parse_attacks", "parse_eps",
           "results_path"]
