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
    san_attention_cost,
    spatial_reduction_attention_cost,
    stage_ratio,
    stage_ratio_table,
    table1,
    window_attention_cost,
)
from .counters import CrossCheck, counter_macs, cross_check
from .walk import ModelCost, ModuleCost, register_rule, walk

__all__ = [
    "MAC_CONVENTION",
    "Component",
    "Cost",
    "CostItem",
    "CrossCheck",
    "ModelCost",
    "ModuleCost",
    "acmix_cost",
    "conv_cost",
    "counter_macs",
    "cross_check",
    "linear_cost",
    "local_attention_cost",
    "mlp_cost",
    "register_rule",
    "san_attention_cost",
    "spatial_reduction_attention_cost",
    "stage_ratio",
    "stage_ratio_table",
    "table1",
    "walk",
    "window_attention_cost",
]
