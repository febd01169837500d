"""Progress bars of the readers that stream a file (listmode, PETSIRD): bytes read so far."""
from __future__ import annotations

from typing import Any

__all__ = ["byte_progress"]


def byte_progress(total_bytes: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar over ``total_bytes`` bytes (closed by the caller), or None when not ``enabled``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, leave=False)
