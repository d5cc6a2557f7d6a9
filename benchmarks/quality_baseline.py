"""Train and evaluate only the KD baseline of one `quality.py` pair, into the folders that
`quality.py` uses (<out>/<run>/baseline/, its evaluations in eval/greedy and eval/sampled).

    python benchmarks/quality_baseline.py --preset paper-cpu --seed 42 --out runs/quality-paper-cpu-1k \
        data.train_limit=1000 train.eval_every=200

A pair whose two halves do not fit one sitting (a machine lent for a few hours at a time) can
be run as two: this script trains the KD baseline that `quality.py` would train after SRD, with
the same config (`compare.step_ratio` of SRD's planned sample passes, computed before any SRD
training), picks its best dev ROUGE-L checkpoint and evaluates it greedy and sampled at the
preset's seeds. Resumable: rerun the same command. It writes `<out>/<run>/baseline-side.json`:
the baseline's phase times, its sample passes, the evaluated checkpoint and the evaluation times.

Carrying the finished half to the other sitting (weights stay behind; what the record reads goes):

    python benchmarks/quality_baseline.py ... --pack kd-half.tar.gz      # after the KD half finished
    python benchmarks/quality_baseline.py ... --unpack kd-half.tar.gz    # on the other machine, first
    python benchmarks/quality.py --preset paper-cpu --out runs/quality-paper-cpu-1k \
        data.train_limit=1000 train.eval_every=200 compare.baseline=false   # the SRD half

`--report-only` with the same arguments writes the record of the pair; its wall-time ratio is
marked, since the two halves may have run on machines of different speeds.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import claim_out, log_machine  # noqa: E402
from benchmarks.quality import (  # noqa: E402
    PRESETS,
    SIDE_FILE,
    _quality_eval_path,
    evaluate_models,
    overrides_for,
    plan,
)

# what a packed half leaves behind: weights, optimizer states, tokenizers, TensorBoard logs
SKIP_DIRS = {"checkpoints", "tb"}
SKIP_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}
SKIP_NAMES = {"tokenizer.json"}
MAX_FILE = 8 << 20


def packed_files(run: Path) -> list[Path]:
    """The KD half's files that a record reads (relative to `run`): its baseline folder without
    weights, its side summary and quality.py's evaluation times."""
    files = [Path(x) for x in (SIDE_FILE, "quality-eval.json") if (run / x).exists()]
    for f in sorted((run / "baseline").rglob("*")):
        rel = f.relative_to(run)
        if f.is_symlink() or not f.is_file() or SKIP_DIRS & set(rel.parts) or f.name in SKIP_NAMES:
            continue
        if f.suffix in SKIP_SUFFIXES:
            continue
        if f.stat().st_size > MAX_FILE:
            raise SystemExit(f"error: {f} is {f.stat().st_size >> 20} MiB, more than a packed half carries")
        files.append(rel)
    return files


def claim_run(run: Path) -> None:
    """Make `run` srd's run folder (as `srd run` does), or refuse a folder that is something else."""
    from srd.config import is_run_folder
    from srd.utils import FolderError, claim_folder

    try:
        claim_folder(run, "run", legacy=is_run_folder(run))
    except FolderError as e:
        raise SystemExit(f"error: {e}") from None


def pack(run: Path, out: Path, archive: Path) -> None:
    """Write the finished KD half of `run` to `archive` (a new file; never over an existing one)."""
    from srd.utils import tmp_sibling

    side = run / SIDE_FILE
    if not side.exists():
        raise SystemExit(f"error: {side} does not exist: the KD half is not finished (run without --pack first)")
    if archive.exists():
        raise SystemExit(f"error: {archive} exists; choose a new file name")
    data = json.loads(side.read_text())
    machines = out / "machines.jsonl"
    lines = machines.read_text().splitlines() if machines.exists() else []
    data["machines"] = [x for x in lines if "quality_baseline.py" in x]
    tmp = tmp_sibling(archive)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for rel in packed_files(run):
                if rel == Path(SIDE_FILE):
                    blob = json.dumps(data, indent=1).encode()
                    info = tarfile.TarInfo(str(rel))
                    info.size, info.mtime = len(blob), int(side.stat().st_mtime)
                    tar.addfile(info, io.BytesIO(blob))
                else:
                    tar.add(run / rel, arcname=str(rel), recursive=False)
        tmp.replace(archive)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"packed the KD half of {run} into {archive} ({archive.stat().st_size >> 10} KiB)")


def unpack(run: Path, out: Path, archive: Path) -> None:
    """Restore a packed KD half into `run` (which must not hold a baseline yet)."""
    from srd.utils import atomic_write_json

    if (run / "baseline").exists() or (run / SIDE_FILE).exists():
        raise SystemExit(f"error: {run} holds a KD baseline already; unpack into a run folder without one")
    claim_run(run)
    try:
        tar = tarfile.open(archive, "r:gz")
    except (OSError, tarfile.TarError) as e:
        raise SystemExit(f"error: {archive}: not a packed KD half ({e})") from None
    with tar:
        members = tar.getmembers()
        names = {m.name for m in members}
        top = (SIDE_FILE, "quality-eval.json")
        bad = [m.name for m in members if not m.isfile() or not (m.name in top or m.name.startswith("baseline/"))]
        if SIDE_FILE not in names or bad:
            raise SystemExit(
                f"error: {archive}: not a packed KD half (from quality_baseline.py --pack)"
                + (f"; unexpected member {bad[0]}" if bad else f"; it has no {SIDE_FILE}")
            )
        side = json.load(tar.extractfile(SIDE_FILE))
        times = json.load(tar.extractfile("quality-eval.json")) if "quality-eval.json" in names else {}
        run.mkdir(parents=True, exist_ok=True)
        tar.extractall(run, members=[m for m in members if m.name.startswith("baseline/")], filter="data")
    path = _quality_eval_path(run)
    merged = json.loads(path.read_text()) if path.exists() else {}
    for key, models in times.items():
        merged.setdefault(key, {}).update({"baseline": models["baseline"]} if "baseline" in models else {})
    atomic_write_json(path, merged)
    machines = out / "machines.jsonl"
    have = set(machines.read_text().splitlines()) if machines.exists() else set()
    with machines.open("a", encoding="utf-8") as f:
        f.writelines(x + "\n" for x in side.pop("machines", []) if x not in have)
    atomic_write_json(run / SIDE_FILE, side)
    print(f"unpacked the KD half of {side['run']} into {run}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(p for p in PRESETS if PRESETS[p].get("sampled_seeds")), required=True)
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the preset's first)")
    p.add_argument("--divergence", default=None, help="default: the preset's first")
    p.add_argument("--out", required=True, help="the folder `quality.py --out` names")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pack", default=None, help="write the finished KD half (no weights) to this .tar.gz")
    p.add_argument("--unpack", default=None, help="restore a packed KD half into --out, before the SRD half")
    p.add_argument("overrides", nargs="*", help="the same key=value overrides as the quality.py command")
    args = p.parse_args(argv)

    preset = PRESETS[args.preset]
    seed = preset["seeds"][0] if args.seed is None else args.seed
    div = args.divergence or preset["divergences"][0]
    name = f"{args.preset}-{div}-s{seed}"
    out = Path(args.out)
    o = overrides_for(preset, div, seed, name, out, True, args.overrides, "", ())

    import torch

    from srd.config import load_config
    from srd.recipes.experiment import _evaluated, baseline_config
    from srd.recipes.pipeline import run_pipeline
    from srd.recipes.train import load_data
    from srd.utils import atomic_write_json, tune_cpu_allocator

    cfg = load_config(None, o)
    if not cfg.compare.baseline:
        p.error(f"the {name} run of preset {args.preset} trains no KD baseline (compare.baseline is off)")
    pl = plan(o)
    bcfg = baseline_config(cfg, {"sample_passes": pl["sample_passes"], "examples": cfg.data.train_limit})
    print(
        f"== {name}: the KD baseline alone, {bcfg.train.epochs:g} epochs over {cfg.data.train_limit} rows "
        f"({pl['baseline']['steps']} optimizer steps; SRD's plan: {pl['sample_passes']:g} sample passes) ==",
        flush=True,
    )
    if not torch.cuda.is_available():
        tune_cpu_allocator()
    claim_out(out, "quality benchmark", own=("dev-rows",))
    if args.pack:
        pack(cfg.run_dir, out, Path(args.pack))
        return 0
    if args.unpack:
        unpack(cfg.run_dir, out, Path(args.unpack))
        return 0
    log_machine(out)
    progress = not args.no_progress
    claim_run(cfg.run_dir)  # the run's folder, as SRD's half would make it: that half resumes into it
    t0 = time.perf_counter()
    base = run_pipeline(bcfg, progress=progress, data=load_data(cfg))
    if not base["complete"]:
        print(f"{name}: the KD baseline paused; rerun the same command to resume", file=sys.stderr)
        return 1
    best = _evaluated(cfg, base, "the KD baseline")
    evaluate_models(o, {"baseline": best}, None, progress)
    evaluate_models(o, {"baseline": best}, preset["sampled_seeds"], progress)
    evals = json.loads(_quality_eval_path(cfg.run_dir).read_text())
    side = {
        "run": name,
        "overrides": o,
        "baseline_epochs": bcfg.train.epochs,
        "evaluated": best,
        **{k: base.get(k) for k in ("train_s", "teacher_cache_s", "dev_eval_s", "total_s", "sample_passes")},
        "eval_s": {k: v.get("baseline") for k, v in evals.items()},
        "this_invocation_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(cfg.run_dir / SIDE_FILE, side)
    print(json.dumps(side, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
