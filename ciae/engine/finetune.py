"""Start a model from another model's weights, whatever its categories (fine-tuning; detectron2's
``MODEL.WEIGHTS``, mmdetection's ``load_from``).

A source (``ciae.checkpoint.Source``, from ``ciae.checkpoint.read_source``) is a checkpoint of
this project or a torchvision-format ResNet state dict (ImageNet weights). ``transfer(model, source)``:

* a ciae checkpoint: every parameter and buffer whose name and shape the model shares is
  carried. The category-dependent ones (the proposal head's class logits, one row per thing
  class; the category memory, one row per CAE category) keep the source's rows of the
  categories both know (same COCO id and, where both know it, the same name) and their fresh
  initialisation elsewhere. The rest of the model keeps its initialisation; the source's
  parameters the model has no place for are dropped. A source whose backbone does not fit (fewer
  than half of the model's backbone tensors carried) is refused, naming both architectures.
* a torchvision ResNet: the backbone is loaded (``backbone.load_torchvision_state``), the rest
  keeps its initialisation.

The returned report lists what was carried, partly carried, re-initialised and dropped, for the
run's record.
"""

from __future__ import annotations

from collections.abc import Mapping

from ciae.checkpoint import Source
from ciae.modeling.backbone import load_torchvision_state
from ciae.modeling.model import CIAEModel

CLASS_ROWS = ("head.cls_logits.weight", "head.cls_logits.bias")
MEMORY_ROWS = ("memory.memory",)


def _architecture(config: Mapping) -> str:
    b, f = config["backbone"], config["fpn"]
    return f"{b['name']} width {b['width']} ({b['norm']}), FPN {f['channels']} channels, D {config['embedding']['dim']}"


def memory_rows(stuff_ids, thing_ids, thing_mode: str) -> list[tuple]:
    """What each row of the category memory stands for: ("stuff", id), then ("things",) for the
    merged thing class or ("thing", id) for each."""
    rows = [("stuff", int(c)) for c in stuff_ids]
    if thing_mode == "merged":
        rows.append(("things",))
    elif thing_mode == "specific":
        rows += [("thing", int(c)) for c in thing_ids]
    return rows


def _shared_rows(target: list[tuple], source: list[tuple], target_names: Mapping[int, str],
                 source_names: Mapping[int, str] | None) -> list[tuple[int, int]]:
    """(target row, source row) of the rows both stand for: same key, and the same category name
    where both know it."""
    where = {key: j for j, key in enumerate(source)}
    pairs = []
    for i, key in enumerate(target):
        j = where.get(key)
        if j is None:
            continue
        if len(key) == 2 and source_names:
            theirs, ours = source_names.get(key[1]), target_names.get(key[1])
            if theirs is not None and ours is not None and theirs != ours:
                continue
        pairs.append((i, j))
    return pairs


def transfer(model: CIAEModel, source: Source) -> dict:
    """Load what ``source`` has for ``model`` (see the module docstring). Returns {"source",
    "kind", "carried", "partly_carried" (name: rows carried of rows), "reinitialised",
    "dropped", "shared_categories" (COCO ids)}."""
    target = model.state_dict()
    if source.kind == "torchvision":
        carried = ["backbone." + k for k in load_torchvision_state(model.backbone, source.state, source.name)]
        return {"source": source.name, "kind": source.kind, "carried": carried, "partly_carried": {},
                "reinitialised": sorted(set(target) - set(carried)), "dropped": [], "shared_categories": []}

    names = model.category_names
    src_names = {int(k): v for k, v in source.category_names.items()} if source.category_names else None
    things = [("thing", c) for c in model.thing_ids]
    memory = memory_rows(model.stuff_ids, model.thing_ids, model.cfg.embedding.thing_mode)
    class_pairs = _shared_rows(things, [("thing", c) for c in source.thing_ids], names, src_names)
    memory_pairs = _shared_rows(memory, memory_rows(source.stuff_ids, source.thing_ids,
                                                    source.config["embedding"]["thing_mode"]), names, src_names)
    rows = {key: class_pairs for key in CLASS_ROWS} | {key: memory_pairs for key in MEMORY_ROWS}
    new, carried, partly, dropped = {}, [], {}, []
    for key, value in source.state.items():
        if key not in target:
            dropped.append(key)
        elif key in rows:
            ours = target[key].clone()
            if ours.shape[1:] != value.shape[1:]:
                dropped.append(key)
                continue
            for i, j in rows[key]:
                ours[i] = value[j]
            new[key] = ours
            if len(rows[key]) == len(ours) == len(value):
                carried.append(key)
            else:
                partly[key] = f"{len(rows[key])} of {len(ours)} rows"
        elif value.shape == target[key].shape:
            new[key] = value
            carried.append(key)
        else:
            dropped.append(key)
    backbone = [k for k in target if k.startswith("backbone.")]
    fit = sum(k in new for k in backbone)
    if fit < len(backbone) / 2:
        raise ValueError(f"{source.name} does not fit this config: its model is a "
                         f"{_architecture(source.config)}, this config's a {_architecture(model.cfg.to_dict())} "
                         f"({fit} of {len(backbone)} backbone tensors match)")
    model.load_state_dict(new, strict=False)
    shared = sorted({memory[i][1] for i, _ in memory_pairs if len(memory[i]) == 2}
                    | {things[i][1] for i, _ in class_pairs})
    return {"source": source.name, "kind": source.kind, "carried": sorted(carried), "partly_carried": partly,
            "reinitialised": sorted(set(target) - set(new)), "dropped": sorted(dropped),
            "shared_categories": shared}
