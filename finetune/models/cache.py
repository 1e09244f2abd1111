"""A directory cache for things that are slow to build and never change for given inputs: converted and
re-quantised models (the `smoke` recipe's SmolLM2, the test fixtures).

Each entry lives at `${MEDITRON_FINETUNE_CACHE:-~/.cache/meditron-finetune}/<name>-<key>`, where the key
hashes the build's settings and the versions of the libraries whose output it is, so an upgrade rebuilds
instead of reusing stale files. Entries are built in a temporary sibling and renamed into place: a crash
leaves no half-written entry behind, and the next build clears the staging folder a killed one left.
"""

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..config.files import remove_dead_staging

# The libraries that shape what is built: the GGUF reader and writer, the quantiser, the numerics.
KEYED_PACKAGES = ("torch", "transformers", "gptqmodel", "gguf")


def cache_root() -> Path:
    return Path(os.environ.get("MEDITRON_FINETUNE_CACHE", "~/.cache/meditron-finetune")).expanduser()


def package_versions(packages: tuple[str, ...] = KEYED_PACKAGES) -> dict[str, str]:
    """Installed version of each package, "absent" where it is not installed."""
    versions = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return versions


def cache_key(settings: dict) -> str:
    payload = json.dumps({"settings": settings, "versions": package_versions()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_dir(name: str, settings: dict, build: Callable[[Path], None]) -> Path:
    """The directory `build(path)` writes for these settings, built on first use and reused after.

    `build` receives a path that does not exist yet and must create it."""
    final = cache_root() / f"{name}-{cache_key(settings)}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"Building {name} (once; cached in {final})", file=sys.stderr)
    remove_dead_staging(final.parent, f".{final.name}.building-*")  # left by builds that were killed
    staging = final.with_name(f".{final.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        build(staging)
        if final.is_dir():  # another process finished the same entry first: keep theirs
            shutil.rmtree(staging)
        else:
            staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
