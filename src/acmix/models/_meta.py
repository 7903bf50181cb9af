"""The paper's results table as data: one row per ACmix variant, beside its baseline.

Numbers and their sources are in ``docs/paper-numbers.md``: the ACmix rows are the official README, the baseline
rows the baselines' own repositories, and the "released" columns the analytic counts of the released code
(``docs/official-code.md``). Multiply-adds (MACs, what the paper family calls FLOPs) are for one 224 x 224 image.

Tests check every registered model against this table (``tests/test_models.py``); ``docs/deviations.md`` explains
every gap between the paper, the released code and this library.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PAPER_TABLE", "PaperRow", "paper_row"]


@dataclass(frozen=True)
class PaperRow:
    """One ACmix variant of the paper's table and the baseline it is compared with.

    Attributes:
        name: registered timm name of the ACmix variant.
        family: ``"resnet"``, ``"san"``, ``"pvt"`` or ``"swin"``.
        baseline: registered timm name of the baseline.
        params_m: paper (README) parameters of the ACmix variant, millions.
        gmacs: paper multiply-adds at 224 x 224, G.
        top1: paper ImageNet-1K top-1 (%).
        baseline_params_m, baseline_gmacs, baseline_top1: the same for the baseline (docs/paper-numbers.md).
        released_params_m: parameters the released ACmix code instantiates (docs/official-code.md); None where no
            code was released (SAN, PVT).
        released_gmacs: multiply-adds of the released code, attention aggregation included (docs/official-code.md).
        baseline_released_params_m: analytic parameter count of the baseline's own code, where one was derived.
        weights_released: the authors published ImageNet weights for the ACmix variant.
        params_rounding_m: rounding step of the paper's parameter count (0.1 M, or 1 M where the README gives
            integers: PVT, Swin); a count within 3% plus half this step matches the paper.
        params_gap_note: why this variant sits further from the paper than the released code would suggest.
    """

    name: str
    family: str
    baseline: str
    params_m: float
    gmacs: float
    top1: float
    baseline_params_m: float
    baseline_gmacs: float
    baseline_top1: float
    released_params_m: float | None = None
    released_gmacs: float | None = None
    baseline_released_params_m: float | None = None
    weights_released: bool = False
    params_rounding_m: float = 0.1
    params_gap_note: str = ""

    def params_tolerance_m(self) -> float:
        """Allowed distance from the paper's count: 3% plus half the paper's rounding step."""
        return 0.03 * self.params_m + self.params_rounding_m / 2


_SWIN_T_GAP = (
    "the released SwinTransformer_acmix instantiates 28.65 M, 1.35 M (4.5%) below the README's 30 M "
    "(docs/official-code.md); acmix matches the released code, within 3% plus the README's 1 M rounding"
)

PAPER_TABLE: tuple[PaperRow, ...] = (
    PaperRow("acmix_resnet26", "resnet", "resnet26_san", 10.6, 2.3, 76.1, 13.7, 2.4, 73.6, 10.49, 2.22, 13.70),
    PaperRow("acmix_resnet38", "resnet", "resnet38_san", 14.6, 2.9, 77.4, 19.6, 3.2, 76.0, 14.41, 2.86, 19.63),
    PaperRow("acmix_resnet50", "resnet", "resnet50_san", 18.6, 3.6, 77.8, 25.6, 4.1, 76.9, 18.33, 3.50, 25.56),
    PaperRow("acmix_san10", "san", "san10", 12.1, 1.9, 77.6, 11.8, 1.9, 77.1, baseline_released_params_m=11.84),
    PaperRow("acmix_san15", "san", "san15", 16.6, 2.7, 78.4, 16.2, 2.6, 78.0, baseline_released_params_m=16.18),
    PaperRow("acmix_san19", "san", "san19", 21.2, 3.4, 78.7, 20.5, 3.3, 78.2, baseline_released_params_m=20.52),
    PaperRow("acmix_pvt_tiny", "pvt", "pvt_tiny", 13.0, 2.0, 78.0, 13.2, 1.9, 75.1, params_rounding_m=1.0),
    PaperRow("acmix_pvt_small", "pvt", "pvt_small", 25.0, 3.9, 81.7, 24.5, 3.8, 79.8, params_rounding_m=1.0),
    PaperRow(
        "acmix_swin_tiny_patch4_window7_224",
        "swin",
        "swin_tiny_patch4_window7_224",
        30.0,
        4.6,
        81.9,
        28.29,
        4.5,
        81.3,
        28.65,
        4.65,
        28.29,
        weights_released=True,
        params_rounding_m=1.0,
        params_gap_note=_SWIN_T_GAP,
    ),
    PaperRow(
        "acmix_swin_small_patch4_window7_224",
        "swin",
        "swin_small_patch4_window7_224",
        51.0,
        9.0,
        83.5,
        49.61,
        8.7,
        83.0,
        50.35,
        8.95,
        49.61,
        weights_released=True,
        params_rounding_m=1.0,
    ),
)
"""One :class:`PaperRow` per ACmix variant, in the order of the official README's table."""


def paper_row(name: str) -> PaperRow:
    """The table row of an ACmix variant or of a baseline (looked up by either name)."""
    for row in PAPER_TABLE:
        if name in (row.name, row.baseline):
            return row
    known = ", ".join(r.name for r in PAPER_TABLE)
    raise ValueError(f"no paper table row for {name!r}; known ACmix variants: {known}")
