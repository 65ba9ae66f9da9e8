"""Object storage: `workdir` (every stage output), `train.storage_path` (Ray Train runs) and `extract.inputs`
(audio folders, globs and manifests) may be `s3://` / `gs://` URIs as well as local paths.

A *location* is a local path or a URI. Stages write small files into a local folder (`local_path`: the
location itself, or this machine's staging copy under `$SLAM_RAY_CACHE`, default ~/.cache/slam_ray) and
`publish` them; actors write audio straight to its location (`write_bytes`); a process on any node that needs
a file or folder calls `localize`, which fetches a remote one into its own staging copy once.

pyarrow resolves the URI (`s3://bucket/prefix`, with `?endpoint_override=host:port&scheme=http` for an
S3-compatible server such as MinIO); credentials come only from the environment (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, GOOGLE_APPLICATION_CREDENTIALS), never from the experiment file,
so they are never logged as params.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import posixpath
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slam_ray.errors import SlamError

if TYPE_CHECKING:
    from slam_ray.config import Experiment

_FILESYSTEMS: dict[tuple[str, str, str], Any] = {}  # (scheme, bucket, query) -> pyarrow filesystem, per process


def is_remote(uri: str | Path | None) -> bool:
    return bool(uri) and "://" in str(uri) and not str(uri).startswith("file://")


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
    # One per bucket: Arrow resolves an S3 filesystem's region from the bucket of the URI it was made from, so
    # one shared by two buckets in two regions would send one of them to the wrong region (HTTP 301).
    scheme, path, query = _parts(uri)
    key = (scheme, path.split("/", 1)[0], query)
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = filesystem(uri)[0]
    return _FILESYSTEMS[key], path


def glob_match(path: str, pattern: str) -> bool:
    """Whether `path` matches `pattern` as `glob.glob(pattern, recursive=True)` matches files: `*`, `?`, `[...]`
    within one path segment (not across `/`, not a leading `.`), `**` any number of segments, none included."""
    def match(names: list[str], parts: list[str]) -> bool:
        if not parts:
            return not names
        if parts[0] == "**":
            return any(match(names[i:], parts[1:]) for i in range(len(names) + 1)
                       if all(not n.startswith(".") for n in names[:i]))
        if not names or (names[0].startswith(".") and not parts[0].startswith(".")):
            return False
        return fnmatch.fnmatchcase(names[0], parts[0]) and match(names[1:], parts[1:])

    return match(path.strip("/").split("/"), pattern.strip("/").split("/"))


def open_input(uri: str):
    """A seekable binary file (pyarrow NativeFile) of an object; soundfile and pandas read it directly."""
    fs, path = _cached_filesystem(uri)
    return fs.open_input_file(path)


def _file_infos(uri: str) -> tuple[str, list[Any]] | None:
    """(root, pyarrow FileInfo of every object) under a folder URI (recursively), of a single object, or
    matching a glob (`s3://bucket/audio/**/*.flac`), in path order; None when nothing is at the URI."""
    import pyarrow.fs

    fs, path = _cached_filesystem(uri)
    glob_at = min((path.index(c) for c in "*?[" if c in path), default=None)
    root = path[:glob_at].rsplit("/", 1)[0] if glob_at is not None else path.rstrip("/")
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.File:
        files = [info]
        root = posixpath.dirname(root)
    elif info.type == pyarrow.fs.FileType.Directory:
        selector = pyarrow.fs.FileSelector(root, recursive=True)
        files = [i for i in fs.get_file_info(selector) if i.type == pyarrow.fs.FileType.File]
    else:
        return None
    if glob_at is not None:
        files = [f for f in files if glob_match(f.path, path)]  # as a local glob matches (recursive)
    return root, sorted(files, key=lambda f: f.path)


def list_files(uri: str) -> list[tuple[str, str]]:
    """(path relative to the folder, file URI) of the objects under a folder URI (recursively), of a single
    object, or matching a glob (`s3://bucket/audio/**/*.flac`); the URI's query (endpoint etc.) is kept on
    every file."""
    scheme, _, query = _parts(uri)
    root, files = _file_infos(uri) or ("", [])
    return [(f.path[len(root):].lstrip("/"), _uri(scheme, f.path, query)) for f in files]


def listing(uri: str) -> list[tuple[str, int, int]] | None:
    """(relative path, size, mtime in ns) of what `list_files` lists, what a stage key knows of a bucket
    input (an object rewritten in place gets a new modification time); None when nothing is at the URI."""
    found = _file_infos(uri)
    if found is None:
        return None
    root, files = found
    return [(f.path[len(root):].lstrip("/"), f.size, f.mtime_ns or 0) for f in files]


def resolve_relative(uri: str, relative: str) -> str:
    """A path from a manifest at `uri`: URIs and absolute paths as given, others relative to its folder."""
    if "://" in relative or relative.startswith("/"):
        return relative
    scheme, path, query = _parts(uri)
    return _uri(scheme, posixpath.normpath(posixpath.join(posixpath.dirname(path), relative)), query)


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...` for a local path or a URI (the URI's query stays at the end)."""
    if not is_remote(location):
        return str(Path(location, *parts))
    scheme, path, query = _parts(location)
    return _uri(scheme, posixpath.join(path, *parts), query)


def parent(location: str) -> str:
    """The folder holding `location` (a local path or a URI, whose query stays at the end)."""
    if not is_remote(location):
        return str(Path(location).parent)
    scheme, path, query = _parts(location)
    return _uri(scheme, posixpath.dirname(path.rstrip("/")), query)


def s3_client(location: str):
    """(boto3 S3 client, bucket, key) for an s3:// location, with the endpoint, scheme and region of its
    query as pyarrow reads them, and credentials from the environment: for what pyarrow's filesystem cannot
    do (conditional writes: the cross-node lock of slam_ray/core/lock.py)."""
    try:
        import boto3
    except ImportError as e:
        raise SlamError("a workdir in s3:// needs boto3 for its lock across nodes: pip install boto3") from e
    from urllib.parse import parse_qsl

    _, path, query = _parts(location)
    params = dict(parse_qsl(query))
    endpoint = params.get("endpoint_override")
    url = f"{params.get('scheme', 'https')}://{endpoint}" if endpoint else None
    bucket, _, key = path.partition("/")
    return boto3.client("s3", endpoint_url=url, region_name=params.get("region")), bucket, key


def in_filesystem(root: str, path: str) -> str:
    """The location of `path` inside the filesystem of `root` (a Ray Train checkpoint's path in a bucket)."""
    if not is_remote(root):
        return path
    scheme, _, query = _parts(root)
    return _uri(scheme, path, query)


def cache_root() -> Path:
    return Path(os.environ.get("SLAM_RAY_CACHE") or Path.home() / ".cache" / "slam_ray").expanduser()


def local_path(location: str) -> Path:
    """Where `location` lives on this machine: itself when local, else its staging copy in the cache (the
    query, e.g. an endpoint, keys a folder of its own)."""
    if not is_remote(location):
        return Path(location)
    scheme, path, query = _parts(location)
    where = scheme + (f"-{hashlib.sha256(query.encode()).hexdigest()[:8]}" if query else "")
    return cache_root() / where / path


def _info(location: str):
    fs, path = _cached_filesystem(location)
    return fs, path, fs.get_file_info(path)


def exists(location: str) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    import pyarrow.fs

    return _info(location)[2].type != pyarrow.fs.FileType.NotFound


def read_text(location: str) -> str | None:
    """A small file's text, None when it does not exist."""
    if not is_remote(location):
        path = Path(location)
        return path.read_text() if path.is_file() else None
    if not exists(location):
        return None
    with open_input(location) as f:
        return f.read().decode()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file: a local one under a temporary name renamed into place; an object is only visible
    once its upload completes, so neither is ever seen half-written."""
    if not is_remote(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    fs, path = _cached_filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def _remote_sizes(location: str) -> dict[str, int]:
    """{relative path: size} of the files under a remote folder (or of the one file at it, as "")."""
    import pyarrow.fs

    fs, path, info = _info(location)
    if info.type == pyarrow.fs.FileType.File:
        return {"": info.size}
    if info.type != pyarrow.fs.FileType.Directory:
        return {}
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    return {i.path[len(path):].lstrip("/"): i.size for i in found if i.type == pyarrow.fs.FileType.File}


def localize(location: str) -> Path:
    """A local file or folder holding what is at `location`: the path itself when local; for a URI its staging
    copy, completed with every remote file it lacks (files of a stage are written once, never changed)."""
    local = local_path(location)
    if not is_remote(location):
        return local
    fs, path = _cached_filesystem(location)
    for relative, size in _remote_sizes(location).items():
        target = local / relative if relative else local
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        with fs.open_input_stream(posixpath.join(path, relative) if relative else path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        tmp.replace(target)
    return local


def publish(location: str, relative: str = "") -> None:
    """Upload the local staging copy of `location/relative`: a file always (a manifest is rewritten in place),
    a folder's files unless already there with the same size; nothing to do for a local location."""
    if not is_remote(location):
        return
    target = join(location, relative) if relative else location
    local = local_path(target)
    if not local.exists():
        return
    present = _remote_sizes(target) if local.is_dir() else {}
    fs, path = _cached_filesystem(target)
    files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file() and not f.name.startswith("."))
    for file in files:
        relative_file = "" if file == local else file.relative_to(local).as_posix()
        if present.get(relative_file) == file.stat().st_size:
            continue
        remote = posixpath.join(path, relative_file) if relative_file else path
        try:
            with open(file, "rb") as src, fs.open_output_stream(remote) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        except BaseException:
            # pyarrow commits a stream it closes on the way out of an error (Ctrl+C, `ray job stop`): a truncated
            # object would pass for a finished shard (and be fetched over the good local copy) or an empty manifest
            with contextlib.suppress(Exception):
                fs.delete_file(remote)
            raise


def workdir_location(exp: Experiment) -> str:
    """The experiment's workdir as given when it is in object storage, else its absolute local path."""
    if exp.workdir and is_remote(exp.workdir):
        return exp.workdir
    return str(Path(exp.workdir or Path("slam_runs") / exp.name).absolute())


def workdir_path(exp: Experiment) -> Path:
    """The workdir on this machine: itself, or the staging copy of a workdir in object storage (where the
    default MLflow store, sweep state and caches of fetched files live)."""
    return local_path(workdir_location(exp))


def run_storage(exp, out, stage: str) -> dict:
    """RunConfig's name / storage_path / storage_filesystem for a stage's Ray Train run: the stage folder by
    default (in the bucket when `workdir` is one); under `train.storage_path` (a shared folder or a bucket) a
    name unique to experiment and stage key."""
    name = f"{exp.name}-{stage}-{out.key}" if exp.train.storage_path else stage
    where = storage_root(exp, out)
    if is_remote(where):
        fs, root = filesystem(where)
        return {"name": name, "storage_path": root, "storage_filesystem": fs}
    return {"name": name, "storage_path": str(Path(where).expanduser().absolute())}


def storage_root(exp, out) -> str:
    """The location under which a stage's Ray Train checkpoint paths live."""
    return exp.train.storage_path or out.location("ray")


def model_source(name: str) -> str:
    """What `from_pretrained` takes for a model given as an HF id, a folder, or a folder in object storage
    (fetched to this machine once)."""
    return str(localize(name)) if is_remote(name) else name
