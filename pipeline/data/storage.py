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

Requests follow the work on an object store: a folder there is the prefix of the names under
it, so ``create_folder`` writes no marker object there. On S3 (pyarrow's ``S3FileSystem``) a
file is read with one GET, where pyarrow's Python API (25.0) asks for its size with a HEAD
first; a file of up to ``SPOOL_BYTES`` is written with one PUT, where pyarrow's stream makes a
multipart upload of three requests; and ``delete_file`` / ``delete_folder`` delete without the
HEAD before and the folder marker after that pyarrow adds. A botocore client with the
filesystem's endpoint, region, credentials and TLS settings (``_s3_client``) makes those
requests, pyarrow everything else.

Credentials and endpoints come the way the cloud's own tools take them: for S3,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or ``~/.aws``, instance roles),
``AWS_REGION`` and ``AWS_ENDPOINT_URL`` for another S3 server (pyarrow's ``from_uri`` reads it).
Error messages pass through ``redact``: no credential given in a URI or the environment is shown.
Job-internal files and folders (manifests, plans, parts) are named with a leading ``_`` for the
same reason (``INTERNAL``).

S3 answers 503 SlowDown, 500 and dropped connections under load, so every request is retried on
purpose, by pyarrow (``_bucket_filesystem``'s ``S3FileSystem``, which keeps its retries when
pickled to Ray workers, Ray Train's storage included) and botocore (``s3_retries``) alike, and by
MLflow's boto3 (``s3_retry_environment``): ``S3_MAX_ATTEMPTS`` = 7 attempts in AWS's standard
mode (before retry k a random wait of up to 2**(k-1) s, at most 20 s; a client that sees mostly
failures stops retrying), ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` winning when set. Under 5%
failed requests a request then fails for good once in 1.3e9 (0.05**7), and a job of 250,000
requests (COCO's train set prepared and labeled) finishes with 99.98% certainty, where 3 attempts
(pyarrow's ``S3FileSystem`` default, which a pickled one falls back to, and boto3's standard
mode's) fail a job of 10,000 requests with 71% odds; a store that keeps failing is given up after
~30 s (at most 51 s) per request, the job ending with one line naming the object (``s3_uris``).

pyarrow is imported on first use: a command that reads only local files (``read_uri``) starts
without it (~70 ms on the 2-core VM).
"""

from __future__ import annotations

import atexit
import errno
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
            fs, path = pafs.FileSystem.from_uri(uri)
            if fs.type_name == "s3":        # credentials in the URI: no cache, the same retries
                fs = _retrying_s3(fs.__reduce__()[1][0], s3_max_attempts())
            return fs, path
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
    _release_at_exit()
    fs = pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))[0]
    if fs.type_name != "s3":
        return fs
    return _retrying_s3(fs.__reduce__()[1][0], s3_max_attempts())    # from_uri's settings, our retries


@functools.cache
def _release_at_exit() -> None:
    """Drop the cached filesystems before pyarrow finalizes S3 at exit (its handler, registered
    when ``pyarrow.fs`` is imported, runs after ours): an S3 filesystem destroyed after that can
    crash the exiting process (apache/arrow#38352; seen once here, a CLI exiting with SIGSEGV)."""
    atexit.register(_bucket_filesystem.cache_clear)


# S3's retries, chosen for 5% failed requests (the module's docstring; README, "Running on a cluster")
S3_RETRY_MODE = "standard"
S3_MAX_ATTEMPTS = 7


def s3_max_attempts() -> int:
    """Attempts per S3 request, the first included: ``AWS_MAX_ATTEMPTS`` when set, else ours."""
    return int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)


def s3_retries() -> dict:
    """The same retries as botocore's ``Config(retries=...)``."""
    return {"mode": os.environ.get("AWS_RETRY_MODE") or S3_RETRY_MODE, "max_attempts": s3_max_attempts()}


def s3_retry_environment() -> None:
    """Give the boto3 clients this process makes elsewhere (MLflow's S3 artifact store, which
    takes no config) our retries, unless the environment sets its own."""
    os.environ.setdefault("AWS_RETRY_MODE", S3_RETRY_MODE)
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(S3_MAX_ATTEMPTS))


def _retrying_s3(options: dict, attempts: int) -> pafs.S3FileSystem:
    """pyarrow's ``S3FileSystem`` with ``options`` (its pickled settings) and AWS's standard
    retries of ``attempts``, kept when it is pickled (Ray Train sends its storage filesystem to
    the workers so; pyarrow's own pickling drops the retry strategy)."""
    import pyarrow.fs as pafs

    fs = _retrying_s3_class()(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
    fs.max_attempts = attempts
    return fs


@functools.cache
def _retrying_s3_class() -> type:
    import pyarrow.fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        def __reduce__(self):
            return _retrying_s3, (super().__reduce__()[1][0], self.max_attempts)

    return RetryingS3FileSystem


# how pyarrow's S3 errors name an object
_PYARROW_S3_OBJECT = re.compile(r"key '([^']*)' in bucket '([^']*)'")


def s3_uris(text: str) -> str:
    """``text`` with the objects pyarrow's S3 errors name (``key 'K' in bucket 'B'``) as URIs
    (``s3://B/K``), as the user gave them."""
    return _PYARROW_S3_OBJECT.sub(r"s3://\2/\1", text)


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


def create_folder(fs: pafs.FileSystem, path: str) -> None:
    """Create the folder ``path`` with its parents on a file system; nothing on an object store,
    where a folder is the prefix of the names under it (pyarrow's ``create_dir`` there writes an
    empty marker object for each level: requests, and a name no job wrote)."""
    if not is_object_store(fs):
        fs.create_dir(path, recursive=True)


# the settings of a pyarrow S3FileSystem that its botocore twin (``_s3_client``) takes over
_S3_SETTINGS = ("access_key", "secret_key", "session_token", "anonymous", "region", "scheme",
                "endpoint_override", "connect_timeout", "request_timeout", "force_virtual_addressing",
                "tls_ca_file_path")


def _s3_client(fs: pafs.FileSystem):
    """A botocore S3 client with the settings of ``fs`` when it is pyarrow's ``S3FileSystem``
    (one per settings and process), else None; None too for settings it would not carry over
    (an assumed role, a proxy, metadata for new objects), which pyarrow keeps serving. Its
    retries are ``s3_retries()``, as pyarrow's."""
    if fs.type_name != "s3":
        return None
    options = fs.__reduce__()[1][0]        # the settings the filesystem is pickled with
    if options["role_arn"] or (options["proxy_options"] or {}).get("host") or options["default_metadata"]:
        return None
    return _botocore_s3(tuple((k, options[k]) for k in _S3_SETTINGS), tuple(s3_retries().items()))


@functools.lru_cache(maxsize=16)
def _botocore_s3(settings: tuple, retries: tuple):
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    s = dict(settings)
    endpoint = s["endpoint_override"] or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{s['scheme']}://{endpoint}"
    # pyarrow addresses buckets by path at an endpoint of one's own, unless told otherwise
    config = {"s3": {"addressing_style": "virtual" if s["force_virtual_addressing"] or not endpoint else "path"},
              "retries": dict(retries)}
    if s["anonymous"]:
        config["signature_version"] = UNSIGNED
    if s["connect_timeout"] > 0:
        config["connect_timeout"] = s["connect_timeout"]
    if s["request_timeout"] > 0:
        config["read_timeout"] = s["request_timeout"]
    return botocore.session.Session().create_client(
        "s3", region_name=s["region"] or None, endpoint_url=endpoint, use_ssl=s["scheme"] != "http",
        verify=s["tls_ca_file_path"] or None, aws_access_key_id=s["access_key"] or None,
        aws_secret_access_key=s["secret_key"] or None, aws_session_token=s["session_token"] or None,
        config=Config(**config))


@contextmanager
def _s3_errors(path: str):
    """botocore's errors as pyarrow's: FileNotFoundError for a missing object or bucket, else OSError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(errno.ENOENT, "Path does not exist", path) from None
        raise OSError(f"s3://{path}: {e}") from None
    except BotoCoreError as e:
        raise OSError(f"s3://{path}: {e}") from None


def _put_once(fs: pafs.FileSystem, path: str, body, size: int) -> bool:
    """Upload ``body`` (bytes or a binary file at its start) of ``size`` bytes to ``path`` with
    one PUT when ``fs`` is S3 and ``size`` is at most ``SPOOL_BYTES``; whether it did."""
    client = _s3_client(fs) if size <= SPOOL_BYTES else None
    if client is None:
        return False
    bucket, _, key = path.partition("/")
    with _s3_errors(path):
        client.put_object(Bucket=bucket, Key=key, Body=body)
    return True


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    """Delete one file. On S3 one DELETE, and a missing file is no error (pyarrow asks with a
    HEAD first, and after the DELETE writes a marker object for the folder, lest it vanish)."""
    client = _s3_client(fs)
    if client is None:
        fs.delete_file(path)
        return
    bucket, _, key = path.partition("/")
    with _s3_errors(path):
        client.delete_object(Bucket=bucket, Key=key)


def delete_folder(fs: pafs.FileSystem, path: str) -> None:
    """Delete a folder and everything under it. On S3 a listing and a DELETE per 1,000 objects
    (pyarrow adds a HEAD, a DELETE of the folder's marker and a marker object for its parent)."""
    client = _s3_client(fs)
    if client is None:
        fs.delete_dir(path)
        return
    bucket, _, key = path.partition("/")
    with _s3_errors(path):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                failed = client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True}).get("Errors")
                if failed:
                    raise OSError(f"{path}: {len(failed)} objects not deleted, e.g. {failed[0]}")


def absolute(uri: str | None) -> str | None:
    """A URI as it is, a local path made absolute (for processes with another working folder)."""
    return uri if uri is None or "://" in uri else os.path.abspath(uri)


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The bytes of one file (on S3 one GET, no HEAD before it: ``_s3_client``)."""
    client = _s3_client(fs)
    if client is None:
        with fs.open_input_stream(path) as f:
            return f.read()
    bucket, _, key = path.partition("/")
    with _s3_errors(path):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()


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
    one go when the block ends without an exception (nothing uploaded when it raises): on S3 one
    PUT up to ``SPOOL_BYTES``, beyond that (and elsewhere) pyarrow's upload stream."""
    if is_object_store(fs):
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, prefix="ciae-spool-") as spool:
            yield spool
            size = spool.seek(0, os.SEEK_END)
            spool.seek(0)
            if not _put_once(fs, path, spool, size):
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
    upload of the bytes, no spool: on S3 one PUT up to ``SPOOL_BYTES``)."""
    if is_object_store(fs):
        if not _put_once(fs, path, data, len(data)):
            with fs.open_output_stream(path) as out:
                out.write(data)
        return
    with open_atomic(fs, path) as f:
        f.write(data)


def write_uri(uri: str, data: bytes) -> None:
    """``write_bytes_atomic`` to a local path or URI, creating its folder (``create_folder``)."""
    fs, path = resolve(uri)
    create_folder(fs, path.rpartition("/")[0])
    write_bytes_atomic(fs, path, data)


@contextmanager
def parquet_file(uri: str):
    """A ``pyarrow.parquet.ParquetFile`` over one file given by a local path or URI (row groups,
    footer metadata), open for the block; a storage error in it names the file."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            yield pq.ParquetFile(f)
    except OSError as e:       # pyarrow's errors of a read (GetObject of a range) name no object
        if path in str(e):
            raise
        raise OSError(f"{public_uri(uri)}: {e}") from e


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of one Parquet file, or of a folder read as a dataset (its Parquet files, the
    names starting with ``.`` or ``_`` skipped, as pandas and Spark do), given by a local path
    or URI (``columns`` only, if given). On an object store a file is read whole, with one
    request on S3 (``read_bytes``), and a name without an object taken for a folder."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    if is_object_store(fs):
        try:
            return pq.ParquetFile(pa.BufferReader(read_bytes(fs, path))).read(columns=columns)
        except FileNotFoundError:
            pass
    elif file_type(fs, path) != pafs.FileType.Directory:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read(columns=columns)
    return ds.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)


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
