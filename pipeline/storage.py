"""Files on a local disk or behind a filesystem URI (s3://, gs://, file://, any fsspec protocol):
one way to open, read, write atomically and list them.

Paths are ``str``: a local path or a URI. ``resolve`` turns one into a pyarrow filesystem and a
path on it; the helpers take that pair, or a URI (``read_uri``, ``write_uri``, ``read_parquet``,
``parquet_file``). A write is whole or absent (``write_bytes_atomic``, ``open_atomic``), so a
reader never sees half a file:

* on a file system (a local disk, ``memory://``, HDFS, ...) it goes to a hidden temporary name
  beside the target (``.NAME.tmp-PID-RAND``: a leading dot, so that pyarrow, pandas and Spark
  reading the folder as a dataset skip it) and is moved into place; the temporary names contain
  ``TMP_MARK`` so that a job can clean up after a killed run;
* on an object store (``is_object_store``: S3, GCS, Azure, natively or through fsspec), which has
  no atomic rename (pyarrow's move there is a copy and a delete), it is one upload under the
  final name, started only once the writer is done: the bytes are gathered in a spool
  (``tempfile.SpooledTemporaryFile``: memory up to ``SPOOL_BYTES``, beyond that node-local
  scratch in the system's temporary folder, removed when the write ends). An upload (one PUT, or
  a multipart upload completed on close) makes the object appear whole or not at all, and an
  exception in the writer uploads nothing. (Closing a pyarrow S3 output stream commits what was
  written, even after an exception, and pyarrow offers no abort: hence the spool.)

Credentials and endpoints come the way the cloud's own tools take them: for S3,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or ``~/.aws``, instance roles),
``AWS_REGION`` and ``AWS_ENDPOINT_URL`` for another S3 server (pyarrow's ``from_uri`` reads it).
Error messages pass through ``redact``: no credential given in a URI or the environment is shown.
Job-internal files and folders (manifests, plans, parts) are named with a leading ``_`` for the
same reason (``INTERNAL``).
pyarrow is imported on first use: a command that reads only local files (``read_uri``) starts
without it (~70 ms on the 2-core VM).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

TMP_MARK = ".tmp-"
INTERNAL = "_"        # prefix of job-internal names, skipped by dataset readers
SPOOL_BYTES = 64 * 2**20   # an object-store write held in memory up to this, then in a local file
# protocols without an atomic rename: a write there is one upload under the final name
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2"})
# environment variables whose values never appear in our error messages (``redact``)
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                    "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^@\s]*@")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a pyarrow/fsspec URI -> (pyarrow filesystem, path on it)."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        parts = urlsplit(uri)
        if parts.scheme in BUCKET_SCHEMES and "@" not in uri:    # one filesystem per bucket, not per file
            env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(BUCKET_ENV)))
            fs = _bucket_filesystem(parts.scheme, parts.netloc, parts.query, env)
            return fs, (parts.netloc + unquote(parts.path)).rstrip("/")
        try:
            return pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError):  # pyarrow.ArrowInvalid for a scheme it has no native filesystem for
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
            return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    except (ValueError, OSError, ImportError) as e:    # the URI may carry credentials: never show them
        raise ValueError(f"{redact(uri)}: cannot open it ({redact(str(e))})") from None


# pyarrow's bucket filesystems: making one asks the endpoint for the bucket's region (a request,
# 40-90 ms), so ``resolve`` keeps one per bucket, its URI options and the environment they read
# (not for a URI with credentials in it: pyarrow parses those, and its errors are redacted)
BUCKET_SCHEMES = ("s3", "gs", "gcs")
BUCKET_ENV = ("AWS_", "GOOGLE_", "GCS_")


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str, query: str, env: tuple) -> pafs.FileSystem:
    import pyarrow.fs as pafs

    del env     # in the key only: new credentials or endpoint, a new filesystem
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))[0]


def public_uri(uri: str | None) -> str | None:
    """``uri`` as it may be recorded (manifests, plans, MLflow params): the user part of any URI
    in it (``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``) hidden; the same for the same URI."""
    return None if uri is None else _USERINFO.sub(r"\g<scheme>***@", uri)


def redact(text: str) -> str:
    """``text`` without credentials: ``public_uri`` of it, and the values of ``SECRET_VARIABLES``
    set in the environment hidden."""
    text = public_uri(text)
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def is_object_store(fs: pafs.FileSystem) -> bool:
    """Whether ``fs`` is an object store (no atomic rename): pyarrow's S3, GCS and Azure file
    systems, or an fsspec one of ``OBJECT_STORE_PROTOCOLS`` wrapped by ``resolve``."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.PyFileSystem):
        protocol = getattr(getattr(fs.handler, "fs", None), "protocol", ())
        protocols = {protocol} if isinstance(protocol, str) else set(protocol)
        return bool(protocols & OBJECT_STORE_PROTOCOLS)
    return fs.type_name in OBJECT_STORE_PROTOCOLS


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
    """A stream to write ``path`` through, whole or not at all. On a file system it goes to
    ``temporary_name(path)`` and is moved into place when the block ends without an exception
    (removed when it raises); on an object store it goes to a spool, uploaded under ``path`` in
    one go when the block ends without an exception (nothing uploaded when it raises)."""
    if is_object_store(fs):
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, prefix="ciae-spool-") as spool:
            yield spool
            spool.seek(0)
            with fs.open_output_stream(path) as out:
                shutil.copyfileobj(spool, out, 8 * 2**20)
        return
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
    """Write ``data`` to ``path`` whole or not at all (``open_atomic``; on an object store one
    upload of the bytes, no spool)."""
    if is_object_store(fs):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
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
