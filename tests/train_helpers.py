"""Shared helpers for the trainer tests (tiny models so every run takes a second or two)."""

from __future__ import annotations

import copy
import importlib.machinery
import types

from kind_fast.train.config import RunConfig

TINY_MODEL = {"hidden_size": 32, "depth": 2, "num_heads": 2, "tailor_rank": 8, "active": 2}


def tiny_config(out, mode: str = "pretrain", **overrides) -> RunConfig:
    d = {
        "mode": mode, "out": str(out), "steps": 6, "batch_size": 16, "progress": False,
        "tensorboard": "off", "log_every": 2,
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "model": dict(TINY_MODEL),
        "eval": {"sample_steps": 4, "n_per_class": 2},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **copy.deepcopy(v)}
        else:
            d[k] = v
    return RunConfig.from_dict(d)


TINY_FLAGS = [f"--set=model.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "--batch-size", "16", "--lr", "1e-3", "--no-progress", "--tensorboard", "off", "--log-every", "1",
]


class FakeWandb(types.ModuleType):
    """Records what the trainer sends to W&B."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe find_spec("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        fake = self

        class Run:
            def log(self, values, step=None):
                fake.logged.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        self._run = Run
        self.Image = lambda arr: ("image", tuple(arr.shape))

    def init(self, **kw):
        self.inits.append(kw)
        return self._run()
