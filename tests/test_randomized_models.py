"""Any randomized defense under the protocols: the resample protocol, worst-of-R and vote-of-R,
deterministic models, and models from outside rna_core (rna_core.randomness, rna_core.external).

No Ray: the protocols in-process. The fan-out of a user's model is in test_external_models.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import low_contrast, train_small_cnn

import rna_core
from rna_core.attacks import get_attack
from rna_core.data import make_synthetic
from rna_core.errors import ConfigError
from rna_core.evaluation import PROTOCOLS, evaluate_model, run_protocol, vote_correct
from rna_core.randomness import PathNetwork, is_randomized, sampling_strategy

ALL_PROTOCOLS = list(PROTOCOLS)


@pytest.fixture(scope="module")
def test_data():
    return low_contrast(make_synthetic(48, seed=0, split="test"))


@pytest.fixture(scope="module")
def plain_model():
    return train_small_cnn("bn", epochs=1, n=256)


@pytest.fixture(scope="module")
def random_model():
    return train_small_cnn("bn,gns:1", epochs=1, n=256)


def xy(data, n: int):
    return data.images[:n].float() / 255, data.labels[:n]


class Foreign(nn.Module):
    """A network written without rna_core: a small conv net on [0, 1] images, deterministic."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(16 * width, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class HeldNoise(Foreign):
    """A randomized model that holds its randomness between forwards: a per-channel input offset
    drawn by resample(generator), as the protocol in rna_core.randomness asks."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.zeros(1, 3, 1, 1))
        self.resamples = 0
        self.seen: list[torch.Tensor] = []  # the offset of every forward

    def resample(self, generator: torch.Generator) -> None:
        self.resamples += 1
        self.offset = 0.3 * torch.randn(1, 3, 1, 1, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.offset.clone())
        return super().forward(x + self.offset)


class ForwardNoise(Foreign):
    """A randomized model that draws per forward, from torch's global RNG (nothing to expose)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + 0.3 * torch.randn_like(x))


def _trained(model: nn.Module, data, steps: int = 60) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = xy(data, len(data))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def train_data():
    return low_contrast(make_synthetic(256, seed=0, split="train"))


# ------------------------------------------------------------------- our networks and the protocol


def test_our_networks_implement_the_resample_protocol(random_model):
    """RNA's networks hold a path between forwards; `resample` draws it, as sample_path would."""
    assert isinstance(random_model, PathNetwork) and random_model.randomized
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    random_model.resample(g1)
    assert rna_core.get_path(random_model) == rna_core.sample_path(random_model, "uniform", g2)
    with sampling_strategy(random_model, "fixed:0110"):
        random_model.resample(torch.Generator().manual_seed(9))
        assert str(rna_core.get_path(random_model)) == "0110" and not random_model.randomized
    assert random_model.sampling == "uniform" and random_model.randomized  # the strategy was for the block only
    rpt = rna_core.create_model("small_cnn", method="rpt", norm="bn", precisions="4-6")
    rpt.resample(torch.Generator().manual_seed(1))  # RPI+RPT: one precision for the whole network
    assert rna_core.precision_of(rpt) in (4, 5, 6) and rpt.randomized
    with pytest.raises(ConfigError, match="unknown sampling strategy"):
        with sampling_strategy(random_model, "sometimes"):
            pass


# ------------------------------------------------------------------- deterministic models


@pytest.mark.parametrize("which", ["plain bn", "rna on a fixed path", "foreign"])
def test_a_deterministic_model_scores_the_same_under_every_protocol_and_every_r(
    which, plain_model, random_model, train_data, test_data
):
    """One forward is attacked and scored, so no protocol and no number of draws can change the
    score: every protocol's x_adv and counts are transfer's, and worst-of-R = vote-of-R = one draw.
    APGD-CE hands back the clean input for examples it cannot fool: the unperturbed rule (for
    randomized models) must not turn that into a different attack here."""
    model, strategy = {
        "plain bn": (plain_model, "uniform"),
        "rna on a fixed path": (random_model, "fixed:1001"),
        "foreign": (_trained(Foreign(), train_data), None),
    }[which]
    x, y = xy(test_data, 16)
    attacks = [get_attack("natural"), get_attack("pgd20", steps=4), get_attack("apgd_ce", steps=8, eps=2 / 255)]
    with sampling_strategy(model, strategy):
        assert not is_randomized(model, x, 0)
    for attack in attacks:
        base = run_protocol(model, x, y, attack, "transfer", seed=4, eot_iter=3, strategy=strategy)
        for protocol in ALL_PROTOCOLS:
            for draws in (1, 10):
                out = run_protocol(
                    model, x, y, attack, protocol, seed=4, eot_iter=3, strategy=strategy, inference_draws=draws
                )
                assert (out.correct, out.worst, out.vote) == (base.correct,) * 3, (attack.name, protocol, draws)
                assert not out.randomized
                if protocol != "early-stop":  # early-stop keeps first successes: the same count, other points
                    assert torch.equal(out.x_adv, base.x_adv), (attack.name, protocol, draws)
    natural = run_protocol(model, x, y, "natural", "transfer", seed=4, strategy=strategy).correct
    assert base.correct < natural, "the attacks must bite, or equal numbers prove nothing"


# ------------------------------------------------------------------- worst-of-R and vote-of-R


def test_vote_of_r_needs_a_strict_plurality_for_the_label():
    y = torch.tensor([0, 0, 0, 1])
    preds = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 2], [1, 1, 0, 3], [0, 2, 0, 1]])  # R = 4 draws x 4 examples
    # per example, its 4 votes: (0, 0, 1, 0) label 3 of 4; (0, 1, 1, 2) label 1, class 1 two: wrong;
    # (1, 2, 0, 0) label 2, the others 1 each: a plurality wins; (1, 2, 3, 1) label 2, others 1: right
    assert vote_correct(preds, y, 4).tolist() == [True, False, True, True]
    tie = torch.tensor([[0], [1], [0], [1]])  # 2 votes each: a tie is not a win
    assert vote_correct(tie, torch.tensor([0]), 2).tolist() == [False]


def test_worst_and_vote_of_r_on_a_randomized_model(random_model, test_data):
    """The first draw is the one-draw number for every R; worst-of-R can only fall as R grows
    (draw r is the same for every R); worst <= one draw and worst <= vote; R = 1 is one draw."""
    rows = {}
    for draws in (1, 3, 10):
        rows[draws] = evaluate_model(
            random_model,
            test_data,
            attacks=["fgsm"],
            protocols=["transfer", "eot"],
            batch_size=16,
            eot_iter=2,
            progress=False,
            inference_draws=draws,
        )
    for r1, r3, r10 in zip(rows[1], rows[3], rows[10]):
        assert r1.correct == r3.correct == r10.correct
        assert r1.correct_worst == r1.correct_vote == r1.correct and r1.draws == 1
        assert r10.correct_worst <= r3.correct_worst <= r1.correct
        assert r10.correct_worst <= r10.correct_vote and r10.draws == 10
    natural10 = next(r for r in rows[10] if r.attack == "natural" and r.protocol == "transfer")
    assert natural10.correct_worst < natural10.correct, "16 paths should disagree on some example"


# ------------------------------------------------------------------- foreign randomized models


def test_a_model_that_holds_its_randomness_is_resampled_where_the_protocols_draw(train_data, test_data):
    model = _trained(HeldNoise(), train_data)
    x, y = xy(test_data, 16)
    pgd = get_attack("pgd20", steps=3)

    def run(protocol, **kw):
        model.resamples, model.seen = 0, []
        return run_protocol(model, x, y, pgd, protocol, seed=7, eot_iter=4, strategy="uniform", **kw)

    out = run("transfer", inference_draws=5)
    attack_states, scoring_states = model.seen[:3], model.seen[3:]
    assert out.randomized and model.resamples == out.path_draws == 1 + 5  # the attack state, five scoring draws
    assert all(torch.equal(s, attack_states[0]) for s in attack_states)  # held for the whole attack
    assert len(scoring_states) == 5 and not any(torch.equal(s, attack_states[0]) for s in scoring_states)
    again = run("transfer", inference_draws=5)
    assert torch.equal(again.x_adv, out.x_adv) and again.counts == out.counts  # a pure function of the seed

    run("eot")
    assert (
        model.resamples == 1 + 3 * 4 + 1 + 3 * 4 and len(model.seen) == 3 * 4 + 1 + 3 * 4
    )  # every attack forward drew (and LogitAverage's backward replayed each draw from its saved state, issue 18)
    fixed = run("fixed-path", inference_draws=3)
    assert model.resamples == 1 and all(torch.equal(s, model.seen[0]) for s in model.seen)
    assert fixed.correct <= out.correct + 2  # white-box bound (on 16 examples, up to noise)


def test_a_model_that_draws_per_forward_is_reproducible_and_leaves_the_global_rng_alone(train_data, test_data):
    model = _trained(ForwardNoise(), train_data)
    x, y = xy(test_data, 16)
    state = torch.random.get_rng_state()
    assert is_randomized(model, x, 0)
    a = run_protocol(model, x, y, get_attack("pgd20", steps=3), "eot", seed=3, eot_iter=2, inference_draws=10)
    assert torch.equal(torch.random.get_rng_state(), state)  # every draw came from a forked, seeded RNG
    torch.rand(100)  # the caller's global RNG moves on: the evaluation does not depend on it
    b = run_protocol(model, x, y, get_attack("pgd20", steps=3), "eot", seed=3, eot_iter=2, inference_draws=10)
    assert torch.equal(a.x_adv, b.x_adv) and a.counts == b.counts and a.randomized
    natural = run_protocol(model, x, y, "natural", "transfer", seed=3, inference_draws=10)
    assert natural.worst <= natural.correct and natural.worst <= natural.vote


def test_a_path_strategy_is_refused_for_a_foreign_model_with_random_layers():
    class Wrapped(nn.Module):  # random layers, but not built by rna_core: it draws no paths itself
        def __init__(self):
            super().__init__()
            self.inner = rna_core.create_model("small_cnn", norm="bn,gns:1")

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(ConfigError, match="needs a model built by rna_core"):
        with sampling_strategy(Wrapped(), "uniform"):
            pass
    with sampling_strategy(Foreign(), "uniform"):  # no random layers: one path, nothing to draw
        pass
