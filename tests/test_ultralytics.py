"""ACmix in ultralytics YOLO, as a user runs it: the model YAML forms, fuse, half precision, training, validation,
ONNX export in onnxruntime, the DDP worker script, and convert_model on ultralytics' own models.

Offline and self-contained: ultralytics' settings live in a temporary directory (``YOLO_CONFIG_DIR``, set before it is
imported), ``YOLO_OFFLINE=1``, every test fails if anything opens a non-loopback connection, the dataset is generated
in ``tmp_path`` and plots are off. ultralytics fetches a font when it checks a dataset (``check_font``; the font is
only drawn on plots): that call is stubbed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn

#: ultralytics changes these process-wide when it is imported (PIL.Image.open: on an unreadable image it tries to
#: pip-install a HEIF plugin; torch.save: retries with sleeps; torch and numpy print options); they are put back below
#: for the rest of the suite, which shares the test processes
_PIL_OPEN, _TORCH_SAVE, _NP_PRINT = PIL.Image.open, torch.save, np.get_printoptions()
_CFG_DIR = tempfile.mkdtemp(prefix="acmix-yolo-settings-")
atexit.register(shutil.rmtree, _CFG_DIR, ignore_errors=True)
os.environ["YOLO_CONFIG_DIR"] = _CFG_DIR  # before ultralytics is imported: its settings file goes here
os.environ["YOLO_OFFLINE"] = "1"

pytest.importorskip("ultralytics", reason="ultralytics is not installed (pip install 'acmix[yolo]')")

import ultralytics.data.utils  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, yaml_model_load  # noqa: E402
from ultralytics.utils import USER_CONFIG_DIR  # noqa: E402

from acmix import ACmix, convert_model  # noqa: E402
from acmix.integrations.ultralytics import (  # noqa: E402
    ACmixDetectionTrainer,
    is_registered,
    model_yaml,
)
from acmix.tools import ACmixNormAct  # noqa: E402

PIL.Image.open, torch.save = _PIL_OPEN, _TORCH_SAVE
np.set_printoptions(**_NP_PRINT)
torch.set_printoptions(profile="default")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: layer index -> (in, out, stride) of the ACmix layers of the shipped YAMLs at scale n (width 0.25)
EXPECTED = {
    "yolov8n-acmix.yaml": {16: (64, 64, 1), 20: (128, 128, 1), 24: (256, 256, 1)},
    "yolo11n-acmix.yaml": {17: (64, 64, 2), 20: (128, 128, 2), 23: (256, 256, 1)},
}

DETECT_FROM = {"yolov8n-acmix.yaml": [16, 20, 24], "yolo11n-acmix.yaml": [16, 19, 23]}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Fail on any non-loopback connection; stub the dataset check's font fetch; restore torch's global state."""
    attempts: list[object] = []
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        if not (isinstance(address, tuple) and address[0] in LOOPBACK):
            attempts.append(address)
            raise OSError(f"network use in an offline test: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(ultralytics.data.utils, "check_font", lambda *a, **k: None)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)  # ultralytics' select_device sets it for CPU training
    torch.use_deterministic_algorithms(deterministic)
    assert not attempts, f"tried to reach the network: {attempts}"


def test_settings_stay_in_the_temporary_directory():
    assert Path(USER_CONFIG_DIR).resolve().is_relative_to(Path(_CFG_DIR).resolve())
    assert is_registered()


def _detector(name: str, nc: int = 3, **overrides: object) -> DetectionModel:
    cfg = yaml_model_load(model_yaml(name))
    cfg.update(overrides)
    return DetectionModel(cfg, nc=nc, verbose=False)


def _acmix_layers(model: nn.Module) -> dict[int, ACmix]:
    return {m.i: m for m in model.model if isinstance(m, ACmix)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_yaml_builds_acmix_at_p3_p5(name):
    model = _detector(name)
    layers = _acmix_layers(model)
    assert {i: (m.dim, m.dim_out, m.stride) for i, m in layers.items()} == EXPECTED[name]
    for m in layers.values():
        assert (m.attn_kernel_size, m.num_heads, m.conv_kernel_size) == (7, 4, 3)
        assert m.f == -1 and m.type == "acmix.ACmix" and m.np == sum(p.numel() for p in m.parameters())
    assert model.model[-1].f == DETECT_FROM[name]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_explicit_channels_are_scaled_like_a_conv():
    """yolo11n-acmix replaces the head's Conv [256, 3, 2] and [512, 3, 2] rows: same channels as ultralytics' own."""
    for scale in ("n", "s"):
        ours = _detector("yolo11n-acmix.yaml", scale=scale)
        stock = DetectionModel(dict(yaml_model_load("yolo11n.yaml"), scale=scale), nc=3, verbose=False)
        for i in (17, 20):
            conv = stock.model[i].conv
            layer = ours.model[i]
            assert (layer.dim, layer.dim_out, layer.stride) == (conv.in_channels, conv.out_channels, conv.stride[0])
        assert ours.model[23].dim_out == stock.model[22].cv2.conv.out_channels  # [1024] scaled as the C3k2's c2


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("size", [640, 320, 160])
def test_forward_at_image_sizes(name, size):
    """160 gives a 5 x 5 map at P5 (the official operator's strided/reflection code fails on such maps)."""
    model = _detector(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))[0]
    anchors = sum((size // s) ** 2 for s in (8, 16, 32))
    assert out.shape == (1, 4 + 3, anchors) and torch.isfinite(out).all()


def _custom(rows: list[list[object]]) -> dict[str, object]:
    cfg = yaml_model_load(model_yaml("yolov8n-acmix.yaml"))
    cfg["backbone"] = [[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [128, 3, 2]], *rows]
    cfg["head"] = [[[-1], 1, "Detect", ["nc"]]]
    return cfg


def test_row_forms_and_their_errors():
    model = DetectionModel(_custom([[-1, 1, "ACmix", [96, 5, 2, 3, 2]], [-1, 6, "ACmix", []]]), nc=2, verbose=False)
    a, b = model.model[2], model.model[3]
    assert (a.dim, a.dim_out, a.attn_kernel_size, a.num_heads, a.conv_kernel_size, a.stride) == (32, 24, 5, 2, 3, 2)
    # repeats scale by the depth multiple (0.33 at n: 6 -> 2), as ultralytics' own rows
    assert isinstance(b, nn.Sequential) and [(m.dim, m.dim_out) for m in b] == [(24, 24), (24, 24)]
    with pytest.raises(ValueError, match=r"\[\] \(keep the channels\) needs 'from' = -1"):
        DetectionModel(_custom([[0, 1, "ACmix", []]]), verbose=False)
    with pytest.raises(ValueError, match="ACmix takes one input"):
        DetectionModel(_custom([[[-1, 0], 1, "ACmix", [64]]]), verbose=False)
    with pytest.raises(ValueError, match=r"up to 5 ints \[c2, kernel_att, head, kernel_conv, stride\]"):
        DetectionModel(_custom([[-1, 1, "ACmix", [64, 7, 4, 3, 1, 1]]]), verbose=False)
    with pytest.raises(ValueError, match="ACmix supports dilation=1 only"):
        ACmix(32, 32, 7, 4, 3, 1, 2)
    with pytest.raises(ValueError, match="no shipped model YAML 'yolov9.yaml'; shipped: yolo11n-acmix.yaml"):
        model_yaml("yolov9.yaml")


def test_fuse_and_half_precision():
    model = _detector("yolo11n-acmix.yaml").eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        ref = model(x)[0]
        model.fuse(verbose=False)
        fused = model(x)[0]
        assert model.is_fused() and len(_acmix_layers(model)) == 3
        torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
        half = model.half()(x.half())[0]  # what validation runs with half=True (official code: a dtype crash)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    boxes, scores = (half.float() - ref)[:, :4], (half.float() - ref)[:, 4:]
    assert boxes.abs().max() < 1.0 and scores.abs().max() < 0.02  # pixels on a 160 image; sigmoid scores


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 train / 4 val images of 64 x 64 with one coloured box each, YOLO labels, and a data YAML."""
    from PIL import Image

    root = tmp_path_factory.mktemp("boxes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = np.full((64, 64, 3), 114, np.uint8)
            x0, y0 = rng.integers(4, 28, 2)
            w, h = rng.integers(16, 32, 2)
            cls = i % 2
            img[y0 : y0 + h, x0 : x0 + w] = (230, 40, 40) if cls == 0 else (40, 40, 230)
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text(
                f"{cls} {(x0 + w / 2) / 64:.6f} {(y0 + h / 2) / 64:.6f} {w / 64:.6f} {h / 64:.6f}\n"
            )
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: blue\n")
    return str(data)


#: nbs=4: an optimizer step every batch (the default nominal batch of 64 accumulates 16 batches of 4)
TRAIN_ARGS = dict(
    imgsz=64, batch=4, nbs=4, workers=0, device="cpu", amp=False, plots=False, deterministic=False, seed=0
)


def test_train_validate_and_export_onnx(tmp_path, dataset, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    yolo = YOLO(model_yaml("yolov8n-acmix.yaml"))
    init: dict[str, torch.Tensor] = {}

    def snapshot(trainer: DetectionTrainer) -> None:  # the trainer builds its own model from the YAML
        init.update({k: v.clone() for k, v in trainer.model.state_dict().items() if k.startswith("model.16.")})

    yolo.add_callback("on_train_start", snapshot)
    yolo.train(data=dataset, epochs=2, project=str(tmp_path), name="train", exist_ok=True,
               trainer=ACmixDetectionTrainer, **TRAIN_ARGS)  # fmt: skip
    state = yolo.trainer.model.state_dict()  # the trained float weights (checkpoints hold a half-precision EMA)
    moved = [k for k, v in init.items() if not torch.equal(state[k], v)]
    assert {k.rsplit(".", 1)[-1] for k in moved} >= {"alpha", "beta", "shift_weight", "weight"}
    best = tmp_path / "train" / "weights" / "best.pt"
    trained = YOLO(str(best))
    assert len(_acmix_layers(trained.model)) == 3

    metrics = trained.val(data=dataset, project=str(tmp_path), name="val", exist_ok=True, **TRAIN_ARGS)
    assert 0.0 <= metrics.box.map50 <= 1.0 and metrics.speed["inference"] > 0

    onnx_file = trained.export(format="onnx", imgsz=64, simplify=False, dynamic=False)
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 64, 64)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = YOLO(str(best)).model.float().fuse(verbose=False).eval()(x)[0]
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)


_WORKER = """
import runpy, socket, sys
_connect = socket.socket.connect
def _guarded(self, address):
    if not (isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost", "::1")):
        raise OSError(f"network use in an offline test: {address}")
    return _connect(self, address)
socket.socket.connect = _guarded
import ultralytics.data.utils
ultralytics.data.utils.check_font = lambda *a, **k: None
assert "acmix" not in sys.modules
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.parametrize("trainer_cls", [ACmixDetectionTrainer, DetectionTrainer], ids=["acmix", "stock"])
def test_ddp_worker_script_rebuilds_the_model_from_the_yaml(tmp_path, dataset, trainer_cls):
    """ultralytics starts each DDP worker with a generated script that rebuilds the trainer from its class and the
    model from the YAML. With ACmixDetectionTrainer the worker imports acmix's registration and trains; with the stock
    trainer it cannot build an ACmix row. (Real DDP needs several CUDA devices; the script runs here on the CPU.)"""
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    trainer = trainer_cls(overrides=dict(model=model_yaml("yolov8n-acmix.yaml"), data=dataset, epochs=1,
                                         project=str(tmp_path), name="ddp", exist_ok=True, **TRAIN_ARGS))  # fmt: skip
    assert isinstance(trainer.model, str)  # the worker builds the model itself
    script = generate_ddp_file(trainer)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _WORKER, script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
    finally:
        ddp_cleanup(trainer, script)
    if trainer_cls is DetectionTrainer:
        assert proc.returncode != 0 and "KeyError: 'ACmix'" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "weights" / "last.pt", weights_only=False)
    assert len(_acmix_layers(ckpt["model"])) == 3


@pytest.mark.gpu
def test_half_precision_validation_on_gpu(tmp_path, dataset):
    """The official operator crashes here (float32 position map, ``.cuda()``); validation on CUDA runs in fp16."""
    yolo = YOLO(model_yaml("yolo11n-acmix.yaml"))
    metrics = yolo.val(data=dataset, imgsz=64, batch=4, workers=0, device=0, half=True, plots=False,
                       project=str(tmp_path), name="val")  # fmt: skip
    assert 0.0 <= metrics.box.map50 <= 1.0


def test_convert_model_on_ultralytics_models():
    """convert_model on ultralytics' stock YOLOv8n: its Conv blocks become ACmixNormAct (the head's Detect kept by
    pattern); the model still predicts and fuses, with the ACmix blocks left unfused."""
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    converted, report = convert_model(model, exclude="model.22.*", input_size=64)
    assert report.replaced and all(r.kind == "block" for r in report.replaced)
    top = {r.name for r in report.replaced if r.name.count(".") == 1}
    assert top == {"model.1", "model.3", "model.5", "model.7", "model.16", "model.19"}  # the 3x3 stride-2 Convs
    for name in top:
        block = converted.get_submodule(name)
        assert isinstance(block, ACmixNormAct) and block.i == int(name.split(".")[1]) and block.f == -1
    assert any(s.reason == "fewer than min_channels=16 channels" for s in report.skipped)  # the 3 -> 16 stem
    assert report.macs_before and report.macs_after
    converted.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = converted(x)[0]
        converted.fuse(verbose=False)
        torch.testing.assert_close(converted(x)[0], ref, atol=1e-3, rtol=1e-4)
    assert all(hasattr(converted.get_submodule(n), "bn") for n in top)
