"""RPI+RPT (Double-Win Quant, Fu et al., ICML 2021): one random precision for the whole network.

The layers (quantized convs, switchable BatchNorm) live in `rna_core.rpt`; this module says what
the method reads from `model.*` (`precisions`, `rpt_draws`), how RPT's draws map onto the generic
training modes, and which measure selects a checkpoint (Double-Win Quant's: PGD at its lowest
precision, attacked and scored there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch.nn as nn

from ..errors import ConfigError
from ..norms import NormSpec, parse_space
from ..rpt import DEFAULT_PRECISIONS, RPT_DRAWS, RptFactory, parse_precisions, path_for_precision, precisions_of
from .base import Criterion, Method, register_method


def check_norm(norm: str) -> None:
    if tuple(parse_space(norm)) != (NormSpec("bn"),):
        raise ConfigError(
            f"method 'rpt' uses switchable BatchNorm, so model.norm must be 'bn', got '{norm}'; set model.norm: bn"
        )


@register_method
class RPT(Method):
    name = "rpt"
    title = "Random Precision Training/Inference (RPI+RPT; Fu et al., ICML 2021)"

    def layer_factory(
        self, norm: str = "bn", precisions: str | int | Sequence[int] = DEFAULT_PRECISIONS, **options: Any
    ) -> RptFactory:
        if options:
            raise ConfigError(f"method 'rpt' takes only the options norm and precisions; got {sorted(options)}")
        check_norm(norm)
        return RptFactory(precisions)

    def model_options(self, model_cfg: Any) -> dict[str, Any]:
        return {"precisions": model_cfg.precisions}

    def validate(self, model_cfg: Any) -> None:
        check_norm(model_cfg.norm)
        parse_precisions(model_cfg.precisions)
        if model_cfg.rpt_draws not in RPT_DRAWS:
            raise ConfigError(f"model.rpt_draws '{model_cfg.rpt_draws}' is unknown; valid: {', '.join(RPT_DRAWS)}")

    def train_config(self, cfg: Any) -> Any:
        """`model.rpt_draws` decides how the adversarial modes draw precisions.

        `per_iteration` (Double-Win Quant's RPT) draws one precision per iteration, used to craft
        the batch and to update: train_step's `whitebox` (update path = attack path).
        `attack_and_update` draws the two independently: `blackbox`. `eot` and `natural` keep
        their meaning.
        """
        train = cfg.train
        if train.mode not in ("blackbox", "whitebox"):
            return train
        if cfg.model.rpt_draws == "per_iteration":
            return replace(train, mode="whitebox")
        if train.mode == "whitebox":
            raise ConfigError(
                "train.mode 'whitebox' and model.rpt_draws 'attack_and_update' contradict each other; "
                "use rpt_draws per_iteration for one precision per iteration"
            )
        return train

    def random_space(self, model_cfg: Any) -> str:
        return f"precisions {model_cfg.precisions} ({model_cfg.rpt_draws})"

    def row_label(self, spec: Mapping[str, Any]) -> str:
        return f"rpt({spec['precisions']})" if spec.get("precisions") else self.name

    def selection_criterion(self, cfg: Any, model: nn.Module) -> Criterion:
        steps = cfg.train.eval_pgd_steps
        bits = min(precisions_of(model))
        return Criterion(
            f"pgd{steps}_{bits}bit_acc",
            "fixed-path",
            f"fixed:{path_for_precision(model, bits)}",
            f"PGD-{steps} accuracy at {bits} bits, attacked and scored at that precision (Double-Win Quant's train.py)",
        )
