"""robust-enc: adversarial-robustness evaluation of weight-decay-style regularizers (ENC, GBR).

``robust_enc.benchmark(model, dataset="digits", threat_model="Linf", eps=8/255, attacks="pgd")``: clean and robust
accuracy of any ``nn.Module`` as a DataFrame; ``robust_enc.evaluate_model``: the same rows as records.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "benchmark", "evaluate_model"]


def __getattr__(name: str) -> Any:
    """The public API, imported on first use (PEP 562): ``import robust_enc`` stays light, and the package root, which
    every module imports for ``__version__``, does not import the attack stack while the package initializes."""
    if name in ("benchmark", "evaluate_model"):
        from robust_enc.attacks import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module 'robust_enc' has no attribute {name!r}")
