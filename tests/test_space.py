"""The hyper-parameter space: one declaration, drawn through Optuna with the right frequencies."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from scipy import stats

from nws import space
from nws.errors import ParameterError
from nws.space import PROPERTIES, NetConfig, TrialSeededSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

FIXED_NET = "mnist,0.001,64,1,0,0,0,2,5,3,2,8,128"


def draw(n: int, subset: str, seed: int = 0, datasets=space.PAPER_DATASETS) -> list[NetConfig]:
    study = optuna.create_study(sampler=TrialSeededSampler(seed))
    configs = []
    for _ in range(n):
        trial = study.ask()
        configs.append(space.suggest(trial, subset, datasets))
        study.tell(trial, 0.0)
    return configs


def test_space_matches_the_reference_columns_and_options():
    assert space.PROPERTY_NAMES == (
        "dataset", "lrate", "batch_size", "batch_norm", "augmentation", "optimizer",
        "activation", "initialization", "filter_size", "depth_conv", "depth_fc",
        "width_conv", "width_fc",
    )  # fmt: skip
    by = space.BY_NAME
    assert by["batch_size"].options == (32, 64, 128, 256)
    assert by["optimizer"].codes == (0, 1, 2)
    assert by["initialization"].options[by["initialization"].codes.index(3)] == "glorot_normal"
    assert (by["lrate"].low, by["lrate"].high) == (0.0002, 0.005)
    fixed = {p.name: p.fixed for p in PROPERTIES if p.is_architecture}
    assert fixed == {
        "filter_size": 5, "depth_conv": 3, "depth_fc": 2, "width_conv": 8, "width_fc": 128,
    }  # fmt: skip


def test_draws_cover_the_space_with_uniform_frequencies():
    n = 1500
    configs = draw(n, "main", seed=7)
    for prop in PROPERTIES:
        values = [getattr(c, prop.name) for c in configs]
        if prop.name == "lrate":
            assert min(values) >= 0.0002 and max(values) <= 0.005
            # Linear (not log) uniform: a KS test against U(low, high) must not reject.
            scaled = (np.array(values) - prop.low) / (prop.high - prop.low)
            assert stats.kstest(scaled, "uniform").pvalue > 0.001
            continue
        choices = prop.choices("main", space.PAPER_DATASETS)
        counts = np.array([values.count(c) for c in choices])
        assert counts.sum() == n, prop.name
        if len(choices) == 1:
            continue
        # Chi-square goodness of fit against equal frequencies.
        assert stats.chisquare(counts).pvalue > 0.001, (prop.name, counts)
    assert {c.batch_norm for c in configs} == {"on"}


def test_fixed_subset_pins_the_architecture_and_draws_the_rest():
    configs = draw(200, "fixed", seed=3)
    for c in configs:
        assert c.architecture() == {
            "filter_size": 5, "depth_conv": 3, "depth_fc": 2, "width_conv": 8, "width_fc": 128,
        }  # fmt: skip
    assert len({c.optimizer for c in configs}) == 3
    assert len({c.dataset for c in configs}) == 5


def test_same_seed_same_configurations_and_independent_of_the_drawing_study():
    first = draw(30, "main", seed=11)
    assert draw(30, "main", seed=11) == first
    assert draw(30, "main", seed=12) != first
    # A draw depends on the trial number only: a second study object on shared storage
    # (another worker) that asks trial 5 gets the configuration of trial 5.
    storage = optuna.storages.InMemoryStorage()
    a = optuna.create_study(study_name="c", storage=storage, sampler=TrialSeededSampler(11))
    b = optuna.load_study(study_name="c", storage=storage, sampler=TrialSeededSampler(11))
    drawn = []
    for study in (a, b, a, b, a, b):
        trial = study.ask()
        drawn.append((trial.number, space.suggest(trial, "main", space.PAPER_DATASETS)))
        study.tell(trial, 0.0)
    assert [c for _, c in sorted(drawn, key=lambda x: x[0])] == first[:6]


def test_trial_seeds_are_distinct_within_a_campaign():
    seeds = {space.trial_seed(42, n) for n in range(20000)}
    assert len(seeds) == 20000


def test_replay_goes_through_the_same_optuna_path():
    config = NetConfig.parse(FIXED_NET)
    study = optuna.create_study(sampler=TrialSeededSampler(0))
    study.enqueue_trial(config.as_dict())
    trial = study.ask()
    assert space.suggest(trial, "fixed", space.PAPER_DATASETS) == config
    assert trial.params["optimizer"] == "adam"


def test_parse_accepts_codes_readable_values_and_released_booleans():
    by_codes = NetConfig.parse(FIXED_NET)
    readable = NetConfig.parse(
        "dataset=mnist,lrate=0.001,batch_size=64,batch_norm=on,augmentation=off,optimizer=adam,"
        "activation=relu,initialization=glorot_uniform,filter_size=5,depth_conv=3,depth_fc=2,"
        "width_conv=8,width_fc=128"
    )
    released = NetConfig.parse("mnist,0.001,64,True,False,0,0,2,5,3,2,8,128")
    assert by_codes == readable == released
    assert by_codes.nws_codes()["initialization"] == 2
    assert by_codes.nws_codes()["batch_norm"] == 1
    assert by_codes.as_params()["lrate"] == "0.001"


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("mnist,0.001,64,1,0,0,0,2,5,3,2,8", "config"),  # 12 values
        ("mnist,0.1,64,1,0,0,0,2,5,3,2,8,128", "lrate"),  # outside [0.0002, 0.005]
        ("mnist,0.001,48,1,0,0,0,2,5,3,2,8,128", "batch_size"),
        ("mnist,0.001,64,1,0,7,0,2,5,3,2,8,128", "optimizer"),
        ("mnist,0.001,64,1,0,0,0,2,4,3,2,8,128", "filter_size"),
        ("dataset=mnist,lrate=0.001", "config"),
    ],
)
def test_configurations_outside_the_space_are_refused_with_the_parameter_named(text, name):
    with pytest.raises(ParameterError) as error:
        NetConfig.parse(text)
    assert str(error.value).startswith(f"{name}:")
    assert "\n" not in str(error.value)


def test_fixed_subset_refuses_another_architecture():
    main_arch = NetConfig.parse("mnist,0.001,64,1,0,0,0,2,7,3,2,8,128")
    main_arch.check("main", ["mnist"])
    with pytest.raises(ParameterError, match=r"^config.filter_size: 7 is outside the fixed subset"):
        main_arch.check("fixed", ["mnist"])
