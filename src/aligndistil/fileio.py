"""Small file helpers shared by every module that writes outputs.

Outputs must never be left half-written (a crash mid-write would otherwise leave a file that
looks complete), so text files are written to a hidden temp file beside the target and
renamed over it; the rename is atomic on one filesystem.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via ``.<name>.tmp`` and a rename; return the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
