"""FSDP (torch FSDP2, `fully_shard`) for the student: parameters, gradients and optimizer
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
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

PREFIX = "student."  # DistillModule keeps the student under this attribute


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_student(module: nn.Module) -> None:
    """fully_shard every transformer block of `module.student`, then `module` (in place)."""
    from torch.distributed.fsdp import fully_shard

    student = module.student
    if hasattr(student, "peft_config"):
        from srd.config import ConfigError

        raise ConfigError("train.sharding=fsdp does not support LoRA students yet: use DDP (train.sharding=none)")
    from srd.train.step import transformer_blocks

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
