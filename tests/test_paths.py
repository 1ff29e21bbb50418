from collections import Counter

import pytest
import torch

import rna_core
from rna_core import ConfigError, Path, count_paths, create_model, get_path, sample_path, set_path
from rna_core.paths import PathSampler, fresh_path_every_forward


@pytest.fixture(scope="module")
def resnet():
    return create_model("resnet18", norm="bn,gns:1")


def test_resnet18_space_has_20_layers_and_2_pow_20_paths(resnet):
    assert len(rna_core.random_layers(resnet)) == 20
    assert count_paths(resnet) == 2**20
    three = create_model("resnet18", norm="bn,in,gn:8")
    assert count_paths(three) == 3**20


def test_sampling_is_reproducible_from_seed(resnet):
    a = [sample_path(resnet, "uniform", torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g = torch.Generator().manual_seed(7)
    draws = [sample_path(resnet, "uniform", g) for _ in range(5)]
    assert len(set(draws)) == 5


def test_uniform_is_roughly_uniform_per_layer(resnet):
    g = torch.Generator().manual_seed(0)
    counts = Counter()
    n = 400
    for _ in range(n):
        for i, c in enumerate(sample_path(resnet, "uniform", g).choices):
            counts[(i, c)] += c
    # every layer picks candidate 1 about half of the time
    for i in range(20):
        assert 0.38 < counts[(i, 1)] / n < 0.62


def test_shared_picks_one_candidate_for_all_layers(resnet):
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        p = sample_path(resnet, "shared", g)
        assert len(set(p.choices)) == 1
        seen.add(p.choices[0])
    assert seen == {0, 1}


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_far_differs_in_at_least_the_fraction(resnet, fraction):
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        a = sample_path(resnet, "uniform", g)
        b = sample_path(resnet, f"far:{fraction}", g, relative_to=a)
        assert a.differences(b) >= round(fraction * 20)
    if fraction == 1.0:
        comp = Path(tuple(1 - c for c in a.choices))
        assert sample_path(resnet, "far:1.0", g, relative_to=a) == comp


def test_far_uses_all_other_candidates():
    m = create_model("small_cnn", norm="bn,gns:1,ln")
    g = torch.Generator().manual_seed(0)
    a = Path((0, 0, 0, 0))
    picks = {sample_path(m, "far:1", g, relative_to=a).choices[0] for _ in range(40)}
    assert picks == {1, 2}


def test_fixed_strategy_and_string_round_trip(resnet):
    p = sample_path(resnet, "uniform", torch.Generator().manual_seed(1))
    text = str(p)
    assert len(text) == 20 and Path.parse(text) == p
    assert sample_path(resnet, f"fixed:{text}") == p
    long = Path(tuple(range(40)))
    assert Path.parse(str(long)) == long
    assert Path.parse(str(Path((40,)))) == Path((40,))


def test_a_fixed_path_is_checked_when_the_strategy_is_read_and_against_the_model(resnet):
    with pytest.raises(ConfigError, match="cannot read path"):
        PathSampler("fixed:01-1")  # at configuration time, before any model or worker
    with pytest.raises(ConfigError, match="has 2 choices but the model has 20"):
        rna_core.paths.check_strategy(resnet, "fixed:01")
    with pytest.raises(ConfigError, match="which has 2 choices"):
        sample_path(resnet, "fixed:" + "2" * 20)
    rna_core.paths.check_strategy(resnet, "fixed:" + "1" * 20)
    rna_core.paths.check_strategy(resnet, "far:0.5")


def test_set_and_get_path_and_validation(resnet):
    p = Path.parse("1" * 20)
    set_path(resnet, p)
    assert get_path(resnet) == p
    set_path(resnet, "0" * 20)
    assert get_path(resnet) == Path((0,) * 20)
    with pytest.raises(ConfigError):
        set_path(resnet, "0" * 19)
    with pytest.raises(ConfigError):
        set_path(resnet, "2" * 20)
    with pytest.raises(ConfigError):
        sample_path(resnet, "sometimes")
    with pytest.raises(ConfigError):
        sample_path(resnet, "far:1.5")


def test_fresh_path_every_forward_draws_each_call():
    m = create_model("small_cnn", norm="bn,gns:1").eval()
    sampler = PathSampler("uniform", seed=0)
    x = torch.rand(2, 3, 32, 32)
    paths = []
    with fresh_path_every_forward(m, sampler):
        for _ in range(6):
            m(x)
            paths.append(get_path(m))
    assert sampler.draws == 6 and len(set(paths)) > 1
    set_path(m, "0000")
    m(x)
    assert sampler.draws == 6 and get_path(m) == Path((0, 0, 0, 0))  # hook removed
