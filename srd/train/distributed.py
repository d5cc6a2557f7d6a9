"""The distributed backends of one training stage, in one place: which one a stage uses (plain
DDP through accelerate, FSDP, or a DeepSpeed ZeRO-1/2 engine), DeepSpeed's config and
checkpoint layout, and FSDP itself.

FSDP (torch FSDP2, `fully_shard`) for the student: parameters, gradients and optimizer
states sharded over the processes; the frozen teacher stays a full copy in every process.

`train.sharding=fsdp` (or an accelerate config with `distributed_type: FSDP`) shards each
transformer block of the student (the model's `_no_split_modules`) and then the whole
`DistillModule`, so embeddings, final norm and LM head are gathered once per forward of the
loss module. Everything that needs the whole model goes through this module:

- exports and checkpoints gather a full state dict (collective; rank 0 writes it), stored in
  the same format as an unsharded run's, so checkpoints resume with or without sharding and
  under another process count;
- generation (dev ROUGE-L, on-policy samples) runs on an unsharded replica loaded with the
  gathered weights (`generation_model()`), so processes whose answers differ in length never
  wait on each other's collectives, and FSDP's record of the forward order stays the same on
  every process.

The same code runs on CPU processes (gloo) and GPUs (nccl); tested with 2 CPU processes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srd.config import ConfigError, RunConfig
from srd.models.features import transformer_blocks
from srd.runtime import ZERO_STAGES

log = logging.getLogger(__name__)

PREFIX = "student."  # DistillModule keeps the student under this attribute


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_student(module: nn.Module) -> None:
    """fully_shard every transformer block of `module.student`, then `module` (in place)."""
    from torch.distributed.fsdp import fully_shard

    student = module.student
    if hasattr(student, "peft_config"):
        raise ConfigError("train.sharding=fsdp does not support LoRA students yet: use DDP (train.sharding=none)")

    for block in transformer_blocks(student, "train.sharding=fsdp"):
        fully_shard(block)
    fully_shard(module)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The student's full weights, keys as in its own state_dict. Collective: every process
    must call it; rank 0 gets CPU tensors, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights (e.g. lm_head = embed_tokens) are stored once, as save_pretrained does
    tied = {n for n, _ in module.named_parameters(remove_duplicate=False)} - {n for n, _ in module.named_parameters()}
    return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX) and k not in tied}


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full student weights (read by every process) into the sharded module. Keys may
    be missing only for tied weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    expected = set(module.state_dict())
    full = {PREFIX + k: v for k, v in state.items()}
    unexpected = sorted(set(full) - expected)
    if unexpected:
        raise RuntimeError(f"checkpoint does not match the model: unexpected {unexpected[:5]}")
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, strict=False))


def _group_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state in plain `optimizer.state_dict()` form (integer parameter ids,
    full tensors), as an unsharded run saves it. Collective; rank 0 gets it, others {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not osd:
        return {}
    state, groups, i = {}, [], 0
    for group, names in zip(osd["param_groups"], _group_names(module, optimizer)):
        ids = []
        for name in names:
            if name in osd["state"]:
                state[i] = osd["state"][name]
            ids.append(i)
            i += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a plain `optimizer.state_dict()` (integer ids, full tensors) into the optimizer
    of the sharded module; every process passes the same `saved`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state, groups = {}, []
    all_names = _group_names(module, optimizer)
    if len(all_names) != len(saved["param_groups"]):
        raise RuntimeError("optimizer checkpoint has a different number of parameter groups than this run")
    for group, names in zip(saved["param_groups"], all_names):
        if len(group["params"]) != len(names):
            raise RuntimeError("optimizer checkpoint does not match the model's parameters")
        for pid, name in zip(group["params"], names):
            if pid in saved["state"]:
                state[name] = saved["state"][pid]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": names})
    set_optimizer_state_dict(
        module,
        optimizer,
        optim_state_dict={"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )


@contextlib.contextmanager
def generation_model(module: nn.Module, replica: nn.Module, device: Any) -> Iterator[nn.Module]:
    """The model to generate with. Unsharded: `replica`, the trained student itself. Sharded:
    `replica` (the caller's unsharded student) loaded with the current gathered weights and
    moved to `device` for the duration. Generating through the FSDP module instead would
    record extra forwards on the processes that sample, and FSDP's backward prefetching would
    then issue mismatched collectives. Collective when sharded: every process must enter.
    Compiled blocks (train.compile) run eagerly while generating: a decode step's shapes
    change every token, and recompiling for them costs more than it saves."""
    if not is_sharded(module):
        with torch.compiler.set_stance("force_eager"):
            yield replica
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    replica.load_state_dict({k[len(PREFIX) :]: v for k, v in full.items() if k.startswith(PREFIX)}, strict=False)
    del full
    home, training = next(replica.parameters()).device, replica.training
    replica.to(device).eval()
    try:
        yield replica
    finally:
        replica.to(home).train(training)


def use_deepspeed(cfg: RunConfig, acc: Any) -> bool:
    """Whether this stage trains through a DeepSpeed engine (ZeRO stage 1 or 2): an accelerate
    DeepSpeed config, or train.sharding=zero1/zero2 under torchrun. ZeRO-3 is refused: it
    partitions the weights themselves, which srd does with FSDP (train.sharding=fsdp)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        if cfg.train.sharding in ZERO_STAGES and acc.num_processes == 1:
            log.warning(
                "train.sharding=%s on a single process: nothing to partition, training unsharded", cfg.train.sharding
            )
        return False
    stage = int(acc.state.deepspeed_plugin.zero_stage)
    if stage not in (1, 2):
        raise ConfigError(
            f"DeepSpeed ZeRO stage {stage} is not supported: use ZeRO-1/2 (configs/accelerate/deepspeed-zero2.yaml, "
            "or train.sharding=zero2 with torchrun), or FSDP to partition the weights themselves "
            "(configs/accelerate/fsdp.yaml, or train.sharding=fsdp with torchrun)"
        )
    return True


def use_sharding(cfg: RunConfig, acc: Any) -> bool:
    """Whether this stage shards the student with FSDP: train.sharding=fsdp (or an accelerate
    config with distributed_type FSDP) on more than one process."""
    from accelerate.utils import DistributedType

    wanted = cfg.train.sharding == "fsdp" or acc.distributed_type == DistributedType.FSDP
    if wanted and acc.num_processes == 1:
        log.warning("train.sharding=fsdp on a single process: nothing to shard, training unsharded")
    return wanted and acc.num_processes > 1


def deepspeed_config(acc: Any, tcfg: Any) -> None:
    """Fill the DeepSpeed config from train.*: srd's optimizer, lr schedule, batch, accumulation
    and clipping are the run's; the config file contributes the ZeRO stage and precision."""
    c = acc.state.deepspeed_plugin.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in c:
            raise ConfigError(
                f"the DeepSpeed config has an {key!r} section: srd builds the optimizer and lr schedule from train.*; "
                "remove it"
            )
    offload = c.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None):
        raise ConfigError(
            f"DeepSpeed optimizer offload ({offload}) is not supported: set offload_optimizer_device: none"
        )
    c["train_micro_batch_size_per_gpu"] = tcfg.batch_size
    c["gradient_accumulation_steps"] = tcfg.grad_accum
    c["train_batch_size"] = tcfg.batch_size * tcfg.grad_accum * acc.num_processes
    c["gradient_clipping"] = float(tcfg.grad_clip or 0.0)


def zero_layout(acc: Any) -> dict[str, int]:
    return {"stage": int(acc.state.deepspeed_plugin.zero_stage), "processes": int(acc.num_processes)}


def zero_safe_globals() -> list[Any]:
    """The DeepSpeed classes a ZeRO optimizer state file holds besides tensors (plain data records),
    allowed when it is loaded with weights_only=True."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def zero_files(folder: Path, zero: dict[str, int]) -> list[Path]:
    return [folder / f"optimizer.zero{zero['stage']}.rank{r}.pt" for r in range(zero["processes"])]


def zero_mismatch(latest: Path, saved: dict[str, int] | None, now: dict[str, int] | None) -> str:
    def name(z: dict[str, int] | None) -> str:
        return "without DeepSpeed" if z is None else f"with DeepSpeed ZeRO-{z['stage']} on {z['processes']} processes"

    return (
        f"{latest} was written {name(saved)} but this run is {name(now)}. ZeRO partitions the optimizer state, so "
        f"resume it {name(saved)}; or start the stage afresh from weights (delete {latest.parent} to retrain it, "
        "or use a finished stage's final/ folder as model.student)"
    )
