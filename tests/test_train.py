"""The training loop through the CLI: KD steps, SFT, exact resume, run-directory safety."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srd.cli import main


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _args(tiny_models, tiny_data, out: Path, pair: str = "llama", *extra: str) -> list[str]:
    return [
        "train",
        "--no-progress",
        "-",  # "-" = no YAML file, defaults + overrides
        f"model.teacher={tiny_models[pair + '-teacher']}",
        f"model.student={tiny_models[pair + '-student']}",
        f"data.train={tiny_data['train']}",
        f"data.dev={tiny_data['dev']}",
        f"output_dir={out}",
        "name=t",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "loss.chunk_size=16",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.lr=1e-3",
        "train.max_steps=4",
        "train.save_every=2",
        "dev_eval.num_examples=2",
        "dev_eval.max_new_tokens=4",
        "seed=0",
        *extra,
    ]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("pair,divergence", [("llama", "fkl"), ("gpt2", "srkl"), ("llama", "jsd")])
def test_kd_run_changes_student_not_teacher(tmp_path, tiny_models, tiny_data, pair, divergence):
    teacher_before = _weights(tiny_models[f"{pair}-teacher"])
    assert main(_args(tiny_models, tiny_data, tmp_path, pair, f"loss.divergence={divergence}")) == 0
    run = tmp_path / "t"
    rows = _rows(run / "logs" / "train.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["ce"], r["kd"]])).all() for r in rows)
    assert all(r["kd"] > 0 for r in rows)
    student_before = _weights(tiny_models[f"{pair}-student"])
    after = _weights(run / "final")
    changed = [k for k in student_before if not torch.equal(student_before[k], after[k])]
    assert len(changed) == len(student_before)
    assert all(torch.equal(v, _weights(tiny_models[f"{pair}-teacher"])[k]) for k, v in teacher_before.items())
    done = json.loads((run / "done.json").read_text())
    assert done["complete"] and done["steps"] == 4 and done["divergence"] == divergence
    evals = _rows(run / "logs" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 4] and "dev_rougeL" in evals[0]
    assert (run / "best" / "metrics.json").exists() and (run / "config.yaml").exists()
    assert list((run / "tb").iterdir())
    # a finished run is not retrained
    assert main(_args(tiny_models, tiny_data, tmp_path, pair, f"loss.divergence={divergence}")) == 0
    assert len(_rows(run / "logs" / "train.jsonl")) == 4


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_models, tiny_data):
    extra = ("train.max_steps=5", "train.save_every=1", "dev_eval.num_examples=0")
    assert main(_args(tiny_models, tiny_data, tmp_path / "a", "llama", *extra)) == 0
    # the same run, stopped after 2 steps, then after 2 more, then finished
    b = tmp_path / "b"
    assert main(_args(tiny_models, tiny_data, b, "llama", *extra, "train.stop_after_steps=2")) == 0
    assert not (b / "t" / "done.json").exists()
    assert main(_args(tiny_models, tiny_data, b, "llama", *extra, "train.stop_after_steps=2")) == 0
    assert main(_args(tiny_models, tiny_data, b, "llama", *extra)) == 0
    wa, wb = _weights(tmp_path / "a" / "t" / "final"), _weights(b / "t" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = _rows(tmp_path / "a" / "t" / "logs" / "train.jsonl"), _rows(b / "t" / "logs" / "train.jsonl")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_resume_after_a_crash_drops_stale_log_rows(tmp_path, tiny_models, tiny_data):
    extra = ("train.max_steps=4", "train.save_every=2", "dev_eval.num_examples=0")
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", *extra, "train.stop_after_steps=3")) == 0
    run = tmp_path / "t"
    # simulate a crash after step 3 was logged but before its checkpoint was written
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000003")
    assert [r["step"] for r in _rows(run / "logs" / "train.jsonl")] == [1, 2, 3]
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", *extra)) == 0
    assert [r["step"] for r in _rows(run / "logs" / "train.jsonl")] == [1, 2, 3, 4]


def test_keep_last_0_keeps_a_checkpoint_while_training_and_none_once_done(tmp_path, tiny_models, tiny_data):
    """train.keep_last=0: an interrupted stage still resumes from its last checkpoint; a finished
    one keeps its final model and summary, not the resumable checkpoints (their optimizer state is
    most of a run's disk use); changing it between invocations is allowed."""
    from srd.config import ConfigError, load_config

    ckpts = tmp_path / "t" / "checkpoints"
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", "train.stop_after_steps=2")) == 0
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", "train.keep_last=0", "train.stop_after_steps=1")) == 0
    assert sorted(d.name for d in ckpts.iterdir()) == ["step-000003"]  # paused: still resumable
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", "train.keep_last=0")) == 0
    assert not ckpts.exists() and (tmp_path / "t" / "final" / "model.safetensors").exists()
    assert [r["step"] for r in _rows(tmp_path / "t" / "logs" / "train.jsonl")] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="keep_last"):
        load_config(None, ["train.keep_last=-1"])


@pytest.mark.parametrize("lr,best_is_last", [("1e-3", True), ("3", False)])
def test_final_shares_best_files_only_when_the_last_evaluation_was_the_best(
    tmp_path, tiny_models, tiny_data, lr, best_is_last
):
    """final/ is hard links to best/ when the stage's last evaluation was its best (one copy of the
    weights on disk), its own files otherwise (lr 3 diverges: no dev loss improves on step 0's)."""
    extra = (f"train.lr={lr}", "dev_eval.num_examples=0", "train.eval_every=2")
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", *extra)) == 0
    run = tmp_path / "t"
    done = json.loads((run / "done.json").read_text())
    assert (done["best_step"] == done["steps"]) is best_is_last
    final, best = run / "final" / "model.safetensors", run / "best" / "model.safetensors"
    assert os.path.samefile(final, best) is best_is_last
    assert not (run / "final" / "metrics.json").exists() and (run / "best" / "metrics.json").exists()
    assert {p.name for p in (run / "final").iterdir()} == {p.name for p in (run / "best").iterdir()} - {"metrics.json"}
    start, best_w = _weights(tiny_models["llama-student"]), _weights(run / "best")
    assert all(torch.equal(v, start[k]) for k, v in best_w.items()) is not best_is_last
    assert all(torch.equal(v, best_w[k]) for k, v in _weights(run / "final").items()) is best_is_last


def test_link_model_dir_replaces_the_folder_and_copies_without_hard_links(tmp_path, monkeypatch):
    from srd.train import checkpoint as ckpt

    src, out = tmp_path / "best", tmp_path / "final"
    (src / "adapter").mkdir(parents=True)
    for name, text in {"model.safetensors": "w", "metrics.json": "{}", "adapter/a.bin": "a"}.items():
        (src / name).write_text(text)
    out.mkdir()
    (out / "stale.txt").write_text("old")
    ckpt.link_model_dir(src, out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["adapter", "adapter/a.bin", "model.safetensors"]
    assert os.path.samefile(out / "adapter" / "a.bin", src / "adapter" / "a.bin")
    # a later save_model_dir replaces best/ whole: final/ keeps its files
    ckpt.replace_dir(_write(tmp_path / ".best.tmp"), src)
    assert (out / "model.safetensors").read_text() == "w" and (src / "model.safetensors").read_text() == "new"

    def no_links(a, b):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    ckpt.link_model_dir(src, out)
    assert (out / "model.safetensors").read_text() == "new"
    assert not os.path.samefile(out / "model.safetensors", src / "model.safetensors")


def _write(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_text("new")
    return folder


def test_sft_needs_no_teacher(tmp_path, tiny_models, tiny_data):
    args = _args(tiny_models, tiny_data, tmp_path, "llama", "loss.alpha=1.0", "model.teacher=null")
    assert main(args) == 0
    rows = _rows(tmp_path / "t" / "logs" / "train.jsonl")
    assert all(r["kd"] == 0 and r["loss"] == pytest.approx(r["ce"]) for r in rows)


def test_changed_config_in_existing_run_dir_is_an_error(tmp_path, tiny_models, tiny_data, capsys):
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", "train.stop_after_steps=1")) == 0
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", "train.lr=0.5")) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "train.lr: 0.001 -> 0.5" in err


def test_bad_data_is_reported_with_file_and_line(tmp_path, tiny_models, tiny_data, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", f"data.train={bad}")) == 2
    assert "bad.jsonl, line 2: no output field" in capsys.readouterr().err


def test_cli_help_and_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "resumes" in capsys.readouterr().out
    assert main(["config", "configs/quickstart.yaml", "train.lr=3e-4"]) == 0
    assert "lr: 0.0003" in capsys.readouterr().out
    # no recipe: the first key=value is an override, as in srd prune (and '-' names no recipe)
    assert main(["config", "train.lr=2e-4", "seed=7"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0002" in out and "seed: 7" in out
    assert main(["config", "-", "seed=8"]) == 0 and "seed: 8" in capsys.readouterr().out
    assert main(["divergences"]) == 0
    assert "srkl" in capsys.readouterr().out


def test_cli_help_names_every_environment_variable_srd_reads(capsys):
    import re

    read = set()
    for path in (Path(__file__).parents[1] / "srd").rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?[\[(]\"(SRD_[A-Z0-9_]+)\"", path.read_text()))
    assert {"SRD_DATA_DIR", "SRD_CPU_MALLOC"} <= read
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert [v for v in sorted(read) if v not in out] == []


def test_training_on_a_mixture_of_sets(tmp_path, tiny_models, tiny_data):
    other = tmp_path / "other.jsonl"
    other.write_text('{"instruction": "Say yes.", "output": "yes"}\n{"instruction": "Say no.", "output": "no"}\n')
    args = _args(tiny_models, tiny_data, tmp_path, "llama", f"data.train=[{tiny_data['train']}, {other}]")
    assert main(args) == 0
    done = json.loads((tmp_path / "t" / "done.json").read_text())
    assert done["examples"] == 8 + 2


def _four_steps(tiny_models, tiny_data, out, *extra) -> list[str]:
    """`srd train` of 4 steps (batch 2 per process, checkpoint every 2) on the tiny Llamas."""
    return [
        "train",
        "--no-progress",
        "-",
        f"model.teacher={tiny_models['llama-teacher']}",
        f"model.student={tiny_models['llama-student']}",
        f"data.train={tiny_data['train']}",
        f"data.dev={tiny_data['dev']}",
        f"output_dir={out}",
        "name=x",
        "seed=0",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "train.batch_size=2",
        "train.lr=1e-3",
        "train.max_steps=4",
        "train.save_every=2",
        *extra,
    ]


def test_two_processes_train_like_one_and_checkpoints_cross_over(tmp_path, tiny_models, tiny_data):
    """torchrun 2 CPU processes (gloo, batch 2 each) vs 1 process (batch 2 x 2 accumulation):
    the same micro-batches per step, so the same losses and weights within float tolerance;
    a 2-process checkpoint resumes in 1 process and vice versa."""
    import json

    import torch
    from safetensors.torch import load_file

    from srd.cli import main
    from tests.conftest import run_cli_in_processes

    def args(out, *extra):
        return _four_steps(tiny_models, tiny_data, out, "dev_eval.num_examples=0", *extra)

    def weights(out):
        return load_file(out / "x" / "final" / "model.safetensors")

    def losses(out):
        return [json.loads(r)["loss"] for r in (out / "x" / "logs" / "train.jsonl").read_text().splitlines()]

    dev = "dev_eval.num_examples=3"  # three dev rows over two processes: one answers two, the other one
    proc = run_cli_in_processes(args(tmp_path / "two", "train.grad_accum=1", dev), port=29531)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args(tmp_path / "one", "train.grad_accum=2", dev)) == 0
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    # the dev answers of both processes are gathered into one file, in dev-row order
    for out in (tmp_path / "one", tmp_path / "two"):
        logged = [json.loads(r) for r in (out / "x" / "logs" / "eval.jsonl").read_text().splitlines()]
        for e in logged:
            kept = (out / "x" / "logs" / "dev-answers" / f"step-{e['step']:06d}.jsonl").read_text().splitlines()
            rows = [json.loads(r) for r in kept]
            assert [r["id"] for r in rows] == ["dev-1", "dev-2", "dev-3"]
            assert sum(r["score"] for r in rows) / 3 == pytest.approx(e["dev_rougeL"])
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    # 2 processes -> pause at step 2 -> resume in 1 process (grad_accum 2): same result
    proc = run_cli_in_processes(args(tmp_path / "mixed", "train.grad_accum=1", "train.stop_after_steps=2"), port=29532)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args(tmp_path / "mixed", "train.grad_accum=2")) == 0
    c = weights(tmp_path / "mixed")
    assert all(torch.allclose(a[k], c[k], atol=1e-6, rtol=1e-5) for k in a)
    # 1 process -> pause -> resume in 2 processes
    assert main(args(tmp_path / "back", "train.grad_accum=2", "train.stop_after_steps=2")) == 0
    proc = run_cli_in_processes(args(tmp_path / "back", "train.grad_accum=1"), port=29533)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = weights(tmp_path / "back")
    assert all(torch.allclose(a[k], d[k], atol=1e-6, rtol=1e-5) for k in a)
    # a different number of micro-batches per step is refused with the fix in the message
    assert main(args(tmp_path / "mixed2", "train.grad_accum=1", "train.stop_after_steps=2")) == 0
    assert main(args(tmp_path / "mixed2", "train.grad_accum=2")) == 2


def test_deepspeed_zero2_two_processes_train_like_one_and_resume(tmp_path, tiny_models, tiny_data):
    """train.sharding=zero2 in 2 CPU processes (DeepSpeed ZeRO-2 over gloo: optimizer state and
    gradients partitioned) trains like 1 plain process with the same micro-batches per step; its
    checkpoint (one optimizer partition per process) resumes exactly on 2 processes, and a
    1-process run refuses it with the fix in the message."""
    pytest.importorskip("deepspeed")
    import json

    import torch
    from safetensors.torch import load_file

    from srd.cli import main
    from tests.conftest import run_cli_in_processes

    def args(out, *extra):
        return _four_steps(tiny_models, tiny_data, out, "dev_eval.num_examples=0", *extra)

    def weights(out):
        return load_file(out / "x" / "final" / "model.safetensors")

    def log(out):
        return [json.loads(r) for r in (out / "x" / "logs" / "train.jsonl").read_text().splitlines()]

    zero = ("train.sharding=zero2", "train.grad_accum=1")
    proc = run_cli_in_processes(args(tmp_path / "zero", *zero), port=29541, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeepSpeed" in proc.stdout + proc.stderr  # the engine did train
    assert main(args(tmp_path / "one", "train.grad_accum=2")) == 0
    z, o = log(tmp_path / "zero"), log(tmp_path / "one")
    assert [r["loss"] for r in z] == pytest.approx([r["loss"] for r in o], rel=1e-5)
    assert [r["grad_norm"] for r in z] == pytest.approx([r["grad_norm"] for r in o], rel=1e-4)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "zero")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    ckpt = sorted((tmp_path / "zero" / "x" / "checkpoints").iterdir())[-1]
    assert sorted(f.name for f in ckpt.glob("optimizer*")) == ["optimizer.zero2.rank0.pt", "optimizer.zero2.rank1.pt"]
    # pause at step 2, resume on 2 processes: the same weights as the uninterrupted run
    paused = args(tmp_path / "paused", *zero, "train.stop_after_steps=2")
    proc = run_cli_in_processes(paused, port=29542, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args(tmp_path / "paused", "train.grad_accum=2")) == 2  # 1 plain process: refused
    proc = run_cli_in_processes(args(tmp_path / "paused", *zero), port=29543, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = weights(tmp_path / "paused")
    assert all(torch.allclose(b[k], c[k], atol=1e-6, rtol=1e-5) for k in b)


def test_fsdp_two_processes_train_like_one_and_checkpoints_cross_over(tmp_path, tiny_models, tiny_data):
    """train.sharding=fsdp in 2 CPU processes (FSDP2 over gloo) trains like 1 unsharded
    process; its dev generation runs on gathered weights; its checkpoints (stored unsharded)
    resume in 1 unsharded process; on-policy (GKD) batches sample the same answers as DDP."""
    import json

    import torch
    from safetensors.torch import load_file

    from srd.cli import main
    from tests.conftest import run_cli_in_processes

    def args(out, *extra):
        dev = ("train.eval_every=2", "dev_eval.num_examples=3", "dev_eval.max_new_tokens=6")
        return _four_steps(tiny_models, tiny_data, out, *dev, *extra)

    def weights(out, folder="final"):
        return load_file(out / "x" / folder / "model.safetensors")

    def log(out, name="train.jsonl"):
        return [json.loads(r) for r in (out / "x" / "logs" / name).read_text().splitlines()]

    proc = run_cli_in_processes(args(tmp_path / "fsdp", "train.grad_accum=1", "train.sharding=fsdp"), port=29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args(tmp_path / "one", "train.grad_accum=2")) == 0
    one, two = log(tmp_path / "one"), log(tmp_path / "fsdp")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    assert set(b) <= set(a) and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in b)
    assert [r["dev_rougeL"] for r in log(tmp_path / "fsdp", "eval.jsonl")] == pytest.approx(
        [r["dev_rougeL"] for r in log(tmp_path / "one", "eval.jsonl")]
    )
    assert (tmp_path / "fsdp" / "x" / "best" / "model.safetensors").exists()
    # FSDP pause at step 2 -> resume in one unsharded process: the uninterrupted result
    paused = args(tmp_path / "mixed", "train.grad_accum=1", "train.sharding=fsdp", "train.stop_after_steps=2")
    proc = run_cli_in_processes(paused, port=29542)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args(tmp_path / "mixed", "train.grad_accum=2")) == 0
    c = weights(tmp_path / "mixed")
    assert all(torch.allclose(a[k], c[k], atol=1e-6, rtol=1e-5) for k in b)
    # on-policy batches: answers sampled on gathered weights, processes finishing at different lengths
    gkd = ("train.grad_accum=1", "on_policy.ratio=0.5", "on_policy.max_new_tokens=8", "loss.alpha=0.0")
    proc = run_cli_in_processes(args(tmp_path / "gkd-fsdp", *gkd, "train.sharding=fsdp"), port=29543)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli_in_processes(args(tmp_path / "gkd-ddp", *gkd), port=29544)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f, d = log(tmp_path / "gkd-fsdp"), log(tmp_path / "gkd-ddp")
    assert sum(r["on_policy_batches"] for r in d) > 0
    assert [r["loss"] for r in f] == pytest.approx([r["loss"] for r in d], rel=1e-5)


def test_sharding_choice_and_refusals(tiny_models):
    """FSDP only with several processes; DeepSpeed ZeRO-1/2 taken, ZeRO-3 and FSDP + LoRA refused with advice."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from srd.config import ConfigError, load_config
    from srd.train import distributed as sharding
    from srd.train.distributed import use_deepspeed, use_sharding

    def acc(kind, n):
        return SimpleNamespace(distributed_type=kind, num_processes=n)

    fsdp, plain = load_config(None, ["train.sharding=fsdp"]), load_config(None, ["lora.enabled=true"])
    assert use_sharding(fsdp, acc(DistributedType.MULTI_CPU, 2))
    assert not use_sharding(fsdp, acc(DistributedType.NO, 1))
    assert not use_sharding(plain, acc(DistributedType.MULTI_GPU, 4))
    assert use_sharding(plain, acc(DistributedType.FSDP, 4))  # an accelerate FSDP config
    assert not use_sharding(plain, acc(DistributedType.DEEPSPEED, 4))
    ds = SimpleNamespace(**vars(acc(DistributedType.DEEPSPEED, 4)))
    ds.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))
    assert use_deepspeed(plain, ds)
    ds.state.deepspeed_plugin.zero_stage = 3
    with pytest.raises(ConfigError, match="ZeRO stage 3 is not supported.*fsdp"):
        use_deepspeed(plain, ds)
    assert not use_deepspeed(load_config(None, ["train.sharding=zero2"]), acc(DistributedType.NO, 1))
    from srd.models import load_model
    from srd.recipes.train import add_lora
    from srd.train.step import DistillModule

    student = add_lora(load_model(str(tiny_models["llama-student"])), plain.lora, seed=0)
    with pytest.raises(ConfigError, match="LoRA"):
        sharding.shard_student(DistillModule(student, divergence="fkl", tau=1.0, beta=None, chunk_size=16))


def test_compiled_blocks_train_like_eager(tmp_path, tiny_models, tiny_data, monkeypatch):
    """train.compile=true compiles the blocks of both models and trains to the same losses and
    weights; generation inside training (dev ROUGE-L) runs eagerly. A light backend keeps the
    test fast on a CPU (inductor's C++ compiling takes minutes here)."""
    from srd.config import ConfigError, load_config
    from srd.models import features as step

    monkeypatch.setattr(step, "COMPILE_BACKEND", "aot_eager")
    compiled = []
    real = step.compile_blocks
    monkeypatch.setattr("srd.train.loop.compile_blocks", lambda m: compiled.append(real(m)))
    extra = ("train.max_steps=3", "dev_eval.num_examples=2")
    assert main(_args(tiny_models, tiny_data, tmp_path / "eager", "llama", *extra)) == 0
    assert compiled == []
    assert main(_args(tiny_models, tiny_data, tmp_path / "compiled", "llama", *extra, "train.compile=true")) == 0
    assert compiled == [2, 4]  # the tiny student's 2 blocks and the teacher's 4
    a, b = tmp_path / "eager" / "t", tmp_path / "compiled" / "t"
    la, lb = _rows(a / "logs" / "train.jsonl"), _rows(b / "logs" / "train.jsonl")
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], rel=1e-5)
    wa, wb = _weights(a / "final"), _weights(b / "final")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    ea, eb = _rows(a / "logs" / "eval.jsonl"), _rows(b / "logs" / "eval.jsonl")
    assert [e["dev_rougeL"] for e in eb] == pytest.approx([e["dev_rougeL"] for e in ea])
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=true", "train.sharding=fsdp"])


def test_resume_under_another_resolved_precision_is_refused(tmp_path, tiny_models, tiny_data, monkeypatch, capsys):
    """train.precision=auto is fp32 on one CPU and bf16 on another: a checkpoint trained in fp32
    does not go on in bf16 (the saved config says `auto` both times); the error says how to resume."""
    from accelerate.state import AcceleratorState

    import srd.runtime as loop_mod

    extra = ("train.max_steps=4", "train.save_every=1", "dev_eval.num_examples=0")
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", *extra, "train.stop_after_steps=2")) == 0
    state = json.loads(next((tmp_path / "t" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["mixed_precision"] == "no"
    monkeypatch.setattr(loop_mod, "native_bf16", lambda device: True)  # now a CPU with native bf16
    monkeypatch.setenv("SRD_CPU_BF16", "1")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert main(_args(tiny_models, tiny_data, tmp_path, "llama", *extra)) == 2
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    err = capsys.readouterr().err
    assert "was trained with precision fp32" in err and "resume it with train.precision=fp32" in err


_ALLOCATOR_PROBE = """
import ctypes, json, sys
import torch
from srd.utils import cpu_allocator_tuned, tune_cpu_allocator

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
tuned = tune_cpu_allocator()
before = libc.mallinfo2().hblkhd
x = torch.ones(1024, 16384)  # 64 MB: over glibc's largest mmap threshold (32 MB)
grew = libc.mallinfo2().hblkhd - before
print(json.dumps({"tuned": tuned, "reported": cpu_allocator_tuned(), "mmapped": grew >= x.numel() * 4}))
"""


def _glibc() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(v) for v in version.split(".")[:2]) if name == "glibc" and version else ()


@pytest.mark.skipif(_glibc() < (2, 33), reason="glibc's allocator, probed with mallinfo2 (glibc 2.33+)")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_the_cpu_allocator_keeps_large_tensors_off_mmap(setting):
    """tune_cpu_allocator makes glibc serve a vocabulary-sized tensor from its heap (reused when
    freed) instead of a fresh mmap; SRD_CPU_MALLOC=0 leaves glibc's default."""
    env = {**os.environ, "SRD_CPU_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    on = setting == "1"
    assert got == {"tuned": on, "reported": on, "mmapped": not on}


def test_a_stage_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path, tiny_models, tiny_data):
    """Rows an attempt wrote before it was killed (no checkpoint yet) are dropped when the stage
    starts over, so the logs hold each step and evaluation once."""
    from srd.utils import mark_srd_folder

    logs = tmp_path / "t" / "logs"
    logs.mkdir(parents=True)
    mark_srd_folder(tmp_path / "t", "run")  # the attempt's run folder, as srd made it
    (logs / "train.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    (logs / "eval.jsonl").write_text(json.dumps({"step": 0, "dev_loss": 9.0}) + "\n")
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama")) == 0
    assert [r["step"] for r in _rows(logs / "train.jsonl")] == [1, 2, 3, 4]
    assert 9.0 not in [r["loss"] for r in _rows(logs / "train.jsonl")]
    assert [r["step"] for r in _rows(logs / "eval.jsonl")].count(0) == 1


def test_dev_rouge_sampled_with_dev_eval_seeds(tmp_path, tiny_models, tiny_data, monkeypatch):
    """dev_eval.seeds: dev answers sampled at T = 1 (top-k 0, top-p 1), once per seed, each row with
    its own seed from row_seeds, the same at every evaluation; ROUGE-L over all of them."""
    import srd.train.loop as loop_mod
    from srd.generation.decode import row_seeds

    calls = []
    real = loop_mod.generate_responses

    def spy(model, tokenizer, prompts, decoding, **kwargs):
        calls.append((decoding, kwargs.get("seeds")))
        return real(model, tokenizer, prompts, decoding, **kwargs)

    monkeypatch.setattr(loop_mod, "generate_responses", spy)
    assert (
        main(_args(tiny_models, tiny_data, tmp_path, "llama", "dev_eval.seeds=[10, 20]", "generation.temperature=0.5"))
        == 0
    )
    assert len(calls) == 4  # two evaluations (steps 0 and 4) x two seeds
    for decoding, _ in calls:
        assert decoding.do_sample and decoding.temperature == 1.0 and decoding.top_k == 0 and decoding.top_p == 1.0
    assert [s for _, s in calls] == [row_seeds(10, 2), row_seeds(20, 2)] * 2
    evals = _rows(tmp_path / "t" / "logs" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 4] and all(0 <= e["dev_rougeL"] <= 100 for e in evals)
    # every evaluation's answers are kept, each seed's in turn, and their scores make the logged mean
    for e in evals:
        kept = _rows(tmp_path / "t" / "logs" / "dev-answers" / f"step-{e['step']:06d}.jsonl")
        assert [(r["seed"], r["id"]) for r in kept] == [(s, i) for s in (10, 20) for i in ("dev-1", "dev-2")]
        assert sum(r["score"] for r in kept) / 4 == pytest.approx(e["dev_rougeL"])
        assert all(isinstance(r["prediction"], str) for r in kept)
    # greedy by default: no seeds, no sampling
    calls.clear()
    assert main(_args(tiny_models, tiny_data, tmp_path / "g", "llama")) == 0
    assert calls and all(not d.do_sample and s is None for d, s in calls)
    kept = _rows(tmp_path / "g" / "t" / "logs" / "dev-answers" / "step-000004.jsonl")
    assert [r["seed"] for r in kept] == [None, None]


def test_stage_clock_counts_every_dev_evaluation_also_across_a_resume(tmp_path, tiny_models, tiny_data, monkeypatch):
    """wall_time_s is the stage's whole clock: the dev evaluation at step 0 and the one after the
    last step count (the method's time includes them), dev_eval_s says how much of it they were,
    and a resumed stage adds to what its checkpoint had counted. Each evaluation here is made to
    take 0.3 s more, so a clock that misses one is short by at least that."""
    import time

    import srd.train.loop as loop_mod

    real = loop_mod.evaluate_dev

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "evaluate_dev", slow)
    extra = ("train.eval_every=2",)  # evaluations at steps 0, 2 and 4
    assert main([*_args(tiny_models, tiny_data, tmp_path, "llama", *extra), "train.stop_after_steps=3"]) == 0
    assert main(_args(tiny_models, tiny_data, tmp_path, "llama", *extra)) == 0
    run = tmp_path / "t"
    done = json.loads((run / "done.json").read_text())
    evals = _rows(run / "logs" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert 0.9 <= done["dev_eval_s"] < done["wall_time_s"]
    # each score is stamped with the stage clock when it was known: after its own evaluation
    steps = {r["step"]: r["elapsed_s"] for r in _rows(run / "logs" / "train.jsonl")}
    assert evals[0]["elapsed_s"] >= 0.3 and steps[1] > evals[0]["elapsed_s"]
    assert steps[2] + 0.3 <= evals[1]["elapsed_s"] < steps[3]
    assert steps[4] + 0.3 <= evals[2]["elapsed_s"] <= done["wall_time_s"]


class _Payload:
    """Unpickling this runs code: what a run folder from someone else could hold."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_resume_never_unpickles_code_from_a_checkpoint(tmp_path, tiny_models, tiny_data, capsys):
    """Optimizer, scheduler and RNG states load with weights_only=True: a checkpoint whose rng
    file would run code on unpickling is refused with one line, and the code does not run."""
    args = _args(tiny_models, tiny_data, tmp_path, "llama")
    assert main([*args, "train.stop_after_steps=2"]) == 0
    ckpts = sorted((tmp_path / "t" / "checkpoints").glob("step-*"))
    assert ckpts
    marker = tmp_path / "code-ran"
    torch.save({"state": _Payload(str(marker))}, ckpts[-1] / "rng_0.pt")
    # a crafted folder carries matching digests (a flipped byte alone is caught by them)
    from srd.train.checkpoint import file_digests

    state = json.loads((ckpts[-1] / "state.json").read_text())
    (ckpts[-1] / "state.json").write_text(json.dumps({**state, "files": file_digests(ckpts[-1])}))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "rng_0.pt" in err and "does not load" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_resumed_log_drops_later_rows_and_a_row_cut_short(tmp_path):
    """On resume, the log rows after the checkpoint go, and so does a last row the kill cut in
    half (it raised a JSON error before); a damaged row in the middle is named, not skipped."""
    from srd.train.loop import _truncate_log
    from srd.utils import DamagedFileError

    log = tmp_path / "train.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    log.write_text("\n".join(rows) + '\n{"step": 6, "lo')
    _truncate_log(log, 3)
    assert log.read_text() == "\n".join(rows[:3]) + "\n"
    _truncate_log(log, 3)  # nothing to drop: left as it is
    assert log.read_text() == "\n".join(rows[:3]) + "\n"
    log.write_text(rows[0] + "\nnot json\n" + rows[1] + "\n")
    with pytest.raises(DamagedFileError, match="train.jsonl, line 2: not a JSON row"):
        _truncate_log(log, 1)
