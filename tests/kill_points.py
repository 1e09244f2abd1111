"""Deterministic kill points for the fault tests: each function runs in a child process (a forkserver child, so
torch and transformers are imported once for all of them) and dies by SIGKILL at a named point -- the product
code has no test hook; the points are the libraries' own calls, wrapped here."""

import os
import signal
import time

from transformers import Trainer, TrainerCallback, TrainerState
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from finetune.config.files import hold_lock
from finetune.config.recipe import compose_recipe
from finetune.models.cache import cached_dir
from finetune.training import sft


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class AtStepEnd(TrainerCallback):
    """At the end of optimiser step `step`, before that step's checkpoint: run `action`."""

    def __init__(self, step: int, action):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.action()


def _die_in_checkpoint_save(step: int) -> None:
    """SIGKILL after checkpoint-`step`'s adapter weights are written, before its optimizer state and
    trainer_state.json are."""
    save = Trainer._save_optimizer_and_scheduler

    def dying(self, output_dir):
        if self.state.global_step == step:
            die()
        save(self, output_dir)

    Trainer._save_optimizer_and_scheduler = dying


def _die_writing_trainer_state(step: int) -> None:
    """SIGKILL half way through writing checkpoint-`step`'s trainer_state.json, the file the Trainer writes last."""
    save = TrainerState.save_to_json

    def dying(self, json_path):
        if self.global_step == step:
            save(self, json_path)
            with open(json_path, "r+") as f:
                f.truncate(len(f.read()) // 2)
            die()
        save(self, json_path)

    TrainerState.save_to_json = dying


def _die_saving_final_adapter() -> None:
    """SIGKILL while the final adapter is written (its weights are in the staging folder, its tokenizer not)."""
    save = PreTrainedTokenizerBase.save_pretrained

    def dying(self, save_directory, *args, **kwargs):
        if str(save_directory).endswith(".adapter.tmp"):
            die()
        return save(self, save_directory, *args, **kwargs)

    PreTrainedTokenizerBase.save_pretrained = dying


def train_and_die(kill_point: str, overrides: list[str], ready=None) -> None:
    """The smoke recipe with `overrides`, killed at `kill_point`: step-N (end of step N, before its checkpoint),
    checkpoint-N (inside checkpoint-N's save), trainer-state-N (half of checkpoint-N's trainer_state.json
    written), final-adapter (inside the final adapter's save), or hold-at-step-N (set `ready`, then wait at the
    end of step N for the parent to kill it)."""
    callbacks = []
    name, _, step = kill_point.rpartition("-")
    if name == "step":
        callbacks.append(AtStepEnd(int(step), die))
    elif name == "hold-at-step":
        callbacks.append(AtStepEnd(int(step), lambda: (ready.set(), time.sleep(600))))
    elif name == "checkpoint":
        _die_in_checkpoint_save(int(step))
    elif name == "trainer-state":
        _die_writing_trainer_state(int(step))
    elif kill_point == "final-adapter":
        _die_saving_final_adapter()
    else:
        raise ValueError(f"unknown kill point {kill_point!r}")
    sft.train(compose_recipe("smoke", overrides), callbacks=callbacks)
    raise AssertionError(f"the run finished without reaching {kill_point}")


def build_and_die(cache: str, settings: dict) -> None:
    """An artifact-cache build that has written part of its entry when it is killed."""
    os.environ["MEDITRON_FINETUNE_CACHE"] = cache

    def build(path):
        path.mkdir()
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"half")
        die()

    cached_dir("killed-build", settings, build)


def hold_and_wait(path: str, ready) -> None:
    """Hold the lock at `path`, then wait to be killed."""
    with hold_lock(path):
        ready.set()
        time.sleep(600)
