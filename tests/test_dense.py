"""Dense prediction: segmentation_models_pytorch with a ``tu-acmix_*`` encoder, torchvision's Faster R-CNN and
RetinaNet over :class:`acmix.models.FPNBackbone`, and the two examples.

Each test builds the model, runs one training step (loss, backward, optimiser step: the weights move) and one
evaluation step on data it generates (shapes on noise). Default tests use narrow, shallow configurations of one model
per family; the registered full-size models run behind ``slow``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import acmix  # noqa: F401
from acmix.models import FPNBackbone

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: (name, narrow/shallow kwargs): one model per family, the same classes and ops as the registered ones
SMALL = [
    ("acmix_resnet26", dict(layers=(1, 1, 1, 1))),
    ("acmix_san10", dict(layers=(1, 1, 1, 1, 1), widths=(32, 64, 64, 128, 128))),
    ("acmix_pvt_tiny", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2))),
    ("acmix_swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))),
]
FULL = ["acmix_resnet26", "acmix_san10", "acmix_pvt_tiny", "acmix_swin_tiny_patch4_window7_224"]


def shapes_on_noise(
    n: int, h: int, w: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """``n`` noisy images with one bright rectangle (class 1) and one dark one (class 2) each.

    Returns images (n, 3, h, w), segmentation masks (n, h, w) in {0, 1, 2} and detection targets (boxes x1 y1 x2 y2,
    labels).
    """
    g = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(n, 3, h, w, generator=g)
    masks = torch.zeros(n, h, w, dtype=torch.long)
    targets = []
    for i in range(n):
        boxes, labels = [], []
        for label, value in ((1, 2.0), (2, -2.0)):
            bh, bw = (
                int(torch.randint(h // 5, h // 2, (1,), generator=g)),
                int(torch.randint(w // 5, w // 2, (1,), generator=g)),
            )
            y0, x0 = int(torch.randint(0, h - bh, (1,), generator=g)), int(torch.randint(0, w - bw, (1,), generator=g))
            images[i, :, y0 : y0 + bh, x0 : x0 + bw] += value
            masks[i, y0 : y0 + bh, x0 : x0 + bw] = label
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            labels.append(label)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, masks, targets


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _moved(model: nn.Module, before: list[torch.Tensor]) -> bool:
    after = [p for p in model.parameters() if p.requires_grad]
    return any(not torch.equal(a, b) for a, b in zip(after, before))


# ---------------------------------------------------------------------------------------------- segmentation
def _segmentation_step(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, classes: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = _snapshot(model)
    model.train()
    logits = model(images)
    assert logits.shape == (images.shape[0], classes, *images.shape[-2:])
    loss = nn.functional.cross_entropy(logits, masks)
    loss.backward()
    opt.step()
    assert math.isfinite(float(loss)) and _moved(model, before)
    model.eval()
    with torch.no_grad():
        pred = model(images).argmax(1)
    assert pred.shape == masks.shape and pred.min() >= 0 and pred.max() < classes


@pytest.mark.parametrize("name,kwargs", SMALL, ids=[s[0] for s in SMALL])
@pytest.mark.parametrize("arch", ["UPerNet", "FPN"])
def test_smp_segmentation_train_and_eval(name, kwargs, arch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    narrow = (
        dict(decoder_channels=32)
        if arch == "UPerNet"
        else dict(decoder_pyramid_channels=32, decoder_segmentation_channels=32)
    )
    model = getattr(smp, arch)(f"tu-{name}", encoder_weights=None, classes=3, **narrow, **kwargs)
    images, masks, _ = shapes_on_noise(2, 64, 96)
    _segmentation_step(model, images, masks, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_smp_segmentation_full_size_encoders(name):
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.UPerNet(f"tu-{name}", encoder_weights=None, classes=3)
    images, masks, _ = shapes_on_noise(2, 128, 192)
    _segmentation_step(model, images, masks, 3)


# ---------------------------------------------------------------------------------------------- detection
def _detection_step(detector: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> None:
    opt = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    before = _snapshot(detector)
    detector.train()
    losses = detector(images, targets)
    loss = sum(losses.values())
    assert all(math.isfinite(float(v)) for v in losses.values()), losses
    loss.backward()
    opt.step()
    assert _moved(detector, before)
    detector.eval()
    with torch.no_grad():
        out = detector(images)
    assert len(out) == len(images)
    for det in out:
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0] == det["labels"].shape[0]


def _faster_rcnn(backbone: nn.Module, **kwargs):
    from torchvision.models.detection import FasterRCNN

    small = dict(
        min_size=96, max_size=160, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64, box_detections_per_img=20,
    )  # fmt: skip
    return FasterRCNN(backbone, num_classes=3, **dict(small, **kwargs))


@pytest.mark.parametrize("name,kwargs", SMALL, ids=[s[0] for s in SMALL])
def test_faster_rcnn_train_and_eval(name, kwargs):
    torch.manual_seed(0)
    backbone = FPNBackbone(name, out_channels=32, **kwargs)
    assert backbone.reductions == [4, 8, 16, 32]
    detector = _faster_rcnn(backbone)
    images, _, targets = shapes_on_noise(2, 96, 144)
    # two sizes in one batch, neither square: the detector resizes and pads them to one (multiple of 32) tensor
    images_list = [images[0], images[1, :, :80, :128]]
    targets[1]["boxes"][:, 0::2].clamp_(max=128)
    targets[1]["boxes"][:, 1::2].clamp_(max=80)
    _detection_step(detector, images_list, targets)


def test_retinanet_train_and_eval():
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    torch.manual_seed(0)
    name, kwargs = SMALL[0]
    backbone = FPNBackbone(name, out_channels=32, extra_max_pool=False, **kwargs)
    anchors = AnchorGenerator(tuple((s,) for s in (16, 32, 64, 128)), ((0.5, 1.0, 2.0),) * 4)
    detector = RetinaNet(backbone, num_classes=3, anchor_generator=anchors, min_size=96, max_size=160)
    images, _, targets = shapes_on_noise(2, 96, 144)
    _detection_step(detector, list(images), targets)


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_faster_rcnn_full_size_backbones_at_detection_sizes(name):
    """The registered models behind torchvision's default transform: 800 x 1216 and other non-square sizes."""
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    detector = FasterRCNN(FPNBackbone(name, out_channels=64), num_classes=3).eval()
    images = [torch.rand(3, 480, 730), torch.rand(3, 600, 500)]
    with torch.no_grad():
        out = detector(images)
        batch, _ = detector.transform(images)
    assert len(out) == 2
    assert batch.image_sizes == [(800, 1216), (960, 800)] and tuple(batch.tensors.shape[-2:]) == (960, 1216)


def test_fpn_backbone_errors():
    with pytest.raises(ValueError, match="no feature level with reduction >= 64"):
        FPNBackbone("acmix_micro", min_reduction=64)


# ---------------------------------------------------------------------------------------------- examples
def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("example", ["segmentation", "detection"])
def test_example_runs_a_couple_of_iterations(example, capsys):
    if example == "segmentation":
        pytest.importorskip("segmentation_models_pytorch")
    module = _load_example(example)
    assert module.main(["--epochs", "1", "--train-images", "4", "--val-images", "2", "--tiny"]) == 0
    out = capsys.readouterr().out
    assert ("mIoU" if example == "segmentation" else "mAP@0.5") in out


def test_generated_data_is_what_it_says():
    images, masks, targets = shapes_on_noise(3, 64, 96, seed=1)
    for i in range(3):
        x0, y0, x1, y1 = targets[i]["boxes"][1].long().tolist()  # the dark rectangle, drawn last
        assert targets[i]["labels"].tolist() == [1, 2]
        assert bool((masks[i, y0:y1, x0:x1] == 2).all()) and int((masks[i] == 2).sum()) == (y1 - y0) * (x1 - x0)
        assert float(images[i, :, y0:y1, x0:x1].mean()) < -1.0 < 1.0 < float(images[i][:, masks[i] == 1].mean())
