"""Object storage: `train.storage_path` (Ray Train runs) and `extract.inputs` (audio folders, globs and
manifests) may be `s3://` / `gs://` URIs as well as local paths.

pyarrow resolves the URI (`s3://bucket/prefix`, with `?endpoint_override=host:port&scheme=http` for an
S3-compatible server such as MinIO); credentials come only from the environment (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, GOOGLE_APPLICATION_CREDENTIALS), never from the experiment file,
so they are never logged as params.
"""

from __future__ import annotations

import fnmatch
import posixpath
from pathlib import Path
from typing import Any

from slam_ray.errors import SlamError

_FILESYSTEMS: dict[tuple[str, str], Any] = {}  # (scheme, query) -> pyarrow filesystem, one per process


def is_remote(uri: str | None) -> bool:
    return bool(uri) and "://" in uri and not uri.startswith("file://")


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a storage URI; a clear error when it cannot be reached."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses
        raise SlamError(f"storage {uri!r}: {e}. Give s3://bucket/prefix or gs://bucket/prefix, with credentials "
                        "in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)") from e


def _parts(uri: str) -> tuple[str, str, str]:
    """`s3://bucket/key?query` -> ("s3", "bucket/key", "query")."""
    base, _, query = uri.partition("?")
    scheme, _, path = base.partition("://")
    return scheme, path, query


def _uri(scheme: str, path: str, query: str) -> str:
    return f"{scheme}://{path}" + (f"?{query}" if query else "")


def _cached_filesystem(uri: str):
    scheme, path, query = _parts(uri)
    if (scheme, query) not in _FILESYSTEMS:
        _FILESYSTEMS[scheme, query] = filesystem(uri)[0]
    return _FILESYSTEMS[scheme, query], path


def open_input(uri: str):
    """A seekable binary file (pyarrow NativeFile) of an object; soundfile and pandas read it directly."""
    fs, path = _cached_filesystem(uri)
    return fs.open_input_file(path)


def list_files(uri: str) -> list[tuple[str, str]]:
    """(path relative to the folder, file URI) of the objects under a folder URI (recursively), of a single
    object, or matching a glob (`s3://bucket/audio/**/*.flac`); the URI's query (endpoint etc.) is kept on
    every file."""
    import pyarrow.fs

    fs, path = _cached_filesystem(uri)
    scheme, _, query = _parts(uri)
    glob_at = min((path.index(c) for c in "*?[" if c in path), default=None)
    root = path[:glob_at].rsplit("/", 1)[0] if glob_at is not None else path.rstrip("/")
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.File:
        files = [root]
        root = posixpath.dirname(root)
    elif info.type == pyarrow.fs.FileType.Directory:
        selector = pyarrow.fs.FileSelector(root, recursive=True)
        files = [i.path for i in fs.get_file_info(selector) if i.type == pyarrow.fs.FileType.File]
    else:
        files = []
    if glob_at is not None:
        files = [f for f in files if fnmatch.fnmatchcase(f, path)]
    return [(f[len(root):].lstrip("/"), _uri(scheme, f, query)) for f in sorted(files)]


def resolve_relative(uri: str, relative: str) -> str:
    """A path from a manifest at `uri`: URIs and absolute paths as given, others relative to its folder."""
    if "://" in relative or relative.startswith("/"):
        return relative
    scheme, path, query = _parts(uri)
    return _uri(scheme, posixpath.normpath(posixpath.join(posixpath.dirname(path), relative)), query)


def download(uri: str, path: str, target: Path) -> Path:
    """Copy the folder `path` of the storage `uri`'s filesystem to the local folder `target` (once)."""
    import pyarrow.fs

    if (target / "config.json").is_file():
        return target
    fs, _ = filesystem(uri)
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    tmp.replace(target)
    return target


def run_storage(exp, out, stage: str) -> dict:
    """RunConfig's name / storage_path / storage_filesystem for a stage's Ray Train run: the stage folder by
    default; under `train.storage_path` (a shared folder or a bucket) a name unique to experiment and stage key."""
    where = exp.train.storage_path
    if not where:
        return {"name": stage, "storage_path": str(out.path / "ray")}
    name = f"{exp.name}-{stage}-{out.key}"
    if is_remote(where):
        fs, root = filesystem(where)
        return {"name": name, "storage_path": root, "storage_filesystem": fs}
    return {"name": name, "storage_path": str(Path(where).expanduser().absolute())}
