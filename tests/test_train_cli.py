"""`acmix train/eval/predict/inspect` in-process on tiny data; bad arguments; SIGTERM/SIGINT and kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from acmix.cli.main import main
from acmix.train import checkpoint as ckpt
from acmix.train.data import digits_split

FAST = ["--no-progress", "--threads", "1"]


def _digit_folder(root: Path, per_class: int = 12, val_per_class: int = 4) -> Path:
    """Real digit images (scikit-learn) written as 8 x 8 greyscale PNGs in the ImageNet layout."""
    from PIL import Image

    xtr, ytr, xva, yva = digits_split()
    for split, x, y, n in (("train", xtr, ytr, per_class), ("val", xva, yva, val_per_class)):
        for c in range(10):
            d = root / split / str(c)
            d.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate((y == c).nonzero().flatten()[:n].tolist()):
                Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), "L").save(d / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """One short training on the PNG folder, shared by the eval/predict/inspect tests."""
    root = tmp_path_factory.mktemp("digits")
    data = _digit_folder(root / "data")
    run = root / "run"
    argv = ["train", "--data-dir", str(data), "--epochs", "2", "--batch-size", "30", "--hflip", "0", "--lr", "0.005"]
    code = main([*argv, "--color-jitter", "0", "--output", str(run), *FAST])
    assert code == 0
    return data, run


def test_train_on_png_folder_writes_run(folder_run, capsys):
    data, run = folder_run
    for name in ("last.safetensors", "last.state.pt", "best.safetensors", "config.yaml", "loss.png", "accuracy.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(0 <= r["val_top1"] <= 100 and r["val_top5"] >= r["val_top1"] for r in rows)
    st = ckpt.load_state(run / "last.state.pt")
    assert st["data"]["classes"] == [str(i) for i in range(10)] and st["data"]["in_chans"] == 1


def test_eval_matches_training_metrics(folder_run, capsys):
    data, run = folder_run
    assert main(["eval", str(run / "last.state.pt"), "--data-dir", str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert res["count"] == 40
    assert abs(res["top1"] - last["val_top1"]) < 1e-6 and abs(res["loss"] - last["val_loss"]) < 1e-5


def test_predict_png_and_jpeg(folder_run, tmp_path, capsys):
    from PIL import Image

    data, run = folder_run
    png = data / "val" / "3" / "0.png"
    jpg = tmp_path / "three.jpg"
    Image.open(png).convert("L").save(jpg, "JPEG", quality=95)
    assert main(["predict", str(png), str(jpg), "-c", str(run), "--topk", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == [str(png), str(jpg)]
    for o in out:
        probs = [t["prob"] for t in o["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"] in [str(i) for i in range(10)] for t in o["top"])
    assert main(["predict", str(png), "-c", str(run)]) == 0
    assert capsys.readouterr().out.startswith(f"{png}: ")


def test_inspect_table_and_plot(folder_run, tmp_path, capsys):
    _, run = folder_run
    plot = tmp_path / "ab.png"
    assert main(["inspect", str(run / "last.safetensors"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "alpha (att)" in out[0]
    rows = [line.split() for line in out[1:] if line.split() and line.split()[0].isdigit()]
    assert [r[1] for r in rows] == ["stages.0.0.mix", "stages.1.0.mix"]
    from safetensors.torch import load_file

    sd = load_file(str(run / "last.safetensors"))
    assert abs(float(rows[0][2]) - float(sd["stages.0.0.mix.alpha"])) < 1e-4
    assert abs(float(rows[1][3]) - float(sd["stages.1.0.mix.beta"])) < 1e-4
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"
    bare = tmp_path / "bare.safetensors"  # weights alone (no state file): read from the key names
    bare.write_bytes((run / "last.safetensors").read_bytes())
    assert main(["inspect", str(bare), "--json", "--no-plot"]) == 0
    rows_bare = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in rows_bare] == ["stages.0.0.mix", "stages.1.0.mix"]
    assert abs(rows_bare[1]["beta"] - float(sd["stages.1.0.mix.beta"])) < 1e-6


def test_train_embedded_default_few_steps(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--max-steps", "3", "--output", str(run), *FAST]) == 0
    out = capsys.readouterr().out
    assert "3 updates" in out and "--resume" in out
    st = ckpt.load_state(run / "last.state.pt")
    assert (st["updates"], st["epoch"], st["batches_done"], st["model_name"]) == (3, 0, 3, "acmix_micro")
    moved = run.rename(tmp_path / "moved")  # a run folder resumes wherever it now lives
    assert main(["train", "--resume", str(moved), "--max-steps", "5", *FAST]) == 0
    assert ckpt.load_state(moved / "last.state.pt")["updates"] == 5 and not run.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "acmix_mirco"], "unknown model 'acmix_mirco'; did you mean acmix_micro"),
        (["train", "--data-dir", "/no/such/folder"], "--data-dir not found: /no/such/folder"),
        (["train", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["train", "--batch-size", "x"], "invalid int value: 'x'"),
        (["train", "--bach-size", "8"], "unrecognized argument '--bach-size'; did you mean --batch-size"),
        (["train", "--recipe", "swim"], "unknown recipe 'swim'"),
        (["train", "--opt", "adamww"], "unknown optimizer --opt 'adamww'; did you mean adamw"),
        (["train", "--sched", "cosin"], "unknown scheduler --sched 'cosin'; did you mean cosine"),
        (["train", "--amp", "--amp-dtype", "float16", "--device", "cpu", "--max-steps", "1"], "needs a CUDA device"),
        (["train", "--resume", "/no/such/run"], "no checkpoint state file at /no/such/run"),
        (["train", "--model-kwargs", "oops"], "expected KEY=VALUE"),
        (["train", "--mixup", "0.8", "--batch-size", "33"], "need an even --batch-size"),
        (["train", "--resume", "r", "--initial-checkpoint", "w.safetensors"], "contradict each other"),
        (
            ["train", "--device", "cuda:7"] if not torch.cuda.is_available() else ["train", "--device", "tpu"],
            "--device",
        ),
        (["eval", "/no/such.safetensors"], "checkpoint not found"),
        (["eval", "--model", "acmix_mirco"], "unknown model 'acmix_mirco'; did you mean acmix_micro"),
        (["inspect", os.devnull, "--model", "acmix_mirco"], "did you mean acmix_micro"),
        (["eval", "--batch-size", "0", "--model", "acmix_micro"], "--batch-size must be positive"),
        (["predict", "x.png", "-c", "/no/run"], "checkpoint not found"),
        (["inspect", "/no/file.safetensors"], "checkpoint not found"),
    ],
)
def test_bad_arguments_one_line_exit_2(argv, message, capsys):
    assert main([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_predict_missing_image_and_no_acmix_layers(folder_run, tmp_path, capsys):
    _, run = folder_run
    assert main(["predict", str(tmp_path / "nope.png"), "-c", str(run)]) == 2
    assert "image not found" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(bad), "-c", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read image" in err[0] and "bad.png" in err[0]


# ------------------------------------------------------------------------------------------- interruptions


def _train_proc(run: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "acmix", "train", "--output", str(run), "--epochs", "50", *FAST, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_exits_with_resume_hint(tmp_path, sig, capsys):
    """The signal arrives (in this process) after the first periodic checkpoint; training must stop cleanly."""
    run = tmp_path / "run"

    def send_when_checkpointed() -> None:
        t0 = time.time()
        while not (run / "last.state.pt").exists() and time.time() - t0 < 120:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN in a background job
    watcher = threading.Thread(target=send_when_checkpointed, daemon=True)
    watcher.start()
    code = main(["train", "--output", str(run), "--epochs", "50", "--checkpoint-every", "3", *FAST])
    watcher.join()
    err = capsys.readouterr().err
    assert code == 130, err
    assert f"interrupted by {sig.name}" in err and f"acmix train --resume {run}" in err
    st = ckpt.load_state(run / "last.state.pt")
    updates = st["updates"]
    assert updates >= 3 and st["batches_done"] == updates  # written at the stop, not only the periodic one
    assert {s: signal.getsignal(s) for s in before} == before  # the caller's handlers restored
    assert main(["train", "--resume", str(run), "--max-steps", str(updates + 2), *FAST]) == 0
    assert ckpt.load_state(run / "last.state.pt")["updates"] == updates + 2


def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(tmp_path):
    """kill -9 a real run (checkpointing every update) at random moments, then load and resume each time."""
    import timm

    rng = random.Random(0)
    run = tmp_path / "run"
    pids = []
    for attempt in range(3):
        proc = _train_proc(run, "--checkpoint-every", "1", *(["--resume", str(run)] if attempt else []))
        pids.append(proc.pid)
        _wait_for(run / "last.state.pt", proc)
        before = ckpt.load_state(run / "last.state.pt")["updates"] if attempt else 0
        time.sleep(rng.uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        holder = (run / ".lock").read_text()  # a killed holder (this one, or an earlier one if this was killed
        assert any(f"pid {pid} on" in holder for pid in pids), holder  # before locking): its lock died with it
        st = ckpt.load_state(run / "last.state.pt")
        assert st["updates"] >= before
        model = timm.create_model("acmix_micro")
        ckpt.load_weights(model, ckpt.state_weights_path(run / "last.state.pt", st))
        ckpt.load_weights(model, run / "last.safetensors")
        assert all(torch.isfinite(p).all() for p in model.parameters())
    final = ckpt.load_state(run / "last.state.pt")["updates"]
    assert main(["train", "--resume", str(run), "--max-steps", str(final + 1), *FAST]) == 0


def test_corrupt_image_stops_with_its_name_or_is_skipped(tmp_path, capsys):
    data = _digit_folder(tmp_path / "data", per_class=3, val_per_class=1)
    good = (data / "train" / "4" / "0.png").read_bytes()
    (data / "train" / "4" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    run = tmp_path / "r"
    argv = ["train", "--data-dir", str(data), "--epochs", "1", "--batch-size", "8", "--output", str(run), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zz_truncated.png" in err[0] and "--skip-bad-images" in err[0], err
    assert main([*argv, "--skip-bad-images"]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["bad_images"] == 1


def test_nonfinite_loss_stops_naming_the_step(tmp_path, capsys):
    run = tmp_path / "r"
    argv = ["train", "--opt", "sgd", "--lr", "1e12", "--warmup-epochs", "0", "--output", str(run), *FAST]
    assert main([*argv, "--checkpoint-every", "1", "--max-steps", "20"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at epoch 0, batch" in err[0] and "last good checkpoint" in err[0], err
    st = ckpt.load_state(run / "last.state.pt")  # the checkpoint before the bad step survives
    assert st["updates"] >= 1


def test_amp_channels_last_accumulation_ema_mixup_clip_run(tmp_path, capsys):
    run = tmp_path / "r"
    argv = ["train", "--amp", "--channels-last", "--grad-accum-steps", "2", "--model-ema", "--clip-grad", "1.0"]
    argv += ["--mixup", "0.8", "--cutmix", "1.0", "--max-steps", "3", "--output", str(run), *FAST]
    assert main(argv) == 0
    st = ckpt.load_state(run / "last.state.pt")
    assert (st["updates"], st["batches_done"]) == (3, 6)  # 2 batches per update
    assert (run / "last.ema.safetensors").is_file() and st["config"]["amp"] is True


def test_eval_plain_state_dict_through_the_model_loader(folder_run, tmp_path, capsys):
    """A bare timm-style .pth (a plain state dict) with --model goes through acmix.models.load_official_checkpoint."""
    from safetensors.torch import load_file

    data, run = folder_run
    sd = load_file(str(run / "last.safetensors"))
    pth = tmp_path / "weights.pth"
    torch.save({"state_dict": sd}, pth)
    assert main(["eval", str(pth), "--model", "acmix_micro", "--num-classes", "10", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "acmix_micro" in out and "on 40 images" in out
    assert main(["eval", str(run / "last.state.pt"), "--data-dir", str(data), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert f"top-1 {ours['top1']:.2f}%" in out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_amp_channels_last_few_steps(tmp_path, dtype):
    run = tmp_path / "r"
    argv = ["train", "--device", "cuda", "--amp", "--amp-dtype", dtype, "--channels-last", "--max-steps", "3"]
    assert main([*argv, "--output", str(run), "--no-progress"]) == 0
    st = ckpt.load_state(run / "last.state.pt")
    assert st["updates"] == 3 and (st["scaler"] is not None) == (dtype == "float16")


@pytest.mark.parametrize("recipe", ["swin", "resnet"])
def test_recipes_on_a_timm_model_and_rgb_folder(folder_run, tmp_path, recipe):
    """A timm model (3 channels: the grey PNGs are read as RGB) with the paper recipes' timm data pipeline
    (RandAugment, random erasing, mixup/cutmix for swin; SGD with decay on every parameter for resnet)."""
    data, _ = folder_run
    run = tmp_path / recipe
    argv = ["train", "--recipe", recipe, "--model", "resnet10t", "--data-dir", str(data), "--input-size", "32"]
    assert main([*argv, "--batch-size", "8", "--max-steps", "2", "--output", str(run), *FAST]) == 0
    st = ckpt.load_state(run / "last.state.pt")
    assert st["model_name"] == "resnet10t" and st["data"]["in_chans"] == 3 and st["updates"] == 2
    groups = st["optimizer"]["param_groups"]
    assert (len(groups) == 1) == (recipe == "resnet")  # resnet: one group, decay on all; swin: no-decay group too
