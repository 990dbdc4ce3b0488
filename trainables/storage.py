"""Where trials keep their files: a local (or NFS) folder or an S3-compatible bucket, through ``pyarrow.fs``.

A sweep's trial files (Tune's experiment state, checkpoints, each trial's ``run/`` files and ``error.json``)
live in its storage, which every node of a cluster must reach; the driver's results root keeps what only the
driver writes (Parquet tables, MLflow's SQLite, reports). Default: the results root itself (one machine).

    clmim sweep space.yaml --storage /mnt/nfs/clmim                        # a path every node mounts
    clmim sweep space.yaml --storage s3://bucket/clmim --storage-endpoint http://127.0.0.1:9000

S3 credentials come from the usual places (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an
instance role) on every node; the endpoint from ``--storage-endpoint`` or ``AWS_ENDPOINT_URL``. A ``Storage``
holds strings only, so it pickles into trial processes, which build their own filesystem client.
"""

from __future__ import annotations

import functools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from trainables.errors import UserError, excerpt


@functools.lru_cache(maxsize=8)
def _filesystem(uri: str, endpoint: str | None):
    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem()
    kw = {}
    if endpoint:
        e = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kw = {"endpoint_override": e.netloc, "scheme": e.scheme}
    # a wrong endpoint or a dead server fails in seconds with a clear error, not after minutes of retries
    return pafs.S3FileSystem(region=os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
                             connect_timeout=5, request_timeout=30,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3), **kw)


@dataclass(frozen=True)
class Storage:
    """One storage location: ``uri`` an absolute local path or ``s3://bucket/prefix``; ``endpoint`` an S3 endpoint
    URL (``http://host:port``) or None for AWS's own."""

    uri: str
    endpoint: str | None = None

    @classmethod
    def parse(cls, uri: str | None, endpoint: str | None, default: Path) -> Storage:
        """``--storage``/``--storage-endpoint`` as given (None: ``default``, the results root); a ``UserError``
        for anything but a path or an ``s3://bucket[/prefix]`` URI."""
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        if not uri:
            return cls(str(default))
        u = urlparse(uri)
        if u.scheme == "s3":
            if not u.netloc or any(p in (".", "..") for p in u.path.split("/")):
                raise UserError(f"--storage: {excerpt(uri, 80)} is not s3://BUCKET[/PREFIX]")
            if endpoint and urlparse(endpoint).scheme not in ("http", "https"):
                raise UserError(f"--storage-endpoint: {excerpt(endpoint, 80)} is not an http:// or https:// URL")
            return cls(f"s3://{u.netloc}{u.path.rstrip('/')}", endpoint)
        if u.scheme and u.scheme != "file" and len(u.scheme) > 1:  # (a Windows drive letter is not a scheme)
            raise UserError(f"--storage: {u.scheme}:// is not supported; use a path every node mounts or "
                            "s3://BUCKET/PREFIX (S3-compatible: AWS, MinIO, Ceph, GCS's S3 API)")
        return cls(str(Path(u.path if u.scheme == "file" else uri).expanduser().resolve()), None)

    # -------------------------------------------------------------------------------------- paths
    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    @property
    def fs(self):
        """The ``pyarrow.fs`` filesystem (one client per process and location)."""
        return _filesystem(self.uri, self.endpoint)

    def path(self, *parts: str) -> str:
        """A path on ``fs`` (no scheme): the location joined with ``parts``."""
        base = self.uri[len("s3://"):] if not self.is_local else self.uri
        return "/".join([base.rstrip("/"), *parts])

    def display(self, path: str) -> str:
        """``path`` as a user writes it (``s3://...`` or the local path)."""
        return path if self.is_local else f"s3://{path}"

    # -------------------------------------------------------------------------------------- files
    def read_bytes(self, path: str) -> bytes | None:
        """The file's bytes; None if it does not exist."""
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if "does not exist" in str(e) or "NoSuchKey" in str(e) or "Path does not exist" in str(e):
                return None
            raise

    def read_text(self, path: str) -> str | None:
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", errors="replace")

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so no reader sees half of it (local: a temporary file renamed over; S3: one PUT)."""
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode())

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def listdir(self, path: str) -> list[str]:
        """Names of the folders directly under ``path`` (sorted; [] if it does not exist)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def size(self, path: str) -> int:
        """Bytes of the file ``path``, or of every file under the folder ``path`` (0 if none)."""
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return info.size or 0
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return 0
        return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)

    def delete(self, path: str) -> None:
        """Remove a folder and everything in it (nothing if it does not exist)."""
        try:
            self.fs.delete_dir(path)
        except FileNotFoundError:
            pass

    def delete_file(self, path: str) -> None:
        """Remove one file (nothing if it does not exist)."""
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if "does not exist" not in str(e) and "NoSuchKey" not in str(e):
                raise

    def rename(self, src: str, dst: str) -> None:
        """Move one file (S3: copy then delete)."""
        self.fs.move(src, dst)

    def upload(self, local_dir: Path, path: str) -> None:
        """Copy a local folder's files into ``path``."""
        self.fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download(self, path: str, local_dir: Path) -> Path:
        """Copy the files under ``path`` into a local folder; return the folder."""
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local_dir), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    def check_writable(self, flag: str = "--storage") -> None:
        """Write and remove a marker file; a ``UserError`` naming the location and the reason if that fails (a
        missing bucket, wrong credentials, an unreachable endpoint), before any expensive work starts."""
        marker = self.path(f".clmim-write-test-{uuid.uuid4().hex[:8]}")
        try:
            if self.is_local:
                Path(self.uri).mkdir(parents=True, exist_ok=True)
            self.write_bytes(marker, b"ok")
            self.fs.delete_file(marker)
        except (OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            where = f" (endpoint {self.endpoint})" if self.endpoint else ""
            raise UserError(f"{flag}: cannot write to {self.uri}{where}: {reason}") from None

    def to_dict(self) -> dict:
        return {"uri": self.uri, "endpoint": self.endpoint}
