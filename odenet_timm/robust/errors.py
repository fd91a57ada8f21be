"""The error raised for bad evaluation input (paths, ε, attack names, datasets that do not fit the models)."""

__all__ = ['EvaluationInputError']


class EvaluationInputError(ValueError):
    """Input that cannot be evaluated; raised while checking the request, before any long work starts."""
