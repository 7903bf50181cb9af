"""Where the time of a model step goes: a ``torch.profiler`` table after the usual warm-up."""

from __future__ import annotations

import torch.nn as nn

from .config import BenchConfig, ModelFactory
from .env import synchronize
from .runner import num_threads, prepare_with_oom_halving, resolve_model
from .switch import set_host_attention

__all__ = ["profile_step"]


def profile_step(
    model: nn.Module | str,
    mode: str,
    config: BenchConfig | None = None,
    *,
    steps: int = 1,
    row_limit: int = 20,
    factory: ModelFactory | None = None,
) -> str:
    """Where the time of a step goes: ``torch.profiler`` table of the top ops by self time (after warm-up).

    Args:
        model: a module or a registered model name.
        mode: ``"train"`` or ``"infer"``.
        config: settings (``config.backend`` is forced on the ACmix layers).
        steps: profiled steps.
        row_limit: rows of the table.
        factory: builds a module from a name (default :func:`acmix.models.create_model`).
    """
    from torch.profiler import ProfilerActivity, profile

    config = config or BenchConfig()
    with num_threads(config.threads):
        module, _ = resolve_model(model, config, factory)
        set_host_attention(module, config.backend)
        warm = prepare_with_oom_halving(module, mode, config, measure_memory=False)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if warm.case.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                warm.case.step()
            synchronize(warm.case.device)
    sort = "self_cuda_time_total" if warm.case.device.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=sort, row_limit=row_limit))
