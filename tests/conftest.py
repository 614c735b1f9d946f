"""Shared fixtures: the real COCO sample, synthetic datasets and their shards (each made once per
session), one local Ray per session, and an S3 server (``s3_server``) and a Label Studio server
(``label_studio``) started on first use."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():   # the Triton kernels' tests run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")   # (must precede the first import of triton)

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

COCO_SAMPLE = Path(__file__).parent / "data" / "coco_sample"


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test that builds a labeler in this process sets torch's thread count (``Labeler``): every
    later test gets the process's own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def coco_sample() -> dict:
    """Paths of the real COCO panoptic sample (2 val2017 images, 133 categories)."""
    return {"images": str(COCO_SAMPLE / "input_images"),
            "panoptic_json": str(COCO_SAMPLE / "panoptic_examples.json"),
            "panoptic_dir": str(COCO_SAMPLE / "panoptic_examples")}


def _paths(root) -> dict:
    return {"root": str(root), "images": str(root / "images"),
            "panoptic_json": str(root / "panoptic.json"), "panoptic_dir": str(root / "panoptic")}


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """``synth_dataset(n, seed, height, width)``: the paths of a synthetic COCO panoptic dataset,
    made once per session for each set of arguments; copy it before changing it."""
    from pipeline.data.synth import SynthSpec, write_dataset

    made = {}

    def make(n: int, seed: int, height: int, width: int) -> dict:
        key = (n, seed, height, width)
        if key not in made:
            root = tmp_path_factory.mktemp(f"synth_{n}_{seed}_{height}x{width}")
            write_dataset(str(root), n, seed=seed, spec=SynthSpec(height=height, width=width))
            made[key] = _paths(root)
        return made[key]

    return make


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory, ray_local):
    """``make_shards(source, rows_per_shard)``: shards of a dataset's paths (``synth_dataset``,
    ``coco_sample``) prepared once per session for each pair; copy them before changing them.
    Prepared in this process (``in_process``: the Ray Data job's very shards, tested in
    test_data_prepare.py, without a job's overhead); the session's Ray is started all the same
    for the tests that stream them through Ray."""
    from pipeline.data.prepare import prepare
    from pipeline.data.shards import Source

    made = {}

    def make(source: dict, rows_per_shard: int = 4) -> str:
        key = (source["panoptic_json"], rows_per_shard)
        if key not in made:
            out = str(tmp_path_factory.mktemp("shards") / "shards")
            prepare(Source(source["images"], source["panoptic_json"], source["panoptic_dir"]), out,
                    rows_per_shard=rows_per_shard, progress=False, in_process=True)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def synth_small(synth_dataset) -> dict:
    """A 6-image 96x128 synthetic dataset; copy it before changing it."""
    return synth_dataset(6, 7, 96, 128)


@pytest.fixture(scope="session")
def synth_shards(synth_small, make_shards) -> str:
    """``synth_small`` as shards of 4 rows."""
    return make_shards(synth_small)


@pytest.fixture
def synth_copy(synth_small, tmp_path) -> dict:
    """A private copy of ``synth_small`` that a test may corrupt."""
    root = tmp_path / "src"
    shutil.copytree(synth_small["root"], root)
    return _paths(root)


@pytest.fixture(scope="session")
def s3_env() -> str:
    """The environment of the session's S3 server (``s3_server``), set before it starts and
    before the session's Ray (whose workers inherit it): credentials, region and
    ``AWS_ENDPOINT_URL`` at a free port of 127.0.0.1, so that no test reaches a real S3 (an
    s3:// path fails there at once until ``s3_server`` runs). Returns the endpoint."""
    from s3_server import S3_ENV, free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    return endpoint


@pytest.fixture(scope="session")
def s3_server(s3_env):
    """moto's S3 server at ``s3_env``'s endpoint, started once per session on first use and
    stopped by its pid at the end: {"endpoint", "bucket" (an empty bucket's name: s3://NAME),
    "requests" (``s3_server.Requests``: what it was asked)}."""
    from s3_server import Requests, S3Server, create_bucket

    server = S3Server(int(s3_env.rpartition(":")[2])).start()
    try:
        create_bucket("ciae-test")
        yield {"endpoint": s3_env, "bucket": "ciae-test", "requests": Requests(server)}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A Label Studio server (``label_studio_server``: its own virtualenv, port, data dir and
    personal access token), started once per session on first use and stopped by its pid:
    {url, token, ...}."""
    import label_studio_server

    server = label_studio_server.start(tmp_path_factory.mktemp("label_studio"))
    print(f"\nLabel Studio {server.url} started in {server.start_seconds:.1f} s")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_env):
    """One local Ray for the whole session (stages reuse a running Ray); its workers see
    ``s3_env``'s environment."""
    os.environ.setdefault("CIAE_OBJECT_STORE_MB", "300")
    from pipeline.cluster.ray_runtime import connect

    with connect():
        yield


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory) -> str:
    """An MLflow sqlite database with its tables, made once: MLflow's schema migrations take
    3-5 s for every new database."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow_empty") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    return str(db)


@pytest.fixture
def mlflow_db(_empty_mlflow_db, tmp_path) -> str:
    """The tracking URI of a new sqlite MLflow store of this test's own, ``tmp_path/mlflow.db``
    (artifacts beside it): a copy of an empty database."""
    shutil.copy(_empty_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def write_checkpoint(trainer, path) -> str:
    """Write ``trainer``'s checkpoint to ``path`` (atomically, as the training jobs do); returns it."""
    from ciae import checkpoint
    from pipeline.data.storage import write_uri

    write_uri(str(path), checkpoint.to_bytes(trainer.checkpoint()))
    return str(path)


@pytest.fixture(scope="session")
def registered_untrained(tmp_path_factory, _empty_mlflow_db) -> dict:
    """An untrained Config.small() model on the synthetic categories, registered (and given
    @champion) in a sqlite MLflow of its own: {"uri": models:/..., "tracking", "checkpoint"}."""
    import torch

    from ciae.config import Config
    from ciae.engine.train import Trainer
    from ciae.modeling.model import CIAEModel
    from pipeline.data.synth import select_categories
    from workflows.tracking.registry import register_checkpoint

    root = tmp_path_factory.mktemp("registered_untrained")
    cats = select_categories()
    torch.manual_seed(0)
    ckpt = write_checkpoint(Trainer(CIAEModel(Config.small(), cats.stuff_ids, cats.thing_ids)), root / "model.pt")
    shutil.copy(_empty_mlflow_db, root / "mlflow.db")
    tracking = f"sqlite:///{root}/mlflow.db"
    uri = register_checkpoint(ckpt, tracking_uri=tracking, model_name="ciae-untrained")
    return {"uri": uri, "tracking": tracking, "checkpoint": ckpt}


@pytest.fixture(scope="session")
def trained_small(synth_dataset, make_shards, tmp_path_factory, _empty_mlflow_db) -> dict:
    """``Config.small()`` at a 112 px input size (``size``) trained for 140 steps on 64 synthetic
    112x112 images in one process, once per session, registered in a sqlite MLflow of its own:
    {"shards" (train, val), "size", "checkpoint", "weights" (the trained state dict), "losses",
    "untrained_pq", "trained_pq", "uri", "tracking"}. Held-out PQ 0 untrained, 0.43-0.48 trained (2-core VM, 1 or 2 torch threads): more
    than the preset's 192 px gave in 160 steps (0.35-0.37), at 45% of their cost."""
    import torch

    from ciae.config import Config
    from ciae.engine.train import Trainer, scale_schedule
    from pipeline.evaluation.validation import evaluate
    from pipeline.feed.stream import batch_stream, model_for_shards
    from workflows.tracking.registry import register_checkpoint

    size, steps = 112, 140
    shards = {split: make_shards(synth_dataset(n, seed, size, size), 128)
              for split, n, seed in (("train", 64, 0), ("val", 12, 1000))}
    root = tmp_path_factory.mktemp("trained_small")
    torch.manual_seed(0)
    cfg = Config.small().merged({"input": {"shorter_sides": (size,), "test_shorter_side": size,
                                           "max_size": 2 * size}})
    cfg.solver = scale_schedule(cfg.solver, steps)
    model = model_for_shards(cfg, shards["train"])
    untrained = evaluate(model, shards["val"])["All"]["pq"]
    losses = []
    trainer = Trainer(model)
    trainer.fit(batch_stream(shards["train"], cfg), steps, on_step=lambda step, s: losses.append(s["loss"]))
    ckpt = write_checkpoint(trainer, root / "model.pt")
    trained = evaluate(model, shards["val"])["All"]["pq"]
    shutil.copy(_empty_mlflow_db, root / "mlflow.db")
    tracking = f"sqlite:///{root}/mlflow.db"
    uri = register_checkpoint(ckpt, tracking_uri=tracking, model_name="ciae-trained")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"shards": shards, "size": size, "checkpoint": ckpt, "weights": weights, "losses": losses,
            "untrained_pq": untrained, "trained_pq": trained, "uri": uri, "tracking": tracking}


# Ray Train's preemption watcher, an actor per worker group (~1.5 s of CPU each on the 2-core
# VM) that watches for nodes being drained: no test drains one (test_ray_nodes.py, which loses
# nodes, keeps it as users have it)
LEAN_RAY_TRAIN = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture(scope="module")
def lean_ray_train():
    """``LEAN_RAY_TRAIN`` in the environment for the module's tests: Ray Train runs in this
    process and in the commands they start (which inherit it) start no preemption watcher."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in LEAN_RAY_TRAIN.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def two_worker_run(synth_small, make_shards, tmp_path_factory, _empty_mlflow_db, ray_local) -> dict:
    """test_train_distributed.py's ``two_worker_job`` trained by ``train`` once per session, on
    local folders given as file:// URIs (``synth_small``'s shards of 3 rows, whose row groups
    straddle the workers' parts), registered as ciae-local in a sqlite MLflow of its own:
    {"job", "summary" (train's), "shards", "tracking"}. test_train_distributed.py compares it
    with one process, test_s3.py with the same job on S3."""
    from test_train_distributed import two_worker_job

    from workflows.jobs.train import train

    shards = make_shards(synth_small, 3)
    root = tmp_path_factory.mktemp("two_worker_run")
    shutil.copy(_empty_mlflow_db, root / "mlflow.db")
    tracking = f"sqlite:///{root}/mlflow.db"
    job = two_worker_job(data=f"file://{shards}", val=shards, storage=f"file://{root}/ray_results", name="local",
                         experiment="local", register="ciae-local", tracking_uri=tracking)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in LEAN_RAY_TRAIN.items():
            mp.setenv(k, v)
        summary = train(job, progress=False)
    return {"job": job, "summary": summary, "shards": shards, "tracking": tracking}
