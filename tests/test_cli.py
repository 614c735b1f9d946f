"""The ``ciae`` command line: help everywhere, with the defaults of what the commands call, one-line
errors with exit status 2, training configs and their scaling."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from workflows.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: ciae " + command in capsys.readouterr().out


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, and review's push and pull ("review push")."""
    def sub(parser):
        return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    found = {}
    for command in COMMANDS:
        found[command] = p = sub(build_parser(command))[command]
        found.update({f"{command} {name}": q for name, q in sub(p).items()})
    return found


def _callees() -> dict[str, list]:
    """What each command passes its options to (demo: its own defaults, but Ray's address)."""
    from pipeline.cluster.ray_runtime import connect
    from pipeline.data.prepare import prepare
    from pipeline.data.synth import SynthSpec, write_dataset
    from pipeline.evaluation.files import evaluate
    from workflows.jobs.label import label
    from workflows.jobs.specs import LabelJob, TrainJob
    from workflows.jobs.train import train
    from workflows.review.sync import pull, push

    return {"synth": [write_dataset, SynthSpec], "prepare": [prepare], "train": [TrainJob, train],
            "evaluate": [evaluate], "label": [LabelJob, label], "export": [], "review": [],
            "review push": [push], "review pull": [pull], "demo": [connect]}


def test_option_defaults_are_the_signatures():
    """An option named as a parameter or field of what its command calls defaults as that does."""
    from ciae.config import Config
    from workflows.commands import defaults
    from workflows.jobs.specs import TrainJob

    parsers, callees = _parsers(), _callees()
    assert sorted(parsers) == sorted(callees)
    wrong = [(name, a.dest, a.default, d[a.dest]) for name, p in parsers.items() for callee in callees[name]
             for d in [defaults(callee)] for a in p._actions if a.dest in d and a.default != d[a.dest]]
    assert wrong == []
    config = next(a.default for a in parsers["train"]._actions if a.dest == "config")
    assert Config.load(config) == TrainJob(data="x").config


def test_help_states_the_actual_defaults():
    """A literal (number, quoted, path, choice) that a help text calls the default is the default."""
    stated = re.compile(r"\bdefault:?\s+([^\s,;:)]+)|(\S+?),? \(default\)|\((\S+?), the default\)")
    wrong = []
    for name, p in _parsers().items():
        for a in p._actions:
            if not a.help or a.help == argparse.SUPPRESS:
                continue
            text = p._get_formatter()._expand_help(a)
            shown = {str(a.default)} | ({f"{a.default:g}"} if isinstance(a.default, float) else set())
            for m in stated.finditer(text):
                token = next(g for g in m.groups() if g)
                literal = (re.fullmatch(r"-?[\d.]+|'.*'|\".*\"", token) or ("/" in token and token[0] != "$")
                           or token in (a.choices or ()))
                if literal and token.strip("'\"") not in shown:
                    wrong.append((name, a.option_strings, a.default, text))
    assert wrong == []


def test_help_texts_type_no_default():
    """Defaults in help texts come from where they live (argparse's %(default)s, a formatted
    value), never typed in: no "default 4", "default 'x'", "default a/b", "x (default)"."""
    typed = re.compile(r"\bdefault:?\s*(?:[\d'\"]|[\w.-]*/)|\(default\)|\bthe default\b")
    found = []
    for path in sorted((ROOT / "workflows" / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                for kw in (k for k in node.keywords if k.arg == "help"):
                    parts = kw.value.values if isinstance(kw.value, ast.JoinedStr) else [kw.value]
                    text = "".join(p.value if isinstance(p, ast.Constant) else "{}" for p in parts)
                    if typed.search(text.replace("%(default)s", "{}")):
                        found.append(f"{path.name}:{node.lineno}: {text}")
    assert found == []


def test_train_config_presets_files_and_lr_scaling(tmp_path):
    from ciae.config import Config
    from workflows.jobs.specs import TrainJob

    assert Config.load("paper").backbone.name == "resnet50"
    f = tmp_path / "c.json"
    f.write_text('{"base": "paper", "solver": {"iterations": 1000}, "embedding": {"top_k": 3}}')
    cfg = Config.load(str(f))
    assert (cfg.backbone.name, cfg.solver.iterations, cfg.embedding.top_k) == ("resnet50", 1000, 3)
    f.write_text('{"embedding": {"no_such_knob": 1}}')
    with pytest.raises(ValueError, match="no_such_knob"):
        Config.load(str(f))
    for bad in ('{"base": "huge"}', '{"solver": 3}', '[1]'):
        f.write_text(bad)
        with pytest.raises(ValueError, match=f"^{re.escape(str(f))}: "):
            Config.load(str(f))

    small = Config.load("small")                       # lr 0.01 at batch 4
    cfg, per_worker, cpus = TrainJob(data="x", config=small, workers=2).resolved()
    assert (per_worker, cfg.solver.batch_size, cfg.solver.lr, cpus) == (2, 4, 0.01, 0.5)
    cfg, per_worker, _ = TrainJob(data="x", config=small, workers=4, batch_per_worker=2, iterations=350).resolved()
    assert (cfg.solver.batch_size, cfg.solver.lr, cfg.solver.iterations) == (8, 0.02, 350)
    assert cfg.solver.steps == (234, 311)              # the decay steps scale with the run


def test_paper_recipe_without_weights_is_refused():
    from ciae.config import Config
    from workflows.jobs.specs import TrainJob

    with pytest.raises(ValueError, match="backbone.weights"):
        TrainJob(data="x", config=Config())
    TrainJob(data="x", config=Config().merged({"backbone": {"norm": "gn", "freeze_at": 0}}))
    TrainJob(data="x", config=Config().merged({"backbone": {"weights": "/w/resnet50.pth"}}))


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "nowhere", "--workers", "x"], "ciae train: argument --workers: invalid int value: 'x'"),
    (["train", "--data", "nowhere", "--config", "paper"], "ciae train: this config freezes the backbone's BatchNorm"),
    (["train", "--data", "nowhere"], "ciae train: nowhere: no _manifest.json; run `ciae prepare` first"),
    (["train", "--data", "nowhere", "--config", "missing.json"], "ciae train: --config missing.json: not 'small'"),
    (["train", "--data", "nowhere", "--gpus-per-worker", "0.5"],
     "ciae train: gpus_per_worker must be 0 (CPU) or a whole number of GPUs, got 0.5: DDP ranks cannot "
     "share a GPU (NCCL refuses two ranks on one device); only labeling can share GPUs"),
    (["evaluate", "--gt-json", "a.json", "--gt-dir", "a", "--pred-json", "b.json", "--pred-dir", "b"],
     "ciae evaluate: a.json: file not found"),
    (["label", "--model", "models:/nothing/1", "--input", ".", "--out", "o", "--tracking-uri", "sqlite:///{tmp}/m.db"],
     "ciae label: models:/nothing/1: no such registered model version in sqlite:///"),
    (["prepare", "--images", "i", "--panoptic-json", "p.json", "--panoptic-dir", "p", "--out", "o"],
     "ciae prepare: p.json: file not found"),
])
def test_user_errors_are_one_line_with_status_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) if "invalid int" in message else _nothing():
        code = main(argv)
    err = capsys.readouterr().err.strip()
    if "invalid int" not in message:
        assert code == 2
    assert err.startswith(message), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_training_refuses_shared_gpus_and_unsynchronised_batchnorm(tmp_path, monkeypatch, capsys):
    """Two DDP ranks on one GPU (NCCL refuses them), and BatchNorm trained by several CPU workers
    (SyncBatchNorm runs on GPUs only; unsynchronised, the ranks' statistics drift apart)."""
    from ciae.config import Config
    from workflows.jobs.specs import TrainJob

    for gpus in (0.5, 0.25, 1.5):
        with pytest.raises(ValueError, match=f"got {gpus:g}: .* only labeling can share GPUs"):
            TrainJob(data="x", gpus_per_worker=gpus)
    for gpus in (0, 1, 2.0):
        TrainJob(data="x", gpus_per_worker=gpus)

    bn = Config.small().merged({"backbone": {"norm": "bn"}})
    with pytest.raises(ValueError, match="backbone.norm 'bn' with 2 CPU workers: .*SyncBatchNorm"):
        TrainJob(data="x", config=bn, workers=2)
    TrainJob(data="x", config=bn, workers=1)
    TrainJob(data="x", config=bn, workers=2, gpus_per_worker=1)
    TrainJob(data="x", config=bn.merged({"backbone": {"freeze_at": 5}}), workers=2)   # no BatchNorm trains

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bn.json").write_text('{"backbone": {"norm": "bn"}}')
    assert main(["train", "--data", "nowhere", "--config", "bn.json", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ciae train: backbone.norm 'bn' with 2 CPU workers") and len(err.splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no _manifest.json"):
        main(["train", "--data", "nowhere", "--debug"])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_status_3_ends_the_process_without_the_exit_handlers():
    """``run`` (the ``ciae`` process): a job given up with status 3 exits with it, its output
    flushed, without the interpreter's exit handlers (pyarrow's S3 finalizer among them, which
    once crashed a CLI after its line); any other status exits as usual."""
    import subprocess
    import sys

    code = ("import atexit, sys\n"
            "import workflows.cli as cli\n"
            "atexit.register(print, 'exit handlers ran')\n"
            "def main(argv=None):\n"
            "    sys.stdout.write('unflushed output')\n"
            "    print('ciae label: the one line', file=sys.stderr)\n"
            "    return int(argv[0])\n"
            "cli.main = main\n"
            "cli.run(sys.argv[1:])\n")
    for status in (3, 2, 0):
        done = subprocess.run([sys.executable, "-c", code, str(status)], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert done.returncode == status, done.stderr
        assert done.stdout.startswith("unflushed output") and done.stderr == "ciae label: the one line\n"
        assert ("exit handlers ran" in done.stdout) == (status != 3), (status, done.stdout)
