"""The `srd` command.

srd train CONFIG [key=value ...]     KD (any registered divergence) or SFT, one stage
srd prune --teacher M --layers N --out DIR
srd config CONFIG [key=value ...]    print the resolved config (defaults filled in)
srd divergences                      list the registered divergences
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

OVERRIDE_HELP = (
    "dotted overrides applied after the YAML file, e.g. train.lr=1e-4 loss.divergence=rkl data.train_limit=200 "
    "(values are YAML: true, null, [a, b]); unknown keys are errors that list the valid ones"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srd",
        description="White-box knowledge distillation of LLMs with Selective Reflection Distillation (SRD).",
        epilog="Run `srd COMMAND --help` for the options of each command. Docs: README.md.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="distil (or fine-tune) a student for one stage",
        description="Train the student with loss = alpha*CE + (1-alpha)*tau^2*D(p_tau||q_tau) "
        "(alpha=1 is plain SFT). Writes runs/<name>/: config.yaml, checkpoints/, best/, "
        "final/, logs/, tb/. Rerunning the same command resumes an interrupted run.",
    )
    t.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml ('-' for defaults + overrides only)")
    t.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    t.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")

    r = sub.add_parser(
        "run",
        help="SRD end to end (reflection + curriculum), or the KD baseline",
        description="method=srd: the student answers every training prompt, examples are ranked by ROUGE-L and "
        "cross-entropy (reciprocal rank fusion), the easiest reflect.keep_ratio are kept and taught in "
        "curriculum.num_stages cumulative stages with rising tau and falling alpha. method=baseline: plain KD on "
        "all data with the same code. method=traditional: length + entropy curriculum, no filtering. Writes "
        "runs/<name>/ (reflection/, stages/, results.json) and resumes when rerun.",
    )
    r.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml ('-' for defaults + overrides only)")
    r.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
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
    rf.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    rf.add_argument("--no-progress", action="store_true", help="no progress bars")

    c = sub.add_parser(
        "config",
        help="print the resolved config of a recipe",
        description="Load a YAML recipe, apply overrides, validate, and print every option.",
    )
    c.add_argument("config", nargs="?", help="YAML recipe (omit for the defaults)")
    c.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)

    pr = sub.add_parser(
        "prune",
        help="build a depth-pruned student from a teacher",
        description="Keep N of the teacher's decoder layers, chosen by measured perplexity on "
        "real text, and save the student (HF folder + tokenizer + prune.json with "
        "the kept layers and perplexities). Reuses DIR if it was built the same way.",
    )
    pr.add_argument(
        "--teacher",
        required=True,
        help="Hub id, model folder, .gguf file, or smollm2-135m-instruct (the bundled model)",
    )
    pr.add_argument("--layers", type=int, required=True, help="number of decoder layers the student keeps")
    pr.add_argument("--out", required=True, help="folder to write the student to")
    pr.add_argument("--data", default="dolly-dev", help="text to measure perplexity on (data spec; default dolly-dev)")
    pr.add_argument("--num-texts", type=int, default=8, help="rows of --data used (default 8)")
    pr.add_argument("--max-len", type=int, default=256, help="tokens per row (default 256)")
    pr.add_argument(
        "--method",
        choices=["greedy", "oneshot"],
        default="greedy",
        help="greedy: remove one layer at a time, re-measuring (better); "
        "oneshot: rank layers once by single-layer removal (faster)",
    )
    pr.add_argument("--candidates", type=int, default=4, help="greedy: layers re-measured at each removal (default 4)")
    pr.add_argument(
        "--keep", default=None, help="comma-separated layer indices to keep instead of searching, e.g. 0,1,2,8,29"
    )
    pr.add_argument("--data-dir", default=None, help="folder holding named data sets (default: ../shared/data)")

    sub.add_parser("divergences", help="list the registered divergences")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from srd.config import ConfigError
    from srd.data.example import DataError
    from srd.models.load import ModelError
    from srd.reflect.reflect import ReflectionError

    if args.command is None:
        _parser().print_help()
        return 2
    try:
        return _dispatch(args)
    except (ConfigError, DataError, ModelError, ReflectionError) as e:
        print(f"srd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"srd {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        from srd.config import load_config
        from srd.train.recipe import run_train

        cfg = load_config(None if args.config == "-" else args.config, args.overrides)
        summary = run_train(cfg, progress=not args.no_progress)
        return 0 if summary["complete"] or cfg.train.stop_after_steps else 1
    if args.command in ("run", "reflect"):
        from srd.config import load_config
        from srd.pipeline import run_pipeline, run_reflect

        cfg = load_config(None if args.config == "-" else args.config, args.overrides)
        if args.command == "reflect":
            run_reflect(cfg, progress=not args.no_progress)
            return 0
        results = run_pipeline(cfg, progress=not args.no_progress)
        return 0 if results["complete"] or cfg.train.stop_after_steps else 1
    if args.command == "config":
        from srd.config import dump_config, load_config

        print(dump_config(load_config(args.config, args.overrides)), end="")
        return 0
    if args.command == "prune":
        from srd.models.prune import prune_model

        keep = [int(x) for x in args.keep.split(",")] if args.keep else None
        report = prune_model(
            args.teacher,
            args.layers,
            args.out,
            data=args.data,
            num_texts=args.num_texts,
            max_len=args.max_len,
            method=args.method,
            candidates=args.candidates,
            keep=keep,
            data_dir=args.data_dir,
        )
        print(
            f"student with layers {report['kept_layers']} ({report['student_parameters'] / 1e6:.1f}M parameters) "
            f"saved to {args.out}"
        )
        print(
            f"perplexity on {report['measured_on']}: teacher {report['teacher_perplexity']:.2f}, "
            f"student {report['student_perplexity']:.2f}"
        )
        return 0
    if args.command == "divergences":
        from srd.losses import DIVERGENCES

        for name, d in DIVERGENCES.items():
            doc = (d.fn.__doc__ or "").strip().splitlines()[0]
            print(f"{name:6s} {doc}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
