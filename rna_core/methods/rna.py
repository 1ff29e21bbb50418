"""Random Normalization Aggregation (Dong et al., NeurIPS 2022): every norm layer draws from a space."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch.nn as nn

from ..norms import parse_space
from .base import Criterion, Method, register_method


@register_method
class RNA(Method):
    """`model.norm` is a single spec (a plain baseline) or a random space such as `bn,gns:1`."""

    name = "rna"
    title = "Random Normalization Aggregation (RNA; Dong et al., NeurIPS 2022)"

    def validate(self, model_cfg: Any) -> None:
        parse_space(model_cfg.norm)

    def row_label(self, spec: Mapping[str, Any]) -> str:
        # A plain single-norm model is its norm ("bn", "gn:32", as the paper's BN/GN rows); a
        # random space is named with it, so a BN baseline and an RNA model never share a row.
        norm = str(spec.get("norm", ""))
        if not norm:
            return self.name
        return f"rna({norm})" if "," in norm else norm

    def selection_criterion(self, cfg: Any, model: nn.Module) -> Criterion:
        found = super().selection_criterion(cfg, model)
        return replace(found, description=f"{found.description} (RNA's train.py)")
