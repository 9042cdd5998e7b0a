"""influence: data debugging by hypergradients through recorded training runs.

The public API (DESIGN §3) is imported lazily: ``import influence`` is cheap and
TensorFlow is loaded on first use of a name, so the ``influence`` command answers
``--help`` and usage errors at once.

Main entry points: :func:`fit` → :class:`Trajectory`; :func:`unrolled`;
:func:`one_step`; :func:`check_gradient`; :func:`rank`; :func:`retrain`;
:func:`optimize_training_inputs`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "one_step": "one_step",
    "check_gradient": "checks",
    "check_input_gradient": "checks",
    "as_float64": "checks",
    "GradientCheck": "checks",
    "ModelFunction": "model_function",
    "coupling_layers": "model_function",
    "GradientOverrideWarning": "model_function",
    "hvp": "autodiff",
    "mixed_product": "autodiff",
    "per_sample_dots": "autodiff",
    "hessian": "autodiff",
    "newton_step": "autodiff",
    "vjp_chain": "autodiff",
    "per_sample_gradient_dots": "per_sample",
    "fit": "trajectory",
    "retrain": "trajectory",
    "Trajectory": "trajectory",
    "unrolled": "unroll",
    "UnrolledResult": "unroll",
    "MemoryStrategy": "unroll",
    "StoreAll": "unroll",
    "Checkpointed": "unroll",
    "Replay": "unroll",
    "validation_loss": "verify",
    "actual_removal_effect": "verify",
    "removal_curve": "verify",
    "as_float64_trajectory": "verify",
    "check_unrolled": "verify",
    "rank": "rank",
    "predicted_group_effect": "rank",
    "greedy_removal": "cleansing",
    "rank_in_processes": "sharding",
    "save_trajectory": "persist",
    "load_trajectory": "persist",
    "optimize_training_inputs": "input_optimization",
    "adversarial_examples": "input_optimization",
    "InputOptimization": "input_optimization",
    "learn_sample_weights": "reweighting",
    "SampleWeightLearning": "reweighting",
}
_SUBMODULES = ("autodiff", "losses", "optimizers", "rankers")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'influence' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    public = {name for name in globals() if not name.startswith("_") and name not in _PRIVATE_GLOBALS}
    return sorted(public | set(__all__))


class _Package(types.ModuleType):
    """The package object, keeping :func:`one_step` and :func:`rank` callable once their modules load.

    Both live in modules of the same name, and the import system sets
    ``influence.rank = <module influence.rank>`` when that module is first imported
    (``from influence.rank import …`` anywhere): ``inf.rank(...)`` then failed with
    "'module' object is not callable". Such an assignment stores the function instead.
    ``from influence.rank import X`` still reaches the module (through ``sys.modules``).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_PRIVATE_GLOBALS = {"annotations", "importlib", "sys", "types", "Any", "TYPE_CHECKING"}


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from . import autodiff, losses, optimizers, rankers  # noqa: F401
    from .autodiff import hessian, hvp, mixed_product, newton_step, per_sample_dots, vjp_chain  # noqa: F401
    from .checks import GradientCheck, as_float64, check_gradient, check_input_gradient  # noqa: F401
    from .input_optimization import InputOptimization, adversarial_examples, optimize_training_inputs  # noqa: F401
    from .model_function import GradientOverrideWarning, ModelFunction, coupling_layers  # noqa: F401
    from .one_step import one_step  # noqa: F401
    from .per_sample import per_sample_gradient_dots  # noqa: F401
    from .persist import load_trajectory, save_trajectory  # noqa: F401
    from .rank import predicted_group_effect, rank  # noqa: F401
    from .reweighting import SampleWeightLearning, learn_sample_weights  # noqa: F401
    from .sharding import rank_in_processes  # noqa: F401
    from .trajectory import Trajectory, fit, retrain  # noqa: F401
    from .unroll import Checkpointed, MemoryStrategy, Replay, StoreAll, UnrolledResult, unrolled  # noqa: F401
    from .verify import (  # noqa: F401
        actual_removal_effect,
        as_float64_trajectory,
        check_unrolled,
        removal_curve,
        validation_loss,
    )
