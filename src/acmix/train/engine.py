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

__all__ = [
    "EpochResult",
    "EpochTotals",
    "NonFiniteLossError",
    "StepControl",
    "autocast_for",
    "evaluate",
    "train_one_epoch",
]


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
class EpochTotals:
    """Running sums of one epoch. Checkpointed mid-epoch and passed back on resume, so an interrupted epoch
    reports the same mean loss and counts as an uninterrupted one."""

    loss_sum: float = 0.0  # sum of per-sample losses
    seen: int = 0  # samples in ``loss_sum``
    skipped_nonfinite: int = 0
    bad_images: list[str] = field(default_factory=list)


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


@dataclass
class _EpochLoop:
    """The work of :func:`train_one_epoch`: forward/backward per micro-batch, an update per accumulation group."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    epoch: int
    device: torch.device
    scheduler: Any
    control: StepControl
    accum_steps: int
    clip_grad: float | None
    clip_mode: str
    amp_dtype: torch.dtype | None
    scaler: Any
    ema: Any
    mixup_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    channels_last: bool
    nan_policy: str
    updates: int
    i: int  # batches of the epoch consumed so far
    n_batches: int
    totals: EpochTotals = field(default_factory=EpochTotals)
    seen_timed: int = 0  # samples trained on in this call (throughput)
    poisoned: bool = False  # a micro-batch of the current accumulation group had a non-finite loss
    stop_reason: str = ""
    lr: float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    def run(self, loader: Any, bar: Any) -> None:
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        for batch in loader:
            x, y = batch[0], batch[1]
            if len(batch) > 2 and batch[2]:
                self.totals.bad_images.extend(batch[2])
            self.i += 1
            last_of_group = self.i % self.accum_steps == 0 or self.i == self.n_batches  # aligned to the epoch start
            if x.numel() > 0:  # else every image of the batch was unreadable and skipped
                self.batch(x, y, last_of_group)
                if bar is not None:
                    elapsed = max(time.perf_counter() - self.t0, 1e-9)
                    loss = f"{self.totals.loss_sum / max(self.totals.seen, 1):.4f}"
                    bar.set_postfix(loss=loss, lr=f"{self.lr:.2e}", img_s=f"{self.seen_timed / elapsed:.0f}")
            if bar is not None:
                bar.update(1)
            if x.numel() > 0 and last_of_group and self.should_stop():
                break

    def batch(self, x: torch.Tensor, y: torch.Tensor, last_of_group: bool) -> None:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        self.forward_backward(x, y, sync=last_of_group)
        if last_of_group:
            self.update()
            self.updates += 1
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=self.updates)
            self.lr = self.optimizer.param_groups[0]["lr"]
            if self.control.after_update is not None:
                self.control.after_update(self.updates, self.i)

    def should_stop(self) -> bool:
        if self.control.max_updates is not None and self.updates >= self.control.max_updates:
            self.stop_reason = "max_steps"
        elif _any_rank(self.control.should_stop(), self.device):
            self.stop_reason = "signal"
        return bool(self.stop_reason)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, sync: bool) -> None:
        """Accumulate the gradient of one micro-batch (``sync=False``: skip DDP's all-reduce, not the last one)."""
        ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if not sync and hasattr(self.model, "no_sync"):
            ctx = self.model.no_sync()  # type: ignore[operator]
        with ctx:
            with autocast_for(self.device, self.amp_dtype):
                out = self.model(x)
                loss = self.loss_fn(out, y)
            if _any_rank(not bool(torch.isfinite(loss.detach()).all()), self.device):
                if self.nan_policy == "stop":
                    raise NonFiniteLossError(self.epoch, self.i - 1, self.updates, float(loss.detach().float()))
                self.poisoned = True
            else:
                scaled = loss / self.accum_steps
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
                self.totals.loss_sum += float(loss.detach()) * x.shape[0]
                self.totals.seen += x.shape[0]
        self.seen_timed += x.shape[0]

    def update(self) -> None:
        """Apply the accumulated gradient (clip, optimizer, scaler, EMA), or drop it if the group was poisoned."""
        from timm.utils import dispatch_clip_grad

        opt, scaler = self.optimizer, self.scaler
        if self.poisoned:
            self.totals.skipped_nonfinite += 1
            _logger.warning("non-finite loss at epoch %d batch %d: update skipped", self.epoch, self.i - 1)
            opt.zero_grad(set_to_none=True)
            self.poisoned = False
            return
        if scaler is not None and self.clip_grad is not None:
            scaler.unscale_(opt)
        if self.clip_grad is not None:
            dispatch_clip_grad(self.model.parameters(), self.clip_grad, mode=self.clip_mode)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.updates)

    def result(self) -> EpochResult:
        seconds = time.perf_counter() - self.t0
        return EpochResult(
            loss=self.totals.loss_sum / self.totals.seen if self.totals.seen else math.nan,
            lr=self.lr,
            images_per_s=self.seen_timed / max(seconds, 1e-9),
            updates=self.updates,
            batches_done=self.i,
            seconds=seconds,
            complete=self.i >= self.n_batches,
            stop_reason=self.stop_reason,
            skipped_nonfinite=self.totals.skipped_nonfinite,
            bad_images=list(self.totals.bad_images),
        )


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
    totals: EpochTotals | None = None,
) -> EpochResult:
    """Train over ``loader`` (which already starts after ``batches_done`` batches of this epoch).

    Args:
        updates: optimizer updates done before this call (drives the per-update scheduler).
        batches_done: batches of this epoch already consumed (resume part-way through an epoch).
        totals: the epoch's running sums, updated in place (pass the checkpointed ones to continue an epoch).
        accum_steps: micro-batches per optimizer update; the loss is divided by it.
        nan_policy: ``"stop"`` raises :class:`NonFiniteLossError`, ``"skip"`` drops the update and counts it.

    Shape:
        loader yields ``(x (B, C, H, W), y (B,), skipped_paths)``.
    """
    model.train()
    n_batches = len(loader) + batches_done
    loop = _EpochLoop(
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        epoch=epoch,
        device=device,
        scheduler=scheduler,
        control=control or StepControl(),
        accum_steps=accum_steps,
        clip_grad=clip_grad,
        clip_mode=clip_mode,
        amp_dtype=amp_dtype,
        scaler=scaler,
        ema=ema,
        mixup_fn=mixup_fn,
        channels_last=channels_last,
        nan_policy=nan_policy,
        updates=updates,
        i=batches_done,
        n_batches=n_batches,
        totals=totals if totals is not None else EpochTotals(),
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=n_batches,
            initial=batches_done,
            desc=f"epoch {epoch}",
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )
    try:
        loop.run(loader, bar)
    finally:
        if bar is not None:
            bar.close()
    return loop.result()


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
