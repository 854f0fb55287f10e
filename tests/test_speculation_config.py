"""SpeculationConfig: the one serialization of the policy's settings into vLLM's additional_config and back."""

import json

import pytest

from server.speculation.config import ADDITIONAL_CONFIG_KEY, SpeculationConfig
from server.speculation.cost import CostModel


@pytest.mark.parametrize(
    "config",
    [
        SpeculationConfig(),
        SpeculationConfig("adaptive", CostModel(50, 2, 8, 0.5), cost_online=True),
        SpeculationConfig("fixed", CostModel(50, 2, 8, 0.5, 40, 20, 5, 2, 1.5)),
        SpeculationConfig("adaptive", CostModel(50, 2, 8, 0.5, 0, 0, 0, 0, 0.0)),  # v1 0 is not v1 unset
    ],
)
def test_a_config_survives_the_trip_through_vllms_json_argument(config):
    wire = json.loads(json.dumps(config.to_additional_config()))  # what --additional-config carries
    assert SpeculationConfig.from_additional_config(wire) == config


def test_an_engine_started_without_it_reads_the_defaults():
    assert SpeculationConfig.from_additional_config(None) == SpeculationConfig()
    assert SpeculationConfig.from_additional_config({"other_plugin": {}}) == SpeculationConfig()


@pytest.mark.parametrize(
    "raw",
    [{"policy": "sometimes"}, {"cost_ms": [1, 2]}, {"cost_ms": [0, 0, 3, 4]}, "adaptive", {"cost_ms": "30,1,2,3"}],
)
def test_a_malformed_entry_is_refused_naming_it(raw):
    with pytest.raises(ValueError, match=ADDITIONAL_CONFIG_KEY):
        SpeculationConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: raw})


def test_the_policy_is_one_of_two():
    with pytest.raises(ValueError, match="fixed, adaptive"):
        SpeculationConfig("sometimes")
