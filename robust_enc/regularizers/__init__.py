"""Regularizers and the models they change: the spec language (``spec``: ``enc+cutmix+ls``), the entries
(``catalogue``), ENC/WN/WS as weight parametrizations (``enc``), and ``build_model``: the zoo's network with the
architecture changes of its spec's regularizer. What the entries do during training (batch transforms, penalties,
update rules) is run by ``train.recipe``; the model zoo itself knows nothing of regularizers."""

from robust_enc.models import ModelSpec, NormalizedModel, build_network
from robust_enc.regularizers import catalogue  # noqa: F401  (registers every entry in REGULARIZERS)
from robust_enc.regularizers.enc import bake_model
from robust_enc.regularizers.spec import (
    REGULARIZERS,
    Regularizer,
    canonical_spec,
    export_spec,
    parse_spec,
    prepare_model,
    run_name,
)

__all__ = ["REGULARIZERS", "Regularizer", "bake_model", "build_model", "canonical_spec", "export_spec", "parse_spec",
           "prepare_model", "run_name"]


def build_model(spec: ModelSpec, *, pretrained: bool = False) -> NormalizedModel:
    """Build a model with the architecture changes its regularizer spec asks for (ENC, WN, WS, Dropout, ...)."""
    return prepare_model(build_network(spec, pretrained=pretrained), spec.regularizer)
