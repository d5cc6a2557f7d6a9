"""LoRA students through peft: only adapters train, exports are merged + adapter, exact resume,
SRD stages continue the adapter, a teacher given as base + adapter is merged at load."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from srd.cli import main
from srd.config import load_config
from srd.recipes.train import load_models
from tests.test_srd_run import _args, srd_data  # noqa: F401

LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "lora.target_modules=[q_proj, v_proj]"]


def _train_args(tiny_models, data, out, *extra):
    return [
        "train",
        "--no-progress",
        "-",
        f"model.teacher={tiny_models['llama-teacher']}",
        f"model.student={tiny_models['llama-student']}",
        f"data.train={data['train']}",
        f"data.dev={data['dev']}",
        f"output_dir={out}",
        "name=lora",
        "seed=0",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "train.batch_size=2",
        "train.lr=1e-2",
        "train.max_steps=4",
        "train.save_every=2",
        "dev_eval.num_examples=0",
        *LORA,
        *extra,
    ]


def test_lora_trains_only_adapters_and_exports_merged(tmp_path, tiny_models, srd_data):  # noqa: F811
    assert main(_train_args(tiny_models, srd_data, tmp_path)) == 0
    run = tmp_path / "lora"
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama-student"])
    merged = AutoModelForCausalLM.from_pretrained(run / "final")  # a plain model, loadable anywhere
    adapter = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert (run / "final" / "adapter" / "adapter_config.json").exists()
    b, m = base.state_dict(), merged.state_dict()
    changed = {k for k in b if not torch.equal(b[k], m[k])}
    # LoRA on q_proj / v_proj: exactly those weights moved when merged, nothing else
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    # the resumable checkpoint holds the adapter only
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()


def test_lora_parameter_count_and_merged_outputs(tmp_path, tiny_models, srd_data):  # noqa: F811
    cfg = load_config(None, _train_args(tiny_models, srd_data, tmp_path)[3:])
    student, _, _ = load_models(cfg)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    hidden = student.config.hidden_size
    layers = student.config.num_hidden_layers
    kv = student.config.num_key_value_heads * (hidden // student.config.num_attention_heads)
    # r * (in + out) per adapted matrix: q (hidden -> hidden) and v (hidden -> kv) in every layer
    assert trainable == layers * 4 * ((hidden + hidden) + (hidden + kv))
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        ids = torch.randint(0, student.config.vocab_size, (2, 7))
        from srd.models.save import save_model_dir

        save_model_dir(student, None, tmp_path / "export")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
        assert torch.allclose(student(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_lora_resume_is_exact(tmp_path, tiny_models, srd_data):  # noqa: F811
    assert main(_train_args(tiny_models, srd_data, tmp_path / "a")) == 0
    assert main(_train_args(tiny_models, srd_data, tmp_path / "b", "train.stop_after_steps=2")) == 0
    assert main(_train_args(tiny_models, srd_data, tmp_path / "b")) == 0
    a = load_file(tmp_path / "a" / "lora" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_srd_run_with_lora_continues_the_adapter(tmp_path, tiny_models, srd_data):  # noqa: F811
    assert main(_args("run", tiny_models, srd_data, tmp_path, *LORA)) == 0
    run = tmp_path / "x"
    results = json.loads((run / "results.json").read_text())
    assert results["trainable_parameters"] < results["student_parameters"] / 5
    s1 = load_file(run / "stages" / "stage-1" / "final" / "adapter" / "adapter_model.safetensors")
    s3 = load_file(run / "stages" / "stage-3" / "final" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


def test_teacher_adapter_is_merged_at_load(tmp_path, tiny_models, srd_data):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["llama-teacher"])
    peft_teacher = get_peft_model(teacher, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_teacher.save_pretrained(tmp_path / "teacher-adapter")
    ids = torch.randint(0, teacher.config.vocab_size, (1, 6))
    with torch.no_grad():
        want = peft_teacher(input_ids=ids).logits
    cfg = load_config(
        None,
        _train_args(tiny_models, srd_data, tmp_path)[3:] + [f"model.teacher_adapter={tmp_path / 'teacher-adapter'}"],
    )
    _, loaded, _ = load_models(cfg)
    assert not hasattr(loaded, "peft_config")  # merged: a plain model
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)
    bad = load_config(None, _train_args(tiny_models, srd_data, tmp_path)[3:] + [f"model.teacher_adapter={tmp_path}"])
    import pytest

    from srd.config import ConfigError

    with pytest.raises(ConfigError, match="adapter_config.json"):
        load_models(bad)


def test_unknown_lora_target_is_a_clear_error(tmp_path, tiny_models, srd_data, capsys):  # noqa: F811
    assert main(_train_args(tiny_models, srd_data, tmp_path, "lora.target_modules=[no_such_proj]")) == 2
    assert "lora.target_modules" in capsys.readouterr().err
