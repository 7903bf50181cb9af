"""One training epoch and one evaluation pass (the ConvNeXt/timm split: the CLI only wires these together).

:func:`train_one_epoch` does gradient accumulation, AMP, clipping, EMA, Mixup, per-update scheduler steps,
non-finite loss handling and cooperative stopping (signals, a step budget) at update boundaries, so a stopped
epoch can be resumed on exactly the batches it had not seen. :func:`evaluate` reports top-1/top-5 and mean
cross-entropy, summed over ranks when running distributed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

__all__ = ["EpochResult", "NonFiniteLossError", "StepControl", "autocast_for", "evaluate", "train_one_epoch"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (``nan_policy="stop"``); names the epoch, batch and update."""

    def __init__(self, epoch: int, batch: int, updates: int, value: float) -> None:
        super().__init__(
            f"loss is {value} at epoch {epoch}, batch {batch} (optimizer update {updates + 1}); "
            "training stopped, the last good checkpoint is kept (use --nan-policy skip to skip such steps)"
        )
        self.epoch, self.batch, self.updates, self.value = epoch, batch, updates, value


@dataclass
class StepControl:
    """Hooks the trainer gives the epoch loop.

    Attributes:
        should_stop: polled after every optimizer update (signal flag).
        after_update: called as ``after_update(updates, batches_done)`` after every update (periodic checkpoints).
        max_updates: stop once the global update count reaches this.
    """

    should_stop: Callable[[], bool] = lambda: False
    after_update: Callable[[int, int], None] | None = None
    max_updates: int | None = None


@dataclass
class EpochResult:
    loss: float
    lr: float
    images_per_s: float
    updates: int
    batches_done: int
    seconds: float
    complete: bool
    stop_reason: str = ""
    skipped_nonfinite: int = 0
    bad_images: list[str] = field(default_factory=list)


def autocast_for(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for the device when ``amp_dtype`` is set, else a no-op context."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not _is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epoch: int,
    device: torch.device,
    scheduler: Any = None,
    updates: int = 0,
    batches_done: int = 0,
    accum_steps: int = 1,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
    ema: Any = None,
    mixup_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    channels_last: bool = False,
    nan_policy: str = "stop",
    control: StepControl | None = None,
    progress: bool = True,
) -> EpochResult:
    """Train over ``loader`` (which already starts after ``batches_done`` batches of this epoch).

    Args:
        updates: optimizer updates done before this call (drives the per-update scheduler).
        batches_done: batches of this epoch already consumed (resume part-way through an epoch).
        accum_steps: micro-batches per optimizer update; the loss is divided by it.
        nan_policy: ``"stop"`` raises :class:`NonFiniteLossError`, ``"skip"`` drops the update and counts it.

    Shape:
        loader yields ``(x (B, C, H, W), y (B,), skipped_paths)``.
    """
    from timm.utils import dispatch_clip_grad

    control = control or StepControl()
    model.train()
    total = len(loader) + batches_done
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total, initial=batches_done, desc=f"epoch {epoch}", file=sys.stderr, leave=False, dynamic_ncols=True
        )
    loss_sum, seen, seen_timed, skipped_nonfinite = 0.0, 0, 0, 0
    bad: list[str] = []
    poisoned = False
    t0 = time.perf_counter()
    i = batches_done
    stop_reason = ""
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    n_batches = total
    for batch in loader:
        x, y = batch[0], batch[1]
        if len(batch) > 2 and batch[2]:
            bad.extend(batch[2])
        i += 1
        last_of_group = i % accum_steps == 0 or i == n_batches  # groups aligned to the epoch start
        if x.numel() == 0:  # every image of the batch was unreadable and skipped
            if bar is not None:
                bar.update(1)
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        sync_ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if not last_of_group and hasattr(model, "no_sync"):
            sync_ctx = model.no_sync()  # type: ignore[operator]
        with sync_ctx:
            with autocast_for(device, amp_dtype):
                out = model(x)
                loss = loss_fn(out, y)
            bad_loss = _any_rank(not bool(torch.isfinite(loss.detach()).all()), device)
            if bad_loss:
                if nan_policy == "stop":
                    if bar is not None:
                        bar.close()
                    raise NonFiniteLossError(epoch, i - 1, updates, float(loss.detach().float()))
                poisoned = True
            else:
                scaled = loss / accum_steps
                if scaler is not None:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
                loss_sum += float(loss.detach()) * x.shape[0]
                seen += x.shape[0]
        seen_timed += x.shape[0]
        if last_of_group:
            if poisoned:
                skipped_nonfinite += 1
                _logger.warning("non-finite loss at epoch %d batch %d: update skipped", epoch, i - 1)
                optimizer.zero_grad(set_to_none=True)
                poisoned = False
            else:
                if scaler is not None:
                    if clip_grad is not None:
                        scaler.unscale_(optimizer)
                        dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    if clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model, step=updates)
            updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=updates)
            lr = optimizer.param_groups[0]["lr"]
            if control.after_update is not None:
                control.after_update(updates, i)
        if bar is not None:
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", lr=f"{lr:.2e}", img_s=f"{seen_timed / elapsed:.0f}")
            bar.update(1)
        if last_of_group:
            if control.max_updates is not None and updates >= control.max_updates:
                stop_reason = "max_steps"
                break
            if _any_rank(control.should_stop(), device):
                stop_reason = "signal"
                break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    return EpochResult(
        loss=loss_sum / seen if seen else math.nan,
        lr=lr,
        images_per_s=seen_timed / max(seconds, 1e-9),
        updates=updates,
        batches_done=i,
        seconds=seconds,
        complete=i >= n_batches,
        stop_reason=stop_reason,
        skipped_nonfinite=skipped_nonfinite,
        bad_images=bad,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader``.

    Under ``torch.distributed`` the sums are reduced over ranks (shard the loader without padding for exact
    numbers). Returns ``{"loss", "top1", "top5", "count", "bad_images"}``; top-5 becomes top-k with
    k = min(5, classes).

    Shape:
        loader yields ``(x (B, C, H, W), y (B,), skipped_paths)``.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    bad: list[str] = []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    for batch in it:
        x, y = batch[0], batch[1]
        if len(batch) > 2 and batch[2]:
            bad.extend(batch[2])
        if x.numel() == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp_dtype):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        topk = out.topk(k, dim=1).indices  # (B, k)
        hit = topk == y[:, None]
        sums += torch.tensor(
            [
                float(F.cross_entropy(out, y, reduction="sum")),
                float(hit[:, 0].sum()),
                float(hit.any(dim=1).sum()),
                float(y.shape[0]),
            ],
            dtype=torch.float64,
        )
    if _is_dist():
        t = sums.to(device)
        dist.all_reduce(t)
        sums = t.cpu()
    n = max(float(sums[3]), 1.0)
    return {
        "loss": float(sums[0]) / n,
        "top1": 100.0 * float(sums[1]) / n,
        "top5": 100.0 * float(sums[2]) / n,
        "count": int(sums[3]),
        "bad_images": bad,
    }
