"""Typed errors of the explain package. The server maps each to one gRPC status."""

from __future__ import annotations


class ExplainError(Exception):
    """Base of every error raised by the explain package."""


class UnknownMethod(ExplainError):
    """An attribution method name that is not in the registry."""


class InvalidOption(ExplainError):
    """An option value a method cannot use (negative patch size, point off the grid...)."""


class BudgetExceeded(ExplainError):
    """The method would need more forward passes (or samples) than the budget allows."""


class TimeLimitExceeded(ExplainError):
    """The call ran past its time limit and was stopped."""


class Cancelled(ExplainError):
    """The caller cancelled the call (an abandoned RPC, a closed client)."""


class NonAffineHead(ExplainError):
    """The encoder's head is not affine (e.g. BatchNorm left in training mode)."""


class IncompatibleViews(ExplainError):
    """Views of a scheme whose maps cannot be averaged (different crops or feature grids)."""
