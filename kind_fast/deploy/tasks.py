"""Tasks on a shared learngene base, alone or many in one batch (docs/design.md §7).

A KIND transfer trains only a small part of a DiT: the tailors of every KIND layer, the gate
(when it is trainable), the label table and the final layer (``DiT.set_mode("transfer")``).
Everything else, the **base** (learngenes and biases of the KIND layers, patch and timestep
embedders, position table, the blocks' adaLN), is the pretrained model's, frozen.

``save_task(model, dir)`` writes that trained part as a small folder::

    task.json            task name, classes, gate config, the base it belongs to (a SHA-256
                         fingerprint of the base tensors, its architecture and KIND config),
                         dtype, and the SHA-256 of task.safetensors
    task.safetensors     tailors, gate table, label table, final layer; no base tensor. Its
                         metadata records the SHA-256 of task.json's content (``CONFIG_IGNORED``
                         and ``base.source`` aside), so an edited task.json is refused

Tasks of format version 1 (before that binding) load without the second check. The folder is
written as a whole (``kind_fast.atomic.atomic_directory``).

``load_base(path)`` rebuilds the base once from a pretrain run (only its learngene file is
read; the pretraining tailors are never needed), ``load_task(base, dir)`` puts a task on it
and refuses a task trained on another base. ``MultiTaskDiT.from_tasks(base, dirs)`` serves
several tasks at once: the tailor banks are stacked (task k's tailor j is row
offset_k + j), one combined gate routes every sample to its own task's tailors by its global
label (task k, class c) → ``label_offset[k] + c``, so each KIND layer is still one
``kind_linear`` call per batch; the label tables are concatenated and the per-task final
layers are applied per sample.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kind_fast._version import __version__
from kind_fast.nn.gate import ClassGate
from kind_fast.nn.layers import TAILOR_PARAMS

__all__ = ["save_task", "load_task", "load_base", "read_task", "base_fingerprint", "task_state_dict",
           "MultiTaskDiT", "TaskHeads"]

FORMAT = "kind_fast.task"
FORMAT_VERSION = 2  # 2: task.json is bound to task.safetensors (see the module docstring)
CONFIG_FILE = "task.json"
WEIGHTS_FILE = "task.safetensors"
# task.json keys outside the digest bound to the weights (names and records for people and files)
CONFIG_IGNORED = ("files", "name", "kind_fast_version", "torch_version")
DIGEST_KEY = "config_sha256"
HEAD_PREFIXES = ("y_embedder.", "final_layer.")  # the dense heads a transfer trains
GATE_PREFIX = "kind_gate."


def _check_kind_dit(model, what: str):
    from kind_fast.models.dit import DiT

    if not isinstance(model, DiT) or model.kind is None:
        raise TypeError(f"{what} needs a KIND-DiT (kind_fast.models.dit.DiT with kind set), got {type(model).__name__}"
                        + (" with kind=None" if isinstance(model, DiT) else ""))


def _tailor_keys(model) -> set[str]:
    from kind_fast.nn.utils import kind_layers

    return {f"{n}.{p}" for n, _ in kind_layers(model) for p in TAILOR_PARAMS}


def task_state_dict(model) -> dict[str, Tensor]:
    """What a transfer trained: tailors, gate table, label table, final layer (CPU tensors)."""
    _check_kind_dit(model, "task_state_dict")
    tailors = _tailor_keys(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.startswith(HEAD_PREFIXES) or k == GATE_PREFIX + "table" or k in tailors}


def _base_items(model):
    tailors = _tailor_keys(model)
    for k, v in sorted(model.state_dict().items()):
        if not (k.startswith(HEAD_PREFIXES) or k.startswith(GATE_PREFIX) or k in tailors):
            yield k, v


def base_fingerprint(model) -> str:
    """SHA-256 over the base tensors (name, dtype, shape, bytes) of a KIND-DiT: the tensors a
    task does not own. Equal for the pretrained model, its transfers (learngenes frozen) and
    ``load_base`` of it; load the base in the dtype it was saved in before comparing."""
    _check_kind_dit(model, "base_fingerprint")
    h = hashlib.sha256()
    for k, v in _base_items(model):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, not copied
    return h.hexdigest()


def _arch_without_classes(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if k != "num_classes"}


# =====================================================================================
# One task
# =====================================================================================
def save_task(model, directory: str | os.PathLike, *, name: str | None = None, overwrite: bool = False,
              base_source: str | None = None) -> Path:
    """Write the trained part of a transferred KIND-DiT as a task folder (atomically).

    ``name`` defaults to the folder's name; ``base_source`` (e.g. the pretrain run folder) is
    recorded for people, the fingerprint is what ``load_task`` checks.
    """
    from safetensors.torch import save

    from kind_fast.atomic import atomic_directory
    from kind_fast.models.dit import kind_config_dict
    from kind_fast.deploy.serialization import file_record

    _check_kind_dit(model, "save_task")
    d = Path(directory)
    tensors = task_state_dict(model)
    cfg = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name or d.name,
        "num_classes": model.num_classes, "gate": model.kind_gate.to_config(),
        "class_dropout_prob": model.y_embedder.dropout_prob,
        "base": {"fingerprint": base_fingerprint(model), "arch": _arch_without_classes(model.arch),
                 "kind": kind_config_dict(model.kind), "source": base_source},
        "dtype": str(model.pos_embed.dtype).removeprefix("torch."),
        "kind_fast_version": __version__, "torch_version": torch.__version__,
    }
    data = save(tensors, metadata={"format": FORMAT, DIGEST_KEY: _task_digest(cfg)})
    cfg["files"] = {WEIGHTS_FILE: file_record(data)}  # checked by read_task
    with atomic_directory(d, overwrite=overwrite) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(data)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return d


def _task_digest(cfg: dict) -> str:
    from kind_fast.deploy.serialization import config_digest

    base = cfg.get("base")
    if isinstance(base, dict):  # where the base came from is for people; its fingerprint is checked
        cfg = dict(cfg, base={k: v for k, v in base.items() if k != "source"})
    return config_digest(cfg, CONFIG_IGNORED)


def read_task(directory: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(config, tensors) of a task folder, checked for format, integrity, completeness, a known
    dtype, and (format version 2) that task.json is the config the tensors were saved with."""
    from safetensors.torch import load

    from kind_fast.atomic import refuse_missing_folder
    from kind_fast.deploy.serialization import (
        check_config_digest,
        config_dtype,
        read_folder_config,
        read_recorded_file,
        safetensors_metadata,
    )

    d = Path(directory)
    path = d / CONFIG_FILE
    refuse_missing_folder(d, "task", "rerun the transfer with --resume auto to write it again")
    cfg = read_folder_config(d, CONFIG_FILE, fmt=FORMAT, max_version=FORMAT_VERSION, what="task",
                             whole="the task folder", hint=" (a KIND transfer run writes one to <out>/task)")
    for key, kind in (("files", dict), ("base", dict), ("gate", dict), ("num_classes", int)):
        if not isinstance(cfg.get(key), kind):
            raise ValueError(f"{path}: {key!r} is missing or malformed; the task folder is corrupt")
    dtype = config_dtype(cfg.get("dtype", "float32"), path)
    data = read_recorded_file(d, WEIGHTS_FILE, cfg, CONFIG_FILE)
    if cfg["format_version"] >= 2:
        check_config_digest(safetensors_metadata(data).get(DIGEST_KEY), cfg, (), path, d / WEIGHTS_FILE,
                            "save the task again", digest=_task_digest(cfg))
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise ValueError(f"{d / WEIGHTS_FILE} could not be read ({type(e).__name__}: {e}); the task is corrupt") from e
    found = sorted({str(v.dtype).removeprefix("torch.") for k, v in tensors.items()
                    if v.is_floating_point() and k != GATE_PREFIX + "table"})
    if found and found != [str(dtype).removeprefix("torch.")]:
        raise ValueError(f"{path} says dtype {str(dtype).removeprefix('torch.')}, the tensors in {d / WEIGHTS_FILE} "
                         f"are {', '.join(found)}; the task folder is corrupt")
    return cfg, tensors


def _check_base(model, cfg: dict, directory, fingerprint: str | None = None) -> None:
    """Refuse a task whose base is not ``model``'s (architecture, KIND layout, tensors)."""
    from kind_fast.models.dit import kind_config_dict

    base = cfg["base"]
    name = cfg.get("name", Path(directory).name)
    if _arch_without_classes(model.arch) != base["arch"]:
        raise ValueError(f"task {name!r} ({directory}) was trained on a DiT with {base['arch']}, "
                         f"not this model's {_arch_without_classes(model.arch)}")
    mine = kind_config_dict(model.kind)
    for key in ("tailor_rank", "learngene_rank", "qkv"):
        if mine.get(key) != base["kind"].get(key):
            raise ValueError(f"task {name!r} ({directory}) has KIND {key}={base['kind'].get(key)!r}, "
                             f"this base has {mine.get(key)!r}")
    fp = fingerprint or base_fingerprint(model)
    if fp != base["fingerprint"]:
        src = f" (trained from {base['source']})" if base.get("source") else ""
        raise ValueError(
            f"task {name!r} ({directory}) belongs to another learngene base{src}: its base fingerprint is "
            f"{base['fingerprint'][:16]}…, this model's is {fp[:16]}…. Load the base the task was transferred "
            f"from (kind_fast.load_base(<pretrain run>)), in the dtype it was saved in")


def _task_gate(cfg: dict, tensors: dict[str, Tensor], directory) -> ClassGate:
    table = tensors.get(GATE_PREFIX + "table")
    if table is None:
        raise ValueError(f"{directory}: the task has no gate table")
    return ClassGate.from_config(cfg["gate"], table)


@torch.no_grad()
def load_task(model, directory: str | os.PathLike, *, fingerprint: str | None = None):
    """Put the task saved in ``directory`` on ``model`` (a KIND-DiT holding the task's base):
    its classes, gate, tailors, label table and final layer replace the model's. Refuses a
    task trained on another base. Returns ``model``.

    ``fingerprint``: the model's ``base_fingerprint`` if already known (skips rehashing).
    """
    from kind_fast.models.dit import LabelEmbedder
    from kind_fast.deploy.serialization import _copy_into

    _check_kind_dit(model, "load_task")
    cfg, tensors = read_task(directory)
    _check_base(model, cfg, directory, fingerprint)
    gate = _task_gate(cfg, tensors, directory)
    n = int(cfg["num_classes"])
    if gate.num_classes != n:
        raise ValueError(f"{directory}: gate has {gate.num_classes} classes, task.json says {n}")
    old = model.y_embedder.embedding_table.weight
    y = LabelEmbedder(n, old.shape[1], cfg.get("class_dropout_prob", model.y_embedder.dropout_prob))
    y.train(model.y_embedder.training)  # label dropout only where the model trains
    model.y_embedder = y.to(device=old.device, dtype=old.dtype).requires_grad_(old.requires_grad)
    model.num_classes = model.arch["num_classes"] = n
    model.set_gate(gate)
    expected = set(task_state_dict(model))
    rest = {k: v for k, v in tensors.items() if k != GATE_PREFIX + "table"}
    if set(rest) | {GATE_PREFIX + "table"} != expected:
        missing = sorted(expected - set(rest) - {GATE_PREFIX + "table"})
        extra = sorted(set(rest) - expected)
        raise ValueError(f"{directory}: task tensors do not fit the model (missing {missing[:5]}, "
                         f"unexpected {extra[:5]})")
    _copy_into(model, rest, what=f"load_task({directory})")
    return model


def _resolve_base_dir(path: str | os.PathLike, which: str = "ema") -> Path:
    p = Path(path)
    for cand in (p, p / which):
        if (cand / "kind_config.json").is_file():
            return cand
    if not p.exists():
        raise FileNotFoundError(f"base {p} does not exist")
    raise FileNotFoundError(f"base {p}: neither it nor {p / which} holds a KIND save (kind_config.json); "
                            "point at a pretrain run folder or a save_kind/save_pretrained folder")


@torch.no_grad()
def load_base(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, which: str = "ema"):
    """The learngene base of a KIND-DiT: a run folder (its ``ema/`` or ``--which model``), or
    a folder written by ``save_pretrained`` / ``save_kind(parts=("learngenes",))``.

    Only the learngene part is read. The result has zero tailors and a zero label table (it is
    the learngene-only model) until ``load_task`` puts a task on it.
    """
    from kind_fast.models.dit import DiT, KindConfig
    from kind_fast.deploy.serialization import _read_config, _read_part, load_learngenes

    d = _resolve_base_dir(path, which)
    cfg = _read_config(d)
    mcfg = cfg.get("model") or {}
    if mcfg.get("class") != "kind_fast.dit.DiT" or not mcfg.get("kind"):
        raise ValueError(f"{d} does not hold a KIND-DiT (kind_fast.models.dit.DiT with kind set)")
    with torch.device("meta"):
        model = DiT(**mcfg["arch"], kind=KindConfig(**mcfg["kind"]))
    model.to_empty(device=map_location)
    model.kind_gate.reset_parameters()
    learn = set(_read_part(d, cfg, "learngenes"))
    uncovered = [k for k, _ in _base_items(model) if k not in learn]
    if uncovered:
        raise ValueError(f"{d}: the learngene part does not cover {uncovered[:5]}; it is incomplete")
    load_learngenes(model, d)
    tailors = _tailor_keys(model)
    state = model.state_dict()
    for k in tailors:
        state[k].zero_()
    model.y_embedder.embedding_table.weight.zero_()
    for k, v in state.items():
        if k.startswith("final_layer.") and k not in learn:
            v.zero_()
    return model.eval()


# =====================================================================================
# Many tasks in one batch
# =====================================================================================
class TaskHeads(nn.Module):
    """Per-task final layers (adaLN shift/scale + linear), applied per sample by task id.

    Every task's head runs as one GEMM over the stacked weights and each sample keeps its own
    task's columns: no host sync, and the heads are small next to the blocks (2d·d per
    sample and p²·C_out·d per token for each task).
    """

    def __init__(self, finals: Sequence[nn.Module]):
        super().__init__()
        self.num_tasks = len(finals)
        self.hidden = finals[0].linear.in_features
        self.out_features = finals[0].linear.out_features
        cat = torch.cat
        self.ada_weight = nn.Parameter(cat([f.adaLN_modulation[-1].weight.detach() for f in finals]), False)
        self.ada_bias = nn.Parameter(cat([f.adaLN_modulation[-1].bias.detach() for f in finals]), False)
        self.weight = nn.Parameter(cat([f.linear.weight.detach() for f in finals]), False)
        self.bias = nn.Parameter(cat([f.linear.bias.detach() for f in finals]), False)

    def forward(self, x: Tensor, c: Tensor, task: Tensor) -> Tensor:
        n, t, d = x.shape
        k = self.num_tasks
        ada = F.linear(F.silu(c), self.ada_weight, self.ada_bias).view(n, k, 2 * d)
        ada = ada.gather(1, task.view(n, 1, 1).expand(n, 1, 2 * d)).squeeze(1)
        shift, scale = ada.chunk(2, dim=1)
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        o = self.out_features
        y = F.linear(h, self.weight, self.bias).view(n, t, k, o)
        return y.gather(2, task.view(n, 1, 1, 1).expand(n, t, 1, o)).squeeze(2)


class MultiTaskDiT(nn.Module):
    """Several tasks on one learngene base, mixed freely within a batch.

    Labels are global: ``label(task, c)`` = ``label_offset[task] + c`` for class c of a task,
    ``null_label(task)`` its null (CFG) label. ``forward(x, t, y)`` with global labels;
    guided sampling needs each sample's own null label (``null_labels(y)``), which
    ``kind_fast.train.sampling.sample(..., null_labels=...)`` and ``kind-fast sample-tasks`` pass.

    Build with ``from_tasks``; the base's learngenes, embedders and adaLN weights are shared
    with ``base`` (not copied). Inference only.
    """

    def __init__(self, base, tasks: Sequence[tuple[str, dict, dict[str, Tensor]]]):
        super().__init__()
        from kind_fast.nn.utils import kind_layers

        _check_kind_dit(base, "MultiTaskDiT")
        if not tasks:
            raise ValueError("MultiTaskDiT needs at least one task")
        names = [str(name) for name, _, _ in tasks]
        self.task_names = [n if names.count(n) == 1 else f"{n}-{k}" for k, n in enumerate(names)]  # unique
        self.task_classes = [int(cfg["num_classes"]) for _, cfg, _ in tasks]
        self.arch = dict(base.arch)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.patch_size = base.patch_size
        gates = [_task_gate(cfg, tensors, name) for name, cfg, tensors in tasks]
        offsets = [0]
        for c in self.task_classes:
            offsets.append(offsets[-1] + c + 1)  # each task: its classes, then its null label
        self.num_labels = offsets[-1]
        self._offsets = offsets  # host copy: label() never syncs
        self.num_classes = self.num_labels  # label ids are [0, num_labels): what sample() checks
        dev = base.pos_embed.device
        self.register_buffer("label_offset", torch.tensor(offsets, device=dev), persistent=False)
        task_of = torch.cat([torch.full((c + 1,), k) for k, c in enumerate(self.task_classes)])
        null_of = torch.cat([torch.full((c + 1,), offsets[k] + c) for k, c in enumerate(self.task_classes)])
        self.register_buffer("task_of_label", task_of.to(dev), persistent=False)
        self.register_buffer("null_of_label", null_of.to(dev), persistent=False)

        # the combined gate: task k's rows and columns at its label and tailor offsets
        n_t = [g.tailor_rank for g in gates]
        t_off = [sum(n_t[:k]) for k in range(len(n_t))]
        table = torch.zeros(self.num_labels + 1, sum(n_t))  # last row: ClassGate's null, never used
        support = torch.zeros_like(table, dtype=torch.bool)
        for k, g in enumerate(gates):
            rows = slice(offsets[k], offsets[k + 1])
            cols = slice(t_off[k], t_off[k] + n_t[k])
            table[rows, cols] = g.table.detach()
            support[rows, cols] = g.support_mask() > 0
        self.kind_gate = ClassGate(table, support=support, kind="dense", null="table",
                                   config={"tasks": self.task_names}).to(base.pos_embed.device)

        # shared base modules; blocks copied with every base tensor shared, tailors stacked
        self.x_embedder, self.t_embedder = base.x_embedder, base.t_embedder
        self.register_buffer("pos_embed", base.pos_embed, persistent=False)
        memo = {id(base.kind_gate): base.kind_gate}
        tailor_ids = {id(getattr(m, p)) for _, m in kind_layers(base) for p in TAILOR_PARAMS}
        for t in list(base.blocks.parameters()) + list(base.blocks.buffers()):
            if id(t) not in tailor_ids:
                memo[id(t)] = t
        for _, m in kind_layers(base):
            if m._wg_cache is not None:
                memo[id(m._wg_cache[1])] = m._wg_cache[1]
        self.blocks = copy.deepcopy(base.blocks, memo)
        with torch.no_grad():
            for name, layer in kind_layers(self.blocks):
                full = f"blocks.{name}"
                for p in TAILOR_PARAMS:
                    ref = getattr(layer, p)
                    stacked = torch.cat([tensors[f"{full}.{p}"] for _, _, tensors in tasks])
                    setattr(layer, p, nn.Parameter(stacked.to(device=dev, dtype=ref.dtype), requires_grad=False))
                layer.tailor_rank = sum(n_t)
                layer.set_gate(self.kind_gate)

        tables = [tensors["y_embedder.embedding_table.weight"] for _, _, tensors in tasks]
        ref = base.y_embedder.embedding_table.weight
        self.label_table = nn.Embedding.from_pretrained(torch.cat(tables).to(device=dev, dtype=ref.dtype))
        finals = []
        for _, _, tensors in tasks:
            f = copy.deepcopy(base.final_layer)
            f.load_state_dict({k.removeprefix("final_layer."): v for k, v in tensors.items()
                               if k.startswith("final_layer.")})
            finals.append(f)
        self.heads = TaskHeads(finals)
        self.eval().requires_grad_(False)

    @classmethod
    def from_tasks(cls, base, tasks: Sequence[str | os.PathLike], names: Sequence[str] | None = None):
        """Load every task folder in ``tasks`` onto ``base`` (each must belong to it)."""
        _check_kind_dit(base, "MultiTaskDiT.from_tasks")
        if names is not None and len(names) != len(tasks):
            raise ValueError(f"{len(names)} names for {len(tasks)} tasks")
        fp = base_fingerprint(base)
        loaded = []
        for i, d in enumerate(tasks):
            cfg, tensors = read_task(d)
            _check_base(base, cfg, d, fp)
            loaded.append((names[i] if names else cfg.get("name", Path(d).name), cfg, tensors))
        return cls(base, loaded)

    # ------------------------------------------------------------------ labels
    def _task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.task_names:
                raise ValueError(f"no task named {task!r}; tasks: {self.task_names}")
            return self.task_names.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self.task_names):
            raise ValueError(f"task must be a name or an index in [0, {len(self.task_names) - 1}], got {task!r}")
        return task

    def label(self, task: int | str, classes) -> Tensor:
        """Global labels of class id(s) ``classes`` of ``task`` (a name or an index)."""
        k = self._task_index(task)
        c = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        n = self.task_classes[k]
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= n):
            raise ValueError(f"task {self.task_names[k]!r} has classes 0..{n - 1}, got {c.tolist()}")
        return c + self._offsets[k]

    def null_label(self, task: int | str) -> int:
        k = self._task_index(task)
        return self._offsets[k] + self.task_classes[k]

    def null_labels(self, y: Tensor) -> Tensor:
        """Each sample's own task's null label (for classifier-free guidance)."""
        return self.null_of_label.to(y.device)[self._check_labels(y)]

    def _check_labels(self, y: Tensor) -> Tensor:
        if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"y must be a 1-D int64/int32 tensor of global labels, got {y!r:.80}")
        if y.numel():
            if y.device.type == "cpu":
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= self.num_labels:
                    raise ValueError(
                        f"labels out of range: got [{lo}, {hi}], expected global labels in [0, {self.num_labels - 1}] "
                        "(MultiTaskDiT.label(task, class) / null_label(task); guided sampling needs each "
                        "sample's own null label: sample(..., null_labels=model.null_labels(y)))")
            elif not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                torch._assert_async(((y >= 0) & (y < self.num_labels)).all(), "global labels out of range")
        return y.long()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        y = self._check_labels(y)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
        task = self.task_of_label.to(y.device)[y]
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.label_table(y)
        for block in self.blocks:
            x = block(x, c, y)  # labels passed explicitly: nothing is left on the gate
        from kind_fast.models.dit import DiT

        return DiT.unpatchify(self, self.heads(x, c, task))

    def extra_repr(self) -> str:
        return f"tasks={dict(zip(self.task_names, self.task_classes))}"
