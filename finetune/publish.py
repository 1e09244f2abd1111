"""Publish an export (finetune/export.py output) to the Hugging Face Hub.

    python finetune/publish.py path=exports/medqa-adapter repo=my-user/meditron-70b-medqa-lora dry_run=true
    python finetune/publish.py path=exports/medqa-adapter repo=my-user/meditron-70b-medqa-lora private=true

The token comes from the environment (HF_TOKEN) or the saved login (`hf auth login`); it is never printed or
written. `dry_run=true` lists what would be uploaded, with sizes, and sends nothing. The model card's usage
example is pointed at `repo` before the upload; the Hub checks the card's metadata again on upload.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder must not shadow libraries (datasets, evaluate, ...)

from pathlib import Path  # noqa: E402

from finetune.config.cli import compose_config  # noqa: E402
from finetune.config.recipe import RecipeError  # noqa: E402
from finetune.release.hub import PublishConfig, publish  # noqa: E402


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
