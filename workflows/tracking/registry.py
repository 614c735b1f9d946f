"""The model registry: register a checkpoint as an MLflow pyfunc model version and move an alias
(e.g. ``champion``) to it when its validation PQ beats the current holder's.

A version's PQ is kept as its tag ``val_pq``; a holder without one is beaten by any PQ. All
through the client of one ``workflows.tracking.location.Tracking`` (registry = tracking URI).
"""

from __future__ import annotations

PQ_TAG = "val_pq"


def register(tracking, run_id: str, checkpoint_file: str, meta: dict, name: str, alias: str,
             pq: float | None, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """Log the checkpoint (its local file, and its config and categories: ``ciae.checkpoint.read_meta``
    or the loaded checkpoint) as the pyfunc model of run ``run_id`` and register it as a new
    version of ``name``, with ``tags`` (the run's lineage: ``workflows.jobs.train._lineage``).
    Moves ``alias`` to the new version when no version holds it, or when ``pq`` beats the
    holder's. Returns (version, whether the alias moved)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    from workflows.tracking.pyfunc import log_model

    client = tracking.client()
    source = log_model(tracking, run_id, checkpoint_file, meta)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version = str(client.create_model_version(name, source, run_id=run_id).version)
    if pq is not None:
        client.set_model_version_tag(name, version, PQ_TAG, f"{pq:.6f}")
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version, k, v)
    holder = client.get_registered_model(name).aliases.get(alias)
    if holder is None:
        moved = True
    else:
        best = client.get_model_version(name, str(holder)).tags.get(PQ_TAG)
        moved = pq is not None and (best is None or pq > float(best))
    if moved:
        client.set_registered_model_alias(name, alias, version)
    return version, moved


def register_checkpoint(checkpoint_file: str, *, tracking_uri: str | None, model_name: str,
                        alias: str = "champion", experiment: str = "ciae", pq: float | None = None) -> str:
    """``register`` a checkpoint file made outside the training driver (an imported model, tests,
    benchmarks) in a new run of ``experiment``. Returns the version's URI ``models:/NAME/VERSION``."""
    from ciae import checkpoint
    from workflows.tracking.location import Tracking

    tracking = Tracking.resolve(tracking_uri)
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id(experiment), run_name="register-checkpoint").info.run_id
    try:
        version, _ = register(tracking, run_id, checkpoint_file,
                              checkpoint.read_meta(checkpoint_file, checkpoint_file), model_name, alias, pq)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return f"models:/{model_name}/{version}"
