"""How much dev ROUGE-L moves when nothing that matters changes: the noise floor under which
a difference between two checkpoints (or two rows of the quality table) does not rank them.

    python benchmarks/dev_noise.py --config runs/quality-paper-cpu/paper-cpu-fkl-s42/config.yaml \\
        --models srd=runs/quality-paper-cpu/paper-cpu-fkl-s42/stages/stage-3/best \\
                 kd=runs/quality-paper-cpu/paper-cpu-fkl-s42/baseline/stages/baseline/best

Each model answers the dev rows the way a run's dev evaluation does (the run's config: its dev
set and rows, prompt template, generation settings, dev_eval.max_new_tokens, the decode loop in
generation.dtype), once per nuisance setting:

- greedy at several batch sizes: in bf16 an answer can depend on the rows decoded beside it, so
  this is the spread a dev score has at fixed weights;
- greedy with float32 weights;
- sampled at T = 1 (dev_eval.seeds' protocol) with each seed alone: the spread of a one-seed
  sampled dev score, and so the standard error of a mean over k seeds.

Reported per model: every score, their range and standard deviation; with several models, each
model's difference from the first under every setting, whether the sign holds, and a paired test
over the dev rows (mean difference, 95% bootstrap interval, Wilcoxon p) on the first greedy
setting and on each row's score averaged over the sampled seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _spread(xs: list[float]) -> str:
    if len(xs) < 2:
        return "-"
    return f"{min(xs):.2f}-{max(xs):.2f} (sd {statistics.stdev(xs):.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's config.yaml (its dev set and decoding settings)")
    p.add_argument("--models", nargs="+", required=True, help="label=model spec; the first is the reference")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--no-float32", action="store_true", help="skip the float32 greedy setting")
    p.add_argument("--record", default=None, help="markdown record path (default benchmarks/results/...)")
    args = p.parse_args(argv)

    import torch

    from benchmarks.common import header, save_record
    from srd.config import load_config
    from srd.data.prompts import encode_prompt
    from srd.data.sources import load_examples
    from srd.generation.decode import generate_responses, row_seeds
    from srd.generation.decoding import Decoding
    from srd.metrics.text import rouge_l
    from srd.models import load_model, load_tokenizer
    from srd.models.load import cast_for_inference, inference_dtype_of
    from srd.report import difference_cell, paired_difference

    cfg = load_config(args.config)
    models = []
    for item in args.models:
        label, sep, spec = item.partition("=")
        if not sep or not label or not spec:
            raise SystemExit(f"--models {item!r}: write label=model (e.g. srd=runs/x/stages/stage-3/best)")
        models.append((label, spec))
    dev = load_examples(cfg.data.dev, limit=cfg.data.dev_limit, data_dir=cfg.data.data_dir)
    dev = dev[: min(cfg.dev_eval.num_examples, len(dev))] if cfg.dev_eval.num_examples else dev
    dtype = inference_dtype_of(cfg.generation.dtype, bf16_training=cfg.train.precision == "bf16")
    precision = str(dtype).removeprefix("torch.")
    settings = [(f"greedy, {precision}, batch {bs}", dtype, bs, None) for bs in args.batch_sizes]
    if not args.no_float32 and dtype != torch.float32:
        settings.append((f"greedy, float32, batch {args.batch_sizes[0]}", torch.float32, args.batch_sizes[0], None))
    settings += [(f"sampled T = 1, seed {s}", dtype, args.batch_sizes[0], s) for s in args.seeds]
    scores: dict[str, dict[str, float]] = {}
    rows: dict[str, dict[str, list[float]]] = {}  # model -> setting -> per-dev-row scores
    seconds: dict[str, float] = {}
    for label, spec in models:
        tokenizer = load_tokenizer(spec)
        model = load_model(spec, dtype=torch.float32).eval()
        prompts = [encode_prompt(tokenizer, ex, cfg.data.prompt_format, cfg.data.max_prompt_len) for ex in dev]
        t0 = time.perf_counter()
        for name, dt, bs, seed in settings:
            sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if seed is not None else {}
            decoding = Decoding.of(
                cfg.generation,
                max_new_tokens=cfg.dev_eval.max_new_tokens,
                batch_size=bs,
                backend="loop",
                **{"do_sample": False, **sampling},
            )
            with cast_for_inference(model, dt):
                answers = generate_responses(
                    model, tokenizer, prompts, decoding, seeds=None if seed is None else row_seeds(seed, len(dev))
                )
            rows.setdefault(label, {})[name] = [rouge_l(a, ex.references) for a, ex in zip(answers, dev)]
            scores.setdefault(label, {})[name] = statistics.fmean(rows[label][name])
            print(f"{label}, {name}: {scores[label][name]:.2f}", flush=True)
        seconds[label] = time.perf_counter() - t0
    names = [s[0] for s in settings]
    greedy = [n for n in names if n.startswith("greedy") and "float32" not in n]
    sampled = [n for n in names if n.startswith("sampled")]
    lines = header("Dev ROUGE-L noise") + [
        f"Config `{args.config}`: {len(dev)} dev rows of `{cfg.data.dev}`, the `{cfg.data.prompt_format}` template, "
        f"at most {cfg.dev_eval.max_new_tokens} new tokens, the decode loop; decoding precision "
        f"{precision}. ROUGE-L x100, the mean over the dev rows.",
        "",
        "| setting | " + " | ".join(label for label, _ in models) + " |",
        "|---|" + "---|" * len(models),
        *(f"| {n} | " + " | ".join(f"{scores[lab][n]:.2f}" for lab, _ in models) + " |" for n in names),
        "",
        "| model | greedy over batch sizes: range (sd) | one sampled seed: range (sd) | sampled, mean of "
        f"{len(sampled)} seeds | its standard error | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for lab, _ in models:
        s = [scores[lab][n] for n in sampled]
        se = f"{statistics.stdev(s) / len(s) ** 0.5:.2f}" if len(s) > 1 else "-"
        mean_s = f"{statistics.fmean(s):.2f}" if s else "-"
        lines.append(
            f"| {lab} | {_spread([scores[lab][n] for n in greedy])} | {_spread(s)} | {mean_s} | {se} | "
            f"{seconds[lab]:.0f} |"
        )
    if len(models) > 1:
        ref = models[0][0]
        lines += [
            "",
            f"Each model minus `{ref}`, setting by setting:",
            "",
            "| model | " + " | ".join(names) + " | sign held |",
            "|---|" + "---|" * (len(names) + 1),
        ]
        for lab, _ in models[1:]:
            d = [scores[lab][n] - scores[ref][n] for n in names]
            held = sum(x > 0 for x in d) if statistics.fmean(d) > 0 else sum(x < 0 for x in d)
            lines.append(f"| {lab} | " + " | ".join(f"{x:+.2f}" for x in d) + f" | {held} of {len(d)} |")

        def per_row(lab: str, settings_: list[str]) -> dict[str, float]:
            return {str(i): statistics.fmean(rows[lab][n][i] for n in settings_) for i in range(len(dev))}

        tests = [(greedy[0], [greedy[0]])] if greedy else []
        if sampled:
            tests.append((f"sampled, each row's mean over {len(sampled)} seeds", sampled))
        lines += [
            "",
            f"Paired over the {len(dev)} dev rows, each model minus `{ref}` (mean difference [95% bootstrap "
            "interval], two-sided Wilcoxon p):",
            "",
            "| model | " + " | ".join(t for t, _ in tests) + " |",
            "|---|" + "---|" * len(tests),
        ]
        for lab, _ in models[1:]:
            cells = [difference_cell(paired_difference(per_row(ref, ns), per_row(lab, ns))) for _, ns in tests]
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    save_record("\n".join(lines) + "\n", args.record, "cpu" if not torch.cuda.is_available() else "gpu", "dev-noise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
