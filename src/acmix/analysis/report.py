"""The cost report: Table 1, the Stage I / II split of ResNet-50, the model table and the paper's Fig. 4.

:func:`build_report` returns a JSON-ready dict with the top-level keys ``convention``, ``table1``,
``stage_split``, ``models`` (each row: ``name``, ``params``, ``macs``, ``paper_params``, ``paper_macs``, ...) and
``skipped``; :func:`render_text`, :func:`write_csv` and :func:`plot_fig4` render it.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import timm
import torch.nn as nn

from ..models import PAPER_TABLE, create_model
from .cost import MAC_CONVENTION, stage_ratio_table, table1
from .counters import COUNTER_BLIND, cross_check
from .walk import ModelCost, walk

__all__ = [
    "FIG4_POINTS",
    "PAPER_STAGE_SHARES",
    "build_report",
    "model_rows",
    "plot_fig4",
    "render_text",
    "stage_split_report",
    "write_csv",
]

logger = logging.getLogger(__name__)

#: the paper's claims (Sec. 3.3; docs/paper-numbers.md): Stage I share of the 3 x 3 / attention positions of ResNet-50
PAPER_STAGE_SHARES = {"conv": 0.99, "self_attention": 0.83}

#: Fig. 4 of the paper (official ``figure/result.png``), read off the plot (docs/paper-numbers.md): ±0.05 GMACs,
#: ±0.1 top-1. panel -> [(method, [(GMACs, top-1, label)])]; Swin-T's 81.2-81.3 is plotted at 81.25.
FIG4_POINTS: dict[str, list[tuple[str, list[tuple[float, float, str]]]]] = {
    "ResNet": [
        ("ResNet-ACmix", [(2.27, 76.1, "26"), (2.91, 77.4, "38"), (3.56, 77.9, "50")]),
        ("ResNet", [(2.4, 73.6, "26"), (3.2, 76.0, "38"), (4.1, 76.9, "50")]),
        ("SASA-ResNet", [(2.35, 75.2, "26"), (2.85, 77.0, "38"), (3.6, 77.4, "50")]),
        ("LR-Net", [(2.6, 76.0, "26"), (4.3, 77.5, "50")]),
        ("AA-ResNet", [(3.55, 75.0, "34"), (4.15, 77.9, "50")]),
        ("BoTNet", [(3.8, 77.0, "50")]),
        ("BoTNet-S1", [(4.27, 77.7, "50")]),
    ],
    "SAN": [
        ("SAN-ACmix", [(1.92, 77.6, "10"), (2.68, 78.4, "15"), (3.38, 78.7, "19")]),
        ("SAN", [(1.9, 77.1, "10"), (2.6, 78.0, "15"), (3.3, 78.2, "19")]),
        ("SASA-ResNet", [(2.35, 75.2, "26"), (2.85, 77.0, "38"), (3.6, 77.4, "50")]),
        ("LR-Net", [(2.6, 76.0, "26"), (4.3, 77.5, "50")]),
        ("BoTNet-S1", [(4.27, 77.7, "50")]),
    ],
    "PVT": [
        ("PVT-ACmix", [(2.0, 78.0, "T"), (3.95, 81.7, "S")]),
        ("PVT", [(1.9, 75.1, "T"), (3.8, 79.8, "S"), (6.7, 81.2, "M"), (9.8, 81.7, "L")]),
        ("ConViT", [(1.0, 73.1, "Ti"), (2.0, 76.7, "Ti+"), (4.3, 81.3, "S")]),
        ("T2T-ViT", [(2.2, 76.5, "12"), (5.2, 81.5, "14")]),
    ],
    "Swin": [
        ("Swin-ACmix", [(4.6, 81.9, "T"), (9.0, 83.5, "S")]),
        ("Swin", [(4.5, 81.25, "T"), (8.7, 83.0, "S"), (15.4, 83.3, "B")]),
        ("CvT", [(4.5, 81.6, "13"), (7.1, 82.5, "21")]),
        ("ConT", [(3.1, 80.2, "M"), (6.4, 81.8, "B")]),
    ],
}
#: families whose paper numbers come from SAN's counter (``util/complexity.py``): multiply-adds plus conv bias adds,
#: BatchNorm, ReLU and pooling (docs/paper-numbers.md: the ResNet baselines are SAN-trained, from the SAN README)
SAN_COUNTER_FAMILIES = ("san", "resnet")
_FAMILY_PANEL = {"resnet": "ResNet", "san": "SAN", "pvt": "PVT", "swin": "Swin"}


# ---------------------------------------------------------------------------------------------------- models
def _hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    if len(resolution) not in (1, 2):
        raise ValueError(f"resolution must be H or (H, W), got {resolution!r}")
    return int(resolution[0]), int(resolution[-1])


def _create(name: str, resolution: tuple[int, int]) -> nn.Module:
    if resolution != (224, 224):
        try:
            return create_model(name, img_size=resolution)
        except TypeError:  # a conv net: any size works without the argument
            pass
    return create_model(name)


def _select(names: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    if not patterns:
        return list(names)
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]


def model_rows(
    patterns: Sequence[str] | None = None,
    resolution: int | tuple[int, int] = 224,
    *,
    check_counter: bool = True,
    skipped: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Params and MACs of every registered ACmix model of the paper table and of its baseline, beside the paper.

    Args:
        patterns: fnmatch patterns over the model names (default: all); a pattern naming a timm model outside the
            paper table adds it without paper numbers.
        resolution: H or (H, W); the paper's numbers are at 224 x 224, so differences are given only there.
        check_counter: add FlopCounterMode's MACs and the part of the analytic count it cannot see.
        skipped: receives a note for every model that could not be built or costed.

    Returns:
        rows with ``name``, ``family``, ``role``, ``params``, ``macs``, ``paper_params``, ``paper_macs``,
        ``params_diff_pct``, ``macs_diff_pct``, ``paper_top1``, ``released_params``, ``released_macs``,
        ``macs_reference_conv_path`` (ACmix rows: conv paths counted as FC + group conv, the paper's formulation,
        where ``macs`` counts what the modules run), ``macs_san_counter`` (SAN and ResNet rows: SAN's counter
        convention, which adds conv bias adds, BatchNorm, ReLU and pooling) and, with ``check_counter``,
        ``counter_macs`` (FlopCounterMode) and ``counter_blind_macs`` (the analytic MACs it cannot see).
    """
    res = _hw(resolution)
    wanted: list[tuple[str, dict[str, Any]]] = []
    for entry in PAPER_TABLE:
        wanted.append((entry.name, _paper_fields(entry, baseline=False)))
        wanted.append((entry.baseline, _paper_fields(entry, baseline=True)))
    known = {n for n, _ in wanted}
    names = _select([n for n, _ in wanted], patterns)
    for p in patterns or ():
        if p not in known and not any(ch in p for ch in "*?[") and timm.is_model(p):
            names.append(p)
            wanted.append((p, {"family": None, "role": "other"}))
    if patterns and not names:
        raise ValueError(
            f"no model matches {' '.join(patterns)}; the paper table has {', '.join(sorted(known))} "
            "(or name any registered timm model exactly)"
        )
    paper = dict(wanted)
    rows = []
    for name in dict.fromkeys(names):
        try:
            model = _create(name, res)
            mc = walk(model, res, name=name)
        except Exception as exc:  # noqa: BLE001 - one broken model must not hide the others
            note = f"{name}: could not be costed ({type(exc).__name__}: {exc}); skipped"
            logger.warning(note)
            if skipped is not None:
                skipped.append(note)
            continue
        row = {"name": name, **_measured(mc), **paper[name], "resolution": list(res)}
        if paper[name].get("role") == "acmix":  # the paper's formulation of the conv path (FC + group conv)
            row["macs_reference_conv_path"] = walk(model, res, name=name, conv_impl="reference").macs
        if paper[name].get("family") in SAN_COUNTER_FAMILIES:  # numbers from SAN's counter: same convention too
            row["macs_san_counter"] = walk(model, res, name=name, elementwise=True).macs
        for key in ("params", "macs"):
            ref = row.get(f"paper_{key}")
            row[f"{key}_diff_pct"] = (
                100.0 * (row[key] - ref) / ref if ref and (key == "params" or res == (224, 224)) else None
            )
        if check_counter:
            cc = cross_check(model, res, name=name, model_cost=mc)
            row["counter_macs"] = cc.counter_macs
            row["counter_blind_macs"] = cc.blind_macs
            row["counter_mismatches"] = len(cc.mismatches)
        rows.append(row)
    return rows


def _paper_fields(row: Any, baseline: bool) -> dict[str, Any]:
    def m(x: float | None, scale: float) -> int | None:
        return None if x is None else round(x * scale)

    if baseline:
        return {
            "family": row.family,
            "role": "baseline",
            "paper_params": m(row.baseline_params_m, 1e6),
            "paper_macs": m(row.baseline_gmacs, 1e9),
            "paper_top1": row.baseline_top1,
            "released_params": m(row.baseline_released_params_m, 1e6),
            "released_macs": None,
        }
    return {
        "family": row.family,
        "role": "acmix",
        "paper_params": m(row.params_m, 1e6),
        "paper_macs": m(row.gmacs, 1e9),
        "paper_top1": row.top1,
        "released_params": m(row.released_params_m, 1e6),
        "released_macs": m(row.released_gmacs, 1e9),
    }


def _measured(mc: ModelCost) -> dict[str, Any]:
    return {"params": mc.params, "macs": mc.macs, "traced_with": mc.traced_with}


# ---------------------------------------------------------------------------------------------------- stage split
def stage_split_report(resolution: int | tuple[int, int] = 224, skipped: list[str] | None = None) -> dict[str, Any]:
    """The Stage I share of every 3 x 3 / attention / ACmix position of ResNet-50 (Sec. 3.3; docs/paper-numbers.md).

    Models: timm's ``resnet50`` (torchvision v1.5 layout, the paper's "convolution"), the self-attention ResNet-50
    with k_att = 7 (``acmix_resnet50`` with ``acmix_kwargs={"mix": "attn"}``) counted with the projections at the
    input resolution (as built) and at the output resolution, and ``acmix_resnet50``. A model that cannot be built
    is skipped with a note.
    """
    res = _hw(resolution)
    out: dict[str, Any] = {
        "convention": MAC_CONVENTION,
        "paper": PAPER_STAGE_SHARES,
        "note": (
            "Stage I = the 1x1 projections (a k x k conv: its k^2 1x1 convs); Stage II = shift-and-sum / attention "
            "logits and aggregation / ACmix conv path, summed over the 16 bottleneck 3x3 positions. The paper's 83% "
            "matches projections counted at the output resolution; the official code projects at the input "
            "resolution (87.7% with the formulas)."
        ),
        "models": {},
    }
    plans: list[tuple[str, str, dict[str, Any], str]] = [
        ("conv", "resnet50", {}, "input"),
        ("self_attention_output_res", "acmix_resnet50", {"acmix_kwargs": {"mix": "attn"}}, "output"),
        ("self_attention_input_res", "acmix_resnet50", {"acmix_kwargs": {"mix": "attn"}}, "input"),
        ("acmix", "acmix_resnet50", {}, "input"),
    ]
    built: dict[tuple[str, str], nn.Module] = {}
    for key, name, kwargs, proj_at in plans:
        try:
            model = built.get((name, repr(kwargs)))
            if model is None:
                model = create_model(name, **kwargs)
                built[(name, repr(kwargs))] = model
            mc = walk(model, res, name=name, proj_at=proj_at)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - not buildable: note and go on
            note = f"stage split {key}: {name} {kwargs or ''} unavailable ({type(exc).__name__}: {exc}); skipped"
            logger.info(note)
            if skipped is not None:
                skipped.append(note)
            continue
        split = mc.stage_split()
        out["models"][key] = {"model": name, "kwargs": kwargs, **split}
    return out


# ---------------------------------------------------------------------------------------------------- report
def build_report(
    patterns: Sequence[str] | None = None,
    resolution: int | tuple[int, int] = 224,
    *,
    check_counter: bool = True,
    include_models: bool = True,
    include_split: bool = True,
) -> dict[str, Any]:
    """Everything ``acmix cost`` shows, as one JSON-ready dict (top-level keys ``convention``, ``table1``,
    ``stage_split``, ``models``, ``skipped``, ``counter_blind_to``)."""
    skipped: list[str] = []
    res = _hw(resolution)
    models = model_rows(patterns, res, check_counter=check_counter, skipped=skipped) if include_models else []
    return {
        "convention": MAC_CONVENTION,
        "resolution": list(res),
        "table1": {"rows": table1(), "stage_ratio": stage_ratio_table()},
        "stage_split": stage_split_report(res, skipped) if include_split else {"models": {}},
        "models": models,
        "skipped": skipped,
        "counter_blind_to": list(COUNTER_BLIND),
    }


def _g(x: int | None, unit: float, digits: int = 2) -> str:
    return "-" if x is None else f"{x / unit:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def render_text(report: dict[str, Any]) -> str:
    """The report as readable terminal tables."""
    out = io.StringIO()
    w = out.write
    w(f"Convention: {report['convention']}\n\n")
    t1 = report["table1"]
    at = t1["rows"][0]["at"]
    w(
        f"Table 1 (C_in = C_out = C; values at C={at['C']}, {at['H']}x{at['W']}, k={at['k']}, "
        f"k_att={at['k_att']}, N={at['N']})\n"
    )
    w(f"{'module':<42}{'Stage I params':>16}{'Stage I MACs':>16}{'Stage II params':>26}{'Stage II MACs':>42}\n")
    for r in t1["rows"]:
        w(
            f"{r['module']:<42}{r['stage_I_params']:>16}{r['stage_I_macs']:>16}{r['stage_II_params']:>26}"
            f"{r['stage_II_macs']:>42}\n"
        )
        v = r["values"]
        w(
            f"{'':<42}{v['stage_I_params']:>16,}{v['stage_I_macs'] / 1e6:>14.1f} M{v['stage_II_params']:>26,}"
            f"{v['stage_II_macs'] / 1e6:>40.1f} M   Stage I {100 * v['stage_I_share']:.1f}%\n"
        )
    w("\nSelf-attention Stage I / Stage II = 3C / (2 k_att^2):\n")
    w(
        "  "
        + "   ".join(f"C={r['C']}: {r['ratio']:.2f}x" for r in t1["stage_ratio"])
        + f"   (k_att={t1['stage_ratio'][0]['k_att']})\n"
    )
    if report["stage_split"]["models"]:
        _render_split(w, report["stage_split"])
    if report["models"]:
        w(f"\nModels at {report['resolution'][0]}x{report['resolution'][1]} (paper numbers at 224x224)\n")
        w(
            f"{'model':<38}{'params M':>10}{'paper':>8}{'diff':>8}{'GMACs':>8}{'paper':>8}{'diff':>8}"
            f"{'FC+gc':>8}{'SANcnt':>8}{'counter':>9}{'blind':>7}{'top-1':>7}\n"
        )
        for r in report["models"]:
            w(
                f"{r['name']:<38}{_g(r['params'], 1e6):>10}{_g(r.get('paper_params'), 1e6, 1):>8}"
                f"{_pct(r.get('params_diff_pct')):>8}{_g(r['macs'], 1e9):>8}{_g(r.get('paper_macs'), 1e9, 1):>8}"
                f"{_pct(r.get('macs_diff_pct')):>8}{_g(r.get('macs_reference_conv_path'), 1e9):>8}"
                f"{_g(r.get('macs_san_counter'), 1e9):>8}"
                f"{_g(r.get('counter_macs'), 1e9):>9}"
                f"{_g(r.get('counter_blind_macs'), 1e9):>7}{r.get('paper_top1') or '-':>7}\n"
            )
        w(
            "  GMACs: what the built modules compute; FC+gc: ACmix conv paths counted as FC + group conv (the paper's\n"
            "  formulation); SANcnt: SAN's counter convention (+ conv bias adds, BatchNorm, ReLU, pooling), which the\n"
            "  SAN and ResNet numbers of the paper use; counter = FlopCounterMode MACs (FLOPs/2); blind = analytic\n"
            "  MACs it cannot see (unfold attention, tensor shifts); top-1 = the paper's\n"
        )
    for note in report.get("skipped", []):
        w(f"skipped: {note}\n")
    return out.getvalue()


def _render_split(w: Any, ss: dict[str, Any]) -> None:
    w(
        "\nStage I share over the 16 bottleneck 3x3 / attention / ACmix positions of ResNet-50 "
        "(paper: conv 99%, SA 83%)\n"
    )
    w(
        f"{'count':<28}{'model':<16}"
        + "".join(f"{s:>9}" for s in ("stage1", "stage2", "stage3", "stage4", "total"))
        + f"{'Stage I GMACs':>15}{'Stage II GMACs':>16}\n"
    )
    for key, m in ss["models"].items():
        per = m["per_stage"]
        cells = "".join(
            f"{100 * per[s]['share_I']:>8.1f}%" if s in per else f"{'-':>9}"
            for s in ("stage1", "stage2", "stage3", "stage4")
        )
        w(
            f"{key:<28}{m['model']:<16}{cells}{100 * m['share_I']:>8.1f}%"
            f"{m['stage_I'] / 1e9:>15.3f}{m['stage_II'] / 1e9:>16.3f}\n"
        )
    w(f"  {ss['note']}\n")


CSV_FIELDS = (
    "name", "family", "role", "resolution", "params", "paper_params", "params_diff_pct", "macs", "paper_macs",
    "macs_diff_pct", "macs_reference_conv_path", "macs_san_counter", "paper_top1", "released_params",
    "released_macs", "counter_macs", "counter_blind_macs",
)  # fmt: skip


def write_csv(report: dict[str, Any], f: IO[str]) -> None:
    """The model table as CSV: header :data:`CSV_FIELDS`, one row per model (MACs = multiply-adds per image,
    resolution as ``HxW``, empty cells for missing values). Table 1 and the stage split are in the text and JSON."""
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in report["models"]:
        vals = {k: r.get(k) for k in CSV_FIELDS}
        vals["resolution"] = "x".join(str(x) for x in r.get("resolution", []))
        writer.writerow(["" if vals[k] is None else vals[k] for k in CSV_FIELDS])


def plot_fig4(report: dict[str, Any], path: str | Path) -> Path:
    """The paper's Fig. 4 (top-1 vs GMACs, 4 panels) with this project's measured MACs placed on it.

    The paper's points of all compared methods are drawn as lines; each model of ``report["models"]`` is drawn
    at (measured GMACs, paper top-1), linked to its paper point, so a gap in MACs shows as a horizontal segment.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    for ax, (panel, methods) in zip(axes, FIG4_POINTS.items()):
        for method, pts in methods:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            acm = "ACmix" in method
            ax.plot(
                xs, ys, marker="*" if acm else "o", ms=10 if acm else 5, lw=2 if acm else 1, label=f"{method} (paper)"
            )
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(3, -9), fontsize=7)
        labelled: set[str] = set()
        for r in report["models"]:
            if _FAMILY_PANEL.get(r.get("family") or "") != panel or r.get("paper_top1") is None:
                continue
            x, y = r["macs"] / 1e9, r["paper_top1"]
            if r.get("paper_macs"):
                ax.plot([r["paper_macs"] / 1e9, x], [y, y], color="k", lw=0.8, ls=":")
            role = "ACmix" if r["role"] == "acmix" else "baseline"
            label = f"{role}, MACs measured here" if role not in labelled else None
            labelled.add(role)
            ax.scatter([x], [y], marker="D" if role == "ACmix" else "s", facecolors="none", edgecolors="k", s=50,
                       label=label, zorder=5)  # fmt: skip
        ax.set_title(f"{panel}")
        ax.set_xlabel("GMACs (multiply-adds, 224x224)")
        ax.set_ylabel("ImageNet top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Fig. 4 of the paper (points read off the official figure, ±0.05 GMACs) with the MACs measured by acmix "
        "(open markers, at the paper's top-1; dotted: the gap to the paper's MACs)"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
