"""Damaged files on disk (a full disk, a cut copy, a flipped byte): each kind is found with an
error that names the file and the way on, never a stack trace and never a silent restart."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from srd.cli import main
from tests.test_srd_run import _args as _run_args
from tests.test_srd_run import srd_data  # noqa: F401 (a fixture)
from tests.test_train import _args as _train_args


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def test_cut_checkpoint_weights_name_the_file_and_restart_the_stage(tmp_path, tiny_models, tiny_data, capsys):
    args = _train_args(tiny_models, tiny_data, tmp_path, "llama", "train.save_every=1")
    assert main([*args, "train.stop_after_steps=1"]) == 0
    ckpt = tmp_path / "t" / "checkpoints" / "step-000001"
    assert "files" in json.loads((ckpt / "state.json").read_text())  # sizes and digests saved
    _cut(ckpt / "model.safetensors")
    assert main(args) == 2
    err = _error(capsys)
    assert f"{ckpt / 'model.safetensors'}" in err and "cut short" in err
    assert f"delete {ckpt}" in err and "restarts from its beginning" in err
    assert ckpt.exists() and not (tmp_path / "t" / "final").exists()  # nothing thrown away by srd


def test_corrupted_optimizer_state_points_at_the_previous_checkpoint(tmp_path, tiny_models, tiny_data, capsys):
    args = _train_args(tiny_models, tiny_data, tmp_path, "llama", "train.save_every=1", "train.keep_last=2")
    assert main([*args, "train.stop_after_steps=2"]) == 0
    root = tmp_path / "t" / "checkpoints"
    _flip(root / "step-000002" / "optimizer.pt")  # same size, different bytes
    assert main(args) == 2
    err = _error(capsys)
    assert "optimizer.pt has changed since it was saved" in err and f"resume from {root / 'step-000001'}" in err
    # the way on works: without the damaged checkpoint the run resumes and ends like an unbroken one
    import shutil

    shutil.rmtree(root / "step-000002")
    assert main(args) == 0
    assert main(_train_args(tiny_models, tiny_data, tmp_path / "ref", "llama", "train.save_every=1")) == 0
    a, b = (
        load_file(tmp_path / "t" / "final" / "model.safetensors"),
        load_file(tmp_path / "ref" / "t" / "final" / "model.safetensors"),
    )
    assert all((a[k] == b[k]).all() for k in a)


def test_damaged_state_json_is_named(tmp_path, tiny_models, tiny_data, capsys):
    args = _train_args(tiny_models, tiny_data, tmp_path, "llama", "train.save_every=1")
    assert main([*args, "train.stop_after_steps=1"]) == 0
    state = tmp_path / "t" / "checkpoints" / "step-000001" / "state.json"
    state.write_text(state.read_text()[:20])
    assert main(args) == 2
    assert f"{state} is damaged" in _error(capsys)


def test_damaged_teacher_store_shard_names_the_way_on(tmp_path, tiny_models, srd_data, capsys, teacher_store):  # noqa: F811
    args = _run_args("run", tiny_models, srd_data, tmp_path, "loss.teacher_top_k=4", "train.save_every=1")
    assert main([*args, "train.stop_after_steps=1"]) == 0
    shard = sorted(teacher_store.glob("*/shard-*.logits.npy"))[0]
    _cut(shard, 0.6)
    assert main(args) == 2
    err = _error(capsys)
    assert f"teacher store file {shard} is damaged" in err and "srd store" in err and "--set-aside" in err
    assert main(["store", "--verify", "--set-aside"]) == 0  # the way on: its rows are computed again
    assert main(args) == 0


def test_damaged_final_weights_of_a_finished_stage_name_the_stage_to_retrain(tmp_path, tiny_models, srd_data, capsys):  # noqa: F811
    args = _run_args("run", tiny_models, srd_data, tmp_path, "train.save_every=1")
    assert main([*args, "train.stop_after_steps=4"]) == 0  # stage 1 (3 steps) done, stage 2 paused
    stage1 = tmp_path / "x" / "stages" / "stage-1"
    assert (stage1 / "done.json").exists()
    _cut(stage1 / "final" / "model.safetensors")
    assert main(args) == 2
    err = _error(capsys)
    assert f"weights file {stage1 / 'final' / 'model.safetensors'} is damaged" in err and f"delete {stage1}" in err


def test_a_flipped_byte_in_saved_weights_or_a_store_shard_is_found(
    tmp_path,
    tiny_models,
    srd_data,  # noqa: F811
    capsys,
    teacher_store,
):
    """final/, best/ and teacher-store shards carry the size and SHA-256 of their files: one
    flipped byte (which safetensors and NumPy would load silently) is named with the way on."""
    from srd.models.load import load_model

    extra = ("loss.teacher_top_k=4", "train.save_every=1", "dev_eval.num_examples=2")
    args = _run_args("run", tiny_models, srd_data, tmp_path, *extra)
    assert main([*args, "train.stop_after_steps=4"]) == 0  # stage 1 done, stage 2 paused
    stage1 = tmp_path / "x" / "stages" / "stage-1"
    for folder in (stage1 / "final", stage1 / "best"):
        assert json.loads((folder / "srd-digests.json").read_text())["files"]["model.safetensors"]["sha256"]
    weights = stage1 / "final" / "model.safetensors"
    original = weights.read_bytes()
    _flip(weights)
    assert main(args) == 2  # stage 2 continues from stage 1's final weights
    err = _error(capsys)
    assert f"weights file {weights} is damaged" in err and "SHA-256" in err and f"delete {stage1}" in err
    import pytest

    from srd.models.load import ModelError

    with pytest.raises(ModelError, match="model.safetensors.*SHA-256.*srd-digests.json"):
        load_model(str(stage1 / "final"))  # what srd eval and the experiment's evaluation load
    weights.write_bytes(original)
    load_model(str(stage1 / "best"))
    shard = sorted(teacher_store.glob("*/shard-*.logits.npy"))[-1]  # stage 2's rows, read when it continues
    _flip(shard)
    assert main(args) == 2
    err = _error(capsys)
    assert f"teacher store file {shard} is damaged" in err and "SHA-256" in err


def test_damaged_manifest_is_rebuilt_from_the_reflection_rows(tmp_path, tiny_models, srd_data):  # noqa: F811
    """The manifest is derived (scores, ranks, stages from the saved answers): a damaged copy is
    rewritten on the next run, identical, and no answer is generated again."""
    args = _run_args("reflect", tiny_models, srd_data, tmp_path)
    assert main(args) == 0
    folder = tmp_path / "x" / "reflection"
    manifest, outputs = folder / "manifest.jsonl", folder / "outputs.rank0.jsonl"
    before, answers = manifest.read_text(), outputs.read_text()
    _cut(manifest, 0.3)
    assert main(args) == 0
    assert manifest.read_text() == before and outputs.read_text() == answers


def test_a_run_start_removes_what_a_killed_process_left_half_written(tmp_path):
    """Only srd's own temporaries, and only inside a folder srd marked: a user's `notes.old/`,
    `.draft.tmp` or `.shard-notes.npy` stay, and an unmarked folder is not touched at all."""
    from srd.utils import mark_srd_folder, remove_stale_temporaries

    run = tmp_path / "run"
    keep = [
        run / "config.yaml",
        run / "stages" / "stage-1" / "final" / "model.safetensors",
        run / ".keep-me",
        run / "notes.old" / "mine.txt",  # a user's files with the names older srd versions removed
        run / ".draft.tmp",
        run / "teacher-cache" / ".shard-notes.npy",
    ]
    stale = [
        run / ".results.json.k2j3.srd-tmp",
        run / "stages" / "stage-1" / "checkpoints" / ".step-000004.srd-tmp" / "model.safetensors",
        run / "stages" / "stage-1" / ".final.srd-old" / "model.safetensors",
        run / "teacher-cache" / ".shard-00001.ids.srd-tmp.npy",
    ]
    for f in keep + stale:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    assert remove_stale_temporaries(run) == [] and all(f.exists() for f in keep + stale)  # not srd's folder
    mark_srd_folder(run, "run")
    removed = remove_stale_temporaries(run)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in stale)
    assert not (run / "stages" / "stage-1" / "checkpoints" / ".step-000004.srd-tmp").exists() and len(removed) == 4


def test_a_log_row_cut_short_by_a_kill_is_dropped_and_a_garbled_one_named(tmp_path, tiny_models, tiny_data, capsys):
    """A kill while a log row is appended leaves half a row: `srd report` reads the log without
    it and the resumed run drops it (both raised a JSON traceback before); a garbled row in the
    middle of a log is one line naming the file and the line."""
    args = _train_args(tiny_models, tiny_data, tmp_path, "llama", "train.save_every=1")
    assert main([*args, "train.stop_after_steps=2"]) == 0
    log = tmp_path / "t" / "logs" / "train.jsonl"
    rows = log.read_text()
    log.write_text(rows + '{"step": 3, "lo')
    assert main(["report", str(tmp_path / "t")]) == 0
    assert main(args) == 0  # resumed from step 2: the cut row is gone, step 3 logged again
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[:2] == [1, 2] and len(steps) > 3
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbled", *lines[1:]]) + "\n")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "t")]) == 2
    assert f"{log}, line 2: not a JSON row" in _error(capsys)
