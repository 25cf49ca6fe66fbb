"""Which fsspec filesystem a URI names: resolution with install hints, and what kind of filesystem it is."""

from __future__ import annotations

from typing import Any

import fsspec

from resumer.core.errors import UsageError

# fsspec protocol -> package to install, for a helpful error (fsspec's own courtesy, repeated here)
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


_LISTING_CACHED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, path) for a URI; unknown or uninstalled protocols are a UsageError."""
    options = dict(storage_options or {})
    if uri.split("://", 1)[0] in _LISTING_CACHED:
        # Checkpoints appear while we watch: a cached listing would hide a commit made by another process.
        options.setdefault("use_listings_cache", False)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError as exc:
        proto = uri.split("://", 1)[0]
        pkg = _PACKAGES.get(proto, "the fsspec implementation for it")
        raise UsageError(f"Cannot open {uri}: the {proto}:// protocol needs {pkg} (pip install {pkg}). "
                         f"({exc.__class__.__name__})") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"Cannot open {uri}: {exc}. Use a local path or an fsspec URI such as s3://bucket/path "
                         "or memory://path, with valid --storage-option values.") from None
    return fs, path


def is_local(fs: Any) -> bool:
    return bool(protocols(fs) & {"file", "local"})


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def basename(uri: str) -> str:
    """The last component of a URI or path (``step-0000000012`` for ``s3://runs/a/step-0000000012/``)."""
    return uri.rstrip("/").rpartition("/")[2]


def protocols(fs: Any) -> set[str]:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return set(protocol)
