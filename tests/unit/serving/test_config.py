"""ReplicaConfig's torch thread count: explicit, from reserved CPUs, or a share of the machine."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from ccoe_common.serving.config import ReplicaConfig


def test_threads_default_to_every_cpu_when_none_are_reserved():
    assert ReplicaConfig().threads == (os.cpu_count() or 1)


@pytest.mark.parametrize("cpus", [1, 2, 3, 8])
def test_replicas_sharing_the_machine_split_its_cpus(cpus, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert ReplicaConfig(num_replicas=1).threads == cpus
    assert ReplicaConfig(num_replicas=2).threads == max(1, cpus // 2)
    assert ReplicaConfig(num_replicas=3).threads == max(1, cpus // 3)
    assert ReplicaConfig(num_replicas=16).threads == 1  # never zero
    assert ReplicaConfig(num_replicas=2, num_cpus=3).threads == 3  # reserved CPUs are the replica's own


def test_threads_follow_reserved_cpus_and_an_explicit_count_wins():
    assert ReplicaConfig(num_cpus=3).threads == 3
    assert ReplicaConfig(num_cpus=2.5).threads == 2
    assert ReplicaConfig(num_cpus=3, torch_threads=5).threads == 5


def test_zero_threads_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="torch_threads"):
        ReplicaConfig(torch_threads=0)
