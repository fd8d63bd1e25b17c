"""Where stores live: the one seam between `FeatureStore.from_pretrained(location)` and the places it can read.

A location is a local folder, or anything a registered backend claims (a Hub dataset repo id, hub.py). A
backend is one file in `store/` that calls

    register_backend(name, claims=lambda location: ..., fetch=lambda location, **options: Path(local folder))

`fetch` brings the store's files into a local folder (a cache) and returns it; reading and checking are the
same for every backend (format.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..discovery import discover

_BACKENDS: dict[str, tuple[Callable[[str], bool], Callable[..., Path]]] = {}


def register_backend(name: str, claims: Callable[[str], bool], fetch: Callable[..., Path]) -> None:
    """Register a store backend: `claims(location) -> bool`, `fetch(location, **options) -> local folder`."""
    _BACKENDS[name] = (claims, fetch)


def locate(location: str | os.PathLike, **options: Any) -> Path:
    """The local folder of the store at `location`: the folder itself, or what the backend claiming it fetched."""
    directory = Path(location)
    if directory.is_dir():
        return directory
    discover(__package__)
    for claims, fetch in _BACKENDS.values():
        if claims(str(location)):
            return Path(fetch(str(location), **options))
    raise FileNotFoundError(f"no feature store at {str(location)!r}: not a directory, and not a Hub repo id (user/name) "
                            f"or another location a store backend ({', '.join(_BACKENDS) or 'none'}) takes")
