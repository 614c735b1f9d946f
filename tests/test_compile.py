"""``torch.compile`` of the network (``CIAEModel.compile_features``: ``Predictor(compile=True)``,
``ciae label --compile``) traces one graph for batches of any size >= 2 and inputs of any size,
and one more for a batch of one (the compiler's own 0/1 specialisation): a labeling job whose
images come in many sizes pays for two compiles, not one per padded size (and, past
``torch._dynamo``'s recompile limit, eager speed). Traced on the CPU with the eager backend
(``torch._dynamo.testing.CompileCounter``), in the layout and dtype of the GPU path
(channels-last, bfloat16 autocast). Before, CoordConv's ``linspace`` specialised the graph to
every input size."""

from __future__ import annotations

import functools

import pytest
import torch
from test_device_discipline import planted_model

from ciae.modeling.embedding import _coords

# (B, H, W): both orientations, every FPN level at least 2 x 2 (as at any test size from 256 px
# up: a level one cell wide or high is specialised, as a batch of one is), and a last batch of one
SHAPES = [(4, 160, 224), (4, 224, 160), (2, 192, 256), (8, 256, 192), (3, 160, 160), (2, 320, 224),
          (1, 160, 224), (1, 224, 320)]


def test_the_network_compiles_once_for_every_input_size_and_once_for_a_single_image(monkeypatch):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    torch._dynamo.reset()
    model = planted_model().to(memory_format=torch.channels_last)
    eager = model._forward_features
    model.compile_features()
    graphs = []
    try:
        for b, h, w in SHAPES:
            images = torch.randint(0, 255, (b, 3, h, w), dtype=torch.uint8)
            images = images.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                head, locations, emb4 = model._forward_features(images)
                want = eager(images)
            graphs.append(counter.frame_count)
            assert torch.equal(emb4, want[2]) and all(map(torch.equal, locations, want[1]))
            assert tuple(emb4.shape) == (b, model.cfg.embedding.dim, h // 4, w // 4)
    finally:
        torch._dynamo.reset()
    assert graphs == [1] * 6 + [2] * 2, list(zip(SHAPES, graphs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coordconv_coordinates_are_linspace(dtype):
    like = torch.empty(0, dtype=dtype)
    for n in [1, 2, 3, 7, 25, 34, 200, 333]:
        got, want = _coords(n, like), torch.linspace(-1, 1, n)
        assert got.dtype == dtype and got.shape == (n,)
        assert got[0] == -1
        tol = 2e-7 if dtype == torch.float32 else 4e-3                # bfloat16: 8 bits
        assert torch.allclose(got.float(), want, atol=tol, rtol=0), n


# training steps (B fixed, as a worker's): both orientations, shorter sides 160-256 (P7 at least 2 x 2)
TRAIN_SHAPES = [(2, 160, 224), (2, 224, 160), (2, 192, 256), (2, 256, 192)]


def test_a_training_step_traces_the_network_once_for_every_size_with_eager_numerics(monkeypatch):
    """The network in train mode (the GPU suite's compiled training step): traced once for images
    of every size and both orientations, no graph break, and each step's losses and weights those
    of the eager step. (Inductor then specialises the convolutions' backward to one size; that
    is measured on the GPU, benchmarks/gpu/README.md, train_step.)"""
    from test_device_discipline import tiny_config, toy_batch

    from ciae.engine.train import Trainer
    from ciae.modeling.model import CIAEModel

    traced = []

    def backend(gm, example_inputs):       # runs the graph eagerly; a restarted trace comes empty
        traced.append(len(gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()

    def trainer(compiled: bool) -> Trainer:
        torch.manual_seed(0)
        model = CIAEModel(tiny_config(), stuff_ids=[184, 187], thing_ids=[1, 3])
        model.kernel_backend = "torch"
        if compiled:
            model.compile_features()
        return Trainer(model)

    eager, compiled = trainer(False), trainer(True)
    graphs = []
    try:
        for seed, (b, h, w) in enumerate(TRAIN_SHAPES):
            batch = toy_batch(b, h, w, seed=seed)
            want, got = eager.train_step(batch), compiled.train_step(batch)
            graphs.append(sum(n > 0 for n in traced))
            for term in set(want) - {"lr", "step_time"}:
                assert got[term] == pytest.approx(want[term], rel=1e-5, abs=1e-6), (term, h, w)
        for p, q in zip(eager.model.parameters(), compiled.model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert graphs == [1] * len(TRAIN_SHAPES), list(zip(TRAIN_SHAPES, graphs))
