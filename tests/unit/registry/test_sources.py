"""Where the registry may read artifacts from and write exports to: decided on the text first,
then through symbolic links; every refusal the same whether or not the path exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccoe_common.registry.errors import DisallowedLocation
from ccoe_common.registry.sources import LocationPolicy, parse_location


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    for d in ("store/math/v1", "allowed/law", "elsewhere/secret", "exports-out"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "allowed" / "link-out").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "allowed" / "link-in").symlink_to(tmp_path / "allowed" / "law")
    (tmp_path / "via-link").symlink_to(tmp_path / "allowed")
    return tmp_path


@pytest.fixture()
def policy(tree: Path) -> LocationPolicy:
    return LocationPolicy(str(tree / "store"), allowed_sources=[str(tree / "allowed"), "s3://team/experts/"],
                          allowed_export_prefixes=[str(tree / "exports-out")])


def refused(fn, uri: str) -> str:
    with pytest.raises(DisallowedLocation) as err:
        fn(uri)
    assert err.value.code == "INVALID_ARGUMENT"
    return str(err.value)


def test_sources_inside_the_store_or_an_allowed_prefix_pass_normalised(policy, tree):
    assert policy.source(str(tree / "store/math/v1")) == str(tree / "store/math/v1")
    assert policy.source(f"file://{tree}/allowed/law") == str(tree / "allowed/law")
    assert policy.source(f"FILE://localhost{tree}/allowed//law/") == str(tree / "allowed/law")
    assert policy.source(f"{tree}/allowed/x/../law") == str(tree / "allowed/law")
    assert policy.source(str(tree / "allowed/link-in")) == str(tree / "allowed/law")  # a link that stays inside
    # Another link to an allowed folder is not followed to decide: the text alone is outside.
    assert "is not inside an allowed location" in refused(policy.source, str(tree / "via-link/law"))
    assert policy.source("s3://team/experts/law/v2") == "s3://team/experts/law/v2"
    assert policy.source("S3://TEAM/experts/law") == "s3://team/experts/law"


@pytest.mark.parametrize("outside", [
    "{tree}/elsewhere/secret", "{tree}/elsewhere/does-not-exist", "/etc/passwd", "/proc/self/environ",
    "{tree}/allowed/../elsewhere/secret", "{tree}/allowed-twin/law", "file://{tree}/elsewhere/secret",
    "{tree}/store/../elsewhere",
])
def test_outside_paths_are_refused_the_same_whether_they_exist_or_not(policy, tree, outside):
    message = refused(policy.source, outside.format(tree=tree))
    assert message.startswith("uri: ") and "is not inside an allowed location" in message
    assert f"allowed: ['{tree}/store', '{tree}/allowed', 's3://team/experts/']" in message
    assert "registry.allowed_sources" in message and "--upload" in message
    assert "exist" not in message.replace("does-not-exist", "")


def test_a_prefix_configured_through_a_link_allows_both_spellings(tree):
    policy = LocationPolicy(str(tree / "store"), allowed_sources=[str(tree / "via-link")])
    assert policy.source(str(tree / "via-link/law")) == str(tree / "allowed/law")
    assert policy.source(str(tree / "allowed/law")) == str(tree / "allowed/law")


def test_a_symbolic_link_cannot_lead_out_of_an_allowed_folder(policy, tree):
    message = refused(policy.source, str(tree / "allowed/link-out/secret"))
    assert "leads through a symbolic link outside the allowed locations" in message


@pytest.mark.parametrize(("uri", "fragment"), [
    ("http://127.0.0.1:8080/artifact", "scheme 'http' is not allowed; allowed schemes: ['file', 's3']"),
    ("https://evil.example/x", "scheme 'https' is not allowed"),
    ("gs://team/experts/law", "scheme 'gs' is not allowed"),
    ("s3://other-bucket/experts/law", "is not inside an allowed location"),
    ("s3://team/experts-evil/law", "is not inside an allowed location"),
    ("s3://team/experts/../secrets", "has a '..' segment"),
    ("s3://team/experts/%2e%2e/secrets", "has a '..' segment"),
    ("s3://user:pw@team/experts/law", "carries credentials"),
    ("s3://team/experts/law?versionId=1", "has a query or fragment"),
    ("simplecache::s3://team/experts/law", "chains several filesystems"),
    ("file://etc/passwd", "names a host ('etc')"),
    ("relative/path", "is a relative path"),
    ("~/x", "is a relative path"),
    ("", "is empty"),
    ("/ok\x00/x", "holds a NUL character"),
])
def test_unsafe_forms_are_refused_on_their_text(policy, uri, fragment):
    assert fragment in refused(policy.source, uri)


def test_exports_go_to_the_stores_exports_folder_or_an_allowed_prefix(policy, tree):
    assert policy.export_destination("law-copy") == str(tree / "store/_exports/law-copy")
    assert policy.export_destination("team/law-copy") == str(tree / "store/_exports/team/law-copy")
    assert policy.export_destination(str(tree / "exports-out/law")) == str(tree / "exports-out/law")
    assert policy.export_destination(f"file://{tree}/store/_exports/x") == str(tree / "store/_exports/x")


@pytest.mark.parametrize(("dest", "fragment"), [
    ("../law", "leaves the store's _exports folder"),
    ("a/../../b", "leaves the store's _exports folder"),
    ("{tree}/store/math/v9", "is not inside an allowed location"),
    ("{tree}/store/.uploads/x", "is not inside an allowed location"),
    ("{tree}/allowed/law-copy", "is not inside an allowed location"),  # a source prefix is not an export one
    ("/proc/self/fd", "is not inside an allowed location"),
    ("ftp://host/x", "scheme 'ftp' is not allowed"),
    ("nosuchproto://x/y", "scheme 'nosuchproto' is not allowed"),
])
def test_exports_elsewhere_are_refused(policy, tree, dest, fragment):
    message = refused(policy.export_destination, dest.format(tree=tree))
    assert message.startswith("export_to: ") and fragment in message


def test_an_allowed_prefix_over_the_store_still_cannot_overwrite_its_versions(tree):
    policy = LocationPolicy(str(tree / "store"), allowed_export_prefixes=[str(tree)])
    assert "is inside the artifact store but not in its _exports folder" in refused(
        policy.export_destination, str(tree / "store/math/v1"))
    assert policy.export_destination(str(tree / "exports-out/x")) == str(tree / "exports-out/x")


def test_remote_stores_work_the_same(tmp_path):
    policy = LocationPolicy("memory://ccoe/store", allowed_sources=["memory://ccoe/incoming"])
    assert policy.source("memory://ccoe/store/math/v1") == "memory://ccoe/store/math/v1"
    assert policy.source("memory://ccoe/incoming/law") == "memory://ccoe/incoming/law"
    assert policy.export_destination("law") == "memory://ccoe/store/_exports/law"
    assert "scheme 'file' is not allowed" in refused(policy.source, str(tmp_path))


def test_an_outside_path_is_refused_before_the_filesystem_is_touched(monkeypatch):
    policy = LocationPolicy("/srv/store", allowed_sources=["/data/exports"])

    def no_filesystem(*args, **kwargs):
        raise AssertionError("the filesystem was touched")

    for name in ("realpath", "exists", "lexists", "isdir"):
        monkeypatch.setattr(os.path, name, no_filesystem)
    monkeypatch.setattr(os, "stat", no_filesystem)
    monkeypatch.setattr(os, "lstat", no_filesystem)
    for outside in ("/etc/shadow", "/data/exports/../../etc/shadow", "/data/exports-2/x", "http://10.0.0.1/x"):
        refused(policy.source, outside)
    refused(policy.export_destination, "/proc/self/fd/1")
    assert parse_location("/a/b/../c", "uri").path == "/a/c"
