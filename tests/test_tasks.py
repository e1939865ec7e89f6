"""Tasks (kind_fast.deploy.tasks): save_task / load_task on a learngene base saved once, refusal of
a foreign base, mixed batches over several tasks, and the CLI (transfer writes its task,
sample-tasks, export)."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import kind_fast as kf
from kind_fast.__main__ import main
from kind_fast.models.dit import DiT, KindConfig
from kind_fast.nn.gate import ClassGate
from kind_fast.deploy.serialization import save_kind
from kind_fast.deploy.tasks import MultiTaskDiT, base_fingerprint, load_base, load_task, save_task
from kind_fast.testing import perturbed
from kind_fast.train.models import load_weights
from kind_fast.train.sampling import cfg_model_fn, make_scheduler, run_scheduler, sample
from kind_fast.nn.utils import kind_layers

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import TINY_FLAGS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")



def base_keys_in(tensors) -> list[str]:
    """Keys that are not a task's: anything but tailors, the gate table and the dense heads."""
    def task_key(k):
        tailor = k.startswith("blocks.") and k.rsplit(".", 1)[1] in ("u_t", "sigma_t", "v_t")
        return tailor or k.startswith(("y_embedder.", "final_layer.")) or k == "kind_gate.table"

    return [k for k in tensors if not task_key(k)]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=5,
            kind=KindConfig(tailor_rank=8, active=2))
    return perturbed(m, 0.05).eval()


def transferred(base, num_classes, gate=None, seed=0):
    """A KIND transfer of ``base`` (fresh tailors, gate, label table) with 'trained' weights."""
    torch.manual_seed(seed)
    m = copy.deepcopy(base).prepare_transfer(num_classes, gate, generator=torch.Generator().manual_seed(seed))
    return perturbed(m, 0.1, trainable_only=True).eval()


@pytest.fixture(scope="module")
def three_tasks(base, tmp_path_factory):
    """Three tasks of different sizes and gate kinds, saved as task folders."""
    root = tmp_path_factory.mktemp("tasks")
    gates = [None, ClassGate.random_k(3, 8, 3, seed=1), ClassGate.dense(torch.rand(4, 8), trainable=True)]
    models, dirs = [], []
    for k, (n, g) in enumerate(zip([2, 3, 4], gates)):
        m = transferred(base, n, g, seed=k + 1)
        models.append(m)
        dirs.append(save_task(m, root / f"task{k}"))
    return models, dirs


def test_task_folder_holds_no_base_tensors(base, three_tasks):
    models, dirs = three_tasks
    tensors = load_file(str(dirs[0] / "task.safetensors"))
    assert base_keys_in(tensors) == []
    kind_biases = {f"{n}.bias" for n, _ in kind_layers(models[0])}
    assert not kind_biases & set(tensors)
    assert not [k for k in tensors if k.rsplit(".", 1)[1] in ("u_g", "sigma_g", "v_g")]
    assert base_keys_in(models[0].state_dict())  # the check can see base tensors
    assert {k.rsplit(".", 1)[-1] for k in tensors if k.startswith("blocks.")} == {"u_t", "sigma_t", "v_t"}
    assert "kind_gate.table" in tensors and "final_layer.linear.weight" in tensors
    assert tensors["y_embedder.embedding_table.weight"].shape == (3, 32)
    n_task = sum(t.numel() for t in tensors.values())
    n_all = sum(t.numel() for t in models[0].state_dict().values())
    assert n_task < 0.4 * n_all
    cfg = json.loads((dirs[0] / "task.json").read_text())
    assert cfg["base"]["fingerprint"] == base_fingerprint(base) and cfg["num_classes"] == 2


@pytest.mark.parametrize("k", [0, 1, 2])
def test_load_task_on_a_fresh_base_reproduces_the_task(base, three_tasks, k):
    models, dirs = three_tasks
    fresh = load_task(copy.deepcopy(base), dirs[k])
    assert fresh.num_classes == models[k].num_classes
    n = fresh.num_classes
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(n + 1, 2, 8, 8, generator=g), torch.randint(0, 1000, (n + 1,), generator=g)
    y = torch.arange(n + 1)  # every class and the null label
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), models[k](x, t, y), rtol=0, atol=0)


def test_load_task_refuses_another_base(base, three_tasks):
    _, dirs = three_tasks
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.blocks[1].mlp.fc2.sigma_g[0] += 1e-3  # one learngene differs
    with pytest.raises(ValueError, match="another learngene base"):
        load_task(other, dirs[0])
    bigger = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=3, num_heads=4, num_classes=5,
                 kind=KindConfig(tailor_rank=8, active=2))
    with pytest.raises(ValueError, match="trained on a DiT"):
        load_task(bigger, dirs[0])
    with pytest.raises(TypeError, match="KIND-DiT"):
        load_task(base.to_dense(), dirs[0])
    with pytest.raises(FileNotFoundError, match="not a kind_fast task folder"):
        load_task(copy.deepcopy(base), dirs[0].parent)


def test_corrupt_task_is_refused(base, three_tasks, tmp_path):
    import shutil

    _, dirs = three_tasks
    d = shutil.copytree(dirs[0], tmp_path / "t")
    data = bytearray((d / "task.safetensors").read_bytes())
    data[-10] ^= 0x01
    (d / "task.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_task(copy.deepcopy(base), d)
    cfg = json.loads((d / "task.json").read_text())
    del cfg["base"]
    (d / "task.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'base' is missing"):
        load_task(copy.deepcopy(base), d)


def test_load_base_reads_only_the_learngenes(base, three_tasks, tmp_path):
    """A base saved once (learngene part only) carries every task; no pretraining tailors needed."""
    models, dirs = three_tasks
    save_kind(base, tmp_path / "base", parts=("learngenes",))
    assert not (tmp_path / "base" / "tailors.safetensors").exists()
    b = load_base(tmp_path / "base")
    assert base_fingerprint(b) == base_fingerprint(base)
    assert all(float(m.sigma_t.detach().abs().sum()) == 0 for _, m in kind_layers(b))  # learngenes only
    load_task(b, dirs[1])
    x, t, y = torch.randn(4, 2, 8, 8), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(b(x, t, y), models[1](x, t, y), rtol=0, atol=0)


def mixed_batch(multi, n=12, seed=3):
    """Global labels of a batch mixing every task's classes and null labels, in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    tasks = torch.randint(0, len(multi.task_classes), (n,), generator=g)
    local = torch.stack([torch.randint(0, multi.task_classes[k] + 1, (1,), generator=g)[0] for k in tasks])
    return tasks, local, multi.label_offset[tasks] + local


def test_mixed_batch_equals_each_task_alone(base, three_tasks):
    models, dirs = three_tasks
    multi = MultiTaskDiT.from_tasks(base, dirs)
    assert multi.task_classes == [2, 3, 4] and multi.num_labels == 12
    assert multi.blocks[0].mlp.fc1.u_g is base.blocks[0].mlp.fc1.u_g  # learngenes shared, not copied
    assert multi.blocks[0].mlp.fc1.u_t.shape[0] == 3 * 8  # stacked tailor banks
    tasks, local, y = mixed_batch(multi)
    assert len(set(tasks.tolist())) == 3
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(len(y), 2, 8, 8, generator=g), torch.randint(0, 1000, (len(y),), generator=g)
    with torch.no_grad():
        out = multi(x, t, y)
        for k, m in enumerate(models):
            rows = tasks == k
            torch.testing.assert_close(out[rows], m(x[rows], t[rows], local[rows]), rtol=1e-5, atol=1e-5)

    # one guided sampling step: every sample uses its own task's null label
    cond = local < torch.tensor(multi.task_classes)[tasks]
    tasks, local, y = tasks[cond], local[cond], y[cond]
    step = make_scheduler("ddim", 2, clip_denoised=False)  # the fewest steps: 500 then 0
    noise = torch.randn(len(y), 2, 8, 8, generator=g)
    fn = cfg_model_fn(multi, y, 2.0, multi.null_labels(y), 2)
    got = run_scheduler(step, fn, noise, channels=2)
    for k, m in enumerate(models):
        rows = tasks == k
        ref = run_scheduler(step, cfg_model_fn(m, local[rows], 2.0, m.num_classes, 2), noise[rows], channels=2)
        torch.testing.assert_close(got[rows], ref, rtol=1e-4, atol=1e-4)


def test_sample_with_per_sample_null_labels(base, three_tasks):
    """sample(..., null_labels=) guides each sample of a mixed batch with its own task's null label."""
    from kind_fast.train.data import derived_seed

    models, dirs = three_tasks
    multi = MultiTaskDiT.from_tasks(base, dirs)
    tasks, local = torch.tensor([2, 0, 1, 2, 1]), torch.tensor([3, 1, 0, 0, 2])
    y = multi.label_offset[tasks] + local
    got = sample(multi, y, shape=(2, 8, 8), steps=2, cfg_scale=3.0, seed=11, clip_denoised=False,
                 null_labels=multi.null_labels(y))
    # sample() draws the noise of its first chunk from (seed, "sample", 0): rebuild it per task
    noise = torch.randn((5, 2, 8, 8), generator=torch.Generator().manual_seed(derived_seed(11, "sample", 0)))
    sched = make_scheduler("ddim", 2, clip_denoised=False)
    for k, m in enumerate(models):
        rows = tasks == k
        ref = run_scheduler(sched, cfg_model_fn(m, local[rows], 3.0, m.num_classes, 2), noise[rows], channels=2)
        torch.testing.assert_close(got[rows], ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="null_labels must be"):
        sample(multi, y, shape=(2, 8, 8), null_labels=multi.null_labels(y)[:2])


def test_multitask_labels_and_errors(base, three_tasks):
    _, dirs = three_tasks
    multi = MultiTaskDiT.from_tasks(base, dirs, names=["a", "b", "c"])
    assert multi.label("b", [0, 2]).tolist() == [3, 5] and multi.null_label("c") == 11
    assert multi.null_labels(torch.tensor([0, 4, 7])).tolist() == [2, 6, 11]
    with pytest.raises(ValueError, match="classes 0..1"):
        multi.label(0, [2])
    with pytest.raises(ValueError, match="no task named"):
        multi.label("z", [0])
    x, t = torch.randn(1, 2, 8, 8), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="out of range"):
        multi(x, t, torch.tensor([12]))
    # plain sample() would pair labels with null id num_labels: a clear error, not garbage
    with pytest.raises(ValueError, match="null_labels"):
        sample(multi, torch.tensor([0]), shape=(2, 8, 8), steps=2)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.x_embedder.proj.bias += 1
    with pytest.raises(ValueError, match="another learngene base"):
        MultiTaskDiT.from_tasks(other, dirs)


# =====================================================================================
# CLI: a KIND transfer run writes its task; sample-tasks; export
# =====================================================================================
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy_cli")
    pre = root / "pre"
    assert main(["pretrain", "--steps", "2", "--out", str(pre), "--no-sample", *TINY_FLAGS]) == 0
    t1, t2 = root / "t1", root / "t2"
    for out, classes, seed in ((t1, "8,9", "1"), (t2, "5,6,7", "2")):
        assert main(["transfer", "--init", str(pre), "--method", "kind", "--steps", "2", "--classes", classes,
                     "--seed", seed, "--out", str(out), "--no-sample", *TINY_FLAGS]) == 0
    return pre, t1, t2


def test_transfer_run_writes_a_task_that_reproduces_its_samples(runs):
    pre, t1, _ = runs
    task = t1 / "task"
    tensors = load_file(str(task / "task.safetensors"))
    assert base_keys_in(tensors) == []
    assert json.loads((task / "task.json").read_text())["base"]["source"] == str(pre / "ema")
    model = load_task(load_base(pre), task)
    ref = load_weights(t1 / "ema")
    kw = dict(shape=(1, 8, 8), steps=3, cfg_scale=2.0, seed=3)
    labels = torch.tensor([0, 1, 1])
    torch.testing.assert_close(sample(model, labels, **kw), sample(ref, labels, **kw), rtol=0, atol=0)


def test_sample_tasks_cli(runs, tmp_path, capsys):
    pre, t1, t2 = runs
    png = tmp_path / "mix.png"
    rc = main(["sample-tasks", "--base", str(pre), "--task", str(t1), "--task", str(t2 / "task"),
               "--n-per-class", "2", "--steps", "2", "--out", str(png), "--npz"])
    assert rc == 0, capsys.readouterr().err
    import numpy as np

    z = np.load(png.with_suffix(".npz"))
    assert z["arr_0"].shape == (10, 8, 8, 1) and z["tasks"].tolist() == [0] * 4 + [1] * 6
    assert z["labels"].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2]
    assert main(["sample-tasks", "--base", str(t1), "--task", str(pre)]) == 2
    assert "not a kind_fast task folder" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["merged", "reduced", "dense"])
def test_export_cli(runs, tmp_path, form, capsys):
    _, t1, _ = runs
    out = tmp_path / form
    args = ["export", str(t1), "--classes", "1", "--form", form, "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    e = kf.load_export(out)
    ref = load_weights(t1 / "ema").eval()
    y = torch.tensor([1] if form == "dense" else [1, 2])  # 2: the null label
    x, t = torch.randn(len(y), 1, 8, 8), torch.randint(0, 1000, (len(y),))
    with torch.no_grad():
        torch.testing.assert_close(e(x, t, y), ref(x, t, y), rtol=1e-5, atol=1e-5)
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    if form != "dense":  # kind-fast sample reads an export folder; its guided samples are the run's
        import numpy as np

        common = ["--steps", "2", "--n-per-class", "2", "--cfg-scale", "3", "--npz"]
        assert main(["sample", str(out), "--out", str(tmp_path / "e.png"), *common]) == 0
        assert main(["sample", str(t1), "--classes", "1", "--out", str(tmp_path / "k.png"), *common]) == 0
        a, b = (np.load(tmp_path / f"{n}.npz")["arr_0"].astype(int) for n in "ek")
        assert a.shape == (2, 8, 8, 1) and np.abs(a - b).max() <= 1  # uint8 rounding


def test_export_cli_from_a_base_and_task_and_errors(runs, tmp_path, capsys):
    pre, t1, _ = runs
    assert main(["export", str(pre), "--task", str(t1 / "task"), "--classes", "0,1", "--out",
                 str(tmp_path / "e")]) == 0
    assert kf.load_export(tmp_path / "e").served_labels == [0, 1, 2]
    assert main(["export", str(t1), "--classes", "7", "--out", str(tmp_path / "bad")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["export", str(t1), "--classes", "0,1", "--form", "dense", "--out", str(tmp_path / "d")]) == 2
    assert "one class" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "d").exists()


# =====================================================================================
# Issue 21: task.json bound to its tensors, known dtypes, a killed re-save
# =====================================================================================
def _edited_copy(src, dst, fn):
    import shutil

    d = shutil.copytree(src, dst)
    cfg = json.loads((d / "task.json").read_text())
    fn(cfg)
    (d / "task.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("edit", ["null", "dropout", "num_heads", "dtype"])
def test_an_edited_task_json_is_refused(base, three_tasks, tmp_path, edit):
    """The random_k gate's null mode, say, is in task.json only: editing it changed the task
    silently. Now task.safetensors records the SHA-256 of task.json's content."""
    _, dirs = three_tasks
    load_task(copy.deepcopy(base), dirs[1])
    edits = {"null": lambda c: c["gate"].update(null="all"),
             "dropout": lambda c: c.update(class_dropout_prob=0.5),
             "num_heads": lambda c: (c["base"]["arch"].update(num_heads=2)),
             "dtype": lambda c: c.update(dtype="bfloat16")}
    d = _edited_copy(dirs[1], tmp_path / "t", edits[edit])
    with pytest.raises(ValueError, match="does not describe the tensors|does not describe the weights"):
        load_task(copy.deepcopy(base), d)
    # names and where the base came from are for people: editing them is fine
    d2 = _edited_copy(dirs[1], tmp_path / "t2", lambda c: (c.update(name="renamed"),
                                                           c["base"].update(source="elsewhere")))
    load_task(copy.deepcopy(base), d2)


@pytest.mark.parametrize("bad", ["float33", "Tensor", None])
def test_an_unknown_task_dtype_is_refused_at_load(base, three_tasks, tmp_path, bad):
    _, dirs = three_tasks
    d = _edited_copy(dirs[0], tmp_path / "t", lambda c: c.update(dtype=bad))
    with pytest.raises(ValueError, match=r"dtype .* is not one kind_fast saves"):
        load_task(copy.deepcopy(base), d)


def test_a_task_whose_resave_was_killed_between_renames_says_where_it_is(base, three_tasks, tmp_path):
    import os
    import shutil

    from kind_fast.atomic import old_name

    _, dirs = three_tasks
    d = tmp_path / "task"
    shutil.copytree(dirs[0], d)
    old = old_name(d)
    os.replace(d, old)  # what a kill between atomic_directory's two renames leaves
    with pytest.raises(FileNotFoundError, match=rf"previous task survives in .*{old.name}.*mv '"):
        load_task(copy.deepcopy(base), d)
    os.replace(old, d)
    load_task(copy.deepcopy(base), d)


def test_export_cli_classes_and_sampling_a_dense_export(runs, tmp_path, capsys):
    """Item 7: --classes '' exported every class, --classes 0,0,1 printed [0, 0, 1]; and kind-fast
    sample ran CFG on a dense export (no null label)."""
    _, t1, _ = runs
    assert main(["export", str(t1), "--classes", "", "--out", str(tmp_path / "none")]) == 2
    assert "names no class" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main(["export", str(t1), "--classes", "1,1,0", "--out", str(tmp_path / "m")]) == 0
    assert "classes [1, 0] + null label 2" in capsys.readouterr().out
    assert kf.load_export(tmp_path / "m").classes == [1, 0]
    assert main(["export", str(t1), "--classes", "1", "--form", "dense", "--out", str(tmp_path / "d")]) == 0
    common = ["--steps", "2", "--n-per-class", "1", "--out", str(tmp_path / "s.png")]
    assert main(["sample", str(tmp_path / "d"), *common]) == 2
    assert "--cfg-scale 1" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "d"), "--classes", "0", "--cfg-scale", "1", *common]) == 2
    assert "serves classes [1] only" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "d"), "--cfg-scale", "1", *common]) == 0
