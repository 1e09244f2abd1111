"""Child Python processes for tests: a snippet run from the repository root, with this checkout first on the path."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": pythonpath_with(REPO)} | env, check=False)


def pythonpath_with(first: Path) -> str:
    """PYTHONPATH for a child process: `first`, then the caller's own (where the GPU image's wheels live)."""
    return os.pathsep.join(filter(None, [str(first), os.environ.get("PYTHONPATH")]))
