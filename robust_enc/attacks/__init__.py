"""Adversarial evaluation through IBM ART: AutoAttack, FGSM, PGD, APGD, Square over a data set, an eps sweep,
sanity checks.

``evaluate(AttackConfig(...))`` runs a checkpoint (what ``robust-enc attack`` and ``reproduce`` call);
``benchmark(model, dataset, threat_model="Linf", eps=8/255, attacks="pgd")`` is the RobustBench-style one call for any
``nn.Module`` (a DataFrame of the rows); ``evaluate_model`` returns the rows themselves.
Only ``art_adapter`` imports ART.
"""

from robust_enc.attacks.config import AttackConfig
from robust_enc.attacks.evaluation import benchmark, evaluate, evaluate_model, results_path
from robust_enc.attacks.registry import ATTACKS, AttackSettings, parse_attacks

__all__ = ["ATTACKS", "AttackConfig", "AttackSettings", "benchmark", "evaluate", "evaluate_model", "parse_attacks",
           "results_path"]
