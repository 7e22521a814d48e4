"""Object stores: the ObjectStore interface, its three backends and store_from_url.

Backends are imported lazily, so a user of memfs or localfs never imports
aiobotocore.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from simplequeue.errors import ObjectNotFound, PreconditionFailed, StoreError, StoreUnavailable
from simplequeue.objstore.base import InvalidKey, ObjectStore, check_key, content_etag

__all__ = [
    "InvalidKey",
    "ObjectNotFound",
    "ObjectStore",
    "PreconditionFailed",
    "StoreError",
    "StoreUnavailable",
    "check_endpoint_url",
    "check_key",
    "content_etag",
    "store_from_url",
]


def check_endpoint_url(url: str) -> str:
    """An s3 endpoint as botocore takes one: http or https, and a host; else
    ValueError. Without its scheme (`localhost:9000`), or empty, botocore
    refuses it at the first request only, once a broker has started."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (a port that is not a number raises ValueError)
    except ValueError:
        raise ValueError(f"{url!r} has a port that is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    return url


def store_from_url(url: str) -> ObjectStore:
    """Open a store by URL: `mem://[name]`, `file:///abs/dir`,
    `s3://bucket[/prefix][?endpoint_url=...&region=...]`.

    Named mem:// stores are shared within the process; `mem://` alone is private.
    """
    parts = urlsplit(url)
    if parts.scheme == "mem":
        from simplequeue.objstore.memfs import MemStore

        return MemStore(parts.netloc + parts.path)
    if parts.scheme == "file":
        from simplequeue.objstore.localfs import LocalStore

        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"file URLs take an absolute path (file:///dir), got {url!r}")
        return LocalStore(unquote(parts.path))
    if parts.scheme == "s3":
        from simplequeue.objstore.s3 import S3Settings, S3Store

        if not parts.netloc:
            raise ValueError(f"s3 URLs name a bucket (s3://bucket/prefix), got {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint_url", "region"}
        if unknown:
            raise ValueError(f"unknown s3 URL parameters: {', '.join(sorted(unknown))}")
        if "endpoint_url" in query:
            check_endpoint_url(query["endpoint_url"])
        return S3Store(
            S3Settings(
                bucket=parts.netloc,
                prefix=unquote(parts.path).strip("/"),
                endpoint_url=query.get("endpoint_url"),
                region=query.get("region"),
            )
        )
    raise ValueError(f"unknown store URL {url!r}: use mem://, file:///dir or s3://bucket/prefix")
