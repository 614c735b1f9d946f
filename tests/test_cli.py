"""The ``ciae`` command line: help everywhere, training configs and their scaling."""

from __future__ import annotations

import pytest

from workflows.cli import COMMANDS, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: ciae " + command in capsys.readouterr().out


def test_train_config_presets_files_and_lr_scaling(tmp_path):
    from workflows.commands.train import load_config
    from workflows.train import TrainJob

    assert load_config("paper").backbone.name == "resnet50"
    f = tmp_path / "c.json"
    f.write_text('{"base": "paper", "solver": {"iterations": 1000}, "embedding": {"top_k": 3}}')
    cfg = load_config(str(f))
    assert (cfg.backbone.name, cfg.solver.iterations, cfg.embedding.top_k) == ("resnet50", 1000, 3)
    f.write_text('{"embedding": {"no_such_knob": 1}}')
    with pytest.raises(SystemExit, match="no_such_knob"):
        load_config(str(f))

    small = load_config("small")                       # lr 0.01 at batch 4
    cfg, per_worker, cpus = TrainJob(data="x", config=small, workers=2).resolved()
    assert (per_worker, cfg.solver.batch_size, cfg.solver.lr, cpus) == (2, 4, 0.01, 0.5)
    cfg, per_worker, _ = TrainJob(data="x", config=small, workers=4, batch_per_worker=2, iterations=350).resolved()
    assert (cfg.solver.batch_size, cfg.solver.lr, cfg.solver.iterations) == (8, 0.02, 350)
    assert cfg.solver.steps == (234, 311)              # the decay steps scale with the run
