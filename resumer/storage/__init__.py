"""Bytes on any fsspec URI: the ``Store`` (filesystem, root, options), ranged transfer and retries.

Knows nothing of checkpoint formats; everything above reads and writes through it.
"""
