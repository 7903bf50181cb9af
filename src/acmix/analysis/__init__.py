"""Cost analysis (paper Sec. 3.3, Table 1): analytic formulas, a model walker, FlopCounterMode cross-check, reports."""

from .cost import (
    MAC_CONVENTION,
    Component,
    Cost,
    CostItem,
    acmix_cost,
    conv_cost,
    linear_cost,
    local_attention_cost,
    mlp_cost,
    spatial_reduction_attention_cost,
    stage_ratio,
    stage_ratio_table,
    table1,
    window_attention_cost,
)
from .walk import ModelCost, ModuleCost, register_rule, walk

__all__ = [
    "MAC_CONVENTION",
    "Component",
    "Cost",
    "CostItem",
    "ModelCost",
    "ModuleCost",
    "acmix_cost",
    "conv_cost",
    "linear_cost",
    "local_attention_cost",
    "mlp_cost",
    "register_rule",
    "spatial_reduction_attention_cost",
    "stage_ratio",
    "stage_ratio_table",
    "table1",
    "walk",
    "window_attention_cost",
]
