"""Evaluation of attribution methods: LDS, counterfactuals, damping selection, and the timestep-bias diagnostics (bias.py)."""

# Ground truth and scores of attribution (LDS, counterfactuals, damping selection); heavy imports happen inside the functions.
from .counterfactual import CounterfactualResult, counterfactual
from .damping import DampingSelection, evaluate_with_validation_damping, select_damping, split_queries
from .lds import LDSResult, lds, summarize_seeds
from .masks import removal_masks, subset_masks
from .outputs import LossSpec, QueryLosses, diffusion_losses
from .recipes import LoraTextToImageRecipe
from .retrain import DigitsTrainingRecipe, FunctionRecipe, RetrainHarness, RetrainResults, load_results, retrain_subsets
