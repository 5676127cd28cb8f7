"""The training configuration: checked options, and checkpoints from older versions."""

from dataclasses import fields

import pytest

from simclr.config import OBSOLETE_OPTIONS, RESUMABLE_CHANGES, TrainConfig
from simclr.errors import SimCLRError


@pytest.mark.parametrize("field,value,message", [
    ("width", 0, "width must be >= 1, got 0"),
    ("knn_temperature", 0.0, "knn temperature must be positive, got 0.0"),
    ("log_every", 0, "log-every must be >= 1, got 0"),
    ("lars_eta", -1.0, "LARS trust coefficient must be positive, got -1.0"),
])
def test_out_of_range_settings_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(SimCLRError, match=message):
        TrainConfig(**{field: value}).validate()


def test_unknown_config_keys_are_named() -> None:
    with pytest.raises(SimCLRError, match="unknown training option\\(s\\): colour, speed$"):
        TrainConfig.from_dict({"speed": 1, "colour": 2})


def test_a_configuration_saved_with_obsolete_options_still_loads() -> None:
    saved = {**TrainConfig(lr=0.1).to_dict(), "workers": 4}  # as versions with a `workers` option wrote it
    assert TrainConfig.from_dict(saved) == TrainConfig(lr=0.1)
    # Obsolete options are dropped by name; anything else unknown is still refused.
    with pytest.raises(SimCLRError, match="unknown training option\\(s\\): speed$"):
        TrainConfig.from_dict({**saved, "speed": 1})


def test_option_lists_name_only_real_options() -> None:
    names = {f.name for f in fields(TrainConfig)}
    assert RESUMABLE_CHANGES <= names
    assert not OBSOLETE_OPTIONS & names
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
