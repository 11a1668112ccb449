"""Configs: validation in __post_init__, presets, JSON round trip."""

from __future__ import annotations

import pytest

from arrcoc.config import BalanceConfig, PipelineConfig
from arrcoc.errors import InvalidInputError, InvalidTypeError


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_presets_round_trip_through_json(name: str) -> None:
    config = PipelineConfig.from_name(name)
    assert PipelineConfig.from_json(config.to_json()) == config


def test_overrides_and_bucket_normalisation() -> None:
    config = PipelineConfig.from_name("tiny", buckets=(384, 224, 384), min_tokens=0)
    assert config.buckets == (224, 384) and config.min_tokens == 0


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("region_size", 0, "region_size"),
        ("min_tokens", -1, "min_tokens"),
        ("max_tokens", 17, "max_tokens"),
        ("token_capacity", 0, "token_capacity"),
        ("encoder_dtype", "int8", "encoder_dtype"),
        ("buckets", (), "buckets"),
        ("version", 99, "version"),
        ("query_detail", 1.5, "query_detail"),
        ("query_detail", -0.1, "query_detail"),
        ("query_detail", float("nan"), "query_detail"),
    ],
)
def test_bad_fields_are_named(field: str, value, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        PipelineConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exploit": 1.5}, "exploit"),
        ({"weights": (1, -1, 1)}, "weights"),
        ({"temperature_range": (1.0, 0.1)}, "temperature_range"),
        ({"scarcity": -0.1}, "scarcity"),
        ({"pick": "divprune"}, "pick"),
        ({"pick_salience": 1.5}, "pick_salience"),
        ({"pick_colour": -1.0}, "pick_colour"),
        ({"pick_colour": float("inf")}, "pick_colour"),
        ({"pick_spatial": -0.5}, "pick_spatial"),
        ({"pick_spatial": float("nan")}, "pick_spatial"),
    ],
)
def test_bad_balance(kwargs, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        BalanceConfig(**kwargs)


def test_unknown_preset_and_fields() -> None:
    with pytest.raises(InvalidInputError, match="unknown preset"):
        PipelineConfig.from_name("huge")
    with pytest.raises(InvalidInputError, match="unknown config fields"):
        PipelineConfig.from_dict({"encoderr": "x"})


def test_the_pick_defaults_to_maxmin_with_colour_and_round_trips() -> None:
    assert (
        BalanceConfig().pick == "maxmin" and BalanceConfig().pick_salience == 0 and BalanceConfig().pick_colour == 0.5
    )
    assert BalanceConfig().query_cover == 0
    config = PipelineConfig(balance=BalanceConfig(pick="maxmin", pick_salience=0.3, pick_colour=0.5))
    assert PipelineConfig.from_json(config.to_json()) == config
    with pytest.raises(InvalidTypeError, match="pick"):
        BalanceConfig(pick=1)
