"""Golden loss trajectories: fixed-seed float32 runs on tiny models, stored in tests/assets.

They catch silent changes in the loss math, masking, batching or optimizer. After an
intended change, regenerate with: SRD_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from srd.cli import main

GOLDEN = Path(__file__).parent / "assets" / "golden_losses.json"


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"])
def test_loss_trajectory_matches_golden(tmp_path, tiny_models, tiny_data, divergence):
    args = [
        "train",
        "--no-progress",
        "-",
        f"model.teacher={tiny_models['llama-teacher']}",
        f"model.student={tiny_models['llama-student']}",
        f"data.train={tiny_data['train']}",
        "data.dev=null",
        f"output_dir={tmp_path}",
        "name=g",
        "seed=0",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "loss.chunk_size=16",
        "loss.tau=2.0",
        "loss.alpha=0.3",
        f"loss.divergence={divergence}",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.lr=1e-3",
        "train.max_steps=6",
        "train.save_every=0",
        "train.warmup_steps=1",
        "dev_eval.num_examples=0",
        "train.precision=fp32",
    ]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "g" / "logs" / "train.jsonl").read_text().splitlines()]
    got = {"loss": [r["loss"] for r in rows], "ce": [r["ce"] for r in rows], "kd": [r["kd"] for r in rows]}
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("SRD_UPDATE_GOLDEN"):
        golden[divergence] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert divergence in golden, "no golden trajectory stored; run with SRD_UPDATE_GOLDEN=1"
    for key in ("loss", "ce", "kd"):
        assert got[key] == pytest.approx(golden[divergence][key], rel=1e-4, abs=1e-6), key
