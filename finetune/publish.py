"""Publish an export (finetune/export.py output) to the Hugging Face Hub.

    python finetune/publish.py path=exports/medqa-adapter repo=my-user/meditron-70b-medqa-lora dry_run=true
    python finetune/publish.py path=exports/medqa-adapter repo=my-user/meditron-70b-medqa-lora private=true

The token comes from the environment (HF_TOKEN) or the saved login (`hf auth login`); it is never printed or
written. `dry_run=true` lists what would be uploaded, with sizes, and sends nothing. The model card's usage
example is pointed at `repo` before the upload; the Hub checks the card's metadata again on upload.
"""

import os
import re
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder must not shadow libraries (datasets, evaluate, ...)

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from huggingface_hub import HfApi, ModelCard, constants, get_token  # noqa: E402
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id  # noqa: E402
from omegaconf import MISSING  # noqa: E402

from finetune.cli_config import compose_config  # noqa: E402
from finetune.model_card import validate_card  # noqa: E402
from finetune.recipe import RecipeError  # noqa: E402

IGNORE_PATTERNS = [".*", "*/.*"]  # hidden files and folders: staging leftovers, editor files
PLACEHOLDER = re.compile(r"<your-user>/[\w.\-]+")  # the card's repo id until publish knows it (model_card.py)
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


@dataclass
class PublishConfig:
    path: str = MISSING  # an export directory
    repo: str = MISSING  # user/name or org/name on the Hub
    private: bool = False  # create the repo private (an existing repo keeps its visibility)
    dry_run: bool = False  # list what would be uploaded; send nothing
    commit_message: Optional[str] = None


def upload_files(path: Path) -> list[tuple[str, int]]:
    """(path in repo, bytes) of what `upload_folder` sends with IGNORE_PATTERNS, sorted."""
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    return [(name, files[name]) for name in filter_repo_objects(sorted(files), ignore_patterns=IGNORE_PATTERNS)]


def check_export(path: Path, repo: str) -> ModelCard:
    if not path.is_dir():
        raise RecipeError(f"path={path}: no such directory; pass the output_dir of finetune/export.py")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise RecipeError(f"path={path} holds no exported weights ({' or '.join(WEIGHT_FILES[:2])}); pass the "
                          "output_dir of finetune/export.py")
    if not (path / "README.md").is_file():
        raise RecipeError(f"path={path} has no model card (README.md); export again with finetune/export.py")
    try:
        validate_repo_id(repo)
        if repo.count("/") != 1:
            raise HFValidationError("it needs the owner")
    except HFValidationError as err:
        raise RecipeError(f"repo={repo!r} is not a Hub repo id like 'user/name' ({str(err).splitlines()[0]})") from None
    try:
        return validate_card(ModelCard.load(path / "README.md"))
    except ValueError as err:
        raise RecipeError(f"{path / 'README.md'}: invalid card metadata ({' '.join(str(err).split())}); export "
                          "again") from None


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def publish(path: Path, repo: str, private: bool = False, dry_run: bool = False,
            commit_message: str | None = None) -> str:
    """Upload the export at `path` to `repo` (created if needed); returns the repo URL. Dry run: print only."""
    card = check_export(path, repo)
    files = upload_files(path)
    token = get_token()
    print(f"{'dry run: would upload' if dry_run else 'uploading'} {len(files)} files "
          f"({_size(sum(size for _, size in files))}) to {constants.ENDPOINT}/{repo}"
          f"{' (private)' if private else ''}")
    for name, size in files:
        print(f"  {name:<48} {_size(size):>10}")
    if dry_run:
        print("token: " + ("found (HF_TOKEN or saved login)" if token else "none: set HF_TOKEN or run `hf auth login` "
                                                                            "before publishing"))
        return f"{constants.ENDPOINT}/{repo}"
    if not token:
        raise RecipeError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then publish again")
    if PLACEHOLDER.search(card.text):  # point the usage example at the real repo
        card.text = PLACEHOLDER.sub(repo, card.text)
        card.save(path / ".README.md.tmp")
        os.replace(path / ".README.md.tmp", path / "README.md")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=path, ignore_patterns=IGNORE_PATTERNS,
                          commit_message=commit_message or f"Upload {path.name} (meditron-finetune export)")
    except Exception as err:  # network, auth, quota: one line, and never the token
        message = " ".join(str(err).split()).replace(token, "***")[:300]
        raise RecipeError(f"upload to {repo} failed ({type(err).__name__}: {message}); check the network, the "
                          "token's write access and the repo name") from None
    return str(url)


def main(args: list[str]) -> int:
    if "--help" in args or "-h" in args:
        print(__doc__)
        return 0
    try:
        cfg = compose_config(PublishConfig, args)
        url = publish(Path(cfg.path).expanduser(), cfg.repo, cfg.private, cfg.dry_run, cfg.commit_message)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not cfg.dry_run:
        print(f"published: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
