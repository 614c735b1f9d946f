"""Where MLflow runs and models live: one tracking URI (also the registry) and one artifact root,
carried as a :class:`Tracking` value.

Each job makes one at its entry (``Tracking.resolve(job.tracking_uri)``) and passes it down, to
Ray workers too (a frozen dataclass of two strings); everything that talks to MLflow goes
through it: ``client()`` for runs, metrics, artifacts and the registry, ``download`` for
artifacts and models. Nothing sets MLflow's process-global tracking or registry URI, or exports
``MLFLOW_TRACKING_URI``, so two jobs in one process with different stores do not meet.

Default: ``$MLFLOW_TRACKING_URI`` when set, else a sqlite database ``mlruns/mlflow.db`` under the
current directory with artifacts in ``mlruns/artifacts`` beside it. On a cluster pass a server
(``http://mlflow:5000``, backed by PostgreSQL), which chooses its own artifact root, or give one
(``artifact_root``: any store MLflow writes, such as ``s3://bucket/mlflow``; for S3 MLflow uses
boto3, which reads the same credentials and ``AWS_ENDPOINT_URL`` as the rest of the pipeline, and
takes the pipeline's retries from the environment, where ``resolve`` sets them unless set:
``pipeline.data.storage.s3_retry_environment``).
An artifact root applies to experiments created from then on: an existing experiment keeps its
location. Neither may hold credentials (``refuse_credentials``): they come from the environment.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

DEFAULT_DIR = "mlruns"
DEFAULT_DB = os.path.join(DEFAULT_DIR, "mlflow.db")   # the default store, under the current directory
ARTIFACTS = "artifacts"                                # a sqlite store's artifacts: beside its database
SQLITE = "sqlite:///"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return SQLITE + os.path.abspath(DEFAULT_DB)


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a sqlite store go in ``artifacts/`` beside the database file; a server
    (http, postgresql, ...) chooses its own (None)."""
    if tracking_uri.startswith(SQLITE):
        db = tracking_uri[len(SQLITE):]
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), ARTIFACTS)
    return None


def refuse_credentials(what: str, uri: str | None) -> None:
    """ValueError when ``uri`` (``what``: "tracking URI", "artifact root") holds credentials
    (``user:secret@``): MLflow keeps an experiment's artifact location where anyone who reads
    the tracking server sees it, and the jobs pass the tracking URI to their workers."""
    from pipeline.data.storage import public_uri

    if uri and public_uri(uri) != uri:
        raise ValueError(f"the {what} {public_uri(uri)}: credentials in it would be recorded; give them in "
                         "the environment instead (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws, "
                         "for S3; MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for a tracking server)")


@dataclass(frozen=True)
class Tracking:
    """One MLflow location: ``uri`` (tracking and registry) and ``artifact_root`` (where new
    experiments keep their artifacts; None: the server's choice)."""

    uri: str
    artifact_root: str | None = None

    @classmethod
    def resolve(cls, uri: str | None = None, artifact_root: str | None = None) -> Tracking:
        """``uri`` (default: ``default_tracking_uri()``); a relative sqlite path is made absolute
        (workers run in other folders) and its folder created. ``artifact_root`` (default: the
        store's, ``default_artifact_root``) holds new experiments' artifacts, one folder each."""
        from pipeline.data.storage import s3_retry_environment

        for name in ("mlflow.store.db.utils", "alembic"):     # a new sqlite store's set-up chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        s3_retry_environment()
        uri = uri or default_tracking_uri()
        refuse_credentials("tracking URI", uri)
        refuse_credentials("artifact root", artifact_root)
        if uri.startswith(SQLITE):
            db = os.path.abspath(uri[len(SQLITE):])
            os.makedirs(os.path.dirname(db), exist_ok=True)
            uri = SQLITE + db
        if artifact_root and "://" not in artifact_root:
            artifact_root = "file://" + os.path.abspath(artifact_root)
        return cls(uri, artifact_root.rstrip("/") if artifact_root else default_artifact_root(uri))

    def client(self):
        """An ``MlflowClient`` for this location, its registry included."""
        import mlflow

        return mlflow.MlflowClient(self.uri, registry_uri=self.uri)

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (with its artifact location under
        ``artifact_root``) if missing."""
        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        return client.create_experiment(name, artifact_location=location)

    def model_version(self, spec: str):
        """The registry's ``ModelVersion`` for ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
        (a path after it is ignored); ValueError naming ``spec`` and this URI when there is none."""
        name, alias, version, _ = parse_models_uri(spec)
        client = self.client()
        try:
            return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except Exception as e:
            raise ValueError(f"{spec}: no such registered model version in {self.uri} "
                             f"({type(e).__name__}: {e})") from None

    def download(self, artifact_uri: str, dst: str | None = None) -> str:
        """The local path of an artifact file or folder (``runs:/RUN/path``, ``models:/NAME@ALIAS``
        or ``models:/NAME/VERSION``, optionally with a path inside the model, or an artifact store
        URI) of this location; local artifacts are not copied unless ``dst``. (``models:/`` is
        resolved here through the client: MLflow's own resolution reads the global registry.)"""
        import mlflow

        if artifact_uri.startswith("models:/"):
            mv = self.model_version(artifact_uri)
            path = parse_models_uri(artifact_uri)[3]
            root = self.client().get_model_version_download_uri(mv.name, mv.version).rstrip("/")
            artifact_uri = f"{root}/{path}" if path else root
        return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst,
                                                   tracking_uri=self.uri, registry_uri=self.uri)


def parse_models_uri(spec: str) -> tuple[str, str | None, str | None, str]:
    """``models:/NAME@ALIAS[/PATH]`` -> (NAME, ALIAS, None, PATH), ``models:/NAME/VERSION[/PATH]``
    -> (NAME, None, VERSION, PATH); ValueError for anything else. (MLflow's own parser is
    private; this is the subset the project uses.)"""
    rest = spec[len("models:/"):] if spec.startswith("models:/") else ""
    head, _, tail = rest.partition("/")
    name, at, alias = head.rpartition("@")
    if at and name and alias:
        return name, alias, None, tail.strip("/")
    version, _, path = tail.partition("/")
    if head and "@" not in head and version.isdigit():
        return head, None, version, path.strip("/")
    raise ValueError(f"{spec}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
