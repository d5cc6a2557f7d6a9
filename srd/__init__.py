"""srd: white-box knowledge distillation of LLMs with Selective Reflection Distillation.

The public Python API: what the `srd` command does, for use from your own code or a notebook.
Names are imported on first use, so `import srd` stays light.

    import srd

    cfg = srd.load_config("configs/quickstart.yaml", ["name=my-run"])  # YAML + key=value overrides
    result = srd.run_experiment(cfg)     # `srd run`: reflection, curriculum, KD baseline, evaluation, report
    manifest = srd.run_reflect(cfg)      # `srd reflect`: one row per example (scores, ranks, fused, stage)
    stages = srd.plan_stages(manifest, cfg.curriculum)  # the Baby-Step plan: ids, tau, alpha, epochs
    print(srd.compare_runs([cfg.run_dir / "baseline", cfg.run_dir], eval_name="greedy"))

- `load_config`, `RunConfig`: the typed config, from YAML and overrides (`srd config`);
- `run_experiment`: the method, the KD baseline, evaluation, comparison and report (`srd run`);
- `run_pipeline`: the method alone (SRD, baseline, traditional, GKD);
- `run_reflect`: reflection alone, the curation manifest (`srd reflect`);
- `run_train`: one stage of KD / SFT / GKD on all the data (`srd train`);
- `plan_stages`, `select_and_partition`, `reciprocal_rank_fusion`: the curriculum plan and the
  pure selection functions;
- `reflect_dataset`, `Curriculum`: SRD on a `datasets.Dataset` and any Hugging Face Trainer;
- `evaluate`: benchmarks for a loaded model (`srd eval`);
- `compare_runs`, `paired_difference`, `write_report`: comparison tables, intervals and
  p-values, the report (`srd compare`, `srd report`);
- `load_model`, `load_tokenizer`: a Hub id, a folder, a GGUF file or `smollm2-135m-instruct`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "srd.config",
    "RunConfig": "srd.config",
    "run_experiment": "srd.recipes.experiment",
    "run_pipeline": "srd.recipes.pipeline",
    "run_reflect": "srd.recipes.pipeline",
    "run_train": "srd.recipes.train",
    "plan_stages": "srd.curriculum",
    "select_and_partition": "srd.reflect.fusion",
    "reciprocal_rank_fusion": "srd.reflect.fusion",
    "reflect_dataset": "srd.integrations.hf",
    "Curriculum": "srd.integrations.hf",
    "evaluate": "srd.eval.evaluate",
    "compare_runs": "srd.report",
    "paired_difference": "srd.report",
    "write_report": "srd.report",
    "load_model": "srd.models",
    "load_tokenizer": "srd.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'srd' has no attribute {name!r}; the public API is {__all__}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
