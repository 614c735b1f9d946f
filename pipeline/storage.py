"""Files on a local disk or behind a filesystem URI (s3://, gs://, file://, any fsspec protocol):
one way to open, read, write atomically and list them.

Paths are ``str``: a local path or a URI. ``resolve`` turns one into a pyarrow filesystem and a
path on it; the helpers take that pair, or a URI (``read_uri``, ``write_uri``, ``read_parquet``,
``parquet_file``). Writes go to a hidden temporary name beside the target (``.NAME.tmp-PID-RAND``:
a leading dot, so that pyarrow, pandas and Spark reading the folder as a dataset skip it) and
are moved into place (``write_bytes_atomic``, ``open_atomic``), so a reader never sees half a
file; the temporary names contain ``TMP_MARK`` so that a job can clean up after a killed run.
Job-internal files and folders (manifests, plans, parts) are named with a leading ``_`` for the
same reason (``INTERNAL``).
pyarrow is imported on first use: a command that reads only local files (``read_uri``) starts
without it (~70 ms on the 2-core VM).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

TMP_MARK = ".tmp-"
INTERNAL = "_"        # prefix of job-internal names, skipped by dataset readers


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a pyarrow/fsspec URI -> (pyarrow filesystem, path on it)."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError):  # pyarrow.ArrowInvalid for a scheme it has no native filesystem for
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def absolute(uri: str | None) -> str | None:
    """A URI as it is, a local path made absolute (for processes with another working folder)."""
    return uri if uri is None or "://" in uri else os.path.abspath(uri)


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_uri(uri: str) -> bytes:
    """The bytes of one file given by a local path or a URI."""
    if "://" not in uri:
        with open(uri, "rb") as f:
            return f.read()
    return read_bytes(*resolve(uri))


def temporary_name(path: str) -> str:
    """A hidden name beside ``path`` for writing it: ``DIR/.NAME.tmp-PID-RAND``."""
    folder, _, name = path.rpartition("/")
    return f"{folder}/.{name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"


@contextmanager
def open_atomic(fs: pafs.FileSystem, path: str):
    """A stream to write ``path`` through: it goes to ``temporary_name(path)`` and is moved into
    place when the block ends without an exception (removed when it raises)."""
    tmp = temporary_name(path)
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
    fs.move(tmp, path)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a temporary name beside ``path``, then move it into place."""
    with open_atomic(fs, path) as f:
        f.write(data)


def write_uri(uri: str, data: bytes) -> None:
    """``write_bytes_atomic`` to a local path or URI, creating its folder."""
    fs, path = resolve(uri)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    write_bytes_atomic(fs, path, data)


@contextmanager
def parquet_file(uri: str):
    """A ``pyarrow.parquet.ParquetFile`` over one file given by a local path or URI (row groups,
    footer metadata), open for the block."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        yield pq.ParquetFile(f)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of one Parquet file, or of a folder read as a dataset (its Parquet files, the
    names starting with ``.`` or ``_`` skipped, as pandas and Spark do), given by a local path
    or URI (``columns`` only, if given)."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    if file_type(fs, path) == pafs.FileType.Directory:
        return ds.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
    with parquet_file(uri) as file:
        return file.read(columns=columns)


def file_type(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def list_folder(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The entries directly inside a folder; none when it does not exist."""
    import pyarrow.fs as pafs

    try:
        return fs.get_file_info(pafs.FileSelector(path))
    except FileNotFoundError:
        return []


def remove_temporaries(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Delete the temporary files of interrupted writes directly inside ``folder``; returns
    their names."""
    import pyarrow.fs as pafs

    removed = []
    for info in list_folder(fs, folder):
        if TMP_MARK in info.base_name and info.type == pafs.FileType.File:
            fs.delete_file(info.path)
            removed.append(info.base_name)
    return removed
