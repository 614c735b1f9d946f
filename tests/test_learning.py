"""Learning is real: the CPU configuration, trained briefly on synthetic data, segments held-out
synthetic images far better than the same model untrained; and the oracle is near-perfect."""

from __future__ import annotations

import pytest
import torch

from ciae import checkpoint
from ciae.modeling.model import CIAEModel
from pipeline.evaluation.validation import evaluate


def test_training_beats_the_untrained_model(trained_small):
    losses, val = trained_small["losses"], trained_small["shards"]["val"]
    assert len(losses) == 140
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first

    model = CIAEModel.from_checkpoint(checkpoint.load(trained_small["checkpoint"], "model.pt"))
    # the checkpoint is the model: every weight and buffer, bit for bit
    state, weights = model.state_dict(), trained_small["weights"]
    assert state.keys() == weights.keys() and all(torch.equal(state[k], w) for k, w in weights.items())
    trained = evaluate(model, val)
    untrained = trained_small["untrained_pq"]
    print(f"PQ untrained {untrained:.3f} -> trained {trained['All']['pq']:.3f} after 140 steps; "
          f"things {trained['Things']['pq']:.3f}, stuff {trained['Stuff']['pq']:.3f}")
    assert trained["All"]["pq"] >= 0.25 and trained["All"]["pq"] >= untrained + 0.2
    assert trained["Things"]["pq"] > 0.1 and trained["Stuff"]["pq"] > 0.1

    # the oracle (GT boxes, mask-mean queries) on the same embeddings does better still
    assert evaluate(model, val, oracle=True)["All"]["pq"] > trained["All"]["pq"]
    # and so its PQ, to the few pixels at a tie that another process's kernels may flip (a fresh
    # CI machine gave 0.4274278 here and 0.4274359 in the fixture: 8e-6)
    assert trained["All"]["pq"] == pytest.approx(trained_small["trained_pq"], abs=1e-3)
