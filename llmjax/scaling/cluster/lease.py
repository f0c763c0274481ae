"""The claim protocol of a sweep's workers: one lease per point, in `DIR/.leases/<point>.lease`.

A worker owns a point while its lease names the worker's token. Operations (each atomic on the
storage it runs on, so that two workers never hold one point):

- `claim`: create the lease exclusively. On a POSIX file system (local, or shared: NFS, Lustre,
  GPFS) the JSON is written to a private temporary file and hard-linked to the lease path
  (`link` fails when the path exists, like O_CREAT|O_EXCL, and the lease is never seen half
  written); on gs:// (`GCSLeases`) an upload with `if_generation_match=0`.
- `heartbeat`: refresh the lease's time while the point trains (the file's mtime; on gs:// a
  rewrite conditional on the generation read). It returns False when the lease is no longer the
  worker's (taken over after it went stale): the worker then stops training the point.
- `take_over`: a lease whose heartbeat is older than the lease time is stale (its worker was
  killed, its node lost): exactly one claimer wins it. Locally the winner is the one that
  creates `<point>.takeover.<token of the stale lease>` exclusively; it then re-reads the lease
  (still the stale token?) and replaces it atomically (`rename`). On gs:// it re-reads the lease
  (still the stale token, still stale?) and writes its own conditional on the generation read.
- `release`: delete the lease (after the DONE or FAILED marker is written, or when a worker is
  stopped and leaves the point to the next claimer).

`failures` counts the failed tries of a point and keeps the last error line (written only by the
lease holder, after a heartbeat that proved the lease still its own). `add_failure` increments it:
locally a rename under the lease (one holder at a time); on gs:// a compare-and-swap on the counter
object's generation (`ifGenerationMatch`, retried on a conflict), so that even a holder whose lease
was taken over between its last heartbeat and the write cannot overwrite another's increment: no
failed try is lost and none counted twice.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LEASES = ".leases"


@dataclass
class Lease:
    """Who holds a point: `token` is unique per claim; `claimed` is the claim's wall-clock time."""

    point: str
    worker: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    claimed: float = field(default_factory=time.time)

    def dumps(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def loads(point: str, data: bytes) -> Lease:
        try:
            d = json.loads(data)
            return Lease(point, str(d["worker"]), str(d["token"]), str(d.get("host", "?")), int(d.get("pid", 0)),
                         float(d.get("claimed", 0.0)))
        except (ValueError, KeyError, TypeError):  # unreadable: a lease nobody can heartbeat
            return Lease(point, "?", "unreadable-" + data.hex()[:32], "?", 0, 0.0)


class LocalLeases:
    """Leases on a POSIX file system (`DIR/.leases`); see the module docstring."""

    def __init__(self, sweep_dir: str | Path):
        self.dir = Path(sweep_dir) / LEASES
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, point: str) -> Path:
        return self.dir / f"{point}.lease"

    def _tmp(self, data: bytes) -> Path:
        tmp = self.dir / f".tmp.{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        return tmp

    def read(self, point: str) -> tuple[Lease, float] | None:
        """(the lease, seconds since its last heartbeat), or None when the point is not leased."""
        path = self._path(point)
        try:
            data, mtime = path.read_bytes(), path.stat().st_mtime
        except FileNotFoundError:
            return None
        return Lease.loads(point, data), max(0.0, time.time() - mtime)

    def claim(self, lease: Lease) -> bool:
        tmp = self._tmp(lease.dumps())
        try:
            os.link(tmp, self._path(lease.point))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def take_over(self, stale: Lease, lease: Lease, lease_seconds: float) -> bool:
        marker = self.dir / f"{stale.point}.takeover.{stale.token}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False  # another claimer took this stale lease over
        now = self.read(stale.point)
        if now is None or now[0].token != stale.token or now[1] <= lease_seconds:
            marker.unlink(missing_ok=True)  # released, or its worker came back: not stale after all
            return False
        os.replace(self._tmp(lease.dumps()), self._path(lease.point))
        return True

    def heartbeat(self, lease: Lease) -> bool:
        now = self.read(lease.point)
        if now is None or now[0].token != lease.token:
            return False
        os.utime(self._path(lease.point))
        return True

    def release(self, lease: Lease) -> None:
        now = self.read(lease.point)
        if now is not None and now[0].token == lease.token:
            self._path(lease.point).unlink(missing_ok=True)
        for marker in self.dir.glob(f"{lease.point}.takeover.*"):
            marker.unlink(missing_ok=True)

    def failures(self, point: str) -> tuple[int, str]:
        """(failed tries of the point so far, the last one's error line)."""
        try:
            d = json.loads((self.dir / f"{point}.failures").read_text())
            return int(d["failures"]), str(d.get("error", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return 0, ""

    def set_failures(self, point: str, n: int, error: str) -> None:
        os.replace(self._tmp(json.dumps({"failures": n, "error": error}).encode()), self.dir / f"{point}.failures")

    def add_failure(self, point: str, error: str) -> int:
        """Count one more failed try of `point` (its lease holder only); the new count."""
        n = self.failures(point)[0] + 1
        self.set_failures(point, n, error)
        return n


class GCSLeases:
    """Leases on gs:// through google-cloud-storage's generation preconditions (module docstring).

    Every change of a lease is an upload conditional on the generation read (`ifGenerationMatch`; 0:
    create only), so of two workers that read the same generation at most one write lands. The age of
    a lease is the time since its object was last written (`updated`, the store's clock). Tested
    against fake-gcs-server (tests/scaling/test_cluster_gcs.py), which honours the precondition on
    uploads but not on deletes: `release` therefore re-reads the lease and deletes it only when it
    still holds the worker's token (and, on GCS, only at the generation read). `client`: a
    google.cloud.storage Client (default: one from the environment's credentials; the client honours
    STORAGE_EMULATOR_HOST)."""

    def __init__(self, sweep_dir: str, client: Any = None):
        from google.cloud import storage  # type: ignore[attr-defined,import-untyped,unused-ignore]  # the gcs extra (gcsfs needs it)

        from llmjax.storage import any_path

        bucket, _, prefix = sweep_dir.removeprefix("gs://").partition("/")
        self.bucket = (client or storage.Client()).bucket(bucket)
        self.dir = any_path(sweep_dir.rstrip("/")) / LEASES  # the journal and broadcast files (llmjax.storage)
        self.prefix = f"{prefix.strip('/')}/{LEASES}/" if prefix.strip("/") else f"{LEASES}/"
        self._generation: dict[str, int] = {}

    def _blob(self, name: str) -> Any:
        return self.bucket.blob(self.prefix + name)

    def read(self, point: str) -> tuple[Lease, float] | None:
        """(the lease, seconds since it was last written), or None; remembers the generation read. One
        metadata request: the lease rides in the object's custom metadata too, so its token, generation
        and time are one snapshot (no window between reading the metadata and the bytes)."""
        blob = self.bucket.get_blob(self.prefix + f"{point}.lease")
        if blob is None:
            return None
        lease = Lease.loads(point, str((blob.metadata or {}).get("lease", "")).encode())
        self._generation[lease.token] = blob.generation
        return lease, max(0.0, time.time() - blob.updated.timestamp())

    def _write(self, lease: Lease, generation: int) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        blob = self._blob(f"{lease.point}.lease")
        blob.metadata = {"lease": lease.dumps().decode()}
        try:
            blob.upload_from_string(lease.dumps(), content_type="application/json", if_generation_match=generation)
        except PreconditionFailed:
            return False
        self._generation[lease.token] = blob.generation
        return True

    def claim(self, lease: Lease) -> bool:
        return self._write(lease, 0)

    def take_over(self, stale: Lease, lease: Lease, lease_seconds: float) -> bool:
        now = self.read(stale.point)
        if now is None or now[0].token != stale.token or now[1] <= lease_seconds:
            return False  # released, or its worker came back: not stale after all
        return self._write(lease, self._generation[stale.token])

    def heartbeat(self, lease: Lease) -> bool:
        return lease.token in self._generation and self._write(lease, self._generation[lease.token])

    def release(self, lease: Lease) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        now = self.read(lease.point)
        if now is None or now[0].token != lease.token:
            return  # not ours any more
        try:
            self._blob(f"{lease.point}.lease").delete(if_generation_match=self._generation[lease.token])
        except (NotFound, PreconditionFailed):
            pass

    def failures(self, point: str) -> tuple[int, str]:
        blob = self.bucket.get_blob(self.prefix + f"{point}.failures")
        try:
            d = json.loads(blob.download_as_bytes()) if blob is not None else {"failures": 0}
            return int(d["failures"]), str(d.get("error", ""))
        except (ValueError, KeyError, TypeError):
            return 0, ""

    def set_failures(self, point: str, n: int, error: str) -> None:
        self._blob(f"{point}.failures").upload_from_string(json.dumps({"failures": n, "error": error}))

    def add_failure(self, point: str, error: str) -> int:
        """Count one more failed try of `point`: read the counter and its generation, write n + 1 conditional
        on that generation (0: create only), again on a conflict; the new count."""
        from google.api_core.exceptions import PreconditionFailed

        while True:
            blob = self.bucket.get_blob(self.prefix + f"{point}.failures")
            generation = 0 if blob is None else blob.generation
            try:
                n = int(json.loads(blob.download_as_bytes())["failures"]) if blob is not None else 0
            except (ValueError, KeyError, TypeError):
                n = 0
            try:
                self._blob(f"{point}.failures").upload_from_string(
                    json.dumps({"failures": n + 1, "error": error}), if_generation_match=generation)
                return n + 1
            except PreconditionFailed:
                continue  # another write landed between our read and our write: count on top of it


Leases = LocalLeases | GCSLeases


def leases(sweep_dir: Any) -> Leases:
    """The lease store of a sweep directory: gs://... -> GCSLeases, else LocalLeases."""
    if os.fspath(sweep_dir).startswith("gs://"):
        return GCSLeases(os.fspath(sweep_dir))
    return LocalLeases(os.fspath(sweep_dir))


__all__ = ["LEASES", "GCSLeases", "Lease", "Leases", "LocalLeases", "leases"]
