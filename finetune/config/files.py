"""Output files are written whole or not at all: to a temporary sibling, then renamed into place."""

import os
from pathlib import Path


def write_atomic(path: Path, write) -> None:
    """`write(tmp_path)` then rename onto `path`: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
