"""The training run: data, model, timm optimizer/scheduler/EMA, DDP, checkpoints, metrics, plots, signals.

:func:`run_training` takes a resolved :class:`~acmix.train.config.TrainConfig` and returns a :class:`TrainResult`.
It checks the data before any training, claims and locks the run folder (:mod:`acmix.train.rundir`: a folder
holding another run is refused), writes only on rank 0, checkpoints atomically (``last`` every epoch and every
``checkpoint_every`` updates, ``best`` on a new best top-1), and on SIGINT/SIGTERM finishes the current update,
writes ``last`` and returns with ``stopped="signal"``. A file that cannot be written (full disk, I/O error) or a
data-loader failure stops the run with :class:`TrainingStopped` (one line naming the cause and the last good
checkpoint); a plot that cannot be written is only reported. Resuming restores weights, optimizer, scheduler,
scaler, EMA, RNG states, the epoch's running sums and the position inside the epoch, so on CPU a resumed run ends
with the same weights and metrics as an uninterrupted one, for any number of loader workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..models import micro as _micro  # noqa: F401  (registers acmix_micro)
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import DataBundle, DataLoaderError, ShardSampler, build_data, make_loader, scan_image_folder
from .distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from .engine import EpochTotals, NonFiniteLossError, StepControl, _any_rank, evaluate, train_one_epoch
from .rundir import RunFolderError, RunLock, claim_run_dir, default_run_dir

_logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "TrainingStopped", "check_model_name", "create_model", "run_training"]


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    updates: int
    best_top1: float
    last: dict[str, Any]
    stopped: str  # "" (finished), "signal", "max_steps"
    seconds: float
    metrics: list[dict[str, Any]] = field(default_factory=list)
    signal_name: str = ""
    plot_errors: list[str] = field(default_factory=list)  # plots that could not be written (training went on)

    @property
    def resume_command(self) -> str:
        return f"acmix train --resume {self.run_dir}"


class TrainingStopped(RuntimeError):
    """Training stopped on an error after which the last good checkpoint is kept (non-finite loss, a file that
    could not be written); the message is one line naming the cause and the checkpoint to resume from."""


def check_model_name(name: str) -> None:
    """Raise ValueError for a name timm's registry lacks, with close matches."""
    import timm

    base = name.split(".")[0]
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
    raise ValueError(f"unknown model {name!r}{hint}")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` after checking the name (acmix models are registered by importing acmix.models)."""
    import timm

    check_model_name(name)
    try:
        return timm.create_model(name, **kwargs)
    except Exception as exc:  # a bad keyword or value: TypeError, AssertionError, RuntimeError... from the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot build {name} with {sorted(kwargs)}: {first[:300]}") from None


def _model_kwargs(cfg: TrainConfig, num_classes: int, in_chans: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = dict(pretrained=cfg.pretrained, num_classes=num_classes)
    if in_chans is not None:
        kw["in_chans"] = in_chans
    if cfg.drop_rate is not None:
        kw["drop_rate"] = cfg.drop_rate
    if cfg.drop_path is not None:
        kw["drop_path_rate"] = cfg.drop_path
    kw.update(cfg.model_kwargs)
    return kw


class _SignalFlag:
    """SIGINT/SIGTERM set a flag polled after each update; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.name = ""
        self._old: dict[Any, Any] = {}

    def __call__(self) -> bool:
        return bool(self.name)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        _logger.warning("%s received: finishing the current step, then writing a checkpoint", self.name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_SignalFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _resolve_amp(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, Any]:
    if not cfg.amp:
        return None, None
    dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("--amp-dtype float16 needs a CUDA device; use --amp-dtype bfloat16 on CPU")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return dtype, scaler


def _loss_fns(cfg: TrainConfig, num_classes: int) -> tuple[Any, Any]:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(  # the strengths; when and how to mix; the soft targets
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
            label_smoothing=cfg.smoothing, num_classes=num_classes,
        )  # fmt: skip
        return SoftTargetCrossEntropy(), mixup_fn
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing), None
    return nn.CrossEntropyLoss(), None


class _MetricsLog:
    """metrics.jsonl (one JSON object per epoch, rewritten atomically) + optional TensorBoard; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, keep_before_epoch: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # resumed: keep the epochs already finished, drop any later ones
            self.rows = [r for r in _read_jsonl(self.path) if r.get("epoch", -1) < keep_before_epoch]
            self._write()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:
                _logger.warning(
                    "--tensorboard: the tensorboard package is not installed; logging to metrics.jsonl only"
                )

    def add(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        try:
            self._write()
        except ckpt.WriteError:
            self.rows.pop()
            raise
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def _write(self) -> None:
        """The whole file, atomically: a reader or a failed write never leaves half a line (a few KB per epoch)."""
        ckpt.atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line) if line.strip() else None
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split(": ", 1)[1] if last.startswith(("ValueError: ", "CheckpointError: ")) else last


def _precheck_data(cfg: TrainConfig) -> None:
    """Fail on empty/missing classes before building anything heavy."""
    if cfg.data_dir is None:
        return
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir not found: {root}")
    _, classes = scan_image_folder(root / cfg.train_split)
    scan_image_folder(root / cfg.val_split, {c: i for i, c in enumerate(classes)})


# stepped per update (timm step_update); "plateau" needs per-epoch metrics and is not offered
_SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "poly", "wsd", "rsqrt", "none")


def check_optimizer_and_scheduler(cfg: TrainConfig) -> None:
    """Unknown ``--opt`` / ``--sched`` names: ValueError with close matches, before any work."""
    from timm.optim import list_optimizers

    names: list[str] = [str(n) for n in list_optimizers()]
    opt = cfg.opt.lower().split("_")[-1]
    if opt not in names:
        close = difflib.get_close_matches(opt, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown optimizer --opt {cfg.opt!r}{hint}")
    if cfg.sched not in _SCHEDULERS:
        close_s: list[str] = difflib.get_close_matches(cfg.sched, _SCHEDULERS, n=2)
        hint = f"; did you mean {', '.join(close_s)}?" if close_s else f" (choose from {', '.join(_SCHEDULERS)})"
        raise ValueError(f"unknown scheduler --sched {cfg.sched!r}{hint}")


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train according to ``cfg`` (see module docstring). Call under ``torchrun`` for DDP."""
    cfg.validate()
    check_model_name(cfg.model)
    check_optimizer_and_scheduler(cfg)
    _precheck_data(cfg)
    info, device = init_distributed(cfg.device)
    try:
        return _run(cfg, info, device)
    finally:
        cleanup_distributed()


@dataclass
class _Progress:
    """Where the run stands: the counters a checkpoint records and a resume restores."""

    epoch: int = 0
    batches_done: int = 0  # batches of ``epoch`` already trained on
    updates: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    totals: EpochTotals = field(default_factory=EpochTotals)  # running sums of ``epoch`` so far


@dataclass
class _Parts:
    """Everything built before the first update (model, data, loaders, optimisation) for one run."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    run_dir: Path
    model: nn.Module
    train_model: nn.Module  # ``model``, or its DDP wrapper
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp_dtype: torch.dtype | None
    loss_fn: Any
    mixup_fn: Any
    data: DataBundle
    num_classes: int
    in_chans: int
    train_sampler: ShardSampler
    train_loader: Any
    val_loader: Any
    plot_errors: list[str] = field(default_factory=list)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_loader)

    def data_meta(self) -> dict[str, Any]:
        d = self.data
        return dict(
            in_chans=self.in_chans,
            input_size=d.input_size,
            mean=list(d.mean),
            std=list(d.std),
            crop_pct=d.crop_pct,
            interpolation=d.interpolation,
            classes=list(d.classes),
            dataset=d.name,
        )


def _configure_process(cfg: TrainConfig, info: DistInfo, device: torch.device) -> None:
    threads = cfg.threads or (1 if cfg.data_dir is None else None)  # digits: tiny ops, threads only add sync cost
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_everything(cfg.seed + info.rank)


def _read_resume_state(cfg: TrainConfig, info: DistInfo) -> tuple[dict[str, Any] | None, Path | None]:
    if not cfg.resume:
        return None, None
    state_file = ckpt.find_state_file(cfg.resume)
    state = ckpt.load_state(state_file)
    if int(state.get("world", 1)) != info.world:
        raise ValueError(
            f"{state_file} was written by a run with {state.get('world', 1)} process(es); "
            f"resume it with the same number (now {info.world}) so the data order continues exactly"
        )
    return state, state_file


def _claim_run_dir(
    cfg: TrainConfig, info: DistInfo, device: torch.device, state_file: Path | None
) -> tuple[Path, RunLock | None]:
    """The run folder (``--output``, the resumed run's, or a fresh ``runs/<model>-<time>[-N]``), locked by rank 0.

    A new run may not write into a folder holding another run (:func:`acmix.train.rundir.claim_run_dir`); when
    rank 0 cannot claim the folder, every rank stops.
    """
    resume_dir = None
    if state_file is not None:
        resume_dir = state_file.parent.parent if state_file.parent.name == "checkpoints" else state_file.parent
    run_dir = Path(cfg.output) if cfg.output else resume_dir
    lock, error = None, None
    if info.is_main:
        try:
            run_dir = run_dir or default_run_dir(cfg.model)
            lock = claim_run_dir(run_dir, resume_dir=resume_dir, overwrite=cfg.overwrite)
        except (RunFolderError, ckpt.WriteError) as exc:
            error = exc
    run_dir = run_dir or default_run_dir(cfg.model, create=False)  # ranks > 0 write nothing
    if _any_rank(error is not None, device):
        if error is not None:
            raise error
        raise TrainingStopped("rank 0 could not claim the run folder (see its message)")
    return run_dir, lock


def _build_model_and_data(cfg: TrainConfig) -> tuple[nn.Module, DataBundle, int, int]:
    """The model (on the CPU) and the datasets; returns ``(model, data, num_classes, in_chans)``."""
    from timm.data import resolve_data_config

    if cfg.data_dir is None:
        in_chans: int | None = 1
        num_classes = cfg.num_classes or 10
    else:
        _, classes = scan_image_folder(Path(cfg.data_dir) / cfg.train_split)
        num_classes = cfg.num_classes or len(classes)
        in_chans = None
    model = create_model(cfg.model, **_model_kwargs(cfg, num_classes, in_chans))
    if in_chans is None:
        pcfg = getattr(model, "pretrained_cfg", None) or {}
        in_chans = int(getattr(model, "in_chans", None) or pcfg.get("input_size", (3,))[0])
    data_cfg = resolve_data_config({}, model=model)
    if cfg.input_size:
        data_cfg["input_size"] = (in_chans, cfg.input_size, cfg.input_size)
    data = build_data(cfg, data_cfg, in_chans)
    if data.num_classes > num_classes:
        raise ValueError(f"the data has {data.num_classes} classes but --num-classes is {num_classes}")
    return model, data, num_classes, in_chans


def _place_model(cfg: TrainConfig, model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Initial checkpoint, gradient checkpointing, device, memory format and SyncBatchNorm."""
    if cfg.initial_checkpoint:
        ckpt.load_weights(model, cfg.initial_checkpoint, strict=False)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)  # type: ignore[operator]
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if not cfg.sync_bn:
        return model
    if not info.distributed:
        _logger.warning("--sync-bn has no effect without torchrun (one process)")
        return model
    if device.type != "cuda":
        raise ValueError(
            "--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); on CPU use a model without "
            "batch statistics, e.g. --model-kwargs norm_layer=groupnorm for acmix_micro"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _build_optimizer(cfg: TrainConfig, model: nn.Module, info: DistInfo) -> tuple[Any, Any]:
    """timm's optimizer (lr scaled by the global batch when ``lr_base_size`` is set) and the EMA (or None)."""
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    global_batch = cfg.batch_size * cfg.grad_accum_steps * info.world
    lr = cfg.lr * global_batch / cfg.lr_base_size if cfg.lr_base_size else cfg.lr
    opt_kwargs: dict[str, Any] = {}
    if cfg.opt_eps is not None:
        opt_kwargs["eps"] = cfg.opt_eps
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.opt,
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=not cfg.wd_all_params,
        **opt_kwargs,
    )
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    return optimizer, ema


def _build_loaders(
    cfg: TrainConfig, data: DataBundle, info: DistInfo, device: torch.device, drop_last: bool
) -> tuple[ShardSampler, Any, Any]:
    """The sharded training sampler and the training and validation loaders (own generators: global RNG untouched)."""
    n_train, n_val = len(data.train), len(data.val)  # type: ignore[arg-type]
    train_sampler = ShardSampler(n_train, shuffle=True, seed=cfg.seed, rank=info.rank, world=info.world)
    val_sampler = ShardSampler(n_val, shuffle=False, rank=info.rank, world=info.world)
    if len(train_sampler) < cfg.batch_size and drop_last:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(train_sampler)} training images")
    pin = device.type == "cuda"
    train_loader = make_loader(
        data.train, train_sampler, cfg.batch_size, workers=cfg.workers, drop_last=drop_last, pin_memory=pin
    )
    train_loader.generator = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)
    val_loader = make_loader(data.val, val_sampler, cfg.batch_size, workers=cfg.workers, pin_memory=pin)
    val_loader.generator = torch.Generator().manual_seed(cfg.seed)
    return train_sampler, train_loader, val_loader


def _build(cfg: TrainConfig, info: DistInfo, device: torch.device, run_dir: Path) -> _Parts:
    """Build model, data, optimizer, EMA, DDP wrapper, loaders, scheduler and AMP, in this (RNG-relevant) order."""
    from timm.scheduler import create_scheduler_v2

    model, data, num_classes, in_chans = _build_model_and_data(cfg)
    model = _place_model(cfg, model, info, device)
    optimizer, ema = _build_optimizer(cfg, model, info)
    train_model: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # the whole model under torch.compile (ACmix's ops are torch.library ops or plain torch: no graph break);
        # checkpoints and EMA keep using the bare ``model``
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    loss_fn, mixup_fn = _loss_fns(cfg, num_classes)
    train_sampler, train_loader, val_loader = _build_loaders(cfg, data, info, device, drop_last=mixup_fn is not None)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,  # type: ignore[arg-type]
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=math.ceil(len(train_loader) / cfg.grad_accum_steps),
    )
    amp_dtype, scaler = _resolve_amp(cfg, device)
    return _Parts(
        cfg=cfg,
        info=info,
        device=device,
        run_dir=run_dir,
        model=model,
        train_model=train_model,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        amp_dtype=amp_dtype,
        loss_fn=loss_fn,
        mixup_fn=mixup_fn,
        data=data,
        num_classes=num_classes,
        in_chans=in_chans,
        train_sampler=train_sampler,
        train_loader=train_loader,
        val_loader=val_loader,
    )


def _restore(p: _Parts, state: dict[str, Any], state_file: Path) -> _Progress:
    """Load weights, optimizer, scheduler, scaler, EMA and RNG states from a checkpoint; return its counters."""
    ckpt.load_weights(p.model, ckpt.state_weights_path(state_file, state))
    if p.ema is not None and "ema_weights" in state:
        ckpt.load_weights(p.ema.module, ckpt.state_weights_path(state_file, state, "ema_weights"))
    p.optimizer.load_state_dict(state["optimizer"])
    if p.scheduler is not None and state.get("scheduler") is not None:
        p.scheduler.load_state_dict(state["scheduler"])
    if p.scaler is not None and state.get("scaler") is not None:
        p.scaler.load_state_dict(state["scaler"])
    prog = _Progress(
        int(state["epoch"]),
        int(state["batches_done"]),
        int(state["updates"]),
        float(state["best_top1"]),
        int(state["best_epoch"]),
        _totals_from(state.get("epoch_totals")),
    )
    ckpt.restore_rng(state["rng"])  # rank 0's generators: exact for one process
    if p.info.rank > 0:  # other ranks: fresh, distinct streams (the data order itself is exact on every rank)
        _seed_everything(p.cfg.seed + p.info.rank + 7919 * prog.updates)
    _logger.info(
        "resumed from %s: epoch %d, batch %d, update %d", state_file, prog.epoch, prog.batches_done, prog.updates
    )
    return prog


def _totals_from(saved: Any) -> EpochTotals:
    """The epoch's running sums from a checkpoint (absent in checkpoints written before they were recorded)."""
    if not isinstance(saved, dict):
        return EpochTotals()
    names = {f.name for f in dataclasses.fields(EpochTotals)}
    return EpochTotals(**{k: v for k, v in saved.items() if k in names})


def _save(p: _Parts, prog: _Progress, kinds: tuple[str, ...], last_row: dict[str, Any] | None) -> None:
    """Write a checkpoint at ``prog`` (rank 0; never of non-finite weights: the last good one is kept)."""
    if not p.info.is_main:
        return
    if not all(bool(torch.isfinite(t).all()) for t in p.model.parameters()):
        _logger.warning(
            "update %d: non-finite weights, checkpoint not written (the last good one is kept)", prog.updates
        )
        return
    cfg = p.cfg
    st = dict(
        epoch=prog.epoch,
        batches_done=prog.batches_done,
        updates=prog.updates,
        optimizer=p.optimizer.state_dict(),
        scheduler=p.scheduler.state_dict() if p.scheduler is not None else None,
        scaler=p.scaler.state_dict() if p.scaler is not None else None,
        rng=ckpt.capture_rng(),
        config=cfg.to_dict(),
        model_name=cfg.model,
        model_kwargs=_model_kwargs(cfg, p.num_classes, p.in_chans) | {"pretrained": False},
        num_classes=p.num_classes,
        data=p.data_meta(),
        world=p.info.world,
        best_top1=prog.best_top1,
        best_epoch=prog.best_epoch,
        epoch_totals=dataclasses.asdict(prog.totals),
        metrics=last_row or {},
    )
    ema_model = p.ema.module if p.ema is not None else None
    ckpt.save_checkpoint(p.run_dir, kinds, model=p.model, state=st, ema_model=ema_model)


def _write_config(p: _Parts) -> None:
    import yaml

    cfg_out = {k.replace("_", "-"): v for k, v in p.cfg.to_dict().items()}
    ckpt.atomic_write_bytes(p.run_dir / "config.yaml", yaml.safe_dump(cfg_out, sort_keys=False).encode())


def _train_epoch(p: _Parts, prog: _Progress, control: StepControl) -> Any:
    """One (possibly partial) training epoch from ``prog``; errors become one-line messages."""
    cfg = p.cfg
    p.train_sampler.set_epoch(prog.epoch, start=prog.batches_done * cfg.batch_size)
    try:
        return train_one_epoch(  # the run's parts; where the epoch resumes; the step settings of the config
            p.train_model, p.train_loader, p.optimizer, p.loss_fn,
            device=p.device, scheduler=p.scheduler, amp_dtype=p.amp_dtype, scaler=p.scaler, ema=p.ema,
            mixup_fn=p.mixup_fn, control=control, progress=cfg.progress and p.info.is_main,
            epoch=prog.epoch, updates=prog.updates, batches_done=prog.batches_done, totals=prog.totals,
            accum_steps=cfg.grad_accum_steps, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
            channels_last=cfg.channels_last, nan_policy=cfg.nan_policy,
        )  # fmt: skip
    except NonFiniteLossError as exc:
        raise TrainingStopped(f"{exc}; last good checkpoint: {p.run_dir / 'last.state.pt'}") from None
    except ValueError as exc:  # a DataLoader worker's error arrives with its traceback in the message
        raise ValueError(_last_line(exc)) from None


def _validate(p: _Parts, res: Any, epoch: int, t_start: float) -> dict[str, Any]:
    """Evaluate the model (and its EMA) after an epoch; the epoch's metrics row."""
    ev = evaluate(
        p.train_model, p.val_loader, device=p.device, amp_dtype=p.amp_dtype, channels_last=p.cfg.channels_last
    )
    row: dict[str, Any] = dict(
        epoch=epoch,
        updates=res.updates,
        train_loss=res.loss,
        val_loss=ev["loss"],
        val_top1=ev["top1"],
        val_top5=ev["top5"],
        lr=res.lr,
        epoch_seconds=round(res.seconds, 3),
        images_per_s=round(res.images_per_s, 1),
        elapsed_s=round(time.perf_counter() - t_start, 2),
        skipped_nonfinite=res.skipped_nonfinite,
        bad_images=len(res.bad_images) + len(ev["bad_images"]),
    )
    if p.ema is not None:
        ev_ema = evaluate(p.ema.module, p.val_loader, device=p.device, amp_dtype=p.amp_dtype)
        row.update(ema_top1=ev_ema["top1"], ema_top5=ev_ema["top5"], ema_loss=ev_ema["loss"])
    _logger.info(
        "epoch %d: train loss %.4f, val loss %.4f, top-1 %.2f%%, top-5 %.2f%%",
        epoch,
        res.loss,
        ev["loss"],
        ev["top1"],
        ev["top5"],
    )
    return row


def _finish_epoch(p: _Parts, prog: _Progress, log: _MetricsLog, row: dict[str, Any]) -> None:
    """Record the epoch: best top-1, metrics line, checkpoint (``last``, and ``best`` on a new best), plots."""
    kinds: tuple[str, ...] = ("last",)
    if row["val_top1"] > prog.best_top1:
        prog.best_top1, prog.best_epoch = row["val_top1"], row["epoch"]
        kinds = ("last", "best")
    row["best_top1"] = prog.best_top1
    log.add(row)
    prog.epoch, prog.batches_done = row["epoch"] + 1, 0
    _save(p, prog, kinds, row)
    if p.info.is_main and p.cfg.plots:
        _plot(p, log, row["epoch"])
    gc.collect()  # steady memory over long runs: free per-epoch cycles (loaders, figures) promptly


def _plot(p: _Parts, log: _MetricsLog, epoch: int) -> None:
    """Redraw the plots; one that cannot be written is reported and training goes on (nothing needs it)."""
    from .plots import plot_metrics

    try:
        plot_metrics(log.rows, p.run_dir)
    except OSError as exc:
        p.plot_errors.append(str(exc))
        _logger.warning("epoch %d: %s; training continues (the plots are redrawn next epoch)", epoch, exc)


def _train_loop(p: _Parts, prog: _Progress, log: _MetricsLog, stop: _SignalFlag, t_start: float) -> tuple[str, dict]:
    """Epochs from ``prog`` to ``cfg.epochs``; returns (stop reason, last metrics row)."""
    cfg = p.cfg

    def after_update(ups: int, batches: int) -> None:
        if cfg.checkpoint_every and ups % cfg.checkpoint_every == 0 and batches < p.batches_per_epoch:
            _save(p, dataclasses.replace(prog, batches_done=batches, updates=ups), ("last",), None)

    control = StepControl(should_stop=stop, after_update=after_update, max_updates=cfg.max_steps)
    last_row: dict[str, Any] = dict(log.rows[-1]) if log.rows else {}
    while prog.epoch < cfg.epochs:
        if cfg.max_steps is not None and prog.updates >= cfg.max_steps:
            return "max_steps", last_row
        res = _train_epoch(p, prog, control)
        prog.updates = res.updates
        if res.bad_images:
            _logger.warning(
                "epoch %d: skipped %d unreadable image(s), e.g. %s", prog.epoch, len(res.bad_images), res.bad_images[0]
            )
        if not res.complete:
            prog.batches_done = res.batches_done
            _save(p, prog, ("last",), None)
            return res.stop_reason or "signal", last_row
        prog.batches_done, prog.totals = 0, EpochTotals()
        last_row = _validate(p, res, prog.epoch, t_start)
        _finish_epoch(p, prog, log, last_row)
        if res.stop_reason:
            return res.stop_reason, last_row
    return "", last_row


def _run(cfg: TrainConfig, info: DistInfo, device: torch.device) -> TrainResult:
    t_start = time.perf_counter()
    _configure_process(cfg, info, device)
    state, state_file = _read_resume_state(cfg, info)
    run_dir, lock = _claim_run_dir(cfg, info, device, state_file)
    try:
        p = _build(cfg, info, device, run_dir)
        prog = _restore(p, state, state_file) if state is not None and state_file is not None else _Progress()
        try:
            if info.is_main:
                _write_config(p)
            log = _MetricsLog(run_dir, info.is_main, cfg.tensorboard, prog.epoch)
            stop = _SignalFlag()
            with stop.installed():
                stopped, last_row = _train_loop(p, prog, log, stop, t_start)
        except (ckpt.WriteError, DataLoaderError) as exc:
            raise TrainingStopped(_stop_message(exc, run_dir)) from None
        barrier()
        log.close()
    finally:
        if lock is not None:
            lock.release()
    return TrainResult(
        run_dir=run_dir,
        epochs_done=len(log.rows) if info.is_main else prog.epoch,
        updates=prog.updates,
        best_top1=prog.best_top1,
        last=last_row,
        stopped=stopped,
        seconds=time.perf_counter() - t_start,
        metrics=list(log.rows),
        signal_name=stop.name,
        plot_errors=list(p.plot_errors),
    )


def _stop_message(exc: Exception, run_dir: Path) -> str:
    """One line: what failed (a file and its cause, a data-loader worker), the checkpoint that survived, the way on."""
    last = run_dir / "last.state.pt"
    try:
        st = ckpt.load_state(last)
    except (OSError, ckpt.CheckpointError):
        return f"{exc}; no checkpoint of this run was written yet"
    fix = "free space or fix the folder" if isinstance(exc, ckpt.WriteError) else "fix the cause"
    kept = f"the last good checkpoint is {last} (epoch {st['epoch']}, update {st['updates']})"
    return f"{exc}; {kept}; {fix}, then: acmix train --resume {run_dir}"
