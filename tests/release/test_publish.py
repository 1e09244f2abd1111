"""Publishing an export: the dry run lists what would go up, the token never shows, bad inputs fail in one line.
The Hub is out of reach here, so a real upload is pointed at a closed local port and must fail cleanly."""

import subprocess
import sys
from pathlib import Path

import pytest
from export_fixtures import make_base, make_run

from finetune.config.cli import compose_config
from finetune.release.exporter import ExportConfig, export

REPO = Path(__file__).resolve().parents[2]
PUBLISH = str(REPO / "finetune" / "publish.py")
FAKE_TOKEN = "hf_FAKEtokenThatMustNeverBeShown0123456789"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    run = make_run(root / "run", make_base(root / "base"))
    cfg = compose_config(ExportConfig, [f"run={run}", f"output_dir={root / 'smoke-adapter'}", "export.kind=adapter"])
    return export(cfg)


def publish(*args: str, token: str | None = FAKE_TOKEN, home: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(home),  # no saved login but what the test gives
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, PUBLISH, *args], capture_output=True, text=True, env=env)


def files_containing(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_dry_run_lists_files_and_never_shows_the_token(exported, tmp_path):
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    result = publish(f"path={exported}", "repo=me/smoke-lora", "dry_run=true", home=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"dry run: would upload {len(before)} files (")
    assert lines[0].endswith(") to http://127.0.0.1:9/me/smoke-lora")
    listed = {line.split()[0]: line.split(maxsplit=1)[1].strip() for line in lines[1:-1]}
    assert set(listed) == set(before) >= {"README.md", "adapter_model.safetensors", "adapter_config.json"}
    size = (exported / "adapter_model.safetensors").stat().st_size
    assert listed["adapter_model.safetensors"] == (f"{size / 1e3:.1f} kB" if size < 1e6 else f"{size / 1e6:.1f} MB")
    assert lines[-1] == "token: found (HF_TOKEN or saved login)"
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before  # a dry run changes nothing
    assert not files_containing(tmp_path, FAKE_TOKEN) and not files_containing(exported, FAKE_TOKEN)


def test_dry_run_without_a_token_says_how_to_get_one(exported, tmp_path):
    result = publish(f"path={exported}", "repo=me/smoke-lora", "dry_run=true", token=None, home=tmp_path)
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == "token: none: set HF_TOKEN or run `hf auth login` before publishing"
    result = publish(f"path={exported}", "repo=me/smoke-lora", token=None, home=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == \
        "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`, then publish again"


def test_failed_upload_is_one_line_without_the_token(exported, tmp_path):
    result = publish(f"path={exported}", "repo=me/smoke-lora", "private=true", home=tmp_path)
    assert result.returncode == 2
    error = result.stderr.strip()
    assert "\n" not in error and error.startswith("error: upload to me/smoke-lora failed (")
    assert error.endswith("check the network, the token's write access and the repo name")
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert not files_containing(tmp_path, FAKE_TOKEN) and not files_containing(exported, FAKE_TOKEN)
    # the card's usage example now names the repo it was published to
    assert "PeftModel.from_pretrained(base, 'me/smoke-lora')" in (exported / "README.md").read_text()
