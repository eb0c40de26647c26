"""Several processes of one launch (`accelerate launch`, `torchrun`): which one is the main process, and the few
collectives the stages need around their trainers. Knows nothing of the registry.

    start()                    first thing a stage does: join the launch's process group (gloo on a CPU)
    world_size(), rank()       how many processes, and which one this is (1 and 0 without a launcher)
    is_main_process()          rank 0: the only process that writes the registry and the run's folder
    wait_for_everyone()        a barrier
    broadcast_from_main(obj)   the main process's (picklable) object, on every process
    gather_numbers(values)     every process's list of floats, concatenated in rank order, on every process
    all_sum(tensor)            the sum over processes, on every process
    average_gradients(params)  gradients averaged over processes (our PPO loop's data parallelism)
    broadcast_parameters(params)  the main process's values, copied into every process's parameters

Without a launcher every call is the one-process identity, so code written with these runs unchanged alone.

When one process fails, the launcher (torchrun, under `accelerate launch`) stops the others with SIGTERM; a
process blocked in a collective with a dead peer gets an error from the backend first. `start` turns SIGTERM into
`LaunchStopped`, so the main process leaves through its `except`/`finally` blocks (the run is marked failed)
instead of vanishing.
"""

from __future__ import annotations

import os
import signal
import sys

# What `accelerate launch` starts processes with, for a stage that runs in one process only (see `launcher`)
SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


class LaunchStopped(KeyboardInterrupt):
    """SIGTERM from the launcher: another process of the launch failed (its error is printed above this one's)."""


def world_size() -> int:
    """The number of processes of this launch: torchrun's (and so `accelerate launch`'s) WORLD_SIZE, else 1.
    (Never imports torch: `align --help` asks too.)"""
    dist = _process_group()
    if dist is not None:
        return dist.get_world_size()
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def rank() -> int:
    dist = _process_group()
    if dist is not None:
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _process_group():
    """torch.distributed when torch is imported and a process group is up, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def is_main_process() -> bool:
    return rank() == 0


def launcher() -> str:
    """What runs this process: 'one process', 'FSDP', 'DeepSpeed' or 'data parallel' (DDP: torchrun, `accelerate
    launch --multi_gpu`)."""
    for variable, name in SHARDING_ENV.items():
        if os.environ.get(variable, "false").lower() == "true":
            return name
    return "data parallel" if world_size() > 1 else "one process"


def start() -> None:
    """Join the launch's process group, once, before a stage builds its config (a Trainer's arguments set up the
    same accelerate state and reuse the group). On a machine without a GPU the processes talk over gloo, and
    ACCELERATE_USE_CPU tells every Trainer to stay on the CPU: accelerate's own `--cpu` flag starts one process
    only, so a CPU launch is `accelerate launch --multi_gpu --num_processes N` (or `torchrun --nproc-per-node N`)."""
    if world_size() == 1:
        return
    import torch

    if not torch.distributed.is_initialized():
        from accelerate import PartialState

        cpu = not torch.cuda.is_available()
        if cpu:
            os.environ["ACCELERATE_USE_CPU"] = "true"
        PartialState(cpu=cpu)
        signal.signal(signal.SIGTERM, _stopped_by_launcher)


def _stopped_by_launcher(signum, frame) -> None:
    raise LaunchStopped(
        "stopped by the launcher (SIGTERM): another process of this launch failed, or the launch was stopped"
    )


def wait_for_everyone() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_from_main(obj):
    """The main process's `obj` on every process (the others pass anything, e.g. None)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_numbers(values) -> list[float]:
    """Every process's floats, concatenated in rank order (the lists may differ in length)."""
    values = [float(v) for v in values]
    if world_size() == 1:
        return values
    import torch.distributed as dist

    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def all_sum(tensor):
    """The element-wise sum of `tensor` over processes (a new tensor; `tensor` is left as it is)."""
    if world_size() == 1:
        return tensor
    import torch.distributed as dist

    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def average_gradients(parameters) -> None:
    """Replace each parameter's gradient by its mean over processes: one all-reduce of them all, flattened.
    A parameter without a gradient counts as zeros, as DDP counts a parameter a process did not use."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for parameter, grad in zip(parameters, grads):
        size = grad.numel()
        parameter.grad = flat[offset : offset + size].view_as(grad).to(grad.dtype).clone()
        offset += size


def broadcast_parameters(parameters) -> None:
    """Copy the main process's values into every process's `parameters` (the same list, in the same order)."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    parameters = list(parameters)
    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    dist.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for parameter in parameters:
            size = parameter.numel()
            parameter.copy_(flat[offset : offset + size].view_as(parameter))
            offset += size


def evaluate_before_training(trainer, **kwargs) -> dict:
    """`trainer.evaluate(**kwargs)` before `trainer.train()`, with the training still data-parallel.

    Evaluating first makes accelerate mark the bare model as prepared (for evaluation), and `train()` then skips
    wrapping it in DistributedDataParallel: every process would train on its own batches with its own gradients,
    silently (transformers 5.24, accelerate 1.15). The mark is taken off again here, so `train()` wraps the model."""
    metrics = trainer.evaluate(**kwargs)
    accelerator = trainer.accelerator
    if accelerator.num_processes > 1 and trainer.model_wrapped is trainer.model:
        model = trainer.model
        if getattr(model, "_is_accelerate_prepared", False):
            del model._is_accelerate_prepared
            accelerator._models = [m for m in accelerator._models if m is not model]
    return metrics


def gathered_state_dict(trainer) -> dict:
    """The trainer's model weights, whole: every process must call it (FSDP and ZeRO-3 shard the weights, and
    gathering them is a collective); for `save_pretrained(..., state_dict=...)` on the main process."""
    return trainer.accelerator.get_state_dict(trainer.model)
