from __future__ import annotations

import pytest

from ccoe_common.model.placement import Placement, PlacementError, strategy_layers


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("GL", (0, 4, 7, 11)),
        ("FB", (0, 1, 10, 11)),
        ("FE", (0, 1, 2, 3)),
        ("MD", (4, 5, 6, 7)),
        ("BE", (8, 9, 10, 11)),
    ],
)
def test_strategies_pick_documented_layers(strategy, expected):
    assert strategy_layers(strategy, 12, 4) == expected


def test_odd_counts_and_edges():
    assert strategy_layers("GL", 12, 1) == (6,)
    assert strategy_layers("GL", 12, 12) == tuple(range(12))
    assert strategy_layers("FB", 12, 3) == (0, 1, 11)
    assert strategy_layers("MD", 12, 3) == (4, 5, 6)
    with pytest.raises(PlacementError, match="13 layers does not fit a backbone of 12"):
        strategy_layers("FE", 12, 13)


def test_parse_cli_forms():
    assert Placement.parse("gl:4") == Placement(strategy="GL", num_layers=4)
    assert Placement.parse("BE") == Placement(strategy="BE", num_layers=None)
    assert Placement.parse("0,5,11").layers == (0, 5, 11)
    with pytest.raises(PlacementError, match="'XX' is not one of"):
        Placement.parse("XX:2")
    with pytest.raises(PlacementError, match="positive integer"):
        Placement.parse("GL:0")


def test_explicit_layers_must_be_distinct():
    with pytest.raises(ValueError, match="duplicates"):
        Placement(layers=(1, 1))
