"""What a labeling job reads: a folder of images, a list file, or prepared shards.

``open_source(uri)`` tells them apart (a folder with ``manifest.json`` is shards, another folder
is a folder of images, a file is a list) and lists the images in input order as
:class:`InputImage` records. Paths are local or filesystem URIs (``pipeline.coco.resolve``).

* Folder: the files directly inside it with an image extension (``IMAGE_EXTENSIONS``), sorted
  by name.
* List file: one path or URI per line, in file order; blank lines and lines starting with ``#``
  are skipped; a relative path is relative to the list file's folder.
* Shards: every row of the manifest's shards, in shard order; the image bytes stay in the
  shards until ``read_shard_images`` fetches those of a batch.

**Keys.** An image's ``key`` is its file stem (``000000139`` for ``000000139.jpg``); outputs
are named after it (``panoptic/<key>.png``), so two inputs with one stem are an error.

**Image ids.** Shards: the row's ``image_id``. Folders and lists: with a ground-truth JSON, the
id of the ground-truth image with the same file name (base name); inputs the ground truth lacks
get max(ground-truth id) + 1, + 2, ... in input order. Without one: the stem as a number when
every stem is a decimal number (COCO's ``000000000139.jpg`` -> 139), else 1, 2, ... in input
order. Either way, the same input gives the same ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import coco
from pipeline.shards import MANIFEST, read_manifest, shard_paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class InputImage:
    """One image to label. ``uri``: where to read it (a path or URI; None for a shard row,
    whose bytes live in ``shard``)."""

    key: str
    image_id: int
    file_name: str
    uri: str | None = None
    shard: str | None = None


@dataclass
class ImageSource:
    """The images of an input, in input order. ``kind``: "folder", "list" or "shards";
    ``categories``: the manifest's COCO categories for shards, else None."""

    uri: str
    kind: str
    images: list[InputImage]
    categories: list[dict] | None = None
    shard_paths: list[str] = field(default_factory=list)


def stem(file_name: str) -> str:
    return os.path.splitext(os.path.basename(file_name))[0]


def _check_unique(uri: str, images: list[InputImage]) -> None:
    seen: dict[str, InputImage] = {}
    clashes = []
    for im in images:
        if im.key in seen:
            clashes.append(f"{seen[im.key].uri or seen[im.key].file_name} and {im.uri or im.file_name}")
        seen[im.key] = im
    if clashes:
        raise coco.DatasetError(f"{uri}: {len(clashes)} inputs share a file stem, which names their "
                                f"outputs: {'; '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}")
    by_id: dict[int, InputImage] = {}
    for im in images:
        if im.image_id in by_id:
            raise coco.DatasetError(f"{uri}: {by_id[im.image_id].file_name} and {im.file_name} "
                                    f"both get image id {im.image_id}")
        by_id[im.image_id] = im


def assign_ids(file_names: list[str], gt_ids: dict[str, int] | None = None) -> list[int]:
    """Image ids of files in input order (rules in the module docstring). ``gt_ids``: the
    ground truth's file name -> image id."""
    if gt_ids:
        next_id = max(gt_ids.values()) + 1
        ids = []
        for name in file_names:
            if os.path.basename(name) in gt_ids:
                ids.append(gt_ids[os.path.basename(name)])
            else:
                ids.append(next_id)
                next_id += 1
        return ids
    stems = [stem(n) for n in file_names]
    if stems and all(s.isdecimal() for s in stems):
        return [int(s) for s in stems]
    return list(range(1, len(file_names) + 1))


def _from_files(uri: str, kind: str, uris: list[str], gt_ids: dict[str, int] | None) -> ImageSource:
    names = [os.path.basename(u.rstrip("/")) for u in uris]
    ids = assign_ids(names, gt_ids)
    images = [InputImage(stem(n), i, n, uri=u) for n, i, u in zip(names, ids, uris)]
    _check_unique(uri, images)
    return ImageSource(uri, kind, images)


def _list_folder(fs: pafs.FileSystem, path: str, uri: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path))
    names = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.File and i.base_name.lower().endswith(IMAGE_EXTENSIONS))
    return [coco.join(uri, n) for n in names]


def _read_list(fs: pafs.FileSystem, path: str, uri: str) -> list[str]:
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    out = []
    for line in coco.read_bytes(fs, path).decode("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        absolute = "://" in line or os.path.isabs(line)
        out.append(line if absolute else coco.join(base, line))
    return out


def _from_shards(uri: str) -> ImageSource:
    manifest = read_manifest(uri)
    fs, _ = coco.resolve(uri)
    paths = shard_paths(uri, manifest)
    images = []
    for p in paths:
        _, path = coco.resolve(p)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["image_id", "file_name"])
        for iid, name in zip(table["image_id"].to_pylist(), table["file_name"].to_pylist()):
            images.append(InputImage(stem(name), int(iid), name, shard=p))
    _check_unique(uri, images)
    return ImageSource(uri, "shards", images, categories=manifest["categories"], shard_paths=paths)


def open_source(uri: str, gt_ids: dict[str, int] | None = None) -> ImageSource:
    """List the images of a folder, list file or shards folder (see the module docstring).

    ``gt_ids``: file name -> image id from a ground-truth JSON (folders and lists only).
    Raises DatasetError when the input is missing, empty or has clashing stems."""
    fs, path = coco.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise coco.DatasetError(f"{uri}: no such file or folder")
    if info.type == pafs.FileType.Directory:
        if fs.get_file_info(coco.join(path, MANIFEST)).type == pafs.FileType.File:
            source = _from_shards(uri)
        else:
            source = _from_files(uri, "folder", _list_folder(fs, path, uri), gt_ids)
    else:
        source = _from_files(uri, "list", _read_list(fs, path, uri), gt_ids)
    if not source.images:
        raise coco.DatasetError(f"{uri}: no images (a folder needs files ending in "
                                f"{', '.join(IMAGE_EXTENSIONS)})")
    return source


def read_image_file(uri: str) -> bytes:
    """The bytes of one image file; a missing or unreadable file raises OSError naming it."""
    fs, path = coco.resolve(uri)
    try:
        return coco.read_bytes(fs, path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: file not found") from None


def read_shard_images(shard_uri: str, image_ids: list[int]) -> dict[int, bytes]:
    """image id -> encoded image bytes of the given rows of one shard. Only the row groups
    whose image-id range holds a wanted id are read (shards are written in image-id order)."""
    fs, path = coco.resolve(shard_uri)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=["image_id", "image"],
                              filters=[("image_id", "in", [int(i) for i in image_ids])])
    return dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist()))
