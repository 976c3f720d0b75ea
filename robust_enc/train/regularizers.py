"""Placeholder until the regularizer registry lands: only the baseline (no architecture change)."""

from __future__ import annotations

from torch import nn

from robust_enc.errors import UserError


def prepare_model(model: nn.Module, spec: str) -> nn.Module:
    if spec != "baseline":
        raise UserError(f"unknown regularizer spec {spec!r}")
    return model
