"""The summaries of a labeling output (``pipeline.label.store.Summary``): a finished job's re-run
reads the listing and ``job.json``, no shard, on a local folder and on S3; what the summaries give
(counts, rejects, review list, PQ) is what the shards give, for a review list longer than the job
kept too; an output without summaries (either layout) re-runs as before and gets them; a job
killed between a seal and its summary loses and counts twice nothing; ``--retry-rejected`` and
``ciae review push`` read only the shards they need."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_label import LEGACY_NAMES, check_outputs

from ciae.data.panoptic import CategoryTable
from pipeline.data import storage
from pipeline.evaluation.pq import PQAccumulator
from pipeline.label import store as ls
from pipeline.label.sources import load_plan
from pipeline.label.sources import categories_of
from workflows.jobs.label import label
from workflows.jobs.specs import LabelJob

EXPORTS = ("rejects", "review", "metrics")


@pytest.fixture(scope="module")
def finished(registered_untrained, synth_small, tmp_path_factory, ray_local) -> dict:
    """The 6 synthetic images, a truncated JPEG and a missing file, listed and labeled with the
    ground truth in tasks of 3 (6 labeled, 2 rejected: the last task's two), the job keeping a
    review list of 2: {"out", "job" (its LabelJob arguments), "keys" (key -> (h, w)),
    "exports" (name -> bytes of the rejects, review and metrics files)}."""
    root = tmp_path_factory.mktemp("finished")
    names = sorted(os.listdir(synth_small["images"]))
    data = open(os.path.join(synth_small["images"], names[0]), "rb").read()
    (root / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    listing = root / "inputs.txt"
    listing.write_text("\n".join([os.path.join(synth_small["images"], n) for n in names]
                                 + [str(root / "corrupt.jpg"), str(root / "gone.jpg")]) + "\n")
    kw = dict(model=registered_untrained["checkpoint"], input=str(listing), batch_size=3, task_images=3,
              review=2, gt_json=synth_small["panoptic_json"], gt_dir=synth_small["panoptic_dir"])
    out = root / "out"
    s = label(LabelJob(out=str(out), **kw), progress=False)
    assert (s["labeled"], s["rejected"], s["review"]) == (6, 2, 2)
    keys = {os.path.splitext(n)[0]: (96, 128) for n in names}
    return {"out": out, "job": kw, "keys": keys, "exports": exports_of(out, ls.LAYOUT)}


def exports_of(out, layout: ls.Layout) -> dict[str, bytes]:
    return {name: (out / getattr(layout, name)).read_bytes() for name in EXPORTS}


def rerun(finished, out, **kw) -> dict:
    return label(LabelJob(out=str(out), **(finished["job"] | kw)), progress=False)


def categories(out) -> CategoryTable:
    return CategoryTable.from_json(categories_of(load_plan(ls.LabelStore(str(out)).plan_uri)))


def from_shards(out, n: int) -> dict:
    """What the exports hold, made from the shards with pyarrow (not the store): {"labeled",
    "rejected", "rejects", "review" (the CSV's rows), "pq" (the footers' statistics summed)}."""
    files = sorted((out / "labels").iterdir())
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    acc = PQAccumulator(categories(out))
    for f in files:
        acc.add_json(json.loads(pq.read_schema(f).metadata[ls.PQ_KEY]))
    labeled = sorted((r for r in rows if r["status"] == "labeled"), key=lambda r: (r["quality"], r["index"]))
    review = []
    for rank, r in enumerate(labeled[:n], start=1):
        low = min(r["segments"], key=lambda s: s["score"])
        review.append([str(rank), r["key"], r["file_name"], str(r["image_id"]), f"{r['quality']:.4f}",
                       f"{r['pq']:.4f}", str(low["id"]), str(low["category_id"]), f"{low['score']:.4f}"])
    return {"labeled": len(labeled), "rejected": sum(r["status"] == "rejected" for r in rows),
            "rejects": [{"file": r["file_name"], "key": r["key"], "image_id": r["image_id"], "reason": r["reason"]}
                        for r in rows if r["status"] == "rejected"],
            "review": review, "pq": acc.summary()}


def review_rows(path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text())))[1:]


class Reads(pafs.FileSystemHandler):
    """The local file system, recording the paths it opens for reading."""

    def __init__(self):
        self.local, self.opened = pafs.LocalFileSystem(), []

    def shards(self) -> list[str]:
        return [p for p in self.opened if "/labels/" in p]

    def summaries(self) -> list[str]:
        return sorted(os.path.basename(p) for p in self.opened if "summaries/" in p)

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        self.opened.append(path)
        return self.local.open_input_file(path)

    def get_type_name(self):
        return "reads"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def equals(self, other):
        return other is self

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path, metadata=metadata)


@pytest.fixture
def reads(monkeypatch) -> Reads:
    """Every local path resolves to ``Reads``'s file system from now on."""
    handler = Reads()
    resolve = storage.resolve
    monkeypatch.setattr(storage, "resolve", lambda uri: (pafs.PyFileSystem(handler), os.path.abspath(uri))
                        if "://" not in uri else resolve(uri))
    return handler


def test_a_finished_jobs_rerun_reads_no_shard(finished, tmp_path, reads):
    """The listing of labels/ and job.json: no shard, no task's summary; the same exports."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    s = rerun(finished, out)
    assert (s["labeled"], s["rejected"], s["processed"], s["review"]) == (6, 2, 0, 2)
    assert reads.shards() == [] and reads.summaries() == ["job.json"]
    assert exports_of(out, ls.LAYOUT) == finished["exports"]


def test_exports_and_summaries_equal_what_the_shards_give(finished, tmp_path, reads):
    """Counts, rejects, the review list and PQ as the shards give them; a longer review list
    than the job kept (``ciae export --review 5``) reads the shards of the tasks whose summaries
    hold too few, and job.json then serves it."""
    from workflows.cli import main

    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    expected = from_shards(out, 2)
    summary = ls.LabelStore(str(out)).summary(2, categories(out))
    assert (summary.labeled, summary.rejected, summary.rejects) == \
        (expected["labeled"], expected["rejected"], expected["rejects"]) == (6, 2, expected["rejects"])
    assert json.loads((out / "_rejects.json").read_text())["rejected"] == expected["rejects"]
    assert review_rows(out / "_review.csv") == expected["review"] and len(expected["review"]) == 2
    metrics = json.loads((out / "_metrics.json").read_text())
    for group in ("All", "Things", "Stuff"):
        assert metrics[group] == expected["pq"][group]
    assert metrics["images"] == {"evaluated": 6, "input": 8}
    assert reads.shards() == []

    for n, shards in ((1, []), (5, ["task-000000.parquet", "task-000001.parquet"]), (3, [])):
        reads.opened.clear()
        assert main(["export", "--labels", str(out), "--review", str(n)]) == 0
        assert review_rows(out / "_review.csv") == from_shards(out, n)["review"]
        assert sorted(os.path.basename(p) for p in reads.shards()) == shards, n
    assert json.loads((out / "_summaries" / "job.json").read_text())["review_n"] == 5


@pytest.mark.parametrize("layout", [ls.LAYOUT, ls.LEGACY_LAYOUT], ids=["layout", "legacy"])
def test_an_output_without_summaries_reruns_as_before_and_gets_them(finished, tmp_path, reads, layout):
    """An output written before summaries (in either layout): its re-run reads each shard once
    and writes the exports as before, and the summaries; the next re-run reads no shard."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    shutil.rmtree(out / "_summaries", ignore_errors=True)        # none before summaries
    if layout == ls.LEGACY_LAYOUT:
        for new, name in LEGACY_NAMES.items():
            if (out / new).exists():
                os.rename(out / new, out / name)
    s = rerun(finished, out)
    assert (s["labeled"], s["rejected"], s["processed"]) == (6, 2, 0)
    assert sorted(reads.shards()) == sorted(str(p) for p in (out / "labels").iterdir())
    assert exports_of(out, layout) == finished["exports"]
    assert sorted(os.listdir(out / layout.summaries)) == ["job.json"] + [f"task-00000{t}.json" for t in range(3)]
    if layout == ls.LEGACY_LAYOUT:
        assert not [n for n in os.listdir(out) if n.startswith("_")]
    reads.opened.clear()
    rerun(finished, out)
    assert reads.shards() == [] and exports_of(out, layout) == finished["exports"]


class Killed(BaseException):
    """The driver's process ending where it is raised."""


def test_a_job_killed_between_a_seal_and_its_summary_loses_and_doubles_nothing(finished, tmp_path, monkeypatch):
    """Task 1's images all in parts, unsealed (a driver killed between its last part and its
    seal); the re-run seals it and is killed before the task's summary is written (its shard
    there, its parts too); the next re-run makes the summary from the shard, removes the parts,
    and gives the counts and exports of the finished job."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    store = ls.LabelStore(str(out))
    rows = pq.read_table(out / "labels" / "task-000001.parquet").to_pylist()
    for name in ("labels/task-000001.parquet", "_summaries/task-000001.json", "_summaries/job.json"):
        os.remove(out / name)
    store.write_part(1, rows)

    write_json = ls.LabelStore._write_json

    def killed_before_task_1s_summary(self, path, doc):
        if path.endswith("/task-000001.json"):
            raise Killed
        write_json(self, path, doc)

    monkeypatch.setattr(ls.LabelStore, "_write_json", killed_before_task_1s_summary)
    with pytest.raises(Killed):
        rerun(finished, out)
    assert (out / "labels" / "task-000001.parquet").exists() and (out / "_parts" / "task-000001").is_dir()
    assert not (out / "_summaries" / "task-000001.json").exists() and not (out / "_summaries" / "job.json").exists()

    monkeypatch.setattr(ls.LabelStore, "_write_json", write_json)
    s = rerun(finished, out)
    assert (s["labeled"], s["rejected"], s["processed"], s["skipped"]) == (6, 2, 0, 8)
    check_outputs(str(out), finished["keys"], coco=False)
    assert exports_of(out, ls.LAYOUT) == finished["exports"]
    assert json.loads((out / "_summaries" / "task-000001.json").read_text())["labeled"] == 3


def test_a_finished_jobs_rerun_on_s3_reads_no_shard_in_a_few_requests(finished, s3_server):
    """The finished output uploaded to S3: its re-run there asks for no shard and no task's
    summary, in a few requests (the listing, job.json, the plan, the exports written)."""
    from s3_server import upload

    out = upload(str(finished["out"]), f"s3://{s3_server['bucket']}/test_label_summaries/out")
    requests = s3_server["requests"]
    start = requests.mark()
    s = rerun(finished, out)
    asked = requests.targets(start)
    assert (s["labeled"], s["rejected"], s["processed"]) == (6, 2, 0)
    assert not [t for t in asked if "/labels/" in t[1] and t[0] != "LIST"], asked
    assert not [t for t in asked if "/_summaries/task-" in t[1]], asked
    assert len(asked) <= 30, asked
    fs, base = storage.resolve(out)
    assert {name: storage.read_bytes(fs, f"{base}/{getattr(ls.LAYOUT, name)}") for name in EXPORTS} == \
        finished["exports"]


def shard_names(reads: Reads) -> list[str]:
    """The shards read, once each, by name."""
    return sorted({os.path.basename(p) for p in reads.shards()})


def test_rejected_tasks_come_from_the_summaries(finished, tmp_path, reads):
    """The tasks counting rejected images in their summaries (task 2), and those without a
    summary (their shard read by ``unseal_rejected``); none, from job.json alone, when it counts
    none. No shard read."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    store = ls.LabelStore(str(out))
    assert store.rejected_tasks() == [2]
    assert reads.summaries() == ["job.json"] + [f"task-00000{t}.json" for t in range(3)]
    os.remove(out / "_summaries" / "task-000000.json")
    assert store.rejected_tasks() == [0, 2]
    for name in ("labels/task-000002.parquet", "_summaries/task-000002.json"):
        os.remove(out / name)
    assert store.summary(2, categories(out)).rejected == 0
    reads.opened.clear()
    assert store.rejected_tasks() == [] and reads.summaries() == ["job.json"]
    assert shard_names(reads) == []


@pytest.fixture
def shard_reads(monkeypatch) -> list[str]:
    """The names of the shards the driver reads from now on (``storage.read_parquet`` and
    ``parquet_file``): ``reads``'s file system cannot travel to Ray's workers."""
    opened = []

    def recorded(read):
        def recording(uri, *args, **kw):
            if "/labels/" in uri:
                opened.append(os.path.basename(uri))
            return read(uri, *args, **kw)
        return recording

    for name in ("read_parquet", "parquet_file"):
        monkeypatch.setattr(storage, name, recorded(getattr(storage, name)))
    return opened


@pytest.mark.parametrize("summary", ["present", "missing"])
def test_retry_rejected_reads_only_the_shards_of_tasks_with_rejects(finished, tmp_path, shard_reads, summary):
    """``--retry-rejected`` reads task 2's shard (its two images still unreadable: rejected
    again), not those of tasks 0 and 1, whose summaries count no reject; task 0's shard too when
    its summary is missing (an output written before summaries)."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    if summary == "missing":
        os.remove(out / "_summaries" / "task-000000.json")
    s = rerun(finished, out, retry_rejected=True)
    assert (s["labeled"], s["rejected"], s["processed"]) == (6, 2, 2)
    assert sorted(set(shard_reads)) == ["task-000000.parquet"] * (summary == "missing") + ["task-000002.parquet"]
    assert exports_of(out, ls.LAYOUT) == finished["exports"]


def test_the_least_confident_come_from_job_json_when_it_holds_them(finished, tmp_path, reads):
    """``least_confident_indices``: the images ``least_confident``'s scan chooses, in its order;
    from job.json (its 2 review rows) without a shard read for n <= 2, from the shards beyond."""
    from pipeline.label.exports import least_confident, least_confident_indices

    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    store = ls.LabelStore(str(out))
    for n, shards in ((1, []), (2, []), (5, ["task-000000.parquet", "task-000001.parquet", "task-000002.parquet"])):
        reads.opened.clear()
        chosen = least_confident_indices(store, n)
        assert shard_names(reads) == shards, n
        assert chosen == [r["index"] for r in least_confident(store, n, ["index"])] and len(chosen) == n


def test_push_reads_only_the_shards_of_the_chosen_images(finished, tmp_path, reads, monkeypatch):
    """``ciae review push`` of the 2 least confident (job.json's review rows) reads the shards
    holding them only (Label Studio stood in for: every image already in the project)."""
    from types import SimpleNamespace

    from workflows.review import sync

    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    store = ls.LabelStore(str(out))
    chosen = [r[1] for r in store.job_summary().review[:2]]
    plan = load_plan(store.plan_uri)
    keys = {r["key"] for r in pq.read_table(out / "labels").to_pylist()}
    monkeypatch.setattr(sync, "connect", lambda url, token: None)
    monkeypatch.setattr(sync, "ensure_project", lambda client, title, cats: SimpleNamespace(id=1))
    monkeypatch.setattr(sync, "project_keys", lambda client, project_id: dict.fromkeys(keys, 0))
    reads.opened.clear()
    result = sync.push(str(out), "http://unused", None, "p", 2, progress=False, workers=1)
    assert (result.selected, result.pushed, result.present) == (2, 0, 2)
    assert shard_names(reads) == sorted({ls.task_name(plan.locate(i)[0]) + ".parquet" for i in chosen})
