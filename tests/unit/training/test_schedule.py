from __future__ import annotations

from itertools import pairwise

import pytest

from ccoe_common.training.schedule import lr_at


def test_warmup_then_cosine_to_the_floor():
    lrs = [lr_at(s, base_lr=1.0, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in pairwise(lrs[3:]))  # never rises after warmup
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_at(11, base_lr=1.0, warmup=4, total=20, min_ratio=0.0) == pytest.approx(0.5)  # cosine midpoint
