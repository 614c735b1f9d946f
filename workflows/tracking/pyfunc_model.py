"""The model code that MLflow runs to load a registered CIAE model ("models from code"): the
registered model stores this file, not a pickled object. See ``workflows.tracking.pyfunc``."""

import mlflow

from workflows.tracking.pyfunc import CIAEPyfunc

mlflow.models.set_model(CIAEPyfunc())
