"""The app config's parts: ReplicaConfig's torch thread count (explicit, from reserved CPUs, or a
share of the machine), defaults that come from one place, and the sections it composes."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from ccoe_common.defaults import DEFAULT_BUDGET_FRACTION, DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_REGISTRY
from ccoe_common.registry.config import RegistryConfig
from ccoe_common.serving.config import AppConfig, ConfigError, ReplicaConfig
from ccoe_common.settings import load_settings
from ccoe_common.telemetry.config import TelemetryConfig


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


def test_the_artifact_store_defaults_under_ccoe_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CCOE_CACHE_DIR", str(tmp_path / "cache"))
    assert RegistryConfig().artifact_store == str(tmp_path / "cache" / "artifacts")
    assert AppConfig.load({"backbone": "/m"}).registry.artifact_store == str(tmp_path / "cache" / "artifacts")
    monkeypatch.delenv("CCOE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert RegistryConfig().artifact_store == str(tmp_path / "home" / ".cache" / "ccoe" / "artifacts")
    # An explicit store wins, with ~ expanded.
    assert RegistryConfig(artifact_store="~/store").artifact_store == str(tmp_path / "home" / "store")


def test_the_app_config_composes_the_sections_and_shared_defaults(monkeypatch):
    monkeypatch.delenv("CCOE_REGISTRY", raising=False)
    config = AppConfig.load({"backbone": "/m", "telemetry": {"tracing": "memory"}, "registry": {"resync_s": 2}})
    assert isinstance(config.telemetry, TelemetryConfig) and config.telemetry.tracing == "memory"
    assert isinstance(config.registry, RegistryConfig) and config.registry.resync_s == 2
    assert config.replica.budget_fraction == DEFAULT_BUDGET_FRACTION == 0.15
    # The ops commands' default registry address is where a default config's gRPC port listens.
    assert load_settings().registry == DEFAULT_REGISTRY == f"127.0.0.1:{config.grpc_port}"
    assert config.grpc_port == DEFAULT_GRPC_PORT


def test_the_http_port_is_its_own():
    assert AppConfig.load({"backbone": "/m"}).http_port == DEFAULT_HTTP_PORT == 8000
    with pytest.raises(ConfigError, match="grpc_port and http_port are both 9000"):
        AppConfig.load({"backbone": "/m", "http_port": 9000})
