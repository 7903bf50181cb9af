"""Training, evaluation and checkpoints on timm's pipeline (``acmix train/eval/predict/inspect``).

Import the submodules: :mod:`.config` (TrainConfig), :mod:`.recipes`, :mod:`.data`, :mod:`.engine`,
:mod:`.checkpoint`, :mod:`.trainer` (run_training), :mod:`.inference`, :mod:`.distributed`, :mod:`.plots`.
"""

from .config import TrainConfig, resolve_config
from .recipes import RECIPES, get_recipe, list_recipes

__all__ = ["RECIPES", "TrainConfig", "get_recipe", "list_recipes", "resolve_config"]
