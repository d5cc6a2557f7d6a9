"""Config loading: every shipped YAML, overrides, unknown keys, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from srd.config import ConfigError, RunConfig, dump_config, from_dict, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # the resolved config written to run directories loads back to the same config
    assert from_dict(RunConfig, yaml.safe_load(dump_config(cfg))) == cfg


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "train.max_steps=7",
            "loss.divergence=rkl",
            "data.dev=null",
            "generation.stop_strings=[a, b]",
            "train.grad_clip=null",
            "loss.tau=2",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.loss.divergence == "rkl" and cfg.loss.tau == 2.0
    assert cfg.data.dev is None and cfg.train.grad_clip is None
    assert cfg.generation.stop_strings == ["a", "b"]


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 5e-5\n")
    assert load_config(p).train.lr == 5e-5


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*valid keys here: .*lr"):
        load_config(None, ["train.lrr=1"])
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"'trian'.*valid keys.*train.*\(in .*c.yaml\)"):
        load_config(p)


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.divergence=kld", "not registered"),
        ("loss.alpha=1.5", "alpha must be in"),
        ("train.batch_size=abc", "must be an integer"),
        ("data.prompt_format=vicuna", "is not one of"),
        ("data.max_len=100", "must exceed"),
        ("train.min_lr=1.0", "must not exceed"),
        ("loss.tau=0", "tau must be > 0"),
        ("model.teacher=null", "only works for plain SFT"),
        ("train", "key=value"),
    ],
)
def test_bad_values_have_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_error_points_at_the_override_that_caused_it_else_at_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1.0e-4\n")
    other = ["train.epochs=2", "seed=3"]  # named nowhere in the messages: never blamed
    cases = [
        (["train.lr=abc"], "train.lr must be a number, got 'abc' (from the command line: train.lr=abc)"),
        (["nosuch.key=1"], "(from the command line: nosuch.key=1)"),  # the message names only 'nosuch'
        (["train.foo=1"], "unknown config key 'train.foo'"),
        (["nosuch=1"], "unknown config key 'nosuch'"),
        (["curriculum.tau_start=0"], "curriculum.tau_start must be > 0, got 0"),
        (["name=x", "model.student=s", "model.student="], "model.student must name a model"),  # the last one counts
        (["name=a/b"], "name must be one plain folder name"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config(recipe, [*other, *bad])
        # only the override at fault: not `name=x` for a message that says "must name a model"
        assert message in str(e.value) and str(e.value).endswith(f"(from the command line: {bad[-1]})")
    # a bad value in the recipe itself: the recipe, whatever the overrides
    recipe.write_text("train:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=r"train\.lr must be a number, got 'abc' \(in .*r\.yaml\)$"):
        load_config(recipe, other)


def test_sft_without_teacher_is_valid():
    cfg = load_config(None, ["model.teacher=null", "loss.alpha=1.0"])
    assert cfg.model.teacher is None


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_parse_overrides_keeps_paths_as_strings():
    assert parse_overrides(["model.student=runs/x/final"]) == [("model.student", "runs/x/final")]


def test_train_data_may_be_a_list():
    cfg = load_config(None, ["data.train=[gsm8k, samsum, xsum]"])
    assert cfg.data.train == ["gsm8k", "samsum", "xsum"]
    assert load_config(None, ["data.train=dolly"]).data.train == "dolly"
    with pytest.raises(ConfigError, match="at least one"):
        load_config(None, ["data.train=[]"])


def test_run_dir_from_an_older_version_resumes(tmp_path):
    """A config.yaml written before an option existed still matches a config using its default."""
    import yaml

    from srd.config import ConfigError, load_config
    from srd.recipes.train import prepare_run_dir

    cfg = load_config(None, [f"output_dir={tmp_path}", "name=old"])
    prepare_run_dir(cfg)
    saved = tmp_path / "old" / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    del data["lora"], data["on_policy"], data["data"]["instruction_suffix"]  # options added later
    saved.write_text(yaml.safe_dump(data))
    prepare_run_dir(cfg)  # accepted: the missing options are at their defaults
    saved.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="lora.enabled"):
        prepare_run_dir(load_config(None, [f"output_dir={tmp_path}", "name=old", "lora.enabled=true"]))


@pytest.mark.parametrize("key", ["recompute_chunks", "recompute_log_probs"])
def test_memory_for_compute_settings_auto_depend_on_the_device(key):
    from srd.train.loop import on_accelerators

    assert getattr(load_config(None, []).loss, key) == "auto"
    assert getattr(load_config(None, [f"loss.{key}=false"]).loss, key) is False
    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"loss.{key}=sometimes"])
    assert on_accelerators("auto", "cpu") is False and on_accelerators("auto", "cuda") is True
    assert on_accelerators(True, "cpu") is True and on_accelerators(False, "cuda") is False


def test_a_full_disk_gets_advice_not_a_traceback(monkeypatch, capsys):
    import errno

    import srd.cli as cli

    def fails(args):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:  # as safetensors reports it: only in its own error's message
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)") from e

    monkeypatch.setattr(cli, "_dispatch", fails)
    assert cli.main(["train", "-"]) == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "rerun the same command to resume" in err

    def other(args):
        raise RuntimeError("something else")

    monkeypatch.setattr(cli, "_dispatch", other)
    with pytest.raises(RuntimeError, match="something else"):
        cli.main(["train", "-"])


def test_library_noise_is_dropped_and_nothing_else():
    import logging

    from srd.cli import quiet_library_logs

    quiet_library_logs()
    ds = logging.getLogger("DeepSpeed")

    def record(msg):
        return logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, msg, None, None)

    assert not ds.filter(record("Setting accelerator to CPU. If you have GPU or other accelerator, ..."))
    assert ds.filter(record("ZeRO stage 2 optimizer"))
    assert not logging.getLogger("absl").isEnabledFor(logging.INFO)


def test_auto_precision_is_bf16_where_the_hardware_has_it(monkeypatch):
    """train.precision=auto: bf16 autocast on a CPU with native bf16 unless SRD_CPU_BF16=0,
    float32 on one without; fp32 / bf16 are taken as asked."""
    from accelerate.state import AcceleratorState

    import srd.runtime as loop_mod

    def precision_of(setting: str) -> str:  # one precision per process: accelerate's state is reset
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            return loop_mod.make_accelerator(setting).mixed_precision
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)

    for native, env, want in [(True, "1", "bf16"), (True, "0", "no"), (False, "1", "no")]:
        monkeypatch.setattr(loop_mod, "native_bf16", lambda device, native=native: native)
        monkeypatch.setenv("SRD_CPU_BF16", env)
        assert loop_mod.auto_bf16(cuda=False) is (want == "bf16")
        assert precision_of("auto") == want
    monkeypatch.setenv("SRD_CPU_BF16", "0")
    assert precision_of("bf16") == "bf16" and precision_of("fp32") == "no"


def test_configuration_reference_in_docs_is_generated_from_the_dataclasses():
    """docs/configuration.md is what `srd config --reference` prints: every key, type, default and
    comment of srd/config.py. After changing a config field: srd config --reference > docs/configuration.md"""
    import dataclasses

    from srd.config import RunConfig
    from srd.config_reference import reference_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert doc == reference_markdown(), "regenerate it: srd config --reference > docs/configuration.md"
    for f in dataclasses.fields(RunConfig):
        section = getattr(RunConfig(), f.name)
        keys = (
            [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
            if dataclasses.is_dataclass(section)
            else [f.name]
        )
        for key in keys:
            row = next(line for line in doc.splitlines() if line.startswith(f"| `{key}` |"))
            assert not row.endswith("|  |"), f"{key} has no description: add a comment next to it in srd/config.py"
