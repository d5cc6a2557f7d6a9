"""The run directory: every path a run writes, named in one place (docs/run-directory.md).

    runs/<name>/                      RunDir
      config.yaml                     the resolved config
      environment.jsonl               one line per command started here: srd, libraries, machine
      reflection/                     manifest.jsonl, summary.json (srd run / srd reflect)
      reflection-stage-<i>/           curriculum.re_reflect: the ranking before stage i
      teacher-store.json              rows taken from the teacher store (loss.teacher_top_k)
      stages/<stage>/                 StageDir: one per curriculum stage, or stages/baseline/
      results.json                    srd run: timings, stage sizes, the best checkpoint
      baseline/                       compare.baseline: the KD baseline, itself a RunDir
      references/<teacher|initial>/   their evaluations
      eval/<sampled|greedy>/          evaluation results
      experiment.json, comparison.md  srd run as an experiment
      report.md, report/              srd report

A StageDir (also what `srd train` writes at the run's top level) holds checkpoints/,
logs/train.jsonl and logs/eval.jsonl, tb/, best/, final/, examples.json and done.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageDir:
    """One trained stage's folder."""

    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def train_log(self) -> Path:
        return self.logs / "train.jsonl"

    @property
    def eval_log(self) -> Path:
        return self.logs / "eval.jsonl"

    def dev_answers(self, step: int) -> Path:
        """The dev answers and their scores of the evaluation at `step` (one JSON row each)."""
        return self.logs / "dev-answers" / f"step-{step:06d}.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def examples(self) -> Path:
        return self.path / "examples.json"

    @property
    def done(self) -> Path:
        return self.path / "done.json"


@dataclass(frozen=True)
class RunDir:
    """A run's folder, runs/<name>/."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def environment_log(self) -> Path:
        """One JSON line per command started in the run: when, the command, srd and library
        versions, the machine (srd.runtime.environment)."""
        return self.path / "environment.jsonl"

    @property
    def reflection(self) -> Path:
        return self.path / "reflection"

    @property
    def manifest(self) -> Path:
        return self.reflection / "manifest.jsonl"

    @property
    def reflection_summary(self) -> Path:
        return self.reflection / "summary.json"

    def re_reflection(self, stage: int) -> Path:
        """reflection-stage-<i>/: curriculum.re_reflect's ranking before stage i."""
        return self.path / f"reflection-stage-{stage}"

    def re_reflections(self) -> list[Path]:
        """Every finished re-reflection folder, in stage order."""
        found = [f.parent for f in self.path.glob("reflection-stage-*/summary.json")]
        return sorted(found, key=lambda f: int(f.name.rsplit("-", 1)[1]))

    @property
    def teacher_store(self) -> Path:
        """What the run took from the teacher store: the entry, the seconds it spent building rows,
        and what each row it trained on cost to build (teacher-store.json)."""
        return self.path / "teacher-store.json"

    @property
    def stages(self) -> Path:
        return self.path / "stages"

    def stage(self, name: str) -> StageDir:
        """stages/<name>/: `stage-<i>` of a curriculum, or `baseline` (method=baseline / gkd)."""
        return StageDir(self.stages / name)

    @property
    def as_stage(self) -> StageDir:
        """An `srd train` run, whose one stage is the run folder itself."""
        return StageDir(self.path)

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def experiment(self) -> Path:
        return self.path / "experiment.json"

    @property
    def comparison(self) -> Path:
        return self.path / "comparison.md"

    @property
    def baseline(self) -> RunDir:
        return RunDir(self.path / "baseline")

    def reference(self, model: str) -> RunDir:
        """references/<teacher|initial>/: a reference model's evaluations."""
        return RunDir(self.path / "references" / model)

    @property
    def evals(self) -> Path:
        """eval/: one folder per decoding mode."""
        return self.path / "eval"

    def eval(self, mode: str) -> Path:
        """eval/<sampled|greedy>/."""
        return self.evals / mode

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def report_assets(self) -> Path:
        return self.path / "report"
