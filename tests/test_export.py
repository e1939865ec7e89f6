"""CFG-exact exports (kind_fast.models.export): merged and reduced forms reproduce the KIND model on
every served label and on the null label, guided samples match, save/load round trips,
the facebookresearch-layout dense .pt, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import kind_fast as kf
from kind_fast.atomic import atomic_directory
from kind_fast.models.dit import DiT, KindConfig
from kind_fast.models.export import ExportedDiT, SegmentPlan, segmented_linear
from kind_fast.nn.gate import ClassGate
from kind_fast.testing import perturbed
from kind_fast.train.sampling import sample

pytestmark = pytest.mark.usefixtures("one_thread")


def kind_model(qkv="split", gate=None, null="off", seed=0):
    torch.manual_seed(seed)
    m = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=5,
            kind=KindConfig(tailor_rank=8, active=2, qkv=qkv, null=null, gate="block"), gate=gate)
    return perturbed(m).eval()


GATES = {
    "block": lambda: None,
    "random_k_null_all": lambda: ClassGate.random_k(5, 8, 3, seed=3, null="all"),
    "dense_trainable": lambda: ClassGate.dense(torch.rand(5, 8), null_row=torch.rand(8) * (torch.rand(8) > 0.5),
                                               trainable=True),
}


def inputs(y, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    return torch.randn(n, 2, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.tensor(y)


@pytest.mark.parametrize("form", ["merged", "reduced"])
@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("qkv", ["split", "fused"])
def test_export_reproduces_served_labels_and_null(form, gate, qkv):
    m = kind_model(qkv, GATES[gate]())
    e = m.export([3, 1], form)
    assert isinstance(e, ExportedDiT) and e.served_labels == [3, 1, 5]
    assert not any(isinstance(x, (kf.FastKindLinear, ClassGate)) for x in e.modules())
    x, t, y = inputs([5, 1, 3, 3, 5, 1, 1])  # unsorted: the merged form regroups the rows
    with torch.no_grad():
        torch.testing.assert_close(e(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e.forward_with_cfg(x[:6], t[:6], torch.tensor([3, 1, 1, 5, 5, 5]), 2.0),
                                   m.forward_with_cfg(x[:6], t[:6], torch.tensor([3, 1, 1, 5, 5, 5]), 2.0),
                                   rtol=1e-5, atol=1e-5)


def test_to_dense_is_not_cfg_exact_but_export_is():
    """Why the export exists: to_dense(c) runs the null label through class c's weights."""
    m = kind_model()
    x, t, y = inputs([5, 5])
    with torch.no_grad():
        ref = m(x, t, y)
        wrong = (m.to_dense(1)(x, t, y) - ref).abs().max()
        right = (m.export([1])(x, t, y) - ref).abs().max()
    assert wrong > 1e-3 and right < 1e-5


@pytest.mark.parametrize("form", ["merged", "reduced"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guided_sampling_matches_the_kind_model(form, sampler):
    m = kind_model()
    e = m.export([0, 2], form)
    labels = torch.tensor([0, 2, 2, 0])
    kw = dict(shape=(2, 8, 8), sampler=sampler, steps=4, cfg_scale=2.5, seed=7, clip_denoised=False)
    ref, got = sample(m, labels, **kw), sample(e, labels, **kw)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_reduced_keeps_only_the_tailors_its_labels_use():
    m = kind_model()  # block gate: 8 tailors, 2 per class, blocks of class c: c mod 4; null: none
    e = m.export([1, 3], "reduced")
    fc1 = e.blocks[0].mlp.fc1
    assert fc1.u_t.shape == (4, 128) and fc1.v_t.shape == (4, 32) and fc1.sigma_t.shape == (4,)
    src = m.blocks[0].mlp.fc1
    torch.testing.assert_close(fc1.u_t, src.u_t[[2, 3, 6, 7]])
    assert e.gate_val[2].abs().sum() == 0  # the null row switches nothing on
    merged = m.export([1, 3], "merged")
    n_red = sum(p.numel() for p in e.parameters())
    n_merged = sum(p.numel() for p in merged.parameters())
    assert n_red < n_merged


def test_unserved_labels_and_bad_arguments_give_clear_errors():
    m = kind_model()
    e = m.export([1, 3], "merged")
    x, t, _ = inputs([0, 0])
    with pytest.raises(ValueError, match=r"does not serve label\(s\) \[0, 4\].*serves classes \[1, 3\]"):
        e(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="does not serve"):
        e(x, t, torch.tensor([1, 6]))  # beyond the null label
    with pytest.raises(TypeError, match="integer"):
        e(x, t, torch.tensor([1.0, 3.0]))
    no_cfg = m.export([1], "reduced", guidance=False)
    with pytest.raises(ValueError, match="without guidance"):
        no_cfg(x, t, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="without guidance"):
        no_cfg.forward_with_cfg(x, t, torch.tensor([1, 5]), 1.5)
    with pytest.raises(ValueError, match="out of range"):
        m.export([5], "merged")
    with pytest.raises(TypeError, match="ints"):
        m.export(["1"], "merged")
    with pytest.raises(ValueError, match="form must be"):
        m.export([1], "sparse")
    with pytest.raises(ValueError, match="one class without guidance"):
        m.export([1], "dense")
    with pytest.raises(TypeError, match="KIND-DiT"):
        m.to_dense(1).export([1])


def test_label_cache_follows_in_place_changes():
    """The label→slot plan is cached per labels tensor; an in-place change must not reuse it."""
    m = kind_model()
    e = m.export([1, 3], "merged")
    x, t, y = inputs([1, 3])
    with torch.no_grad():
        e(x, t, y)
        y[0] = 3
        torch.testing.assert_close(e(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)
        y[1] = 2
        with pytest.raises(ValueError, match="does not serve"):
            e(x, t, y)


def test_segmented_linear_matches_per_row_weights():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 5, 4, generator=g), torch.randn(5, generator=g)
    x = torch.randn(6, 2, 4, generator=g)
    for slots in ([2, 0, 1, 0, 2, 2], [0, 0, 1, 1, 2, 2], [1] * 6):
        ref = torch.stack([x[n] @ w[s].t() + b for n, s in enumerate(slots)])
        plan = SegmentPlan.from_slots(slots, x.device)
        assert (plan.perm is None) == (slots == sorted(slots))
        torch.testing.assert_close(segmented_linear(x, w, b, torch.tensor(slots), plan), ref)
    empty = segmented_linear(x[:0], w, b, torch.zeros(0, dtype=torch.long), SegmentPlan.from_slots([], x.device))
    assert empty.shape == (0, 2, 5)


@pytest.mark.parametrize("form", ["merged", "reduced"])
def test_save_load_round_trip(tmp_path, form):
    m = kind_model(qkv="fused" if form == "reduced" else "split")
    e = m.export([4, 0], form)
    d = kf.save_export(e, tmp_path / "exp")
    assert sorted(p.name for p in d.iterdir()) == ["export_config.json", "model.safetensors"]
    cfg = json.loads((d / "export_config.json").read_text())
    assert cfg["form"] == form and cfg["classes"] == [4, 0] and cfg["guidance"] is True
    back = kf.load_export(d)
    assert isinstance(back, ExportedDiT) and not back.training
    x, t, y = inputs([0, 5, 4])
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError):
        kf.save_export(e, d)
    kf.save_export(m.export([2], form), d, overwrite=True)
    assert kf.load_export(d).classes == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_dense_export_is_a_facebookresearch_layout_pt(tmp_path):
    m = kind_model()
    dense = m.export([2], "dense", guidance=False)
    d = kf.save_export(dense, tmp_path / "dense")
    state = torch.load(d / "model.pt", weights_only=True)
    assert set(state) == set(DiT(**m.arch, kind=None).state_dict())  # DiT checkpoint keys, fused qkv
    assert json.loads((d / "export_config.json").read_text())["classes"] == [2]
    assert "blocks.0.attn.qkv.weight" in state and "y_embedder.embedding_table.weight" in state
    back = kf.load_export(d)
    assert isinstance(back, DiT) and back.kind is None
    x, t, y = inputs([2, 2])
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)


def test_export_in_bfloat16_keeps_the_dtype(tmp_path):
    m = kind_model().to(torch.bfloat16)
    e = m.export([1], "merged")
    assert e.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 and e.pos_embed.dtype == torch.bfloat16
    back = kf.load_export(kf.save_export(e, tmp_path / "bf16"))
    assert back.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    x, t, y = inputs([1, 5])
    with torch.no_grad():
        torch.testing.assert_close(back(x.bfloat16(), t, y), e(x.bfloat16(), t, y))


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("partial")
        raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError
    assert (target / "a.txt").read_text() == "one"  # the old folder is untouched
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("form", ["merged", "dense"])
def test_corrupt_export_is_refused(tmp_path, form):
    m = kind_model()
    d = kf.save_export(m.export([1], form, guidance=form != "dense"), tmp_path / "e")
    name = "model.pt" if form == "dense" else "model.safetensors"
    cfg = json.loads((d / "export_config.json").read_text())
    assert cfg["files"][name]["bytes"] == (d / name).stat().st_size
    data = bytearray((d / name).read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the tensor data
    (d / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        kf.load_export(d)
    (d / "export_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        kf.load_export(d)
    with pytest.raises(FileNotFoundError, match="not a kind_fast export folder"):
        kf.load_export(tmp_path)


# =====================================================================================
# Issue 21: exports that cannot be silently wrong
# =====================================================================================
def _edit(d, fn):
    path = d / "export_config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("form", ["merged", "reduced", "dense"])
@pytest.mark.parametrize("edit", ["classes", "num_heads", "guidance", "dtype"])
def test_an_edited_export_config_is_refused(tmp_path, form, edit):
    """Item 2: the config is bound to the weights (a digest of it in their metadata). Swapping
    classes [0, 1] -> [1, 0] served label 0 with class 1's weights; num_heads 4 -> 2 was taken."""
    m = kind_model()
    classes = [2] if form == "dense" else [0, 1]
    d = kf.save_export(m.export(classes, form, guidance=form != "dense"), tmp_path / "e")
    kf.load_export(d)  # as saved: fine
    edits = {"classes": lambda c: c.update(classes=[3] if form == "dense" else [1, 0]),
             "num_heads": lambda c: c["arch"].update(num_heads=2),
             "guidance": lambda c: c.update(guidance=not c["guidance"]),
             "dtype": lambda c: c.update(dtype="float16")}
    _edit(d, edits[edit])
    with pytest.raises(ValueError, match="does not describe the weights"):
        kf.load_export(d)


def test_what_the_binding_ignores_is_bookkeeping(tmp_path):
    m = kind_model()
    d = kf.save_export(m.export([1], "merged"), tmp_path / "e", source="runs/x")
    _edit(d, lambda c: c.update(source="moved/elsewhere", kind_fast_version="0.0"))
    x, t, y = inputs([1, 5])
    with torch.no_grad():
        torch.testing.assert_close(kf.load_export(d)(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["merged", "dense"])
@pytest.mark.parametrize("bad", ["float33", "Tensor", 7])
def test_an_unknown_export_dtype_is_refused_at_load(tmp_path, form, bad):
    """Item 7: dtype went through an unchecked getattr(torch, ...)."""
    m = kind_model()
    d = kf.save_export(m.export([1], form, guidance=form != "dense"), tmp_path / "e")
    _edit(d, lambda c: c.update(dtype=bad))
    with pytest.raises(ValueError, match=r"dtype .* is not one kind_fast saves"):
        kf.load_export(d)


def test_a_dense_export_refuses_labels_other_than_its_class(tmp_path):
    """Item 4: a dense export is exact for its one class only; it served label 0 and the null
    label without complaint."""
    m = kind_model()
    dense = m.export([2], "dense", guidance=False)
    back = kf.load_export(kf.save_export(dense, tmp_path / "d"))
    for model in (dense, back):
        x, t, y = inputs([2, 2])
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)
            for labels in ([2, 0], [5], [4, 2]):
                x, t, y = inputs(labels)
                with pytest.raises(ValueError, match=r"exact for class 2 only.*serves classes \[2\]"):
                    model(x, t, y)
            with pytest.raises(ValueError, match="serves class 2 without guidance"):
                model.forward_with_cfg(*inputs([2, 5]), 1.5)
    torch.testing.assert_close(torch.load(tmp_path / "d" / "model.pt", weights_only=True)["pos_embed"],
                               m.pos_embed)  # still a plain state dict


@pytest.mark.parametrize("form", ["merged", "reduced", "dense"])
def test_the_label_cache_never_serves_labels_changed_behind_its_back(form):
    """Item 3: the label->slot cache was keyed on y._version, which a write through y.data or
    y.numpy() does not bump: the export then served the old labels' weights."""
    m = kind_model()
    if form == "dense":
        e, first, second, third = m.export([3], form, guidance=False), [3, 3], (0, 1), (1, 1)
    else:
        e, first, second, third = m.export([1, 3], form), [1, 3], (0, 3), (1, 5)
    x, t, y = inputs(first)
    with torch.no_grad():
        torch.testing.assert_close(e(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)
        y.data[second[0]] = second[1]  # no version bump
        if form == "dense":
            with pytest.raises(ValueError, match="does not serve"):
                e(x, t, y)
            y.data[0] = 3
        else:
            torch.testing.assert_close(e(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)
        y.numpy()[third[0]] = third[1] if form != "dense" else 0  # no version bump either
        if form == "dense":
            with pytest.raises(ValueError, match="does not serve"):
                e(x, t, y)
        else:
            torch.testing.assert_close(e(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)
        if form == "dense":
            return  # a DiT's own label check (kind_fast.nn.gate.check_labels) needs a version counter
        with torch.inference_mode():  # labels without a version counter
            yi = torch.tensor(first)
            out1 = e(x, t, yi)
            yi[-1] = first[0]  # in place, and inference tensors have no version to bump
            out2 = e(x, t, yi)
        torch.testing.assert_close(out1, m(x, t, torch.tensor(first)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out2, m(x, t, torch.tensor(first[:-1] + first[:1])), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- item 5: killed exports
def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_and_old_folders_are_swept(tmp_path, capsys):
    """Item 5: remove_stale_temps removed files only, and atomic_directory never swept its
    siblings: a killed export's full-size hidden folder survived every re-export."""
    import os

    from kind_fast.atomic import remove_stale_temps, temp_name

    target = tmp_path / "e"
    dead = _dead_pid()
    tmp_dead = tmp_path / temp_name(target).name.replace(f"tmp-{os.getpid()}-", f"tmp-{dead}-")
    old_dead = tmp_path / tmp_dead.name.replace(".tmp-", ".old-")
    tmp_live = tmp_path / temp_name(target).name.replace(f"tmp-{os.getpid()}-", "tmp-1-")  # pid 1: alive
    for d in (tmp_dead, old_dead, tmp_live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    # e is missing: its .old folder is the only copy of the previous export, and is kept
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == [tmp_dead.name]
    assert old_dead.is_dir() and tmp_live.is_dir()
    with pytest.raises(FileNotFoundError, match=r"previous export survives in .*\.e\.old-.*mv '"):
        kf.load_export(target)
    from kind_fast.__main__ import main

    assert main(["sample", str(target), "--steps", "2"]) == 2  # the CLI says so too
    assert "survives in" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="survives in"):  # a new export into e without --overwrite
        kf.save_export(kind_model().export([1], "merged"), target)
    # a re-export (overwrite) sweeps the dead writers' folders for e once it is in place
    tmp_dead.mkdir()
    kf.save_export(kind_model().export([1], "merged"), target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["e", tmp_live.name])


KILL_CHILD = r"""
import os, signal, sys
import torch
import kind_fast as kf
from kind_fast.models.dit import DiT, KindConfig
from kind_fast.testing import perturbed
point, classes = sys.argv[2], [int(c) for c in sys.argv[3].split(",")]
torch.manual_seed(0)
m = perturbed(DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4,
                  num_classes=5, kind=KindConfig(tailor_rank=8, active=2))).eval()
e = m.export(classes, "merged")
real_replace, real_fsync = os.replace, os.fsync
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst):
    real_replace(src, dst)
    if point == "between" and ".old-" in str(dst):
        die()  # the old folder moved aside, the new one not yet in place
    if point == "renamed" and ".tmp-" in str(src):
        die()  # the new folder in place, the old one not yet deleted
def fsync(fd):
    if point == "writing":
        die()  # a file of the new folder written, not yet synced
    real_fsync(fd)
os.replace, os.fsync = replace, fsync
kf.save_export(e, sys.argv[1], overwrite=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["writing", "between", "renamed"])
def test_an_export_killed_at_each_step_of_its_write(tmp_path, point):
    """A re-export SIGKILLed at each step of atomic_directory (aimed by hooks, not by timing):
    the folder holds the old export or the new one, or is missing and says where the old one
    is; the next export sweeps every hidden folder the killed one left."""
    import os
    import signal
    import subprocess
    import sys

    target = tmp_path / "e"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    m = kind_model()
    kf.save_export(m.export([0], "merged"), target)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    r = subprocess.run([sys.executable, "-c", KILL_CHILD, str(target), point, "1,2"], env=env, cwd=repo,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".e.")]
    assert hidden, "the kill left nothing behind: it did not land inside the write"
    if point == "between":
        with pytest.raises(FileNotFoundError, match=r"survives in .*\.e\.old-"):
            kf.load_export(target)
    else:  # the old export or the new one, whole
        assert kf.load_export(target).classes == ([0] if point == "writing" else [1, 2])
    kf.save_export(m.export([3], "merged"), target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]
    assert kf.load_export(target).classes == [3]
