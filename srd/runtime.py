"""Where a run executes: the accelerate Accelerator (one process, DDP, or DeepSpeed ZeRO-1/2)
and the training precision it resolves to (`train.precision=auto`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from srd.config import ConfigError
from srd.models.load import native_bf16

log = logging.getLogger(__name__)


def auto_bf16(cuda: bool) -> bool:
    """train.precision=auto: bf16 autocast where bf16 matmuls run in hardware (a bf16 GPU, or a
    CPU with AVX512-BF16 / AMX, where it was measured faster than float32), float32 elsewhere. SRD_CPU_BF16=0
    keeps CPUs in float32 (the test suite sets it, so its float32 references hold on any CPU)."""
    if cuda:
        return native_bf16("cuda")
    return os.environ.get("SRD_CPU_BF16", "1") != "0" and native_bf16("cpu")


def make_accelerator(precision: str = "auto", sharding: str = "none") -> Any:
    """The run's accelerate Accelerator. `sharding` zero1 / zero2 under a multi-process launcher
    (torchrun) sets up DeepSpeed itself; `accelerate launch` with a DeepSpeed config does that
    through its environment."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if precision == "bf16" and not cuda and not native_bf16("cpu"):
        log.warning(
            "train.precision=bf16 on a CPU without native bf16 (%s, no AVX512-BF16/AMX): matmuls fall back to a "
            "slow path; fp32 (precision=auto) is several times faster here",
            torch.backends.cpu.get_cpu_capability(),
        )
    if precision == "auto":
        mixed = "bf16" if auto_bf16(cuda) else "no"
    else:
        mixed = "bf16" if precision == "bf16" else "no"
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # accelerate launch + DS config
    if (sharding in ZERO_STAGES or launched) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _deepspeed_accelerator(ZERO_STAGES.get(sharding), mixed, cuda)
    return Accelerator(cpu=not cuda, mixed_precision=mixed)


ZERO_STAGES = {"zero1": 1, "zero2": 2}


def _deepspeed_accelerator(stage: int | None, mixed: str, cuda: bool) -> Any:
    """An Accelerator with a DeepSpeed plugin: ZeRO `stage` (train.sharding), or the one
    `accelerate launch` put in the environment (stage None). On CPUs too (gloo), which
    accelerate's cpu=True would silently turn into plain DDP."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, is_deepspeed_available

    if not is_deepspeed_available():
        what = f"train.sharding=zero{stage}" if stage else "an accelerate DeepSpeed config"
        raise ConfigError(f"{what} needs DeepSpeed: pip install deepspeed (or shard with FSDP: train.sharding=fsdp)")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch` sets for a DeepSpeed config
    # batch size, accumulation and clipping are filled in per stage from train.* (_deepspeed_config)
    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=1) if stage else None
    backend = "nccl" if cuda else "gloo"
    return Accelerator(
        mixed_precision=mixed, deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend=backend)]
    )
