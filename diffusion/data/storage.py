"""Where bytes live: a URI (local path, ``file://`` or ``s3://bucket/prefix``) resolved to a
pyarrow filesystem and a path on it, plus the few operations datasets (and, later,
checkpoints) need: read, atomic write, list, delete.

S3 (and S3-compatible servers such as MinIO or moto) goes through
``pyarrow.fs.S3FileSystem``. The endpoint is the ``endpoint_url`` argument, else the
``AWS_ENDPOINT_URL`` environment variable (pyarrow does not read it itself), else AWS.
Credentials and region come from the usual AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``~/.aws``, instance metadata); the
region also from ``AWS_REGION`` or ``AWS_DEFAULT_REGION``. Nothing is read from files of ours.
"""

from __future__ import annotations

import logging
import os
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = [
    "delete",
    "exists",
    "is_local",
    "join",
    "list_files",
    "read_bytes",
    "resolve",
    "write_bytes",
]

log = logging.getLogger(__name__)

SCHEMES = ("local path", "file://", "s3://")


def resolve(uri: str, *, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (filesystem, path on it). The path carries no trailing slash.

    Local paths (relative ones too) become absolute; ``s3://bucket/prefix`` becomes
    ``bucket/prefix`` on an ``S3FileSystem`` (endpoint: ``endpoint_url``, else
    ``AWS_ENDPOINT_URL``; an ``http://`` endpoint switches the transport to plain HTTP).
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"uri: got {uri!r}; expected a local path or s3://bucket/prefix")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"uri: {uri!r} names no bucket; expected s3://bucket/prefix")
        path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return _s3_filesystem(endpoint_url or os.environ.get("AWS_ENDPOINT_URL")), path
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path)
    # One-letter schemes are Windows drive letters, not URLs.
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"uri: scheme {parsed.scheme!r} in {uri!r}; allowed: {list(SCHEMES)}")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _s3_filesystem(endpoint_url: str | None) -> pafs.S3FileSystem:
    options: dict[str, str] = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    if endpoint_url:
        endpoint = urlparse(endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
            raise ValueError(f"endpoint_url: got {endpoint_url!r}; expected http(s)://host[:port]")
        options["endpoint_override"] = endpoint.netloc
        options["scheme"] = endpoint.scheme
    log.debug("S3 filesystem with %s", options)
    return pafs.S3FileSystem(**options)


def is_local(fs: pafs.FileSystem) -> bool:
    """True for the local filesystem (where renames are atomic)."""
    return isinstance(fs, pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join path components with ``/`` (pyarrow paths use ``/`` on every filesystem)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a file exists at ``path``."""
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole file at ``path`` (FileNotFoundError if absent)."""
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, *, atomic: bool = True) -> None:
    """Write ``data`` to ``path``, creating parent directories on local disk.

    ``atomic``: on local disk, write a temporary sibling and rename it over ``path``, so
    readers see either the old file or the whole new one. An S3 object appears only when
    its upload completes, so S3 writes are atomic as they are.
    """
    if not is_local(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    target = f"{path}.tmp-{uuid.uuid4().hex}" if atomic else path
    try:
        with fs.open_output_stream(target) as f:
            f.write(data)
        if atomic:
            fs.move(target, path)
    except BaseException:
        if atomic and exists(fs, target):
            fs.delete_file(target)
        raise


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Paths of all files below ``path`` (recursive; empty if ``path`` does not exist)."""
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


def delete(fs: pafs.FileSystem, path: str) -> None:
    """Delete the file at ``path`` if it exists."""
    if exists(fs, path):
        fs.delete_file(path)
