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

A "path" here is any model's random state: every draw is a ``resample(generator)`` call
(:mod:`rna_core.randomness`). Our networks resample a path with the evaluation's strategy; a
foreign model resamples its own state, or draws per forward from torch's global RNG, which the
protocols seed around every attack and every scoring forward. One code path serves both.

Batch evaluation is a pure function of (model state, batch, attack, protocol, seed): all draws
and attack randomness come from generators seeded from ``seed``, so a fan-out that evaluates
batches on other workers reproduces a sequential run exactly.

Scoring: R = ``inference_draws`` scoring draws per batch (each a fresh draw; under ``fixed-path``
the attacked state). The first is the one-draw accuracy papers report (``correct``); ``worst``
counts the examples right under all R, ``vote`` those whose label wins the plurality of the R
predictions outright (a tie with another class counts as wrong). Draw r has its own seed, so the
first r draws are the same for every R.

How ``eot`` averages: attacks that repeat forwards themselves (``eot_pgd``: loss gradients summed
over its ``eot_iter`` forwards; ``autoattack_rand``: APGD's EOT 20) just get a fresh draw on every
forward. Every other attack sees a model whose output is the mean of the logits of ``eot_iter``
forwards, each on a fresh draw (expectation over logits, the form that works with any library
attack).

A deterministic model (``rna_core.randomness.is_randomized`` is False: one path, a ``fixed:``
strategy, or a foreign model whose forwards do not differ) is attacked and scored on the same
forward, so it needs neither EOT averaging nor the unperturbed rule: ``transfer``,
``transfer-raw``, ``fixed-path`` and ``eot`` coincide exactly, and every R gives the one-draw
number. ``early-stop`` keeps an example's first success, so it can only score lower, and only
where an attack's later iterates un-fool an example.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..attacks.registry import Attack, ThreatModel, resolve_attack, seeded_global_rng
from ..errors import ConfigError
from ..paths import Path, get_path
from ..randomness import can_resample, is_randomized, resample, sampling_strategy
from .seeds import batch_seed, unit_seed

PROTOCOLS = ("transfer", "transfer-raw", "early-stop", "fixed-path", "eot")
DEFAULT_EOT_ITER = 10
DEFAULT_INFERENCE_DRAWS = 10  # R of worst-of-R and vote-of-R in the evaluation job


def list_protocols() -> list[str]:
    return list(PROTOCOLS)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}'; valid protocols: {', '.join(PROTOCOLS)}")
    return protocol


class LogitAverage(nn.Module):
    """Output = mean logits of `draws` forwards of `model` (each on a fresh path under EOT).

    Memory is one forward's graph, not `draws` of them: each draw runs under activation
    checkpointing and is recomputed, draw by draw, in the backward, with the random state it first
    ran with (`replay`, the stream that resamples before every forward, is rewound for the
    recomputation and put back after it; torch's global RNG is restored by the checkpoint), so the
    gradient is the one of keeping every graph. Forwards without autograd run plain. Eval mode only
    (a recomputed train-mode forward would update running statistics twice).
    """

    def __init__(self, model: nn.Module, draws: int, replay: _Draws | None = None):
        super().__init__()
        self.model = model
        self.draws = int(draws)
        self.replay = replay
        self.train(model.training)  # a new Module is in train mode; restoring that would flip `model`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            total = self.model(x)
            for _ in range(self.draws - 1):
                total = total + self.model(x)
            return total / self.draws
        total = None
        for _ in range(self.draws):
            logits = checkpoint(self._one_draw, x, [], use_reentrant=False, preserve_rng_state=True)
            total = logits if total is None else total + logits
        return total / self.draws

    def _one_draw(self, x: torch.Tensor, first_state: list) -> torch.Tensor:
        if self.replay is None:
            return self.model(x)
        stream = self.replay
        if not first_state:  # the first run: note where the stream stood before this draw
            first_state.append((stream.generator.get_state(), stream.count))
            return self.model(x)
        now = (stream.generator.get_state(), stream.count)  # the recomputation: replay, then put back
        stream.generator.set_state(first_state[0][0])
        try:
            if not stream.active:  # a backward after the attack's block: no hook draws, so draw here
                stream()
            return self.model(x)
        finally:
            stream.generator.set_state(now[0])
            stream.count = now[1]


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
        hit = valid & (output.detach().argmax(1) != self.y[idx]) & ~self.found[idx]
        # Each example's first hit row of this forward, with tensor ops only: AutoAttack makes
        # thousands of forwards, and a host sync per fooled row would stall the GPU at each.
        rows = len(q)
        first = torch.full((len(self.x),), rows, dtype=torch.long, device=q.device)
        first.scatter_reduce_(
            0, torch.where(hit, idx, 0), torch.where(hit, torch.arange(rows, device=q.device), rows), reduce="amin"
        )
        new = first < rows
        picked = q[first.clamp(max=rows - 1)].to(self.points.dtype)
        self.points = torch.where(new.view(-1, *([1] * (q.dim() - 1))), picked, self.points)
        self.found = self.found | new

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


@dataclass(frozen=True)
class Counts:
    """Examples scored, and how many were right: on one draw, on all R draws, by the vote of R draws."""

    n: int = 0
    correct: int = 0  # the first inference draw (what papers report)
    worst: int = 0  # right under every one of the R draws
    vote: int = 0  # the plurality of the R draws' predictions is the label (a tie with another class is wrong)

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.n + other.n, self.correct + other.correct, self.worst + other.worst, self.vote + other.vote)


@dataclass
class ProtocolOutcome:
    """What one batch under one protocol produced (for tests and analysis; the runner keeps the counts)."""

    x_adv: torch.Tensor
    correct: int
    n: int
    attack_path: Path  # the path attacked (empty for a model without random layers, e.g. a foreign one)
    score_path: Path  # the path of the first scoring draw
    path_draws: int  # resample calls in total (attack state, EOT draws, scoring draws)
    seconds: float
    worst: int = 0
    vote: int = 0
    inference_draws: int = 1
    randomized: bool = False

    @property
    def counts(self) -> Counts:
        return Counts(self.n, self.correct, self.worst, self.vote)


class _Draws:
    """A seeded stream of `resample` calls on one model, counted."""

    def __init__(self, model: nn.Module, seed: int, *stream: object):
        self.model = model
        self.generator = torch.Generator().manual_seed(unit_seed(seed, *stream))
        self.count = 0
        self.active = False  # inside `every_forward`: each forward draws first

    def __call__(self) -> None:
        self.count += int(resample(self.model, self.generator))

    @contextlib.contextmanager
    def every_forward(self) -> Iterator[None]:
        """Every forward of the model draws first (EOT over a state the model holds)."""
        if not can_resample(self.model):
            yield
            return
        handle = self.model.register_forward_pre_hook(lambda module, args: self())
        self.active = True
        try:
            yield
        finally:
            self.active = False
            handle.remove()


def attack_generator(seed: int) -> torch.Generator:
    """The generator a batch's attack draws its own randomness from (random starts, library seeds)."""
    return torch.Generator().manual_seed(unit_seed(seed, "attack"))


def vote_correct(preds: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per example: the label has strictly more of the R draws' votes (`preds`: R x N) than any other class."""
    votes = torch.nn.functional.one_hot(preds, num_classes).sum(0)  # N x C
    true = votes.gather(1, y[:, None]).squeeze(1)
    others = votes.scatter(1, y[:, None], -1).amax(1)
    return true > others


def _score(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, protocol: str, seed: int, draws: int, randomized: bool
) -> tuple[torch.Tensor, int]:
    """Predictions of `draws` scoring draws (R x N) and the resample calls made.

    Draw r resamples from its own stream (draw 0 from ``score-path``, the one-draw score) and runs
    its forward under its own seed of the global RNG, so draw r is the same whatever R is.
    Draw 0 runs last: the model is left in its state. Under ``fixed-path`` nothing is resampled:
    the attacked state scores (a model that draws per forward still draws on each forward).
    A deterministic model's R draws are one forward: they could not differ.
    """
    preds: list[torch.Tensor] = [torch.empty(0)] * draws
    made = 0
    for r in reversed(range(draws) if randomized else range(1)):
        if protocol != "fixed-path":
            # Drawn independently of the attack path: the defender does not know which path was
            # attacked, so a `far` strategy scores like `uniform` here (far is for training updates
            # and for analysis, rna_core.evaluation.path_analysis).
            stream = ("score-path",) if r == 0 else ("score-path", r)
            made += int(resample(model, torch.Generator().manual_seed(unit_seed(seed, *stream))))
        with torch.no_grad(), seeded_global_rng(unit_seed(seed, "score-forward", r), x_adv.device):
            preds[r] = model(x_adv).argmax(1)
    if not randomized:
        preds = [preds[0]] * draws
    return torch.stack(preds), made


def run_protocol(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Attack,
    protocol: str,
    seed: int,
    eot_iter: int = DEFAULT_EOT_ITER,
    strategy: str | None = "uniform",
    inference_draws: int = 1,
) -> ProtocolOutcome:
    """Attack one batch under `protocol` and score it on `inference_draws` draws; the model runs in eval mode.

    Separate seeded streams draw the attack state, the scoring draws, the EOT draws and the attack's
    own randomness, so e.g. the scoring draws do not depend on how many forwards the attack made.
    Every draw is a ``resample`` (:mod:`rna_core.randomness`); `strategy` is the path strategy of
    our networks (None: the model's own). The model is left in the first scoring draw's state.
    """
    check_protocol(protocol)
    attack = resolve_attack(attack)
    if eot_iter < 1:
        raise ConfigError(f"eot_iter must be a positive integer, got {eot_iter}")
    if inference_draws < 1:
        raise ConfigError(f"inference_draws must be a positive integer, got {inference_draws}")
    start = time.perf_counter()
    attack_draw = _Draws(model, seed, "attack-path")
    eot_draws = _Draws(model, seed, "eot")
    with eval_mode(model), sampling_strategy(model, strategy):
        randomized = is_randomized(model, x, unit_seed(seed, "probe"))
        if randomized and protocol in ("transfer", "eot"):
            attack = attack.scored_on_another_path()  # the score runs a draw the attack's forwards did not
        attack_draw()
        attack_path = get_path(model)
        attack_gen = attack_generator(seed)
        if protocol == "eot" and randomized:
            draws = 1 if attack.native_eot else eot_iter
            target = LogitAverage(model, draws, eot_draws) if draws > 1 else model
            with eot_draws.every_forward():
                x_adv = attack(target, x, y, attack_gen)
        elif protocol == "early-stop" and not attack.stops_when_fooled:
            with FirstFooled(model, x, y, attack.threat) as watch:
                with torch.no_grad(), seeded_global_rng(unit_seed(seed, "clean-forward"), x.device):
                    model(x)  # an example already misclassified keeps its clean input
                x_adv = watch.result(attack(model, x, y, attack_gen))
        else:
            x_adv = attack(model, x, y, attack_gen)
        model.eval()  # whatever the attack did to the mode, scoring runs in eval mode
        preds, score_draws = _score(model, x_adv, y, protocol, seed, inference_draws, randomized)
        score_path = get_path(model)
    draws = attack_draw.count + eot_draws.count + score_draws
    return _outcome(x_adv, y, preds, attack_path, score_path, draws, time.perf_counter() - start, randomized)


def _outcome(
    x_adv: torch.Tensor,
    y: torch.Tensor,
    preds: torch.Tensor,
    attack_path: Path,
    score_path: Path,
    path_draws: int,
    seconds: float,
    randomized: bool,
) -> ProtocolOutcome:
    """The outcome of R scoring draws' predictions `preds` (R x N): one draw, worst-of-R, vote-of-R."""
    right = preds == y
    num_classes = int(max(int(preds.max()), int(y.max())) + 1)
    return ProtocolOutcome(
        x_adv,
        int(right[0].sum()),
        int(y.shape[0]),
        attack_path,
        score_path,
        path_draws,
        seconds,
        worst=int(right.all(0).sum()),
        vote=int(vote_correct(preds, y, num_classes).sum()),
        inference_draws=int(preds.shape[0]),
        randomized=randomized,
    )


# Protocols that attack the same path with the same attack and differ only in how its output is
# scored: one attack run serves them all (see run_protocols).
SHARED_ATTACK = ("fixed-path", "transfer-raw", "transfer")


def run_protocols(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Attack,
    protocols: Sequence[str],
    seed: int,
    eot_iter: int = DEFAULT_EOT_ITER,
    strategy: str | None = "uniform",
    inference_draws: int = 1,
    share_attacks: bool = True,
) -> dict[str, ProtocolOutcome]:
    """:func:`run_protocol` for each of `protocols` on one batch, the attack run once for all of
    ``fixed-path``, ``transfer-raw`` and ``transfer`` among them.

    Those three attack the path drawn from the same stream with the same generator; ``fixed-path``
    and ``transfer-raw`` score the attack's own output, ``transfer`` the output under the
    unperturbed rule (the fill runs after the attack, on the attack path, from the attack's own
    generator: :meth:`Attack.outputs`). So each outcome equals its :func:`run_protocol` exactly (for
    models that follow :mod:`rna_core.randomness`: their draws come from the generators and the seeded
    global RNG the protocols hand them, not from a stream of their own that counts forwards), and
    the attack's cost is paid once instead of once per protocol. An outcome's `seconds` is its own
    scoring plus an equal share of the shared attack. `share_attacks=False` runs each protocol on its
    own (for the benchmark and the equivalence tests).
    """
    for p in protocols:
        check_protocol(p)
    if len(set(protocols)) != len(protocols):
        raise ConfigError(f"protocols must be unique, got {', '.join(protocols)}")
    if eot_iter < 1:
        raise ConfigError(f"eot_iter must be a positive integer, got {eot_iter}")
    attack = resolve_attack(attack)
    shared = [p for p in protocols if p in SHARED_ATTACK] if share_attacks and not attack.fill_unperturbed else []
    out = _run_shared(model, x, y, attack, shared, seed, strategy, inference_draws) if len(shared) > 1 else {}
    for p in protocols:
        if p not in out:
            out[p] = run_protocol(model, x, y, attack, p, seed, eot_iter, strategy, inference_draws)
    return {p: out[p] for p in protocols}


def _run_shared(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    protocols: Sequence[str],
    seed: int,
    strategy: str | None,
    inference_draws: int,
) -> dict[str, ProtocolOutcome]:
    """One attack, scored under each of `protocols` (all in SHARED_ATTACK), as run_protocol would score it."""
    if inference_draws < 1:
        raise ConfigError(f"inference_draws must be a positive integer, got {inference_draws}")
    start = time.perf_counter()
    attack_draw = _Draws(model, seed, "attack-path")
    outcomes: dict[str, ProtocolOutcome] = {}
    with eval_mode(model), sampling_strategy(model, strategy):
        randomized = is_randomized(model, x, unit_seed(seed, "probe"))
        attack_draw()
        attack_path = get_path(model)
        fill = randomized and "transfer" in protocols
        own, filled = attack.outputs(model, x, y, attack_generator(seed), fill=fill)
        if filled is None:
            filled = own
        share = (time.perf_counter() - start) / len(protocols)
        # fixed-path first: it scores the attacked state, which the other protocols' scoring draws replace
        for protocol in sorted(protocols, key=lambda p: p != "fixed-path"):
            begin = time.perf_counter()
            x_adv = filled if protocol == "transfer" else own
            model.eval()
            preds, score_draws = _score(model, x_adv, y, protocol, seed, inference_draws, randomized)
            seconds = share + time.perf_counter() - begin
            draws = attack_draw.count + score_draws
            outcomes[protocol] = _outcome(x_adv, y, preds, attack_path, get_path(model), draws, seconds, randomized)
    return outcomes


def evaluate_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Attack,
    protocol: str,
    seed: int,
    eot_iter: int = DEFAULT_EOT_ITER,
    strategy: str | None = "uniform",
    inference_draws: int = 1,
) -> Counts:
    """Counts on one batch: a pure function of (model state, batch, attack, protocol, seed, draws)."""
    return run_protocol(model, x, y, attack, protocol, seed, eot_iter, strategy, inference_draws).counts


def evaluate_attack(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    attack: str | Attack,
    protocol: str,
    seed: int = 0,
    eot_iter: int = DEFAULT_EOT_ITER,
    strategy: str | None = "uniform",
) -> tuple[int, int]:
    """(correct, n) of one inference draw over `batches`; batch i uses seed ``batch_seed(seed, i)``, as the runner."""
    attack = resolve_attack(attack)
    check_protocol(protocol)
    total = Counts()
    for i, (x, y) in enumerate(batches):
        total = total + evaluate_batch(model, x, y, attack, protocol, batch_seed(seed, i), eot_iter, strategy)
    return total.correct, total.n
