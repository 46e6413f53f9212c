"""ReplicaConfig's torch thread count: explicit, from reserved CPUs, or the whole machine."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from ccoe_common.serving.config import ReplicaConfig


def test_threads_default_to_every_cpu_when_none_are_reserved():
    assert ReplicaConfig().threads == (os.cpu_count() or 1)


def test_threads_follow_reserved_cpus_and_an_explicit_count_wins():
    assert ReplicaConfig(num_cpus=3).threads == 3
    assert ReplicaConfig(num_cpus=2.5).threads == 2
    assert ReplicaConfig(num_cpus=3, torch_threads=5).threads == 5


def test_zero_threads_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="torch_threads"):
        ReplicaConfig(torch_threads=0)
