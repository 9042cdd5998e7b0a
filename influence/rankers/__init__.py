"""Ranking methods and inverse-Hessian solvers behind :func:`influence.rank`."""

from .inverse_hvp import ConjugateGradient, Exact, InverseHVP, LiSSA

__all__ = ["ConjugateGradient", "Exact", "InverseHVP", "LiSSA"]
