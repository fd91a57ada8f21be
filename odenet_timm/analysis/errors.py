"""The error raised on a request the stability analysis cannot carry out."""

__all__ = ['AnalysisInputError']


class AnalysisInputError(ValueError):
    """Bad input to the stability analysis (a model without blocks to find, ε = 0, a non-square Jacobian, …)."""
