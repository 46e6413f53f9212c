"""Unit conversion between metric units (power-of-ten factors, both directions).

    "Convert 7 km to m." -> "7 km = 7000 m"          "Convert 3400 g to kg." -> fails: not whole
    "Convert 5000 ml to l." -> "5000 ml = 5 l"

Pre-training text holds conversion facts in another phrasing ("7 km is 7000 m").
"""

from __future__ import annotations

import random

from ccoe_common.zoo.domains.base import Domain, Problem

# (big unit, small unit, factor)
PAIRS = (("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("l", "ml", 1000),
         ("min", "s", 60), ("h", "min", 60))


class Units(Domain):
    name = "units"
    keywords = ("convert", "km", "kg", "ml", "cm", "mm")
    description = "unit conversion (km/m/cm/mm, kg/g, l/ml, h/min/s)"

    def _pair(self, rng: random.Random) -> tuple[str, int, str, int]:
        big, small, factor = rng.choice(PAIRS)
        n = rng.randint(1, 99)
        if rng.random() < 0.5:
            return big, n, small, n * factor
        return small, n * factor, big, n

    def problem(self, rng: random.Random) -> Problem:
        src, x, dst, y = self._pair(rng)
        return Problem(self.name, f"Convert {x} {src} to {dst}.", f"{x} {src} = {y} {dst}", str(y))

    def pretrain_line(self, rng: random.Random) -> str:
        src, x, dst, y = self._pair(rng)
        return f"{x} {src} is {y} {dst}"
