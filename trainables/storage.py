"""Where checkpoints live: a folder (local disk, or NFS that every node mounts) or a bucket.

A location is a ``Path`` or a URI string that ``pyarrow.fs`` understands (``s3://bucket/prefix``, ``gs://...``,
``abfs://...``; Ray Train's ``storage_path`` accepts the same). Credentials and endpoints come from the
environment of every node, as for Ray (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` for an S3-compatible
server, ...). On a bucket an object appears whole or not at all, so a single upload is the atomic commit that
``os.replace`` is on a filesystem. pyarrow is imported only for a bucket: the training core stays free of it.
"""

from __future__ import annotations

from pathlib import Path

Location = Path | str

BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")


def is_bucket(location: Location) -> bool:
    return isinstance(location, str) and "://" in location


def as_location(value: str | Path) -> Location:
    """A bucket URI stays a string; anything else is a folder path."""
    return value if is_bucket(value) else Path(value)


def bucket_scheme_error(uri: str) -> str | None:
    """Why ``uri`` cannot be checkpoint storage, or None when its scheme is one pyarrow.fs serves."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in BUCKET_SCHEMES:
        return f"{uri}: unknown storage scheme {scheme!r}; use a folder or one of " + ", ".join(
            f"{s}://" for s in BUCKET_SCHEMES
        )
    if not uri.split("://", 1)[1].strip("/"):
        return f"{uri}: name a bucket ({scheme}://BUCKET/PREFIX)"
    return None


def child(location: Location, *names: str) -> Location:
    """``location / name / ...`` for a folder or a bucket URI."""
    if is_bucket(location):
        return "/".join([location.rstrip("/"), *names])
    return Path(location).joinpath(*names)


def sibling(location: Location, suffix: str) -> Location:
    """The location ``location`` + ``suffix`` (``checkpoint.pt`` -> ``checkpoint.pt.prev``)."""
    return location + suffix if is_bucket(location) else Path(location).with_name(Path(location).name + suffix)


def _filesystem(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)  # (filesystem, path inside it)


def exists(location: Location) -> bool:
    if not is_bucket(location):
        return Path(location).is_file()
    import pyarrow.fs

    fs, path = _filesystem(location)
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def read_bytes(location: Location) -> bytes:
    if not is_bucket(location):
        return Path(location).read_bytes()
    fs, path = _filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def upload(data: bytes, location: str) -> None:
    """Write ``data`` as the object ``location`` in one upload: readers see the old object or the new one."""
    fs, path = _filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def copy(source: str, dest: str) -> None:
    """Copy one object to another inside the same bucket (server-side)."""
    fs, path = _filesystem(source)
    fs.copy_file(path, _filesystem(dest)[1])


def subfolders(location: Location, prefix: str) -> list[Location]:
    """The folders directly under ``location`` whose names start with ``prefix``."""
    if not is_bucket(location):
        return [p for p in Path(location).glob(prefix + "*") if p.is_dir()]
    import pyarrow.fs

    fs, path = _filesystem(location)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    return [
        child(location, info.base_name)
        for info in infos
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(prefix)
    ]


def local_copy(location: Location, folder: Path) -> Path:
    """A local file holding ``location``: the file itself, or the object downloaded into ``folder``."""
    if not is_bucket(location):
        return Path(location)
    dest = Path(folder) / location.rstrip("/").rsplit("/", 1)[-1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(read_bytes(location))
    return dest


def check_reachable(uri: str) -> str | None:
    """Why the bucket of ``uri`` cannot be used from here (one line), or None when it can be listed."""
    import pyarrow.fs

    try:
        fs, path = _filesystem(uri)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            return f"{uri}: bucket {bucket!r} does not exist"
        fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError) as exc:
        return f"{uri}: {error_line(exc)}"
    return None


def error_line(exc: Exception) -> str:
    """A storage error in one line: pyarrow's S3 errors run over several (the first one, else the class)."""
    return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
