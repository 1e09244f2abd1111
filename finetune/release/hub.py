"""Publishing an export to the Hugging Face Hub: what would be uploaded, the checks before it, the upload.

The token comes from the environment (HF_TOKEN) or the saved login; it is never printed or written.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, ModelCard, constants, get_token
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id
from omegaconf import MISSING

from ..config.recipe import RecipeError
from .model_card import validate_card

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
