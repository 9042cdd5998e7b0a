"""influence: data debugging by hypergradients through recorded training runs.

Public API (DESIGN §3): ``one_step``, ``check_gradient``, ``check_input_gradient``,
``as_float64``, and the building blocks in :mod:`influence.autodiff`.
"""

from . import autodiff, losses
from .autodiff import hessian, hvp, mixed_product, newton_step, per_sample_dots, vjp_chain
from .checks import GradientCheck, as_float64, check_gradient, check_input_gradient
from .model_function import ModelFunction, coupling_layers
from .one_step import one_step
from .per_sample import per_sample_gradient_dots

__version__ = "0.1.0"

__all__ = [
    "GradientCheck",
    "ModelFunction",
    "as_float64",
    "autodiff",
    "check_gradient",
    "check_input_gradient",
    "coupling_layers",
    "hessian",
    "hvp",
    "losses",
    "mixed_product",
    "newton_step",
    "one_step",
    "per_sample_dots",
    "per_sample_gradient_dots",
    "vjp_chain",
]

from . import optimizers  # noqa: E402
from .trajectory import Trajectory, fit, retrain  # noqa: E402
from .unroll import Checkpointed, MemoryStrategy, Replay, StoreAll, UnrolledResult, unrolled  # noqa: E402

__all__ += [
    "Checkpointed",
    "MemoryStrategy",
    "Replay",
    "StoreAll",
    "Trajectory",
    "UnrolledResult",
    "fit",
    "optimizers",
    "retrain",
    "unrolled",
]

from .verify import actual_removal_effect, as_float64_trajectory, check_unrolled, validation_loss  # noqa: E402

__all__ += ["actual_removal_effect", "as_float64_trajectory", "check_unrolled", "validation_loss"]

from . import rankers  # noqa: E402
from .rank import predicted_group_effect, rank  # noqa: E402

__all__ += ["predicted_group_effect", "rank", "rankers"]

from .input_optimization import InputOptimization, adversarial_examples, optimize_training_inputs  # noqa: E402

__all__ += ["InputOptimization", "adversarial_examples", "optimize_training_inputs"]

from .persist import load_trajectory, save_trajectory  # noqa: E402

__all__ += ["load_trajectory", "save_trajectory"]

from .sharding import rank_in_processes  # noqa: E402

__all__ += ["rank_in_processes"]
