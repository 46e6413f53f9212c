"""Where an expert's layers go in the backbone (CCoE-25 §4.4).

For a backbone of L decoder layers and an expert of k layers, the strategies pick:

- GL (global, the default): k layers spread evenly over the whole depth,
  `round(j * (L - 1) / (k - 1))` for j = 0..k-1 (first and last layer included; k = 1 gives
  the middle layer L // 2).
- FB (front-back): the first ceil(k / 2) layers and the last floor(k / 2) layers.
- FE (front-end): the first k layers, 0..k-1.
- MD (middle): k consecutive layers centred in the stack, starting at (L - k) // 2.
- BE (back-end): the last k layers, L-k..L-1.

Or an explicit list of layer indices. When the count is not given, an expert takes as many
layers as its parameter budget allows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ccoe_common.errors import CCoEError

Strategy = Literal["GL", "FB", "FE", "MD", "BE"]
STRATEGIES: tuple[Strategy, ...] = ("GL", "FB", "FE", "MD", "BE")


class PlacementError(CCoEError, ValueError):
    """A placement that does not fit the backbone (layer out of range, too many layers, ...)."""

    code = "INVALID_ARGUMENT"


class Placement(BaseModel):
    """Which decoder layers an expert replaces. Example: Placement(strategy="GL", num_layers=4)."""

    model_config = ConfigDict(frozen=True)

    strategy: Strategy = Field("GL", description="How layers are spread over the depth when `layers` is not given.")
    num_layers: int | None = Field(
        None, ge=1, description="How many layers the expert replaces; None = as many as the budget allows."
    )
    layers: tuple[int, ...] | None = Field(
        None, description="Explicit layer indices (0-based); overrides strategy and num_layers."
    )

    @model_validator(mode="after")
    def _explicit_layers_are_distinct(self) -> Placement:
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers must not be empty")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers has duplicates: {list(self.layers)}")
        return self

    @classmethod
    def parse(cls, text: str) -> Placement:
        """From a CLI string: "GL", "GL:4", "BE:2" or an explicit list "0,5,11"."""
        text = text.strip()
        if text and (text[0].isdigit() or "," in text):
            try:
                return cls(layers=tuple(int(x) for x in text.split(",") if x.strip()))
            except ValueError as e:
                raise PlacementError(f"placement {text!r}: layer list must be comma-separated integers") from e
        strategy, _, count = text.partition(":")
        strategy = strategy.upper()
        if strategy not in STRATEGIES:
            raise PlacementError(f"placement strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        try:
            return cls(strategy=strategy, num_layers=int(count) if count else None)
        except ValueError as e:
            raise PlacementError(f"placement {text!r}: the layer count must be a positive integer") from e


def strategy_layers(strategy: Strategy, total: int, count: int) -> tuple[int, ...]:
    """The layer indices `strategy` picks for `count` of `total` layers (see module docstring)."""
    if not 1 <= count <= total:
        raise PlacementError(f"an expert of {count} layers does not fit a backbone of {total} layers")
    if strategy == "GL":
        if count == 1:
            return (total // 2,)
        return tuple(round(j * (total - 1) / (count - 1)) for j in range(count))
    if strategy == "FB":
        front = (count + 1) // 2
        return tuple(range(front)) + tuple(range(total - (count - front), total))
    if strategy == "FE":
        return tuple(range(count))
    if strategy == "MD":
        start = (total - count) // 2
        return tuple(range(start, start + count))
    if strategy == "BE":
        return tuple(range(total - count, total))
    raise PlacementError(f"unknown placement strategy {strategy!r}")
