"""Object storage for Ray Train runs: `train.storage_path` may be a folder or an `s3://` / `gs://` URI.

pyarrow resolves the URI (`s3://bucket/prefix`, with `?endpoint_override=host:port&scheme=http` for an
S3-compatible server such as MinIO); credentials come only from the environment (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, GOOGLE_APPLICATION_CREDENTIALS), never from the experiment file,
so they are never logged as params.
"""

from __future__ import annotations

from pathlib import Path

from slam_ray.errors import SlamError


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
