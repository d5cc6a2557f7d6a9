"""The `srd` command.

srd train CONFIG [key=value ...]     KD (any registered divergence) or SFT, one stage
srd run CONFIG [key=value ...]       SRD (reflection + curriculum) or KD, + baseline, evaluation, report
srd reflect CONFIG [key=value ...]   only the curation manifest
srd prune [CONFIG] [key=value ...]   a depth-pruned (and healed) student (flags: --teacher --layers --out ...)
srd eval TARGET [key=value ...]      benchmarks for a run or a model (flags: --benchmarks --greedy ...)
srd compare RUN ...                  scores, time, intervals and p-values of evaluated runs
srd report RUN                       RUN/report.md with plots
srd config CONFIG [key=value ...]    print the resolved config (defaults filled in)
srd divergences                      list the registered divergences
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from srd import config as _config


def _choices(section: type, name: str) -> list[str]:
    """The values a Literal-typed config field takes: the flags offer what the config accepts."""
    return list(typing.get_args(typing.get_type_hints(section, vars(_config))[name]))


OVERRIDE_HELP = (
    "dotted overrides applied after the YAML file, e.g. train.lr=1e-4 loss.divergence=rkl data.train_limit=200 "
    "(values are YAML: true, null, [a, b]); unknown keys are errors that list the valid ones"
)


# `srd prune` flags and `srd eval` flags: aliases of config keys (the command line's key=value
# overrides come after them, so an override wins over a flag)
PRUNE_FLAGS: list[tuple[str, str, dict]] = [
    ("--teacher", "model.teacher", {}),
    ("--out", "model.student", {}),
    ("--layers", "prune.layers", {"type": int}),
    ("--keep", "prune.keep", {"type": lambda v: [int(x) for x in v.split(",")]}),
    ("--method", "prune.method", {"choices": _choices(_config.PruneConfig, "method")}),
    ("--candidates", "prune.candidates", {"type": int}),
    ("--data", "prune.data", {}),
    ("--num-texts", "prune.num_texts", {"type": int}),
    ("--max-len", "prune.max_len", {"type": int}),
    ("--data-dir", "data.data_dir", {}),
    ("--heal-steps", "prune.heal_steps", {"type": int}),
    ("--heal-data", "prune.heal_data", {"nargs": "+"}),
    ("--heal-lr", "prune.heal_lr", {"type": float}),
    ("--heal-batch-size", "prune.heal_batch_size", {"type": int}),
]


EVAL_FLAGS: list[tuple[str, str, dict]] = [
    (
        "--benchmarks",
        "eval.benchmarks",
        {
            "nargs": "+",
            "help": "named benchmarks (dolly-eval self-inst vicuna-eval s-ni unni xsum samsum iwslt17-en-de gsm8k "
            "mbpp) or data files/sets scored with ROUGE-L (default: dolly-eval self-inst)",
        },
    ),
    (
        "--seeds",
        "eval.seeds",
        {
            "nargs": "+",
            "type": int,
            "help": "sampling seeds for instruction-following sets (default: 10 20 30 40 50); each example draws "
            "from its own stream of each seed, so answers do not depend on batch size, process count or resumption",
        },
    ),
    ("--greedy", "eval.greedy", {"action": "store_true", "help": "greedy decoding everywhere (no seeds)"}),
    (
        "--allow-code-execution",
        "allow_code_execution",
        {
            "action": "store_true",
            "help": "run the model's programs for mbpp (also needs SRD_ALLOW_CODE_EXECUTION=1; sandboxed against "
            "accidents, not attackers)",
        },
    ),
    ("--limit", "eval.limit", {"type": int, "help": "only the first N rows of each benchmark"}),
    ("--batch-size", "eval.batch_size", {"type": int, "help": "prompts decoded together (default 16)"}),
    ("--max-new-tokens", "eval.max_new_tokens", {"type": int, "help": "override each benchmark's token budget"}),
    (
        "--prompt-format",
        "data.prompt_format",
        {"choices": _choices(_config.DataConfig, "prompt_format"), "help": "prompt template"},
    ),
    (
        "--no-repeat-ngram-size",
        "eval.no_repeat_ngram_size",
        {"type": int, "help": "(default 0: off, as the paper's eval)"},
    ),
    (
        "--backend",
        "generation.backend",
        {
            "choices": _choices(_config.GenerationConfig, "backend"),
            "help": "decoding implementation (static: one KV-cache shape, compiled on a GPU; see srd.generation)",
        },
    ),
    (
        "--dtype",
        "eval.dtype",
        {
            "choices": _choices(_config.EvalConfig, "dtype"),
            "help": "weights' precision while decoding (default float32, comparable across machines; bfloat16 is "
            "faster on bf16 GPUs and on CPUs with AVX512-BF16/AMX, and its greedy answers differ a little)",
        },
    ),
    ("--data-dir", "data.data_dir", {"help": "folder holding named data sets"}),
]
DEFAULT_EVAL_BENCHMARKS = ["dolly-eval", "self-inst"]


def _metavar(flag: str, kw: dict) -> dict:
    """--num-texts N shows as NUM_TEXTS in --help, not as its config key."""
    if kw.get("action") == "store_true" or "choices" in kw:
        return kw
    return {"metavar": flag[2:].upper().replace("-", "_"), **kw}


def _flag_overrides(args: argparse.Namespace, flags: list[tuple[str, str, dict]]) -> list[str]:
    """key=value overrides for the alias flags that were given."""
    import json

    out = []
    for _, key, _ in flags:
        value = getattr(args, key)
        if value is not None:
            out.append(f"{key}={json.dumps(value) if isinstance(value, list | bool) else value}")
    return out


def _recipe_and_overrides(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """An optional recipe followed by overrides: a first word that looks like key=value and is no
    file is an override; '-' means no recipe."""
    if config is not None and "=" in config and not Path(config).exists():
        return None, [config, *overrides]
    return (None if config in (None, "-") else config), list(overrides)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srd",
        description="White-box knowledge distillation of LLMs with Selective Reflection Distillation (SRD).",
        epilog="Run `srd COMMAND --help` for the options of each command. Docs: README.md.\n\n"
        "environment:\n"
        "  SRD_DATA_DIR         folder of named data sets (before ../shared/data)\n"
        "  SRD_CACHE_DIR        converted models (default ~/.cache/srd)\n"
        "  SRD_TEACHER_STORE    the teacher store (default $SRD_CACHE_DIR/teacher-store; loss.teacher_store)\n"
        "  SRD_CPU_BF16=0       train.precision=auto stays fp32 on CPUs with native bf16\n"
        "  SRD_CPU_MALLOC=0     keep glibc's default allocator on CPUs (less resident memory, slower)\n"
        "  SRD_CPU_PACKED=0     decode float32 models on CPUs without packed weight copies (less memory, slower)\n"
        "  SRD_VLLM_GPU_MEMORY  share of GPU memory for the vLLM backend (default 0.5)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--version", action="version", version=f"srd {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    _add_training_commands(sub)
    _add_evaluation_commands(sub)
    _add_model_commands(sub)
    _add_store_command(sub)
    sub.add_parser("divergences", help="list the registered divergences")
    sub.add_parser(
        "env",
        help="print srd's version, the libraries and the machine (for a bug report)",
        description="What a run's numbers depend on beside its config: srd and its git commit, Python, the "
        "libraries, the CPU (its matmul instructions, native bf16), the GPUs. Every run folder keeps the same, "
        "one line per command started there, in environment.jsonl.",
    )
    return p


def _version() -> str:
    from srd import __version__

    return __version__


def _add_training_commands(sub: Any) -> None:
    """srd train, srd run, srd reflect."""
    t = sub.add_parser(
        "train",
        help="distil (or fine-tune) a student for one stage",
        description="Train the student with loss = alpha*CE + (1-alpha)*tau^2*D(p_tau||q_tau) "
        "(alpha=1 is plain SFT). Writes runs/<name>/: config.yaml, checkpoints/, best/, "
        "final/, logs/, tb/. Rerunning the same command resumes an interrupted run.",
    )
    t.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml ('-' for defaults + overrides only)")
    t.add_argument("overrides", nargs="*", default=[], help=OVERRIDE_HELP)
    t.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")

    r = sub.add_parser(
        "run",
        help="SRD end to end (reflection + curriculum), KD or GKD; + KD baseline, evaluation, report",
        description="method=srd: the student answers every training prompt, examples are ranked by ROUGE-L and "
        "cross-entropy (reciprocal rank fusion), the easiest reflect.keep_ratio are kept and taught in "
        "curriculum.num_stages cumulative stages with rising tau and falling alpha. method=baseline: plain KD on "
        "all data with the same code. method=traditional: length + entropy curriculum, no filtering. With "
        "compare.baseline=true it also trains the plain-KD baseline at 1/compare.step_ratio of SRD's sample "
        "passes; with eval.benchmarks it evaluates eval.models (teacher, initial, baseline, final) and writes "
        "comparison.md (Wilcoxon p-values) and report.md. Writes runs/<name>/ (reflection/, stages/, "
        "results.json, experiment.json) and resumes when rerun.",
    )
    r.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml ('-' for defaults + overrides only)")
    r.add_argument("overrides", nargs="*", default=[], help=OVERRIDE_HELP)
    r.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")

    rf = sub.add_parser(
        "reflect",
        help="only the reflection step: score, rank and stage the training data",
        description="The student answers every training prompt (decoding: the generation section); "
        "reflect.scorers score each example; reciprocal rank fusion ranks them; writes "
        "runs/<name>/reflection/manifest.jsonl and summary.json. An interrupted reflection resumes without "
        "redoing finished rows.",
    )
    rf.add_argument("config", help="YAML recipe ('-' for defaults + overrides only)")
    rf.add_argument("overrides", nargs="*", default=[], help=OVERRIDE_HELP)
    rf.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_evaluation_commands(sub: Any) -> None:
    """srd eval, srd compare, srd report."""
    ev = sub.add_parser(
        "eval",
        help="evaluate a model or a run on benchmarks (ROUGE-L, BLEU, GSM8K accuracy, MBPP pass@1)",
        description="Generate answers on each benchmark and score them. Instruction-following sets sample at "
        "temperature 1 over --seeds (the paper: 10 20 30 40 50) unless --greedy; summarisation, translation, "
        "math and code are greedy. Writes per-example JSONL and summary.json/summary.md to --out (default: "
        "RUN/eval/<sampled|greedy>/ for a run directory, runs/eval/<run>-<stage>-<final|best>-<mode>/ for one of "
        "its checkpoints, runs/eval/<folder name>-<hash of its path>-<mode>/ for another local model, "
        "runs/eval/<hub id>-<mode>/ otherwise). Finished benchmarks are reused when rerun; a folder holding another "
        "model's answers (by name, or by a fingerprint of its weights) is refused.",
    )
    ev.add_argument(
        "target",
        help="run directory (the model its run evaluates: final, or best with eval.checkpoint=best), model folder, "
        ".gguf, Hub id or bundled alias",
    )
    ev.add_argument(
        "overrides",
        nargs="*",
        default=[],  # optional: a missing target is then the only argument named as required
        help="key=value overrides of the eval, data and generation sections (e.g. eval.limit=50 eval.greedy=true); "
        "before or after the flags",
    )
    ev.add_argument("--config", default=None, help="a YAML recipe to take the eval / data / generation settings from")
    for flag, key, kw in EVAL_FLAGS:
        ev.add_argument(flag, dest=key, default=None, **_metavar(flag, kw))
    ev.add_argument(
        "--out",
        default=None,
        help="output folder: a new or empty one, or one srd evaluated into (default: runs/eval/<model>-<mode>, or "
        "the run's eval/<mode>)",
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")

    cmp = sub.add_parser(
        "compare",
        help="compare evaluated runs: scores, average, relative gain, wall time, Wilcoxon p-values",
        description="A table like the SRD paper's Table 1 for runs evaluated with `srd eval`: per-benchmark "
        "scores, their average, the gain relative to the first run, wall-clock training time and its reduction, "
        "and a Wilcoxon signed-rank test on per-example scores against the first run.",
    )
    cmp.add_argument(
        "runs",
        nargs="+",
        help="run directories or `srd eval` output folders (the first is the reference, e.g. the KD baseline)",
    )
    cmp.add_argument("--eval", default="sampled", help="which eval folder of each run folder: sampled or greedy")
    cmp.add_argument(
        "--out",
        default=None,
        help="also write the table to this markdown file (a new one, or one srd compare wrote before)",
    )

    rep = sub.add_parser(
        "report",
        help="write RUN/report.md with plots of reflection, curriculum, training and evaluation",
        description="Markdown report with PNG plots: reflection score distributions and the selection cut, "
        "stage sizes, the tau/alpha schedule, training loss and dev ROUGE-L across stages, evaluation results.",
    )
    rep.add_argument("run", help="run directory")


def _add_model_commands(sub: Any) -> None:
    """srd config, srd prune."""
    c = sub.add_parser(
        "config",
        help="print the resolved config of a recipe",
        description="Load a YAML recipe, apply overrides, validate, and print every option.",
    )
    c.add_argument("config", nargs="?", help="YAML recipe (omit, or '-', for the defaults + overrides)")
    c.add_argument("overrides", nargs="*", default=[], help=OVERRIDE_HELP)
    c.add_argument(
        "--reference", action="store_true", help="print the reference of every option (docs/configuration.md)"
    )

    pr = sub.add_parser(
        "prune",
        help="build a depth-pruned student from a teacher (optionally healed by KD: prune.heal_steps)",
        description="Keep prune.layers of model.teacher's decoder layers, chosen by measured perplexity on "
        "real text, and save the student to the folder model.student names (HF folder + tokenizer + prune.json "
        "with the kept layers and perplexities); with prune.heal_steps, heal it by KD on prune.heal_data. "
        "Settings come from a recipe's model and prune sections and key=value overrides, like the other "
        "commands (the flags below are aliases). Reuses the folder if it was built the same way.",
    )
    pr.add_argument("config", nargs="?", default=None, help="YAML recipe (omit, or '-', for the defaults + overrides)")
    pr.add_argument("overrides", nargs="*", default=[], help=OVERRIDE_HELP)
    for flag, key, kw in PRUNE_FLAGS:
        pr.add_argument(flag, dest=key, default=None, help=f"alias of {key}=...", **_metavar(flag, kw))
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing non-empty --out folder that srd did not write (refused otherwise)",
    )


def _add_store_command(sub: Any) -> None:
    """srd store."""
    st = sub.add_parser(
        "store",
        help="list the teacher store's entries (loss.teacher_top_k), check them, set damaged shards aside",
        description="The teacher store keeps the teacher's top-k logits of every training row a run with "
        "loss.teacher_top_k > 0 computed, for every later run with the same teacher and k. List its entries "
        "(teacher, k, rows, bytes per target position, build time); --verify checks every shard against its "
        "recorded size and SHA-256 (after copying a store to another machine, say).",
    )
    st.add_argument(
        "--store",
        default=None,
        help="the store's folder (default: $SRD_TEACHER_STORE, else <srd cache folder>/teacher-store)",
    )
    st.add_argument("--verify", action="store_true", help="check every shard file; exit 1 if one is damaged")
    st.add_argument(
        "--remove",
        nargs="+",
        metavar="ENTRY",
        default=None,
        help="remove these entries (names as listed) to free their disk; refused while a run uses one",
    )
    st.add_argument(
        "--set-aside",
        action="store_true",
        help="with --verify: move damaged shards into <entry>/damaged/ and forget their rows "
        "(the next run computes them again)",
    )


def quiet_library_logs() -> None:
    """Drop two library messages every run printed that tell a user nothing: rouge-score's
    'Using default tokenizer.' (absl, INFO) and DeepSpeed's 'Setting accelerator to CPU'
    (a warning at import, which accelerate triggers whenever DeepSpeed is installed)."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").addFilter(lambda r: "Setting accelerator to CPU" not in r.getMessage())


# a dotted key=value (train.lr=1e-4): always an override, never a benchmark, a seed or a data set
_OVERRIDE_TOKEN = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")
_NEGATIVE_NUMBER = re.compile(r"^-\d+$")


def _list_flags() -> set[str]:
    """The flags that take several values (--benchmarks a b, --seeds 1 2, --heal-data x y)."""
    return {flag for flag, _, kw in (*EVAL_FLAGS, *PRUNE_FLAGS) if kw.get("nargs") in ("+", "*")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the overrides a list flag would swallow given back: in `srd eval M
    --benchmarks dolly-eval eval.limit=50` argparse reads eval.limit=50 as one more benchmark (and
    after --seeds, as a bad integer); a dotted key=value there is an override, so it is taken out of
    the list and added to the command's overrides, in the order given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    list_flags, kept, moved, in_list = _list_flags(), [], [], False
    for token in argv:
        if token.startswith("-") and not _NEGATIVE_NUMBER.match(token):
            in_list = token in list_flags
            kept.append(token)
        elif in_list and _OVERRIDE_TOKEN.match(token):
            moved.append(token)
        else:
            kept.append(token)
    parser = _parser()
    args = parser.parse_args(kept)
    if moved:
        args.overrides = [*args.overrides, *moved]  # list flags exist only on commands that take overrides
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_library_logs()
    from srd.config import ConfigError
    from srd.data.example import DataError
    from srd.eval.evaluate import EvalError
    from srd.models.load import ModelError
    from srd.reflect.reflect import ReflectionError
    from srd.report import ReportError
    from srd.train.checkpoint import CheckpointError
    from srd.utils import DamagedFileError, FolderError

    if args.command is None:
        _parser().print_help()
        return 2
    import torch

    from srd.utils import tune_cpu_allocator

    if not torch.cuda.is_available():
        tune_cpu_allocator()  # vocabulary-sized tensors reuse freed pages (SRD_CPU_MALLOC=0: off)
    from srd.runtime import command_started

    command_started(["srd", *(sys.argv[1:] if argv is None else argv)])  # what a run folder records
    try:
        return _dispatch(args)
    except (
        CheckpointError,
        ConfigError,
        DamagedFileError,
        DataError,
        EvalError,
        FolderError,
        ModelError,
        ReflectionError,
        ReportError,
    ) as e:
        print(f"srd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"srd {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        from srd.utils import disk_full

        if not disk_full(e):
            raise
        print(
            f"srd {args.command}: error: no space left on device ({e}). Finished work is kept (files are "
            "written to temporary names and renamed when complete). Free some space (finished runs' "
            "checkpoints/ folders and optimizer*.pt files can go; train.keep_last=1 keeps fewer "
            "checkpoints) and rerun the same command to resume.",
            file=sys.stderr,
        )
        return 1


def _store(args: argparse.Namespace) -> int:
    from srd.config import ConfigError
    from srd.train.teacher_store import OldEntryError, TeacherStore, default_store, entries
    from srd.utils import srd_folder_kind

    if args.set_aside and not args.verify:
        raise ConfigError("--set-aside works with --verify (srd store --verify --set-aside)")
    if args.remove and args.verify:
        raise ConfigError("--remove and --verify are two commands: run one, then the other")
    root = Path(args.store).expanduser() if args.store else default_store()
    if args.store and not root.is_dir():
        raise ConfigError(f"--store {root}: no such folder")
    if args.remove:
        from srd.train.teacher_store import remove_entry

        for name in dict.fromkeys(args.remove):  # each is checked, then removed, in turn
            size = remove_entry(root, name)
            print(f"removed teacher store entry {root / name} ({size / 2**20:.1f} MiB)")
        return 0
    found = entries(root)
    if not found and root.is_dir() and srd_folder_kind(root) != "teacher-store" and any(root.iterdir()):
        inner = root / "teacher-store"
        hint = f": did you mean {inner}?" if srd_folder_kind(inner) == "teacher-store" else ""
        raise ConfigError(f"--store {root} is not a teacher store (srd did not make it as one){hint}")
    print(f"teacher store {root}: {len(found)} {'entry' if len(found) == 1 else 'entries'}")
    damaged: list[str] = []
    for folder in found:
        try:
            store = TeacherStore.open(folder)
        except OldEntryError:
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            print(
                f"  {folder.name}: written by an older srd, not read by this one; `srd store --remove {folder.name}` "
                f"frees {size / 2**20:.1f} MiB"
            )
            continue
        s = store.summary()
        taus = ", ".join(f"{t:g}" for t in s["taus"]) or "-"
        used = store.used()
        print(
            f"  {s['entry']}: teacher {s['teacher']} ({s['teacher_dtype']}), k {s['top_k']}, vocabulary {s['vocab']}, "
            f"temperatures {taus}: {s['rows']} rows, {s['positions']} target positions, "
            f"{s['bytes'] / 2**20:.1f} MiB ({s['bytes_per_position']:.0f} bytes per position; "
            f"{s['bytes_on_disk'] / 2**20:.1f} MiB on disk), built in {s['build_seconds']:.0f} s"
            + (
                "; used with "
                + ", ".join(f"{name} (last {at})" for name, at in sorted(used.items(), key=lambda x: x[1]))
                if used
                else ""
            )
        )
        if args.verify:
            bad = store.verify(set_aside=args.set_aside)
            damaged += bad
            for line in bad:
                print(f"    damaged: {line}{' (set aside)' if args.set_aside else ''}")
        store.close()  # listed: not held while the next entry is read
    if args.verify:
        if damaged and not args.set_aside:
            print(f"{len(damaged)} damaged file(s); srd store --verify --set-aside moves their shards aside")
            return 1
        print("every shard matches its recorded size and SHA-256" if not damaged else "damaged shards set aside")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        from srd.config import load_config
        from srd.recipes.train import run_train

        cfg = load_config(None if args.config == "-" else args.config, args.overrides)
        summary = run_train(cfg, progress=not args.no_progress)
        return 0 if summary["complete"] or cfg.train.stop_after_steps else 1
    if args.command in ("run", "reflect"):
        from srd.config import load_config
        from srd.recipes.experiment import run_experiment
        from srd.recipes.pipeline import run_reflect

        cfg = load_config(None if args.config == "-" else args.config, args.overrides)
        if args.command == "reflect":
            run_reflect(cfg, progress=not args.no_progress)
            return 0
        results = run_experiment(cfg, progress=not args.no_progress)
        return 0 if results["complete"] or cfg.train.stop_after_steps else 1
    if args.command == "eval":
        return _eval(args)
    if args.command == "compare":
        from srd.report import compare_runs

        table = compare_runs([Path(r) for r in args.runs], eval_name=args.eval)
        print(table, end="")
        if args.out:
            from srd.report import write_comparison_file

            write_comparison_file(Path(args.out), table)
        return 0
    if args.command == "report":
        from srd.report import write_report

        path = write_report(Path(args.run))
        print(f"report: {path}")
        return 0
    if args.command == "store":
        return _store(args)
    if args.command == "config":
        from srd.config import dump_config, load_config

        if args.reference:
            from srd.config_reference import reference_markdown

            print(reference_markdown(), end="")
            return 0
        print(dump_config(load_config(*_recipe_and_overrides(args.config, args.overrides))), end="")
        return 0
    if args.command == "prune":
        report, out = _prune(args)
        healed = "healed " if "heal" in report else ""
        print(
            f"{healed}student with layers {report['kept_layers']} "
            f"({report['student_parameters'] / 1e6:.1f}M parameters) saved to {out}"
        )
        pruned = f", pruned {report['pruned_perplexity']:.2f} before healing" if "heal" in report else ""
        print(
            f"perplexity on {report['measured_on']}: teacher {report['teacher_perplexity']:.2f}, "
            f"student {report['student_perplexity']:.2f}{pruned}"
        )
        return 0
    if args.command == "env":
        from srd.runtime import environment

        for key, value in environment().items():
            print(f"{key}: {value}")
        return 0
    if args.command == "divergences":
        from srd.losses import DIVERGENCES

        for name, d in DIVERGENCES.items():
            doc = (d.fn.__doc__ or "").strip().splitlines()[0]
            print(f"{name:6s} {doc}")
        return 0
    raise AssertionError(args.command)


def _prune(args: argparse.Namespace) -> tuple[dict, str]:
    from srd.config import ConfigError, load_config
    from srd.recipes.prune import make_student

    recipe, overrides = _recipe_and_overrides(args.config, args.overrides)
    cfg = load_config(recipe, [*_flag_overrides(args, PRUNE_FLAGS), *overrides])
    m = cfg.model
    if m.teacher is None:
        raise ConfigError("srd prune prunes model.teacher, which is null: name it (--teacher or model.teacher=...)")
    if m.student == m.teacher:
        raise ConfigError(
            "srd prune writes the student to the folder model.student names, which is the teacher here: "
            "name a folder (--out DIR or model.student=DIR)"
        )
    report = make_student(
        m.teacher,
        m.student,
        cfg.prune,
        data_dir=cfg.data.data_dir,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    return report, m.student


def _run_training_rows(run_dir: Path | None) -> list[Any]:
    """The training rows of the run `srd eval` evaluates, as its config.yaml names them; none
    where the run or its data cannot be read any more (the evaluation does not need them)."""
    if run_dir is None:
        return []
    from srd.config import ConfigError, load_config
    from srd.data.example import DataError
    from srd.data.sources import is_local
    from srd.recipes.train import load_data
    from srd.rundir import RunDir

    try:
        cfg = load_config(str(RunDir(run_dir).config))
        specs = [cfg.data.train] if isinstance(cfg.data.train, str) else list(cfg.data.train)
        if not all(is_local(s, data_dir=cfg.data.data_dir) for s in specs):  # never a wait on the Hub for this
            return []
        return load_data(cfg, warn=False)[0]
    except (ConfigError, DataError, OSError, ValueError) as e:
        logging.getLogger(__name__).debug("the training rows of %s were not read: %s", run_dir, e)
        return []


def _eval(args: argparse.Namespace) -> int:
    from srd.config import ConfigError, load_config
    from srd.eval.evaluate import (
        check_benchmarks,
        check_run_eval_folder,
        default_eval_name,
        evaluate_model,
        resolve_eval_target,
        summary_markdown,
    )
    from srd.models.load import check_model_spec
    from srd.rundir import RunDir
    from srd.runtime import make_accelerator
    from srd.utils import lock_folder, srd_folder_kind

    overrides = [*_flag_overrides(args, EVAL_FLAGS), *args.overrides]
    cfg = load_config(args.config, overrides)
    seeds = [o.split("=", 1)[1] for o in overrides if o.startswith("eval.seeds=")]
    if cfg.eval.greedy and seeds:
        raise ConfigError(
            f"--greedy (eval.greedy) decodes every benchmark once, without seeds, so the seeds {seeds[-1]} given "
            "would be ignored: give --greedy or --seeds, not both"
        )
    benchmarks = cfg.eval.benchmarks or DEFAULT_EVAL_BENCHMARKS
    model_spec, run_dir = resolve_eval_target(args.target)
    check_model_spec(model_spec)  # the model and every benchmark's rows before any weights are read
    check_benchmarks(
        benchmarks,
        data_dir=cfg.data.data_dir,
        limit=cfg.eval.limit,
        allow_code_execution=cfg.allow_code_execution,
        fmt=cfg.data.prompt_format,
        train=_run_training_rows(run_dir),  # a run's own training rows in a benchmark are said
    )
    acc = make_accelerator("auto")
    mode = "greedy" if cfg.eval.greedy else "sampled"
    if args.out:
        out = Path(args.out)
        check_run_eval_folder(out, run_dir, model_spec)  # another model's scores are not reported as the run's
    elif run_dir is not None:
        out = RunDir(run_dir).eval(mode)
    else:
        out = Path("runs") / "eval" / f"{default_eval_name(model_spec)}-{mode}"
    if acc.is_main_process and srd_folder_kind(out) == "evaluation":
        lock_folder(out, "evaluation folder")  # another srd eval writing there now: said before the model loads
    summary = evaluate_model(
        model_spec, cfg, out, accelerator=acc, progress=not args.no_progress, benchmarks=benchmarks
    )
    if acc.is_main_process:
        print(summary_markdown(summary), end="")
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
