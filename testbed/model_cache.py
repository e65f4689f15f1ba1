"""Where locally built models live, and how a folder is built so that no caller sees it half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    """``$ZOOMR_CACHE_DIR``, else ``~/.cache/zoomr_sglang``."""
    return Path(os.environ.get("ZOOMR_CACHE_DIR") or Path.home() / ".cache" / "zoomr_sglang")


def build_into_place(final: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """Return ``final``, building it first unless ``complete(final)``.

    ``build(folder)`` writes into a temporary sibling folder that is then renamed to ``final``, so
    concurrent callers never see a half-written model. An incomplete ``final`` (from older code, or
    left by hand) is replaced; when another process renames its folder first, that one is kept.
    """
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        if final.exists() and not complete(final):
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not complete(final):  # anything but another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
