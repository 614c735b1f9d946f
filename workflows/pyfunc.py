"""Kept for models registered before the MLflow pieces moved to ``workflows.tracking``: their
stored model code (``workflows/tracking/pyfunc_model.py`` as it was) imports this module."""

from workflows.tracking.pyfunc import CIAEPyfunc

__all__ = ["CIAEPyfunc"]
