"""Learning is real: the CPU configuration, trained briefly on synthetic data, segments held-out
synthetic images far better than the same model untrained; and the oracle is near-perfect."""

from __future__ import annotations

import pytest
import torch

from ciae.config import Config
from ciae.train import Trainer, model_from_checkpoint, scale_schedule
from workflows.local import batch_stream, evaluate, model_for_shards

STEPS = 160


@pytest.fixture(scope="module")
def shards(synth_dataset, make_shards) -> dict:
    return {split: make_shards(synth_dataset(n, seed, 192, 192), 128)
            for split, n, seed in (("train", 64, 0), ("val", 12, 1000))}


def test_training_beats_the_untrained_model(shards, tmp_path):
    torch.manual_seed(0)
    cfg = Config.small()
    cfg.solver = scale_schedule(cfg.solver, STEPS)
    model = model_for_shards(cfg, shards["train"])
    untrained = evaluate(model, shards["val"])["All"]["pq"]

    trainer = Trainer(model)
    losses = []
    ckpt = str(tmp_path / "model.pt")
    trainer.fit(batch_stream(shards["train"], cfg), STEPS, checkpoint_path=ckpt,
                on_step=lambda step, s: losses.append(s["loss"]))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first

    trained = evaluate(model, shards["val"])
    print(f"PQ untrained {untrained:.3f} -> trained {trained['All']['pq']:.3f} after {STEPS} steps; "
          f"things {trained['Things']['pq']:.3f}, stuff {trained['Stuff']['pq']:.3f}")
    assert trained["All"]["pq"] >= 0.25 and trained["All"]["pq"] >= untrained + 0.2
    assert trained["Things"]["pq"] > 0.1 and trained["Stuff"]["pq"] > 0.1

    # the checkpoint reproduces the trained model, and the oracle (GT boxes, mask-mean queries)
    # on its embeddings does better still
    reloaded = model_from_checkpoint(ckpt)
    assert evaluate(reloaded, shards["val"])["All"]["pq"] == pytest.approx(trained["All"]["pq"])
    assert evaluate(reloaded, shards["val"], oracle=True)["All"]["pq"] > trained["All"]["pq"]
