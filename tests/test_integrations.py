"""srd.integrations: SRD's reflection and curriculum for Hugging Face datasets, Trainer and TRL."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from srd.config import CurriculumConfig
from srd.data.example import DataError
from srd.integrations.hf import Curriculum, examples_from_dataset, reflect_dataset
from tests.conftest import ROWS, held_elsewhere, with_chat_template

datasets = pytest.importorskip("datasets")


def _prompt_completion(n: int = 12):
    rows = (ROWS * (n // len(ROWS) + 1))[:n]
    return datasets.Dataset.from_dict(
        {
            "prompt": [f"Q{i}: {r['instruction']}\nA:" for i, r in enumerate(rows)],
            "completion": [" " + r["output"] for r in rows],
        }
    )


def _reflect_tiny(tmp_path, tiny_models, ds):
    from srd.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_models["llama-student"]))
    out = reflect_dataset(
        ds,
        student=load_model(str(tiny_models["llama-student"])),
        tokenizer=tok,
        out_dir=tmp_path / "refl",
        overrides=["generation.max_new_tokens=4", "train.precision=fp32"],
        progress=False,
    )
    return tok, out


def test_curriculum_order_is_the_cumulative_union_in_whole_steps():
    """Stage i sees exactly stages 1..i's kept rows, epochs_per_stage times (less at most one
    step's rows cut at its end), never a dropped row, and a stage ends on an optimizer step."""
    stages = np.array([1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 1])
    positions = np.array([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 4])
    c = CurriculumConfig(
        num_stages=3, epochs_per_stage=2, tau_start=1, tau_end=2, alpha_start=0.3, alpha_end=0.1, lr_schedule="global"
    )
    cur = Curriculum.from_stages(stages, positions, c, batch_size=3, seed=0)
    assert cur.taus == (1.0, 1.5, 2.0) and cur.alphas == pytest.approx((0.3, 0.2, 0.1))
    assert cur.stage_steps == (8 // 3, 14 // 3, 20 // 3)  # 2 x 4, 2 x 7, 2 x 10 rows, whole steps of 3
    edge = 0
    for i, steps in enumerate(cur.stage_steps, start=1):
        rows = cur.order[edge * 3 : (edge + steps) * 3]
        allowed = set(np.flatnonzero((stages >= 1) & (stages <= i)))
        counts = Counter(rows)
        assert set(counts) == allowed  # the cumulative union, nothing dropped enters
        assert all(v <= 2 for v in counts.values()) and sum(counts.values()) >= 2 * len(allowed) - 2
        assert all(cur.stage_at(s) == i for s in range(edge, edge + steps))
        edge += steps
    assert cur == Curriculum.from_stages(stages, positions, c, batch_size=3, seed=0)  # seeded
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        Curriculum.from_stages(stages, positions, c, batch_size=64)


def test_examples_from_the_dataset_formats_trl_takes(tokenizer):
    pc = examples_from_dataset(_prompt_completion(3))
    assert pc[0].instruction.startswith("Q0: ") and pc[0].output.startswith(" Paris") and pc[0].id == "0"
    conv = datasets.Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": "Name three colors."}, {"role": "assistant", "content": "red"}],
            ]
        }
    )
    with pytest.raises(DataError, match="chat template"):
        examples_from_dataset(conv, tokenizer)
    # the file readers' rules for a conversation: one line naming the row (it was transformers' ValueError)
    first = datasets.Dataset.from_dict({"messages": [[{"role": "assistant", "content": "hi"}]]})
    with pytest.raises(DataError, match="dataset row 0: the conversation starts with its assistant message"):
        examples_from_dataset(first, tokenizer)
    alpaca = datasets.Dataset.from_list([dict(r, id=f"a{i}") for i, r in enumerate(ROWS[:2])])
    ex = examples_from_dataset(alpaca, id_column="id")
    assert ex[1].id == "a1" and ex[1].instruction == ROWS[1]["instruction"]
    with pytest.raises(DataError, match="dataset row 1: an empty prompt or completion"):
        examples_from_dataset(datasets.Dataset.from_dict({"prompt": ["a", "b"], "completion": ["x", " "]}))
    with pytest.raises(DataError, match="expected prompt/completion, messages, or instruction/output"):
        examples_from_dataset(datasets.Dataset.from_dict({"text": ["a"]}))


def test_a_prompt_only_dataset_takes_the_teachers_answers_as_references(tmp_path, tiny_models, monkeypatch):
    """DistillationTrainer's own format: without a teacher, one line saying to pass it; with it,
    the teacher answers every prompt once (saved, reused by a rerun), its answers are the
    references the student is ranked against, and they come back as srd_reference."""
    import srd.generation.decode as decode
    from srd.models import load_model, load_tokenizer

    prompts = datasets.Dataset.from_dict({"prompt": _prompt_completion(12)["prompt"]})
    with pytest.raises(DataError, match="dataset row 0: a prompt-only row .*teacher=teacher"):
        examples_from_dataset(prompts)
    tok = load_tokenizer(str(tiny_models["llama-student"]))
    kw = dict(student=load_model(str(tiny_models["llama-student"])), tokenizer=tok, out_dir=tmp_path / "refl",
              overrides=["generation.max_new_tokens=6", "generation.no_repeat_ngram_size=0", "train.precision=fp32"],
              progress=False)  # fmt: skip
    with pytest.raises(DataError, match="prompt-only"):
        reflect_dataset(prompts, **kw)
    teacher = load_model(str(tiny_models["llama-teacher"]))
    real, calls = decode.iter_responses, []
    monkeypatch.setattr(decode, "iter_responses", lambda model, *a, **k: (calls.append(model), real(model, *a, **k))[1])
    out = reflect_dataset(prompts, teacher=teacher, **kw)
    refs = [json.loads(x) for x in (tmp_path / "refl" / "teacher_references.jsonl").read_text().splitlines()]
    assert sorted(int(r["id"]) for r in refs) == list(range(12))
    assert out["srd_reference"] == [{r["id"]: r["reference"] for r in refs}[str(i)] for i in range(12)]
    said = [bool(r.strip()) for r in out["srd_reference"]]  # a random tiny teacher says nothing to some
    assert 0 < sum(said) and sum(out["srd_kept"]) == max(1, int(0.75 * sum(said))) and out.column_names[0] == "prompt"
    assert all(stage == 0 for stage, s in zip(out["srd_stage"], said) if not s)  # nothing to score: left out
    assert sorted(out["srd_position"]) == list(range(1, 13))
    assert calls.count(teacher) == 1
    again = reflect_dataset(prompts, teacher=teacher, **kw)  # rerun: no answer generated again
    assert calls.count(teacher) == 1 and np.array_equal(again["srd_fused"], out["srd_fused"], equal_nan=True)
    path = tmp_path / "refl" / "teacher_references.jsonl"  # a kill tore its last row: decoded again
    path.write_bytes(path.read_bytes().rstrip(b"\n")[:-5])
    torn = reflect_dataset(prompts, teacher=teacher, **kw)
    assert calls.count(teacher) == 2 and torn["srd_reference"] == out["srd_reference"]
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()][-1] == refs[-1]["id"]
    other = load_model(str(tiny_models["llama-student"]))
    with pytest.raises(ValueError, match="another teacher's answers"):
        reflect_dataset(prompts, teacher=other, **kw)


def test_reflect_dataset_writes_only_into_a_folder_of_its_own(tmp_path, tiny_models, monkeypatch):
    """A user's folder with their own files is refused before anything is written into it; srd's
    own reflection folder (marked) is reused."""
    from srd.models import load_model, load_tokenizer
    from srd.utils import FolderError

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "draft.txt").write_text("mine")
    student = str(tiny_models["llama-student"])
    kw = dict(student=load_model(student), tokenizer=load_tokenizer(student),
              overrides=["generation.max_new_tokens=4", "train.precision=fp32"], progress=False)  # fmt: skip
    with pytest.raises(FolderError, match="already holds files srd did not write"):
        reflect_dataset(_prompt_completion(6), out_dir=mine, **kw)
    assert [p.name for p in mine.iterdir()] == ["draft.txt"]
    with pytest.raises(FolderError, match="is a file"):
        reflect_dataset(_prompt_completion(6), out_dir=mine / "draft.txt", **kw)
    first = reflect_dataset(_prompt_completion(6), out_dir=tmp_path / "refl", **kw)
    assert reflect_dataset(_prompt_completion(6), out_dir=tmp_path / "refl", **kw)["srd_fused"] == first["srd_fused"]
    # another process reflecting into it now (the same script started twice) would mix the two's rows
    manifest = (tmp_path / "refl" / "manifest.jsonl").read_bytes()
    with held_elsewhere(tmp_path / "refl") as holder:
        with pytest.raises(
            FolderError, match=rf"reflection folder .*refl is in use by another srd process \(pid {holder.pid}\)"
        ):
            reflect_dataset(_prompt_completion(6), out_dir=tmp_path / "refl", **kw)
    assert (tmp_path / "refl" / "manifest.jsonl").read_bytes() == manifest
    # its other processes (RANK > 0) of one job write in it beside the first, which holds the lock
    monkeypatch.setenv("RANK", "1")
    with held_elsewhere(tmp_path / "refl"):
        again = reflect_dataset(_prompt_completion(6), out_dir=tmp_path / "refl", **kw)
    assert again["srd_fused"] == first["srd_fused"]


def test_a_streaming_dataset_is_one_clear_error():
    streaming = datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}).to_iterable_dataset()
    with pytest.raises(DataError, match="streaming .*streaming=False"):
        examples_from_dataset(streaming)


def test_chat_content_parts_are_text_and_a_missing_content_is_refused():
    """TRL's content parts become their text (not the text of a Python list); a message with no
    content, or an image part, is a one-line DataError naming the row."""
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "red, "}, {"type": "text", "text": "blue"}]}]
    ds = datasets.Dataset.from_list([{"prompt": "Name two colors.", "completion": parts}])
    assert examples_from_dataset(ds)[0].output == "red, blue"
    text = [{"type": "text", "text": "Hi"}]
    for user, content, words in [
        ("Hi", None, "no text content"),
        (text, [{"type": "image", "image": "x.png"}], "'image' part"),
    ]:
        bad = [{"role": "user", "content": user}, {"role": "assistant", "content": content}]
        with pytest.raises(DataError, match=f"dataset row 0: .*{words}"):
            examples_from_dataset(datasets.Dataset.from_list([{"messages": bad}]))


def test_reflect_dataset_adds_the_manifest_as_columns(tmp_path, tiny_models):
    ds = _prompt_completion(12)
    tok, out = _reflect_tiny(tmp_path, tiny_models, ds)
    assert out.column_names == [
        "prompt",
        "completion",
        "srd_rouge_l",
        "srd_ce",
        "srd_fused",
        "srd_position",
        "srd_kept",
        "srd_stage",
    ]
    assert sum(out["srd_kept"]) == 9 and sorted(Counter(out["srd_stage"]).items()) == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert sorted(out["srd_position"]) == list(range(1, 13))
    manifest = [json.loads(x) for x in (tmp_path / "refl" / "manifest.jsonl").read_text().splitlines()]
    assert [m["stage"] or 0 for m in manifest] == out["srd_stage"]
    # the prompt is used as it is (plain format), not wrapped in the Alpaca template
    meta = json.loads((tmp_path / "refl" / "meta.json").read_text())
    assert "plain" in json.dumps(meta["settings"])
    # rerun: the answers are reused, the columns come back identical
    _, again = _reflect_tiny(tmp_path, tiny_models, ds)
    assert again["srd_fused"] == out["srd_fused"]


def _encoded_rows(tokenizer, ds):
    from srd.data.tokenize import encode_example

    return [
        encode_example(tokenizer, ex, fmt="plain", max_prompt_len=32, max_len=48) for ex in examples_from_dataset(ds)
    ]


def _gkd_trainer(
    tmp_path, tiny_models, tok, reflected, cur, *, max_steps=None, seen=None, attach=None, data=None, **extra
):
    from trl.experimental.gkd import GKDConfig

    from srd.data.tokenize import collate
    from srd.integrations.trl import SRDGKDTrainer
    from srd.models import load_model

    encoded = _encoded_rows(tok, reflected)
    rows = reflected.add_column("row", list(range(len(reflected))))

    def collator(features):
        ids = [f["row"] for f in features]
        if seen is not None:
            seen.append(ids)
        return collate([encoded[i] for i in ids], tok.pad_token_id)

    torch.manual_seed(0)
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_steps=max_steps or -1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        lmbda=0.0,
        beta=0.0,
        use_cpu=True,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    args = GKDConfig(**{**settings, **extra})
    trainer = SRDGKDTrainer(
        model=load_model(str(tiny_models["llama-student"])),
        teacher_model=load_model(str(tiny_models["llama-teacher"])),
        args=args,
        train_dataset=(data or cur.dataset)(rows),
        data_collator=collator,
        processing_class=tok,
    )
    (attach or cur).attach(trainer)
    return trainer


def _sequential_args(out) -> dict:
    """A Trainer's arguments for a curriculum: 2 rows a step, one pass over the rows in order."""
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        train_sampling_strategy="sequential",
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )


_CURRICULUM = CurriculumConfig(
    num_stages=3, epochs_per_stage=1, tau_start=1, tau_end=2, alpha_start=0.3, alpha_end=0.1, lr_schedule="global"
)


@pytest.fixture
def reflected_tiny(tmp_path, tiny_models):
    tok, reflected = _reflect_tiny(tmp_path, tiny_models, _prompt_completion(12))
    return tok, reflected, Curriculum.from_reflected(reflected, batch_size=2, curriculum=_CURRICULUM)


def test_gkd_trainer_sees_each_stage_and_its_tau_and_alpha_reach_the_loss(
    tmp_path, tiny_models, reflected_tiny, monkeypatch
):
    from srd.integrations.trl import SRDGKDTrainer

    tok, reflected, cur = reflected_tiny
    assert cur.stage_steps == (1, 3, 4)  # 3, 6, 9 kept rows in whole steps of 2
    calls = []
    jsd = SRDGKDTrainer.generalized_jsd_loss

    def spy(*args, **kwargs):
        calls.append(kwargs["temperature"])
        return jsd(*args, **kwargs)

    monkeypatch.setattr(SRDGKDTrainer, "generalized_jsd_loss", staticmethod(spy))
    seen: list[list[int]] = []
    trainer = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur, seen=seen)
    trainer.train()
    # the rows, in the curriculum's order, each stage's from its cumulative union only
    assert [i for batch in seen for i in batch] == list(cur.order)
    stage_of = reflected["srd_stage"]
    for step, batch in enumerate(seen):
        assert all(1 <= stage_of[i] <= cur.stage_at(step) for i in batch)
    assert calls == [cur.taus[cur.stage_at(s) - 1] for s in range(cur.total_steps)]
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert [(r["srd_stage"], r["srd_tau"]) for r in logged] == [
        (cur.stage_at(s), cur.taus[cur.stage_at(s) - 1]) for s in range(cur.total_steps)
    ]
    assert all(r["srd_alpha"] == pytest.approx(cur.alphas[r["srd_stage"] - 1]) for r in logged)


def test_gkd_loss_is_alpha_ce_plus_tau_squared_jsd(tiny_models, reflected_tiny, tmp_path):
    """The wrapped loss against its formula computed here from the two models' logits."""
    import torch.nn.functional as F

    from srd.data.tokenize import collate

    tok, reflected, cur = reflected_tiny
    trainer = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur)
    batch = collate(_encoded_rows(tok, reflected)[:2], tok.pad_token_id)
    trainer.srd_tau, trainer.srd_alpha = 1.7, 0.25
    got = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        s = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    p = F.log_softmax(t.double() / 1.7, -1)[mask]
    q = F.log_softmax(s.double() / 1.7, -1)[mask]
    kl = (p.exp() * (p - q)).sum(-1).mean()  # beta 0: forward KL(teacher || student)
    ce = F.cross_entropy(s.double()[mask], labels[mask])
    assert float(got.detach()) == pytest.approx(float(0.25 * ce + 0.75 * 1.7**2 * kl), rel=1e-5)


def test_gkd_curriculum_resumed_from_a_checkpoint_ends_where_an_unbroken_run_ends(
    tmp_path, tiny_models, reflected_tiny
):
    tok, reflected, cur = reflected_tiny
    whole = _gkd_trainer(tmp_path / "a", tiny_models, tok, reflected, cur)
    whole.train()
    part = _gkd_trainer(tmp_path / "b", tiny_models, tok, reflected, cur)
    part.add_callback(_StopAt(4))
    part.train()  # stopped in stage 2 (steps 1..4), a checkpoint at step 4
    # the same command without the stop, from the checkpoint
    resumed = _gkd_trainer(tmp_path / "b", tiny_models, tok, reflected, cur)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-4"))
    a = dict(whole.model.named_parameters())
    b = dict(resumed.model.named_parameters())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    stages = [r["srd_stage"] for r in resumed.state.log_history if "loss" in r]
    assert stages[-1] == 3 and stages[:4] == [1, 2, 2, 2]


def _stop_at_base():
    from transformers import TrainerCallback

    return TrainerCallback


class _StopAt(_stop_at_base()):
    """Stops training after optimizer step `step`, as a killed run would (its checkpoint saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_prepare_curriculum_needs_no_hand_computed_number(tmp_path, tiny_models):
    """One call from the trainer's arguments: reflection into the curriculum's stages, the plan
    at the trainer's rows per step (per-device 2 x accumulation 2) and seed; attach accepts it."""
    from transformers import TrainingArguments

    from srd.integrations.hf import prepare_curriculum, rows_per_step
    from srd.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_models["llama-student"]))
    student = load_model(str(tiny_models["llama-student"]))
    args = TrainingArguments(**{**_sequential_args(tmp_path / "t"), "gradient_accumulation_steps": 2, "seed": 3})
    c = CurriculumConfig(num_stages=2, epochs_per_stage=2, tau_start=1, tau_end=1, alpha_start=0, alpha_end=0,
                         lr_schedule="global")  # fmt: skip
    rows, cur = prepare_curriculum(
        _prompt_completion(12),
        args=args,
        student=student,
        tokenizer=tok,
        out_dir=tmp_path / "refl",
        curriculum=c,
        overrides=["generation.max_new_tokens=4", "train.precision=fp32"],
        progress=False,
    )
    assert rows_per_step(args) == cur.batch_size == 4 and len(cur.stage_steps) == 2
    assert len(rows) == len(cur.order) == 4 * cur.total_steps and max(rows["srd_stage"]) == 2
    reflected = reflect_dataset(  # resumed from out_dir: nothing generated again
        _prompt_completion(12),
        student=student,
        tokenizer=tok,
        out_dir=tmp_path / "refl",
        overrides=["generation.max_new_tokens=4", "train.precision=fp32", "curriculum.num_stages=2"],
        progress=False,
    )
    assert cur == Curriculum.from_reflected(reflected, batch_size=4, curriculum=c, seed=3)  # the trainer's seed
    assert cur != Curriculum.from_reflected(reflected, batch_size=4, curriculum=c, seed=0)
    from transformers import Trainer

    cur.attach(Trainer(model=student, args=args, train_dataset=rows))  # its checks pass


def test_gradient_accumulation_resumed_in_the_middle_of_a_stage_ends_where_an_unbroken_run_ends(
    tmp_path, tiny_models, reflected_tiny
):
    """1 row per device x 2 accumulation steps (the plan's 2 rows per step), stopped at step 3 in
    the middle of stage 2 and resumed: the weights and stages of an unbroken run."""
    tok, reflected, cur = reflected_tiny
    accum = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "save_steps": 3}
    whole = _gkd_trainer(tmp_path / "a", tiny_models, tok, reflected, cur, **accum)
    whole.train()
    part = _gkd_trainer(tmp_path / "b", tiny_models, tok, reflected, cur, **accum)
    part.add_callback(_StopAt(3))
    part.train()
    assert cur.stage_at(2) == 2 and cur.stage_at(3) == 2  # step 3 is inside stage 2
    resumed = _gkd_trainer(tmp_path / "b", tiny_models, tok, reflected, cur, **accum)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    a, b = dict(whole.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    stages = [r["srd_stage"] for r in resumed.state.log_history if "loss" in r]
    assert stages == [cur.stage_at(s) for s in range(cur.total_steps)]


def test_a_resume_on_another_plan_is_refused(tmp_path, tiny_models, reflected_tiny):
    """Each checkpoint carries the plan's fingerprint in its trainer_state.json; resuming it with
    another plan (here the same reflection shuffled with another seed), from wherever it lies,
    or resuming a checkpoint trained without a curriculum, stops with the fix instead of
    training on."""
    tok, reflected, cur = reflected_tiny
    part = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur)
    part.add_callback(_StopAt(2))
    part.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert json.loads((checkpoint / "srd-plan.json").read_text())["fingerprint"] == cur.fingerprint
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["SRDPlanRecord"]["args"]["fingerprint"] == cur.fingerprint
    other = Curriculum.from_reflected(reflected, batch_size=2, curriculum=_CURRICULUM, seed=1)
    assert other.fingerprint != cur.fingerprint
    with pytest.raises(ValueError, match="another curriculum plan"):
        _gkd_trainer(tmp_path, tiny_models, tok, reflected, other).train(resume_from_checkpoint=str(checkpoint))

    def copy(name, *, record=True, logged_stage=True):
        """The checkpoint copied out of the trainer's output_dir, less what it is told to drop."""
        folder = tmp_path / name / "checkpoint-2"
        shutil.copytree(checkpoint, folder)
        (folder / "srd-plan.json").unlink()
        saved = json.loads((folder / "trainer_state.json").read_text())
        if not record:
            del saved["stateful_callbacks"]["SRDPlanRecord"]
        if not logged_stage:
            saved["log_history"] = [
                {k: v for k, v in r.items() if not k.startswith("srd_")} for r in saved["log_history"]
            ]
        (folder / "trainer_state.json").write_text(json.dumps(saved))
        return str(folder)

    # moved elsewhere (no srd-plan.json under the trainer's output_dir to read): the record goes with it
    moved = copy("moved")
    with pytest.raises(ValueError, match="another curriculum plan"):
        _gkd_trainer(tmp_path, tiny_models, tok, reflected, other, output_dir=str(tmp_path / "o2")).train(
            resume_from_checkpoint=moved
        )
    # the same trainer's checkpoint without a curriculum (no record, no srd_stage in its log):
    # resumed under one, its steps would count as the plan's first ones
    plain = copy("plain", record=False, logged_stage=False)
    with pytest.raises(ValueError, match="trained without a curriculum"):
        _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur, output_dir=str(tmp_path / "o3")).train(
            resume_from_checkpoint=plain
        )
    # one an older srd wrote (srd-plan.json beside it, no record): its plan file is read
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    del saved["stateful_callbacks"]["SRDPlanRecord"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="another curriculum plan"):
        _gkd_trainer(tmp_path, tiny_models, tok, reflected, other).train(resume_from_checkpoint=str(checkpoint))
    done = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur)
    done.train(resume_from_checkpoint=str(checkpoint))
    assert done.state.global_step == cur.total_steps
    # transformers restoring its stateful callbacks restores the record, and changes nothing else
    again = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur, restore_callback_states_from_checkpoint=True)
    again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert [r["srd_stage"] for r in again.state.log_history if "loss" in r][-1] == len(cur.stage_steps)
    final = json.loads((tmp_path / "out" / f"checkpoint-{cur.total_steps}" / "trainer_state.json").read_text())
    assert final["stateful_callbacks"]["SRDPlanRecord"]["args"]["fingerprint"] == cur.fingerprint


def test_attach_refuses_what_would_silently_break_the_plan(tmp_path, tiny_models, reflected_tiny):
    """Rows per step taken from the trainer (and checked), the plan's length, data skipping on
    resume, batch search, and a dataset the trainer changed (packing: with SFTTrainer)."""
    tok, reflected, cur = reflected_tiny
    derived = Curriculum.from_reflected(
        reflected, args=_gkd_trainer(tmp_path, tiny_models, tok, reflected, cur).args, curriculum=_CURRICULUM
    )
    assert derived == cur  # 2 rows per step: per-device 2 x accumulation 1 x 1 process
    for extra, words in [
        ({"gradient_accumulation_steps": 2}, "consumes 4 .*gradient_accumulation_steps 2"),
        ({"max_steps": 3}, "max_steps=3, and the curriculum is 8 steps"),
        ({"ignore_data_skip": True}, "ignore_data_skip=False"),
        ({"auto_find_batch_size": True}, "auto_find_batch_size=False"),
    ]:
        with pytest.raises(ValueError, match=words):
            _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur, **extra)
    short = Curriculum(cur.order[:-2], (1, 3, 3), cur.taus, cur.alphas, cur.batch_size)
    with pytest.raises(ValueError, match="the trainer's dataset has 16 rows and the curriculum 14"):
        _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur, attach=short)
    with pytest.raises(ValueError, match="args=...|batch_size=..."):
        Curriculum.from_reflected(reflected, curriculum=_CURRICULUM)
    # the plan's rows, in another order: the same length, so only the rows' srd_position tells
    for reorder in (lambda d: cur.dataset(d).shuffle(seed=1), lambda d: cur.dataset(d).sort("srd_position")):
        with pytest.raises(ValueError, match=r"not in the curriculum's order: its row \d+ is the reflection's row at"):
            _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur, data=reorder)
    other = Curriculum.from_reflected(reflected, batch_size=2, curriculum=_CURRICULUM, seed=1)  # another plan's order
    with pytest.raises(ValueError, match="from the reflection the curriculum was planned on"):
        _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur, data=other.dataset)
    trainer = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur)  # a second curriculum on it
    with pytest.raises(ValueError, match="already has a curriculum attached"):
        cur.attach(trainer)
    # what changes after attach is checked again when training starts, before any step
    trainer = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur)
    trainer.args.gradient_accumulation_steps = 2
    with pytest.raises(ValueError, match="consumes 4 .*gradient_accumulation_steps 2"):
        trainer.train()
    trainer = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur)
    data = trainer.train_dataset

    def fewer_rows():  # a trainer whose own dataloader reads fewer rows than its dataset holds
        trainer.train_dataset = data.select(range(len(data) - 4))
        try:
            return type(trainer).get_train_dataloader(trainer)
        finally:
            trainer.train_dataset = data

    trainer.get_train_dataloader = fewer_rows
    with pytest.raises(ValueError, match="will take 6 optimizer steps and the curriculum is 8"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "out" / "checkpoint-2").exists()


def test_rows_per_step_counts_what_one_optimizer_step_reads():
    """Per-device batch x DataParallel GPUs x accumulation x data-parallel processes; under
    split_batches one batch is split among the processes; tensor parallelism leaves fewer
    processes reading rows."""
    from types import SimpleNamespace as NS

    from srd.integrations.hf import data_parallel_size, rows_per_step

    base = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "world_size": 4, "n_gpu": 1}
    assert rows_per_step(NS(**base)) == 24
    assert rows_per_step(NS(**{**base, "world_size": 1, "n_gpu": 2})) == 12  # one process driving two GPUs
    assert rows_per_step(NS(**base, accelerator_config=NS(split_batches=True))) == 6
    assert rows_per_step(NS(**base), data_parallel=2) == 12

    class TensorParallel:
        args = NS(**base)

        def get_tp_size(self):
            return 2

    assert data_parallel_size(TensorParallel()) == 2


def test_attach_refuses_a_plan_for_the_processes_that_do_not_read_rows(tmp_path, tiny_models, reflected_tiny,
                                                                      monkeypatch):  # fmt: skip
    """A plan from the trainer's arguments counts every process; with model parallelism only
    the data-parallel ones read rows, and attach says which batch_size to build for."""
    import srd.integrations.hf as hf

    tok, reflected, cur = reflected_tiny
    monkeypatch.setattr(hf, "data_parallel_size", lambda trainer: 2)
    with pytest.raises(ValueError, match="consumes 4 .*x 2 processes.*batch_size=4 .*leaves 2 of 1 processes"):
        _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"num_stages": 2}, "reflected into 3 stages and the curriculum has num_stages=2"),
        ({"order": "hard_to_easy"}, "curriculum.order=hard_to_easy"),
        ({"lr_schedule": "per_stage"}, "lr_schedule='global'"),
        ({"re_reflect": True}, "re_reflect=False"),
    ],
)
def test_curriculum_settings_a_trainer_cannot_apply_are_refused(reflected_tiny, change, words):
    _, reflected, _ = reflected_tiny
    c = CurriculumConfig(**{**vars(_CURRICULUM), **change})
    with pytest.raises(ValueError, match=words):
        Curriculum.from_reflected(reflected, batch_size=2, curriculum=c)


def _order_only(cur: Curriculum) -> Curriculum:
    """The same plan at tau 1 and alpha 0: a curriculum of the order alone (SFT)."""
    import dataclasses

    n = len(cur.stage_steps)
    return dataclasses.replace(cur, taus=(1.0,) * n, alphas=(0.0,) * n)


def test_plain_trainer_takes_the_curriculum_as_an_sft_curriculum(tmp_path, tiny_models, reflected_tiny):
    from transformers import Trainer, TrainingArguments

    from srd.data.tokenize import collate
    from srd.models import load_model

    tok, reflected, cur = reflected_tiny
    encoded = _encoded_rows(tok, reflected)
    rows = reflected.add_column("row", list(range(len(reflected))))
    seen: list[int] = []

    def collator(features):
        seen.extend(f["row"] for f in features)
        return collate([encoded[f["row"]] for f in features], tok.pad_token_id)

    def trainer(**kw):
        args = {**_sequential_args(tmp_path / "sft"), "remove_unused_columns": False, **kw}
        return Trainer(
            model=load_model(str(tiny_models["llama-student"])),
            args=TrainingArguments(**args),
            train_dataset=cur.dataset(rows),
            data_collator=collator,
        )

    with pytest.raises(ValueError, match="train_sampling_strategy='sequential'"):
        cur.attach(trainer(train_sampling_strategy="random"))
    with pytest.raises(ValueError, match="num_train_epochs=1"):
        cur.attach(trainer(num_train_epochs=2))
    with pytest.raises(ValueError, match="Trainer's loss does not read the stage's tau"):
        cur.attach(trainer())  # no teacher: tau and alpha would be logged and never used
    cur = _order_only(cur)
    t = trainer()
    cur.attach(t)
    t.train()
    assert seen == list(cur.order)
    assert [r["srd_stage"] for r in t.state.log_history if "loss" in r] == [
        cur.stage_at(s) for s in range(cur.total_steps)
    ]


def test_distillation_trainer_reads_the_curriculum_in_order_at_each_stage_tau(tmp_path, tiny_models):
    """TRL's DistillationTrainer (on-policy): with shuffle_dataset=False it takes the prompts in
    the curriculum's order, and the callback's tau is the temperature its loss reads."""
    from trl import DistillationConfig, DistillationTrainer

    from srd.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_models["llama-student"]))
    tok.padding_side = "left"
    n = 12
    ds = datasets.Dataset.from_dict(
        {
            "prompt": [f"What is {i} plus {i}?" for i in range(n)],
            "srd_stage": [1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0],
            "srd_position": list(range(1, n + 1)),
        }
    )
    c = CurriculumConfig(num_stages=3, epochs_per_stage=1, alpha_start=0, alpha_end=0, lr_schedule="global")
    cur = Curriculum.from_reflected(ds, batch_size=2, curriculum=c)
    with_ce = Curriculum.from_reflected(
        ds, batch_size=2, curriculum=CurriculumConfig(**{**vars(c), "alpha_start": 0.3})
    )

    def trainer(shuffle: bool):
        args = DistillationConfig(
            output_dir=str(tmp_path / "dt"),
            per_device_train_batch_size=2,
            num_train_epochs=1,
            shuffle_dataset=shuffle,
            max_completion_length=4,
            use_cpu=True,
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
        )
        return DistillationTrainer(
            model=load_model(str(tiny_models["llama-student"])),
            teacher_model=load_model(str(tiny_models["llama-teacher"])),
            args=args,
            train_dataset=cur.dataset(ds),
            processing_class=tok,
        )

    with pytest.raises(ValueError, match="shuffle_dataset=False"):
        cur.attach(trainer(shuffle=True))
    with pytest.raises(ValueError, match="DistillationTrainer's loss does not read the stage's alpha"):
        with_ce.attach(trainer(shuffle=False))  # its loss has no CE term
    t = trainer(shuffle=False)
    prompts, temps = [], []
    generate, loss = t._generate_and_score_completions, t._compute_loss

    def spy_generate(inputs):
        prompts.extend(x["prompt"] for x in inputs)
        return generate(inputs)

    def spy_loss(*a, **k):
        temps.append(t.temperature)
        return loss(*a, **k)

    t._generate_and_score_completions, t._compute_loss = spy_generate, spy_loss
    cur.attach(t)
    t.train()
    assert prompts == [ds["prompt"][i] for i in cur.order]
    assert temps == [cur.taus[cur.stage_at(s) - 1] for s in range(cur.total_steps)]


def test_a_run_config_takes_overrides_like_a_recipe():
    from srd.config import ConfigError, RunConfig, with_overrides

    cfg = with_overrides(RunConfig(), ["reflect.keep_ratio=0.5", "generation.stop_strings=[]", "model.teacher=x/y"])
    assert cfg.reflect.keep_ratio == 0.5 and cfg.generation.stop_strings == [] and cfg.model.teacher == "x/y"
    assert with_overrides(cfg, []) == cfg
    with pytest.raises(ConfigError, match="keep_ratio"):
        with_overrides(cfg, ["reflect.keep_ratio=2"])


def test_a_run_config_with_another_prompt_template_than_the_trainers_is_refused(tmp_path, tiny_models):
    """RunConfig's default Alpaca template on prompt/completion rows (which the trainer sees as
    they are) would rank answers to other prompts: refused with the fix, which then works."""
    from srd.config import RunConfig
    from srd.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_models["llama-student"]))
    kw = dict(student=load_model(str(tiny_models["llama-student"])), tokenizer=tok, out_dir=tmp_path / "refl",
              config=RunConfig(), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="data.prompt_format is 'alpaca'.*data.prompt_format=plain"):
        reflect_dataset(_prompt_completion(6), **kw)
    fix = ["data.prompt_format=plain", "generation.max_new_tokens=4", "train.precision=fp32"]
    assert "srd_stage" in reflect_dataset(_prompt_completion(6), overrides=fix, **kw).column_names


def test_sft_trainer_reads_the_curriculum_in_order(tmp_path, tiny_models, reflected_tiny):
    """TRL's SFTTrainer (prompt / completion rows, tokenised by TRL itself): with its defaults
    (shuffle_dataset=False) and a sequential sampler, it trains on the rows in the curriculum's
    order, each stage's rows and repeats included; a shuffling config is refused."""
    from trl import SFTConfig, SFTTrainer

    from srd.models import load_model

    tok, reflected, cur = reflected_tiny
    ordered = cur.dataset(reflected).select_columns(["prompt", "completion"])

    def trainer(**kw):
        args = {**_sequential_args(tmp_path / "sft-trl"), "max_length": 64, **kw}
        return SFTTrainer(
            model=load_model(str(tiny_models["llama-student"])),
            args=SFTConfig(**args),
            train_dataset=ordered,
            processing_class=tok,
        )

    with pytest.raises(ValueError, match="shuffle_dataset=False"):
        cur.attach(trainer(shuffle_dataset=True))
    with pytest.raises(ValueError, match="SFTTrainer's loss does not read the stage's tau"):
        cur.attach(trainer())
    with pytest.raises(ValueError, match="packing=False"):
        _order_only(cur).attach(trainer(packing=True))
    cur = _order_only(cur)
    t = trainer()
    assert not t.args.shuffle_dataset  # TRL's default
    seen: list[list[int]] = []
    collate = t.data_collator

    def spy(features):
        seen.extend(list(f["input_ids"]) for f in features)
        return collate(features)

    t.data_collator = spy
    cur.attach(t)
    t.train()
    texts = [tok.decode(ids) for ids in seen]
    assert len(texts) == len(cur.order) == len(ordered)
    assert all(text.startswith(row["prompt"]) for text, row in zip(texts, ordered))
    assert [r["srd_stage"] for r in t.state.log_history if "loss" in r] == [
        cur.stage_at(s) for s in range(cur.total_steps)
    ]


def test_the_trl_example_runs_on_tiny_models(tmp_path, tiny_models):
    """examples/trl_srd.py as users run it (its own command line, TRL's own chat collator),
    on tiny models with a chat template: reflection, the plan from the trainer's arguments,
    every stage trained, a checkpoint with the plan's fingerprint, the final student saved."""
    import subprocess
    import sys
    from pathlib import Path

    models = with_chat_template(tiny_models, tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "examples" / "trl_srd.py"), "32", "--teacher", str(models["llama-teacher"])]
    cmd += ["--student", str(models["llama-student"]), "--data", str(data), "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stages of (2, 4, 6) optimizer steps" in done.stdout
    assert (out / "final" / "model.safetensors").exists()
    plans = sorted((out / "gkd").glob("checkpoint-*/srd-plan.json"))
    assert plans and json.loads(plans[-1].read_text())["stage_steps"] == [2, 4, 6]


def test_two_processes_take_the_plan_from_the_trainer_and_refuse_a_hand_typed_batch(tmp_path, tiny_models):
    """Under torchrun with 2 processes a step consumes 2 x the per-device rows: a plan typed for
    one process is refused (it would end after half its steps, its later stages early), and one
    made from the trainer's arguments trains every step of every stage on both processes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "tests" / "assets" / "curriculum_two_processes.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29623"]
    cmd += [str(script), str(tiny_models["llama-student"]), str(tmp_path / "out")]
    done = subprocess.run(
        cmd, cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads((tmp_path / "out" / f"result-rank{r}.json").read_text()) for r in range(2)]
    for r in lines:
        assert "planned for 2 rows per optimizer step" in r["refused"] and "consumes 4" in r["refused"]
        assert r["rows_per_step"] == 4 and r["steps"] == r["plan_steps"] == 2 + 4 + 6
        assert r["stages"] == [1] * 2 + [2] * 4 + [3] * 6


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_loss_from_the_teacher_store_is_the_dense_loss_when_k_covers_all_but_one_token(
    tiny_models, reflected_tiny, tmp_path, beta
):
    """use_teacher_store: with k = V - 1 the buckets are the teacher's whole distribution, so the
    stored loss equals the dense one (to the store's float16 precision) for forward KL, JSD and
    reverse KL, at a curriculum temperature, CE term included."""
    from srd.data.tokenize import collate
    from srd.integrations.trl import use_teacher_store

    tok, reflected, cur = reflected_tiny
    trainer = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur, beta=beta)
    batch = collate(_encoded_rows(tok, reflected)[:2], tok.pad_token_id)
    trainer.srd_tau, trainer.srd_alpha = 1.5, 0.25
    dense = float(trainer.compute_loss(trainer.model, batch).detach())
    store = use_teacher_store(trainer, top_k=len(tok) - 1)
    assert store.shard_taus(0) == [1.0, 1.5, 2.0]  # SRD's and the attached curriculum's
    stored = float(trainer.compute_loss(trainer.model, batch).detach())
    assert stored == pytest.approx(dense, rel=2e-3)


def test_a_gkd_run_from_the_teacher_store_never_runs_the_teacher_and_a_second_run_builds_nothing(
    tiny_models, reflected_tiny, tmp_path, teacher_store
):
    from srd.integrations.trl import use_teacher_store

    tok, reflected, cur = reflected_tiny
    trainer = _gkd_trainer(tmp_path / "a", tiny_models, tok, reflected, cur)
    store = use_teacher_store(trainer, top_k=8)
    assert store.root == teacher_store and len(store.index) == 9  # the 9 kept rows, once each

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran despite the store")

    trainer.teacher_model.forward = no_teacher
    trainer.train()
    assert all(r["loss"] > 0 for r in trainer.state.log_history if "loss" in r)
    again = _gkd_trainer(tmp_path / "b", tiny_models, tok, reflected, cur)
    shards = dict(store.shards)
    assert use_teacher_store(again, top_k=8).shards == shards  # nothing computed


def test_the_teacher_store_refuses_on_policy_batches(tiny_models, reflected_tiny, tmp_path):
    from srd.integrations.trl import use_teacher_store

    tok, reflected, cur = reflected_tiny
    trainer = _gkd_trainer(tmp_path, tiny_models, tok, reflected, cur, lmbda=0.5)
    with pytest.raises(ValueError, match="lmbda=0.5: on-policy batches"):
        use_teacher_store(trainer)


def test_srd_config_is_read_beside_the_trainers_config_and_drives_prepare_curriculum(tmp_path, tiny_models):
    """SRDConfig on the command line (or in a YAML file) beside TRL's own config, parsed by
    HfArgumentParser as TRL scripts do; its fields reach the reflection and the plan."""
    from transformers import HfArgumentParser, Trainer, TrainingArguments
    from trl import TrlParser
    from trl.experimental.gkd import GKDConfig

    from srd.integrations.hf import SRDConfig, prepare_curriculum
    from srd.models import load_model, load_tokenizer

    (tmp_path / "recipe.yaml").write_text("output_dir: out\nuse_cpu: true\nsrd_keep_ratio: 0.25\nsrd_num_stages: 2\n")
    gkd, from_yaml = TrlParser((GKDConfig, SRDConfig)).parse_args_and_config(
        ["--config", str(tmp_path / "recipe.yaml")]
    )
    assert from_yaml.srd_keep_ratio == 0.25 and from_yaml.srd_num_stages == 2 and gkd.beta == 0.5  # GKD's own beta
    argv = ["--output_dir", str(tmp_path / "t"), "--per_device_train_batch_size", "2", "--report_to", "none"]
    argv += ["--train_sampling_strategy", "sequential", "--use_cpu", "true", "--num_train_epochs", "1"]
    argv += ["--srd_num_stages", "2", "--srd_keep_ratio", "0.5", "--srd_epochs_per_stage", "1", "--srd_tau_end", "1"]
    argv += ["--srd_alpha_start", "0", "--srd_alpha_end", "0", "--srd_max_new_tokens", "4"]
    argv += ["--srd_reflection_dir", str(tmp_path / "refl"), "--srd_overrides", "train.precision=fp32"]
    args, srd = HfArgumentParser((TrainingArguments, SRDConfig)).parse_args_into_dataclasses(argv)
    assert srd.srd_scorers == ["rouge_l", "ce"] and srd.srd_overrides == ["train.precision=fp32"]
    tok = load_tokenizer(str(tiny_models["llama-student"]))
    student = load_model(str(tiny_models["llama-student"]))
    rows, cur = prepare_curriculum(_prompt_completion(12), args=args, student=student, tokenizer=tok, srd=srd)
    assert len(cur.stage_steps) == 2 and len(cur.rows) == 6 and cur.taus == (1.0, 1.0) and cur.batch_size == 2
    assert json.loads((tmp_path / "refl" / "meta.json").read_text())["settings"]["generation"]["max_new_tokens"] == 4
    cur.attach(Trainer(model=student, args=args, train_dataset=rows))
    with pytest.raises(ValueError, match="not both"):
        prepare_curriculum(_prompt_completion(12), args=args, student=student, tokenizer=tok, srd=srd,
                           curriculum=CurriculumConfig(lr_schedule="global"))  # fmt: skip


def test_sft_trainer_tokenises_each_row_once_and_attach_expands_it_into_the_plan(tmp_path, tiny_models, reflected_tiny):
    """distinct_dataset + attach(expand=True): SFTTrainer prepares each kept row once (9 rows, not
    the plan's 24), and trains on them in the plan's order, as from the expanded dataset."""
    from trl import SFTConfig, SFTTrainer

    from srd.models import load_model

    tok, reflected, cur = reflected_tiny
    cur = _order_only(cur)
    distinct = cur.distinct_dataset(reflected).select_columns(["prompt", "completion"])
    args = SFTConfig(**{**_sequential_args(tmp_path / "sft-once"), "max_length": 64})
    t = SFTTrainer(model=load_model(str(tiny_models["llama-student"])), args=args, train_dataset=distinct,
                   processing_class=tok)  # fmt: skip
    assert len(t.train_dataset) == len(cur.rows) == 9 < len(cur.order)  # tokenised once per row
    with pytest.raises(ValueError, match="the trainer's dataset has 9 rows and the curriculum"):
        cur.attach(t)  # the distinct rows without expand=True: refused, not trained out of plan
    seen: list[list[int]] = []
    collate = t.data_collator
    t.data_collator = lambda features: (seen.extend(list(f["input_ids"]) for f in features), collate(features))[1]
    cur.attach(t, expand=True)
    t.train()
    ordered = cur.dataset(reflected)
    assert len(seen) == len(ordered) and all(tok.decode(i).startswith(r["prompt"]) for i, r in zip(seen, ordered))
    short = SFTTrainer(model=load_model(str(tiny_models["llama-student"])), args=args,
                       train_dataset=distinct.select(range(8)), processing_class=tok)  # fmt: skip
    with pytest.raises(ValueError, match="expand=True: the trainer's dataset has 8 rows"):
        cur.attach(short, expand=True)


def test_dataloader_workers_keep_the_curriculum_order(tmp_path, tiny_models, reflected_tiny):
    """Two dataloader worker processes collate the batches: the rows still arrive in the plan's
    order, stage by stage."""
    from transformers import Trainer, TrainingArguments

    from srd.data.tokenize import collate
    from srd.models import load_model

    tok, reflected, cur = reflected_tiny
    cur = _order_only(cur)
    encoded = _encoded_rows(tok, reflected)
    rows = reflected.add_column("row", list(range(len(reflected))))
    seen: list[int] = []

    def collator(features):  # runs in the worker processes
        batch = collate([encoded[f["row"]] for f in features], tok.pad_token_id)
        return {**batch, "row": torch.tensor([f["row"] for f in features])}

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.extend(inputs.pop("row").tolist())  # in the main process, in training order
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = {**_sequential_args(tmp_path / "workers"), "remove_unused_columns": False, "dataloader_num_workers": 2}
    out_of_order = Recording(model=load_model(str(tiny_models["llama-student"])),
                             args=TrainingArguments(**args, dataloader_in_order=False), train_dataset=cur.dataset(rows),
                             data_collator=collator)  # fmt: skip
    with pytest.raises(ValueError, match="set dataloader_in_order=True"):
        cur.attach(out_of_order)
    t = Recording(model=load_model(str(tiny_models["llama-student"])), args=TrainingArguments(**args),
                  train_dataset=cur.dataset(rows), data_collator=collator)  # fmt: skip
    cur.attach(t)
    t.train()
    assert seen == list(cur.order)
