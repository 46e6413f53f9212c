"""The layers stay layered: nothing in ccoe_common imports services (the app builder is
reached by import path), and lower packages never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ccoe_common.serving.local_stack import APP_BUILDER, import_attr

ROOT = Path(__file__).resolve().parents[2]
# package -> packages it must never import (directly or lazily inside a function).
FORBIDDEN = {
    "ccoe_common": {"services"},
    "ccoe_common.model": {"ccoe_common.engine", "ccoe_common.serving", "ccoe_common.registry", "ccoe_common.cli",
                          "ccoe_common.bench", "ccoe_common.zoo", "ccoe_common.routing"},
    "ccoe_common.experts": {"ccoe_common.model", "ccoe_common.engine", "ccoe_common.serving", "ccoe_common.cli",
                            "ccoe_common.registry", "ccoe_common.bench", "ccoe_common.zoo"},
    "ccoe_common.engine": {"ccoe_common.serving", "ccoe_common.registry", "ccoe_common.cli", "ccoe_common.bench",
                           "ccoe_common.zoo", "ccoe_common.routing"},
    "ccoe_common.routing": {"ccoe_common.engine", "ccoe_common.serving", "ccoe_common.cli", "ccoe_common.bench",
                            "ccoe_common.zoo"},
    "ccoe_common.registry": {"ccoe_common.serving", "ccoe_common.cli", "ccoe_common.bench", "ccoe_common.zoo"},
    "ccoe_common.telemetry": {"ccoe_common.serving", "ccoe_common.registry", "ccoe_common.engine", "ccoe_common.cli"},
    "ccoe_common.bench": {"ccoe_common.cli"},
    "ccoe_common.zoo": {"ccoe_common.cli", "ccoe_common.bench"},
    "ccoe_common.training": {"ccoe_common.serving", "ccoe_common.cli", "ccoe_common.bench", "ccoe_common.zoo"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _violations(package: str, forbidden: set[str], root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted(root.joinpath(*package.split(".")).rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue  # generated stubs
        for name in _imports(path):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                out.append(f"{path.relative_to(root)} imports {name}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(package):
    assert _violations(package, FORBIDDEN[package]) == []


def test_the_check_sees_a_lazy_import(tmp_path):
    # The checker must be able to fail: an import inside a function counts as much as one on top.
    bad = tmp_path / "ccoe_common" / "model" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("import torch\n\ndef f():\n    from ccoe_common.engine.engine import Engine\n")
    assert _violations("ccoe_common.model", FORBIDDEN["ccoe_common.model"], tmp_path) == [
        "ccoe_common/model/x.py imports ccoe_common.engine.engine"]


def test_the_app_builder_is_reached_by_import_path():
    from services.app import build_app

    assert import_attr(APP_BUILDER) is build_app


@pytest.mark.parametrize("path", ["services.app", "services.app:", ":build_app", "services.app:no_such_builder",
                                  "no_such_module_xyz:build_app"])
def test_a_wrong_builder_path_names_itself(path):
    with pytest.raises(ValueError, match="services.app|no_such_module_xyz|build_app"):
        import_attr(path)
