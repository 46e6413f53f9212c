"""Where the registry may read artifacts from and write exports to (invariant 9).

A client names a location in `PushExpertRequest.uri` and `PopExpertRequest.export_to`. Before
this check, `PushExpert{uri: "http://127.0.0.1:PORT/artifact"}` made the server fetch that
URL (server-side request forgery), `export_to` wrote anywhere the server could, and the
errors for `file://` URIs told a caller whether a server path existed. Now:

- a source must lie inside the artifact store or under a prefix of `registry.allowed_sources`;
- an export must lie inside the store's `_exports/` folder (a bare relative name such as
  `law-copy` means `<store>/_exports/law-copy`) or under `registry.allowed_export_prefixes`;
- a scheme counts only if the store or one of those prefixes names it (no `http://` unless
  an allowed prefix is an `http://` URL).

The decision is made on the text first, before any filesystem is touched, so a refusal is the
same whether or not the path exists. Only a local path that passes is then resolved through
symbolic links and checked again, so a link inside an allowed folder cannot lead out of it.

    policy = LocationPolicy("/var/ccoe/artifacts", allowed_sources=["/data/exports", "s3://team/experts"])
    policy.source("file:///data/exports/law/v2")   # -> "/data/exports/law/v2"
    policy.source("/data/exports/../../etc")       # DisallowedLocation (INVALID_ARGUMENT)
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ccoe_common.errors import quote
from ccoe_common.registry.errors import DisallowedLocation

# Not a valid expert name (those start with a letter or digit), so no expert's versions
# (<store>/<name>/v<N>) can ever be in it.
EXPORTS = "_exports"
_LOCAL_SCHEMES = {"file", "local"}  # fsspec's two names for the local filesystem


@dataclass(frozen=True)
class Location:
    """A normalised location: scheme ("file" for local paths), host and an absolute path
    without `.`, `..` or repeated slashes, e.g. Location("s3", "team", "/experts/law")."""

    scheme: str
    netloc: str
    path: str

    @property
    def uri(self) -> str:
        """What fsspec is given: a bare path for local files, else scheme://host/path."""
        return self.path if self.scheme == "file" else f"{self.scheme}://{self.netloc}{self.path}"

    def within(self, prefix: Location) -> bool:
        if (self.scheme, self.netloc) != (prefix.scheme, prefix.netloc):
            return False
        base = prefix.path.rstrip("/")
        return self.path == prefix.path or self.path.startswith(base + "/")

    def child(self, name: str) -> Location:
        return Location(self.scheme, self.netloc, posixpath.join(self.path, name))


def _normpath(path: str) -> str:
    # posixpath.normpath keeps a leading "//" (POSIX leaves its meaning to the system).
    return "/" + posixpath.normpath(path).lstrip("/")


def parse_location(uri: str, field: str) -> Location:
    """`uri` as a Location, or DisallowedLocation naming `field` if its form alone is unsafe:
    chained fsspec URLs (`a::b`), relative paths, a host in a file URI, credentials, queries,
    fragments, or `.`/`..` segments in a remote path (a store may not resolve them as a
    filesystem does). Text only: nothing is read."""
    if not uri:
        raise DisallowedLocation(f"{field}: is empty; give an absolute path or a URI")
    if "::" in uri:
        raise DisallowedLocation(f"{field}: {quote(uri)} chains several filesystems ('::'); give one location")
    if "\x00" in uri:
        raise DisallowedLocation(f"{field}: {quote(uri)} holds a NUL character")
    if "://" not in uri:
        scheme, netloc, path = "file", "", uri
    else:
        parts = urlsplit(uri)
        scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
        if not scheme:
            raise DisallowedLocation(f"{field}: {quote(uri)} has no scheme before '://'")
        if scheme in _LOCAL_SCHEMES:
            if netloc not in ("", "localhost"):
                raise DisallowedLocation(f"{field}: {quote(uri)} names a host ({quote(netloc)}); a file URI "
                                         "looks like file:///absolute/path")
            # urlsplit would cut a local path at '?' or '#', which are plain characters in a file name.
            scheme, netloc, path = "file", "", uri.split("://", 1)[1][len(parts.netloc):]
        else:
            if "@" in netloc:
                raise DisallowedLocation(f"{field}: {quote(uri)} carries credentials ('@' in the host); "
                                         "the server's own credentials are used")
            if parts.query or parts.fragment or uri.endswith(("?", "#")):
                raise DisallowedLocation(f"{field}: {quote(uri)} has a query or fragment; give a plain folder URI")
            path = parts.path or "/"
            for segment in (*path.split("/"), *unquote(path).split("/")):
                if segment in (".", ".."):
                    raise DisallowedLocation(f"{field}: {quote(uri)} has a '{segment}' segment; give the "
                                             "folder's own URI")
            return Location(scheme, netloc, "/" + path.lstrip("/"))
    if not path.startswith("/"):
        raise DisallowedLocation(f"{field}: {quote(uri)} is a relative path; give an absolute path or a URI")
    return Location("file", "", _normpath(path))


def _real(location: Location) -> Location:
    """A local location through its symbolic links (the parts that exist); others as they are."""
    if location.scheme != "file":
        return location
    return Location("file", "", _normpath(os.path.realpath(location.path)))


class LocationPolicy:
    """The registry's allow-lists, normalised once. The store itself is always allowed as a
    source, and its `_exports/` folder as an export destination."""

    def __init__(self, store_root: str, allowed_sources: Sequence[str] = (),
                 allowed_export_prefixes: Sequence[str] = ()):
        self.store = parse_location(store_root, "registry.artifact_store")
        self.exports = self.store.child(EXPORTS)
        self._sources = self._prefixes([self.store, *(parse_location(p, "registry.allowed_sources")
                                                      for p in allowed_sources)])
        self._exports = self._prefixes([self.exports, *(parse_location(p, "registry.allowed_export_prefixes")
                                                        for p in allowed_export_prefixes)])
        self._source_text = [loc.uri for loc in self._sources[0]]
        self._export_text = [loc.uri for loc in self._exports[0]]

    @staticmethod
    def _prefixes(given: list[Location]) -> tuple[list[Location], list[Location]]:
        """(as written, through symbolic links): a path is allowed on either spelling."""
        return given, [_real(p) for p in given]

    def source(self, uri: str) -> str:
        """The URI to read `uri` from, normalised; DisallowedLocation (INVALID_ARGUMENT) if it
        is not inside the store or an allowed source prefix."""
        location = self._check(uri, "uri", self._sources, self._source_text, "registry.allowed_sources",
                               "upload the artifact instead (`ccoe expert push DIR --upload`) or ask an "
                               "operator to allow its location")
        return location.uri

    def export_destination(self, export_to: str) -> str:
        """Where to write an export: a bare relative name goes under the store's _exports/
        folder; anything else must lie there or under an allowed export prefix."""
        if "://" not in export_to and not export_to.startswith("/") and export_to:
            relative = posixpath.normpath(export_to)
            if relative in (".", "..") or relative.startswith("../"):
                raise DisallowedLocation(f"export_to: {quote(export_to)} leaves the store's _exports folder; "
                                         "give a folder name such as 'law-copy'")
            export_to = self.exports.child(relative).uri
        location = self._check(export_to, "export_to", self._exports, self._export_text,
                               "registry.allowed_export_prefixes",
                               "give a folder name (it goes under the store's _exports/ folder) or ask an "
                               "operator to allow the destination")
        inside_store = location.within(self.store) or _real(location).within(_real(self.store))
        if inside_store and not (location.within(self.exports) or _real(location).within(_real(self.exports))):
            raise DisallowedLocation(f"export_to: {quote(export_to)} is inside the artifact store but not in its "
                                     f"_exports folder ({self.exports.uri}); the registry's own versions are "
                                     "never written by an export")
        return location.uri

    def _check(self, uri: str, field: str, prefixes: tuple[list[Location], list[Location]], allowed: list[str],
               setting: str, advice: str) -> Location:
        location = parse_location(uri, field)
        written, real = prefixes
        schemes = sorted({p.scheme for p in written})
        if location.scheme not in schemes:
            raise DisallowedLocation(f"{field}: scheme {location.scheme!r} is not allowed; allowed schemes: {schemes} "
                                     f"(the artifact store's and those in {setting})")
        # Decided on the text alone: the answer for a path outside is the same whether it exists or not.
        if not any(location.within(p) for p in (*written, *real)):
            raise DisallowedLocation(f"{field}: {quote(uri)} is not inside an allowed location; allowed: "
                                     f"{allowed} (the artifact store and {setting}); {advice}")
        resolved = _real(location)
        if not any(resolved.within(p) for p in real):
            raise DisallowedLocation(f"{field}: {quote(uri)} leads through a symbolic link outside the allowed "
                                     f"locations; allowed: {allowed}")
        return resolved
