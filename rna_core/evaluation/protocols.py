"""Evaluation protocols for randomized models: who draws which path, when.

The protocol, not the attack, decides the paths:
- ``transfer`` (the paper's setting): one attack path per batch, held for the whole attack (every
  forward inside the attack runs it), then a fresh path, drawn without knowing the attack path,
  scores the result (so `far:<f>` scores like `uniform`: a defender who steered the scoring path
  away from the attacked one would be using the attacker's secret). The attack runs under the
  unperturbed rule (`Attack.scored_on_another_path`): no example is scored unperturbed.
- ``transfer-raw`` (paper-comparable): as ``transfer``, with the same seeds, but each attack's own
  output is scored as the library returns it, clean inputs handed back included, as the RNA
  paper's `evaluate.py` scores torchattacks' outputs. It differs from ``transfer`` only on the
  examples an attack hands back unperturbed.
- ``early-stop`` (Double-Win Quant's evaluation, `CIFAR/utils.py` `attack_pgd`, the seed's adaptive
  setting in its Table 3; the RNA code attacks every example every step): as ``transfer``, but an
  example is no longer perturbed once it is misclassified on the attack path.
- ``fixed-path``: the attacked path also scores (a white-box bound).
- ``eot``: every forward inside the attack draws a fresh path, and gradients are averaged over
  ``eot_iter`` draws; a fresh path scores. The unperturbed rule applies, as under ``transfer``.

Batch evaluation is a pure function of (model state, batch, attack, protocol, seed): all path draws
and attack randomness come from generators seeded from ``seed``, so a fan-out that evaluates
batches on other workers reproduces a sequential run exactly.

How ``eot`` averages: attacks that repeat forwards themselves (``eot_pgd``: loss gradients summed
over its ``eot_iter`` forwards; ``autoattack_rand``: APGD's EOT 20) just get a fresh path on every
forward. Every other attack sees a model whose output is the mean of the logits of ``eot_iter``
forwards, each on a fresh path (expectation over logits, the form that works with any library
attack). A model with a single path needs no averaging, so there all protocols coincide.

How ``early-stop`` stops: while the attack runs, every forward is watched; the first queried point
at which an example is misclassified on the attack path (and that lies inside the threat model)
becomes that example's result, and an example misclassified on the clean input keeps the clean
input. In eval mode examples do not interact, so this is exactly the result of an attack that
stops perturbing each example once it is misclassified, for any attack library (forwards on a
subset of the batch, as AutoAttack makes, are matched to their examples by distance).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..attacks.registry import Attack, ThreatModel, resolve_attack
from ..errors import ConfigError
from ..paths import Path, PathSampler, count_paths, fresh_path_every_forward, set_path
from .seeds import batch_seed, unit_seed

PROTOCOLS = ("transfer", "transfer-raw", "early-stop", "fixed-path", "eot")
DEFAULT_EOT_ITER = 10


def list_protocols() -> list[str]:
    return list(PROTOCOLS)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}'; valid protocols: {', '.join(PROTOCOLS)}")
    return protocol


class LogitAverage(nn.Module):
    """Output = mean logits of `draws` forwards of `model` (each on a fresh path under EOT).

    All `draws` graphs are kept for the backward, so memory grows with `draws`.
    """

    def __init__(self, model: nn.Module, draws: int):
        super().__init__()
        self.model = model
        self.draws = int(draws)
        self.train(model.training)  # a new Module is in train mode; restoring that would flip `model`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.model(x)
        for _ in range(self.draws - 1):
            total = total + self.model(x)
        return total / self.draws


class FirstFooled:
    """Watches a model's forwards during an attack; keeps each example's first misclassified query.

    Rows of a forward are matched to examples by position when the forward has the whole batch,
    else by the nearest clean example in the threat model's norm. A row counts only if it lies
    inside the threat model around its example (points outside it, e.g. FAB's intermediate ones,
    are never candidate answers). For an unbounded threat model only whole-batch forwards count.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, tol: float = 1e-6):
        self.model = model
        self.x = x.detach()
        self.y = y
        self.threat = threat
        self.tol = tol
        self.found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.points = self.x.clone()
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> FirstFooled:
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _match(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(example index per row, row is a valid candidate)."""
        n = len(self.x)
        if len(q) == n:
            idx = torch.arange(n, device=q.device)
        elif self.threat.norm == "none" or self.threat.eps is None:
            return torch.zeros(len(q), dtype=torch.long, device=q.device), torch.zeros(
                len(q), dtype=torch.bool, device=q.device
            )
        else:
            p = 2.0 if self.threat.norm == "l2" else float("inf")
            flat_x = self.x.flatten(1)
            idx = torch.cat([torch.cdist(chunk, flat_x, p=p).argmin(1) for chunk in q.flatten(1).split(64)])
        valid = self.threat.contains(q, self.x[idx], self.tol)
        return idx, valid

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        q = args[0].detach()
        if q.dim() != self.x.dim() or q.shape[1:] != self.x.shape[1:]:
            return
        idx, valid = self._match(q)
        fooled = output.detach().argmax(1) != self.y[idx]
        for r in (valid & fooled).nonzero().flatten().tolist():
            i = int(idx[r])
            if not self.found[i]:
                self.found[i] = True
                self.points[i] = q[r]

    def result(self, x_adv: torch.Tensor) -> torch.Tensor:
        """The attack's output, with each fooled example replaced by its first fooling point."""
        mask = self.found.view(-1, *([1] * (x_adv.dim() - 1)))
        return torch.where(mask, self.points.to(x_adv.dtype), x_adv)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class ProtocolOutcome:
    """What one batch under one protocol produced (for tests and analysis; the runner keeps `correct`)."""

    x_adv: torch.Tensor
    correct: int
    n: int
    attack_path: Path
    score_path: Path
    path_draws: int  # paths drawn in total (attack path, EOT draws, scoring path)
    seconds: float


def _sampler(strategy: str, seed: int, stream: str) -> PathSampler:
    return PathSampler(strategy, generator=torch.Generator().manual_seed(unit_seed(seed, stream)))


def run_protocol(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Attack,
    protocol: str,
    seed: int,
    eot_iter: int = DEFAULT_EOT_ITER,
    strategy: str = "uniform",
) -> ProtocolOutcome:
    """Attack one batch under `protocol` and score it; the model runs in eval mode.

    Separate seeded streams draw the attack path, the scoring path, the EOT paths and the attack's
    own randomness, so e.g. the scoring path does not depend on how many forwards the attack made.
    The model is left on the scoring path.
    """
    check_protocol(protocol)
    attack = resolve_attack(attack)
    if eot_iter < 1:
        raise ConfigError(f"eot_iter must be a positive integer, got {eot_iter}")
    if protocol in ("transfer", "eot"):  # the score runs a path the attack's forwards did not: no clean inputs
        attack = attack.scored_on_another_path()
    start = time.perf_counter()
    attack_sampler = _sampler(strategy, seed, "attack-path")
    score_sampler = _sampler(strategy, seed, "score-path")
    eot_sampler = _sampler(strategy, seed, "eot")
    attack_gen = torch.Generator().manual_seed(unit_seed(seed, "attack"))
    with eval_mode(model):
        attack_path = attack_sampler.apply(model)
        if protocol == "eot":
            draws = eot_iter if count_paths(model) > 1 and not attack.native_eot else 1
            target = LogitAverage(model, draws) if draws > 1 else model
            with fresh_path_every_forward(model, eot_sampler):
                x_adv = attack(target, x, y, attack_gen)
        elif protocol == "early-stop" and not attack.stops_when_fooled:
            with FirstFooled(model, x, y, attack.threat) as watch:
                with torch.no_grad():
                    model(x)  # an example already misclassified keeps its clean input
                x_adv = watch.result(attack(model, x, y, attack_gen))
        else:
            x_adv = attack(model, x, y, attack_gen)
        model.eval()  # whatever the attack did to the mode, scoring runs in eval mode
        if protocol == "fixed-path":
            set_path(model, attack_path)
            score_path = attack_path
        else:
            # Drawn independently of the attack path: the defender does not know which path was
            # attacked, so a `far` strategy scores like `uniform` here (far is for training updates
            # and for analysis, rna_core.evaluation.path_analysis).
            score_path = score_sampler.apply(model)
        with torch.no_grad():
            correct = int((model(x_adv).argmax(1) == y).sum().item())
    draws_total = attack_sampler.draws + score_sampler.draws + eot_sampler.draws
    return ProtocolOutcome(
        x_adv, correct, int(y.shape[0]), attack_path, score_path, draws_total, time.perf_counter() - start
    )


def evaluate_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Attack,
    protocol: str,
    seed: int,
    eot_iter: int = DEFAULT_EOT_ITER,
    strategy: str = "uniform",
) -> int:
    """Correct predictions on one batch: a pure function of (model state, batch, attack, protocol, seed)."""
    return run_protocol(model, x, y, attack, protocol, seed, eot_iter, strategy).correct


def evaluate_attack(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    attack: str | Attack,
    protocol: str,
    seed: int = 0,
    eot_iter: int = DEFAULT_EOT_ITER,
    strategy: str = "uniform",
) -> tuple[int, int]:
    """(correct, n) over `batches`; batch i uses seed ``batch_seed(seed, i)`` as the runner does."""
    attack = resolve_attack(attack)
    check_protocol(protocol)
    correct, n = 0, 0
    for i, (x, y) in enumerate(batches):
        correct += evaluate_batch(model, x, y, attack, protocol, batch_seed(seed, i), eot_iter, strategy)
        n += int(y.shape[0])
    return correct, n
