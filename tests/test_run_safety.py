"""Issue 16, "Never lose a user's run": run folders are never clobbered, write failures keep the last good checkpoint,
readers never trip over a run that is writing, data-loader workers fail in one line and resume exactly.

The write-failure tests inject faults through :class:`_runs.FaultyDisk` (every open-for-write, write, fsync, rename,
link and mkdir under the run folder) and, where the machine allows it (root, tmpfs), fill a real 700 KiB file system.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _runs import FaultyDisk, digit_folder, site_of
from acmix.cli.main import main
from acmix.train import checkpoint as ckpt
from acmix.train.data import DataLoaderError, ShardSampler, make_loader
from acmix.train.engine import evaluate, train_one_epoch
from acmix.train.inference import load_model
from acmix.train.rundir import LOCK_NAME, RunLock, default_run_dir

FAST = ["--no-progress", "--threads", "1"]
#: a whole run in ~2 s: 20 training images, 2 updates per epoch, a checkpoint after every update, plots on
TINY = ["--epochs", "2", "--batch-size", "10", "--checkpoint-every", "1", *FAST]
#: metrics that do not depend on timing
STABLE = ("epoch", "updates", "train_loss", "val_loss", "val_top1", "val_top5", "best_top1")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return digit_folder(tmp_path_factory.mktemp("tiny") / "data", per_class=2, val_per_class=1)


def _args(data: Path, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(data), *TINY, *extra]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _stable_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in STABLE} for r in rows]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "last.safetensors")), load_file(str(b / "last.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------------------------------ run folders


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main([*_args(tiny_data), "--output", str(run)]) == 0
    return run


def test_new_run_refuses_a_finished_run_folder(tiny_data, finished_run, tmp_path, capsys):
    """`--output` into a finished run: refused in one line naming --resume and --overwrite; nothing changes."""
    run = tmp_path / "run"
    run.mkdir()
    for rel, data in _snapshot(finished_run).items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    before = _snapshot(run)
    capsys.readouterr()
    assert main([*_args(tiny_data, "--lr", "0.1"), "--output", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{run} already holds a run" in err[0] and f"--resume {run}" in err[0] and "--overwrite" in err[0]
    assert _snapshot(run) == before  # weights, state, metrics: byte for byte
    assert main([*_args(tiny_data, "--epochs", "1"), "--output", str(run), "--overwrite"]) == 0
    assert [r["epoch"] for r in _stable_rows(run)] == [0]  # the old run's epochs are gone, not mixed in
    assert ckpt.load_state(run / "last.state.pt")["epoch"] == 1
    assert {p.name.split(".")[0] for p in (run / "checkpoints").iterdir()} == {"e0001-u00000002"}


def test_a_folder_with_other_files_is_refused_and_only_run_files_are_overwritten(tiny_data, tmp_path, capsys):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    assert main([*_args(tiny_data), "--output", str(run), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty (notes.txt)" in err[0] and "--overwrite" in err[0], err
    assert main([*_args(tiny_data), "--output", str(run), "--max-steps", "1", "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "my notes" and (run / "last.state.pt").is_file()
    assert main(["train", "--resume", str(run), "--overwrite", *FAST]) == 2
    assert "contradict" in capsys.readouterr().err


def test_default_run_folder_never_collides(tmp_path, monkeypatch):
    """Runs started in the same second get runs/<model>-<time>-1, -2, ... (claimed by an atomic mkdir)."""
    names: list[Path] = []
    lock = threading.Lock()

    def claim() -> None:
        p = default_run_dir("acmix_micro", tmp_path / "runs", stamp="20260101-120000")
        with lock:
            names.append(p)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8
    assert sorted(p.name for p in names) == sorted(
        ["acmix_micro-20260101-120000"] + [f"acmix_micro-20260101-120000-{i}" for i in range(1, 8)]
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("acmix.train.rundir.time.strftime", lambda fmt: "20260101-120000")
    assert main(["train", "--max-steps", "1", *FAST]) == 0  # the trainer's default folder takes the next free name
    assert (tmp_path / "runs" / "acmix_micro-20260101-120000-8" / "last.state.pt").is_file()


_HOLDER = """
import sys
from acmix.train.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_writer_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(tiny_data, tmp_path, capsys):
    """A real process holds the folder's lock: a run into it is refused naming that pid; after kill -9 of the
    holder the kernel has dropped the lock and the run goes ahead."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main([*_args(tiny_data), "--output", str(run), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"being written by another acmix process (pid {holder.pid} on" in err[0], err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert f"pid {holder.pid}" in (run / LOCK_NAME).read_text()  # the dead holder's note is still there...
    assert main([*_args(tiny_data), "--output", str(run), "--max-steps", "1"]) == 0  # ...but not its lock
    assert ckpt.load_state(run / "last.state.pt")["updates"] == 1
    with RunLock(run):  # released at the end of the run
        pass


def test_two_runs_started_together_one_is_refused(tiny_data, tmp_path):
    """Two `acmix train --output same` at once: one trains, the other is refused in one line; no line twice."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "acmix", *_args(tiny_data, "--epochs", "1"), "--output", str(run)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(i for i, p in enumerate(procs) if p.returncode == 2)
    winner = procs[1 - loser]
    err = outs[loser][1].strip().splitlines()
    assert len(err) == 1, err
    assert f"(pid {winner.pid} on" in err[0] or "already holds a run" in err[0], err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and len(set(lines)) == len(lines)
    assert ckpt.load_state(run / "last.state.pt")["updates"] == 2


# ------------------------------------------------------------------------------------------ readers while writing


def _constant_model(value: float) -> torch.nn.Module:
    import timm

    model = timm.create_model("acmix_micro")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def _save_version(run: Path, version: int) -> None:
    state = dict(epoch=version, batches_done=0, updates=version, model_name="acmix_micro", best_top1=0.0)
    state.update(best_epoch=0, model_kwargs={"num_classes": 10, "in_chans": 1}, rng=ckpt.capture_rng())
    ckpt.save_checkpoint(run, ("last", "best"), model=_constant_model(float(version)), state=state)


def test_reader_gets_a_consistent_checkpoint_when_the_run_replaces_it_meanwhile(tmp_path, monkeypatch):
    """The run writes a new checkpoint (and prunes the old one) between the reader's state read and weights read."""
    run = tmp_path / "run"
    _save_version(run, 1)
    real_load_state = ckpt.load_state
    calls = {"n": 0}

    def load_state_then_the_run_moves_on(path):
        state = real_load_state(path)
        calls["n"] += 1
        if calls["n"] == 1:
            _save_version(run, 2)  # replaces best.state.pt and removes checkpoints/e0001-u00000001.*
        return state

    monkeypatch.setattr(ckpt, "load_state", load_state_then_the_run_moves_on)
    loaded = load_model(run)
    assert loaded.state["updates"] == 2
    assert all(bool((p == 2.0).all()) for p in loaded.model.parameters())


def test_readers_never_see_half_a_checkpoint_while_a_run_writes(tmp_path):
    """A writer thread saves checkpoint after checkpoint (each with constant weights = its version) while a reader
    loads the run folder again and again: every load succeeds and weights and state belong together."""
    run = tmp_path / "run"
    _save_version(run, 1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        v = 2
        try:
            while not stop.is_set():
                _save_version(run, v)
                v += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    loads, seen = 0, set()
    try:
        t_end = time.time() + 3.0
        while time.time() < t_end:
            loaded = load_model(run)
            version = loaded.state["updates"]
            assert all(bool((p == float(version)).all()) for p in loaded.model.parameters()), version
            seen.add(version)
            loads += 1
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert loads >= 3 and len(seen) >= 2, (loads, seen)  # the reader really raced the writer


def test_metrics_reader_skips_a_torn_line(tmp_path):
    from acmix.train.plots import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "val_top1": 50.0}\n{"epoch": 1, "val_to')
    assert read_metrics(path) == [{"epoch": 0, "val_top1": 50.0}]


# ------------------------------------------------------------------------------------------ write failures


def _checkpoint_state(version: int) -> dict:
    return dict(epoch=version, batches_done=0, updates=version, best_top1=0.0, best_epoch=0, rng=ckpt.capture_rng())


def _save_v2(run: Path, ema: bool) -> None:
    ema_model = _constant_model(2.0) if ema else None
    ckpt.save_checkpoint(
        run, ("last", "best"), model=_constant_model(2.0), state=_checkpoint_state(2), ema_model=ema_model
    )


def _save_checkpoint_events(tmp_path: Path, ema: bool) -> list[tuple[str, str]]:
    run = tmp_path / f"count{ema}"
    _save_version(run, 1)
    disk = FaultyDisk(run)
    with disk.installed():
        _save_v2(run, ema)
    return disk.events


def _assert_consistent(run: Path, allowed: set[int]) -> int:
    """last.state.pt loads with its own weights (a version in ``allowed``); no orphan or temp files. Returns it."""
    st = ckpt.load_state(run / "last.state.pt")
    model = _constant_model(0.0)
    ckpt.load_weights(model, ckpt.state_weights_path(run / "last.state.pt", st))
    version = int(st["updates"])
    assert version in allowed and all(bool((p == float(version)).all()) for p in model.parameters())
    referenced = {str(ckpt.load_state(run / f"{k}.state.pt")["weights"]).split(".")[0] for k in ("last", "best")}
    orphans = [p.name for p in (run / "checkpoints").iterdir() if p.name.split(".")[0] not in referenced]
    assert not orphans, orphans
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    return version


_SAVE_CASES = [(errno.ENOSPC, True, True), (errno.EIO, False, False)]
_SAVE_CASES_SLOW = [(e, ema, sticky) for e in (errno.EROFS, errno.EDQUOT) for ema in (False, True) for sticky in (0, 1)]


@pytest.mark.parametrize(
    "err,ema,sticky", [*_SAVE_CASES, *(pytest.param(*c, marks=pytest.mark.slow) for c in _SAVE_CASES_SLOW)]
)
def test_save_checkpoint_fails_cleanly_at_every_write(tmp_path, err, ema, sticky):
    """Every write of a checkpoint (weights, EMA, state, last/best pointers, folder fsyncs) fails in turn: one-line
    WriteError naming the file, ``last`` loads with its own weights (old or new), no orphan or temp files."""
    events = _save_checkpoint_events(tmp_path, ema)
    assert len(events) >= (30 if ema else 20), events
    for i in range(len(events)):
        run = tmp_path / f"r{i}"
        _save_version(run, 1)
        disk = FaultyDisk(run, fail_at=i, err=err, sticky=bool(sticky))
        with disk.installed():
            try:
                _save_v2(run, ema)
                raised = None
            except ckpt.WriteError as exc:
                raised = exc
        if raised is None:  # pathlib ignores a failed mkdir of a folder that exists: the save went through
            assert disk.failed == [("mkdir", "checkpoints")] and _assert_consistent(run, {2}) == 2
            continue
        msg = str(raised)
        assert "\n" not in msg and msg.startswith(f"cannot write {run}") and os.strerror(err) in msg, msg
        _assert_consistent(run, {1, 2})


#: the files of a run that the default suite fails (checkpoint internals: every write, in the test above)
_RUN_SITES = (".lock", "config.yaml", "checkpoints/<tag>.safetensors", "best.state.pt", "last.state.pt")
_RUN_SITES += ("metrics.jsonl", "loss.png")


def test_no_hard_links_falls_back_to_copies(tmp_path):
    """File systems without hard links (EPERM/EXDEV on link): last/best become fsync'ed copies instead."""
    run = tmp_path / "run"
    _save_version(run, 1)
    disk = FaultyDisk(run, fail_at=0, err=errno.EPERM, ops=("link",))
    with disk.installed():
        _save_v2(run, ema=True)
    assert disk.failed and all(op == "link" for op, _ in disk.failed)
    assert _assert_consistent(run, {2}) == 2
    tag = ckpt.load_state(run / "last.state.pt")["weights"]
    assert not (run / "last.safetensors").samefile(run / "checkpoints" / tag)


def _fault_plan(events: list[tuple[str, str]], sites: tuple[str, ...] | None = None) -> list[int]:
    """The last write of each file in ``sites`` (all when None): a checkpoint exists before it where possible."""
    last: dict[str, int] = {}
    for i, (_, rel) in enumerate(events):
        last[site_of(rel)] = i
    return sorted(i for site, i in last.items() if sites is None or site in sites)


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    """The uninterrupted run, with its list of write events."""
    run = tmp_path_factory.mktemp("reference") / "run"
    disk = FaultyDisk(run)
    with disk.installed():
        assert main([*_args(tiny_data), "--output", str(run)]) == 0
    return run, disk.events


_STOP = re.compile(r"^acmix train: (stopped|error): cannot write (\S+): (.+)$")


def _fail_and_resume(tiny_data: Path, reference: Path, run: Path, fail_at: int, err: int, capsys) -> str:
    """Run with a fault from write ``fail_at`` on, check the failure and what survived, then go on without it."""
    capsys.readouterr()
    disk = FaultyDisk(run, fail_at=fail_at, err=err)
    with disk.installed():
        code = main([*_args(tiny_data), "--output", str(run)])
    out, errtext = capsys.readouterr()
    assert "Traceback" not in errtext
    if code == 0:  # only plots failed: the run said so and finished
        assert disk.failed and all(site_of(rel).endswith(".png") or rel == "." for _, rel in disk.failed)
        assert "plot(s) could not be written (training went on)" in errtext, errtext
        _assert_same_weights(reference, run)
        return "plot"
    assert code == 1, (code, errtext)
    m = _STOP.match(errtext.strip().splitlines()[-1])
    assert m, errtext
    assert m.group(2).startswith(str(run)) and os.strerror(err) in m.group(3), errtext
    if (run / "last.state.pt").exists():
        _assert_consistent_run(run)
        assert main(["train", "--resume", str(run), *TINY]) == 0
    else:
        assert main([*_args(tiny_data), "--output", str(run), "--overwrite"]) == 0
    _assert_same_weights(reference, run)
    assert _stable_rows(run) == _stable_rows(reference)
    return "stopped"


def _assert_consistent_run(run: Path) -> None:
    loaded = load_model(run / "last.state.pt")  # the state file and the weights it names belong together
    assert loaded.state["updates"] >= 1
    referenced = {str(ckpt.load_state(f)["weights"]).split(".")[0] for f in run.glob("*.state.pt")}
    orphans = [p.name for p in (run / "checkpoints").iterdir() if p.name.split(".")[0] not in referenced]
    assert not orphans, orphans  # no weights file without its state file
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


def test_write_failure_at_each_file_of_a_run_keeps_the_last_good_checkpoint(tiny_data, reference_run, tmp_path, capsys):
    """A full disk (or I/O error, read-only folder) from the last write of each kind of file on (lock, config,
    checkpoint weights, best and last pointers, metrics, plots): one line naming the file and cause, the previous
    checkpoint loads with its own weights, no orphan files, and a resume ends with the uninterrupted run's weights
    and metrics."""
    reference, events = reference_run
    plan = _fault_plan(events, _RUN_SITES)
    assert len(plan) == len(_RUN_SITES), sorted({site_of(r) for _, r in events})
    outcomes = []
    for n, i in enumerate(plan):
        err = (errno.ENOSPC, errno.EIO, errno.EROFS)[n % 3]
        outcomes.append(_fail_and_resume(tiny_data, reference, tmp_path / f"f{i}", i, err, capsys))
    assert "stopped" in outcomes and "plot" in outcomes


def test_a_plot_that_cannot_be_written_does_not_stop_training(tiny_data, reference_run, tmp_path, capsys, caplog):
    reference, _ = reference_run
    run = tmp_path / "run"
    disk = FaultyDisk(run, fail_at=0, err=errno.EACCES, only=lambda site: site == "loss.png")
    with disk.installed():
        assert main([*_args(tiny_data), "--output", str(run)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"cannot write {run / 'loss.png'}: Permission denied" in err
    assert "2 plot(s) could not be written (training went on)" in err
    warned = [r.getMessage() for r in caplog.records if "training continues" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith(f"epoch 0: cannot write {run / 'loss.png'}"), warned
    _assert_same_weights(reference, run)
    assert (run / "accuracy.png").is_file() and not (run / "loss.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("ema", [False, True])
def test_write_failure_at_every_write_of_a_run(tiny_data, tmp_path, capsys, ema):
    """The slow sweep: a full disk from each write of the run on (every event, with and without EMA)."""
    extra = ["--model-ema"] if ema else []
    reference = tmp_path / "reference"
    disk = FaultyDisk(reference)
    with disk.installed():
        assert main([*_args(tiny_data, *extra), "--output", str(reference)]) == 0
    for i in range(len(disk.events)):
        args_run = tmp_path / f"f{i}"
        capsys.readouterr()
        fault = FaultyDisk(args_run, fail_at=i)
        with fault.installed():
            code = main([*_args(tiny_data, *extra), "--output", str(args_run)])
        errtext = capsys.readouterr().err
        assert "Traceback" not in errtext and code in (0, 1), errtext
        if (args_run / "last.state.pt").exists():
            _assert_consistent_run(args_run)
            assert main(["train", "--resume", str(args_run), *TINY, *extra]) == 0
        else:
            assert main([*_args(tiny_data, *extra), "--output", str(args_run), "--overwrite"]) == 0
        _assert_same_weights(reference, args_run)
        assert _stable_rows(args_run) == _stable_rows(reference)
    print(f"write faults injected: {len(disk.events)} (ema={ema})")


def _mount_tmpfs(path: Path, size: str) -> None:
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("a real small file system needs root to mount a tmpfs; the fault-injection tests cover it")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:100]})")


def test_a_real_700k_file_system_fills_up(tiny_data, reference_run, tmp_path, capsys):
    """On a 700 KiB tmpfs the run stops in one line when the disk is full, keeps its last good checkpoint, and
    after the file system grows a resume ends exactly where the uninterrupted run did."""
    reference, _ = reference_run
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "700k")
    try:
        run = mnt / "run"
        capsys.readouterr()
        assert main([*_args(tiny_data), "--output", str(run)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err)
        assert err[-1].startswith(f"acmix train: stopped: cannot write {run}") and "No space left on device" in err[-1]
        _assert_consistent_run(run)
        assert subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)]).returncode == 0
        assert main(["train", "--resume", str(run), *TINY]) == 0
        _assert_same_weights(reference, run)
        assert _stable_rows(run) == _stable_rows(reference)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# ------------------------------------------------------------------------------------------ data-loader workers


def _corrupt_copy(tiny_data: Path, root: Path, split: str) -> Path:
    import shutil

    data = root / "data"
    shutil.copytree(tiny_data, data)
    good = (data / split / "4" / "0.png").read_bytes()
    (data / split / "4" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    return data


@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_image_in_a_worker_is_the_same_one_line_error(tiny_data, tmp_path, capsys, split):
    """A truncated image read by a worker (train, or the validation pass during training, and `acmix eval`) gives
    the line that --workers 0 gives."""
    data = _corrupt_copy(tiny_data, tmp_path, split)
    lines = {}
    for workers in ("0", "2"):
        code = main([*_args(data), "--output", str(tmp_path / f"run{workers}"), "--workers", workers])
        lines[workers] = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines[workers]) == 1, lines[workers]
    assert lines["0"] == lines["2"] and "zz_truncated.png" in lines["0"][0]


def test_bad_image_in_an_eval_worker_is_the_same_one_line_error(tiny_data, finished_run, tmp_path, capsys):
    data = _corrupt_copy(tiny_data, tmp_path, "val")
    lines = {}
    for workers in ("0", "2"):
        assert main(["eval", str(finished_run), "--data-dir", str(data), "--workers", workers, "--json"]) == 2
        lines[workers] = capsys.readouterr().err.strip().splitlines()
        assert len(lines[workers]) == 1, lines[workers]
    assert lines["0"] == lines["2"] and "zz_truncated.png" in lines["0"][0]


class _Crashing(torch.utils.data.Dataset):
    """Item 5 kills its worker process (as the out-of-memory killer would); other items raise or load."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        if i == 5 and self.mode == "kill" and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        if i == 5 and self.mode == "raise":
            raise KeyError(f"no label for item {i}")
        return torch.zeros(1, 2, 2), 0


@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_worker_crash_or_error_is_one_line_in_train_and_eval(mode):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cpu = torch.device("cpu")
    messages = []
    for workers in [2] if mode == "kill" else [0, 2]:
        loader = make_loader(_Crashing(mode), ShardSampler(12, shuffle=False), 2, workers=workers)
        with pytest.raises(DataLoaderError) as info:
            train_one_epoch(model, loader, opt, torch.nn.functional.cross_entropy, epoch=0, device=cpu, progress=False)
        messages.append(str(info.value))
        with pytest.raises(DataLoaderError) as info:
            evaluate(model, loader, device=cpu)
        messages.append(str(info.value))
    for msg in messages:
        assert "\n" not in msg, msg
    if mode == "kill":
        assert "data-loader worker died" in messages[0] and "--workers 0" in messages[0]
    else:
        assert set(messages) == {"loading a batch failed: KeyError: 'no label for item 5'"}, messages


def test_worker_crash_in_the_cli_is_one_line(finished_run, monkeypatch, capsys):
    from acmix.train.data import DigitsDataset

    real = DigitsDataset.__getitem__

    def dies_in_worker(self, i):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    monkeypatch.setattr(DigitsDataset, "__getitem__", dies_in_worker)
    assert main(["eval", str(finished_run), "--workers", "2", "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("acmix eval: error: a data-loader worker died"), err


def test_augmentation_depends_on_seed_epoch_and_index_only():
    """Each sample's augmentation is the same with 0 or 2 workers and when the epoch starts part-way (a resume);
    iterating leaves the main process's generators alone (dropout and Mixup draw from them)."""
    import random

    import numpy as np

    from acmix.train.data import DigitsDataset

    def batches(workers: int, start: int = 0, epoch: int = 3) -> list[torch.Tensor]:
        sampler = ShardSampler(1437, shuffle=True, seed=7)
        sampler.set_epoch(epoch, start=start)
        loader = make_loader(DigitsDataset("train", shift=2), sampler, 100, workers=workers)
        loader.generator = torch.Generator().manual_seed(0)
        return [b[0] for b in loader]

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    zero = batches(0)
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]
    two = batches(2)
    assert len(zero) == len(two) == 15 and all(torch.equal(a, b) for a, b in zip(zero, two))
    assert all(torch.equal(a, b) for a, b in zip(zero[5:], batches(0, start=500)))
    assert not torch.equal(zero[0], batches(0, epoch=4)[0])  # another epoch, another augmentation


def test_resume_is_exact_with_two_workers(tiny_data, reference_run, tmp_path):
    """Guarantee: for any --workers an interrupted and resumed run ends with the weights of an uninterrupted one
    (augmentation is seeded per sample from seed, epoch and index). Here: stopped after 3 of 4 updates with 2
    workers, resumed with 2 workers, equal to the uninterrupted 0-worker reference, which has random
    augmentation on (timm's random resized crop, flip, colour jitter)."""
    reference, _ = reference_run
    run = tmp_path / "run"
    assert main([*_args(tiny_data, "--workers", "2", "--max-steps", "3"), "--output", str(run)]) == 0
    assert ckpt.load_state(run / "last.state.pt")["updates"] == 3
    assert main(["train", "--resume", str(run), *TINY, "--workers", "2"]) == 0
    _assert_same_weights(reference, run)
    assert _stable_rows(run) == _stable_rows(reference)


def test_a_broken_worker_pipe_reads_as_a_dead_worker_only_with_workers():
    from acmix.train.data import _one_line

    reset = ConnectionResetError(104, "Connection reset by peer")
    died = str(_one_line(reset, workers=2))
    assert died.startswith("a data-loader worker died") and "--workers 0" in died, died
    # without workers the same error is the dataset's own (a network file system, say): named as it is
    assert (
        str(_one_line(reset, workers=0))
        == "loading a batch failed: ConnectionResetError: [Errno 104] Connection reset by peer"
    )
