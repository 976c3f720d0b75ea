"""Adversarial evaluation through IBM ART: AutoAttack, FGSM, PGD, APGD, Square over a data set, an eps sweep,
sanity checks.

``evaluate(AttackConfig(...))`` runs a checkpoint (what ``robust-enc attack`` and ``reproduce`` call);
``evaluate_model(model, dataset, attacks=..., eps=...)`` is the RobustBench-style one call for any ``nn.Module``.
Only ``art_adapter`` imports ART.
"""

from robust_enc.attacks.config import AttackConfig
from robust_enc.attacks.evaluation import evaluate, evaluate_model, results_path
from robust_enc.attacks.registry import ATTACKS, AttackSettings, parse_attacks

__all__ = ["ATTACKS", "AttackConfig", "AttackSettings", "evaluate", "evaluate_model", "parse_attacks", "results_path"]
