"""The KV data plane between real processes (tests/transport/peer.py) on every backend
this machine has: exact bytes in the destination blocks, nothing else touched, layers
landing one by one, a peer killed mid-transfer, bad ids and pools, shm cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvmesh.actors.base import Actor, ActorConfig, RemoteError
from kvmesh.kv.segment import HEADER_BYTES, SHM_DIR
from kvmesh.kv.segment import available as shm_available
from kvmesh.protocol import KvWrite
from kvmesh.transport import ucx
from kvmesh.transport.dataplane import (
    CHUNK_BYTES,
    DataPlaneHandlers,
    KVDataPlane,
    allocate_shared_pool,
)
from kvmesh.transport.shm import copy_blocks
from tests.transport.peer import PeerProcess, fill_pool, make_cuda_pool, make_layout

pytestmark = pytest.mark.timeout(60)

HEARTBEAT, LIVENESS = 0.2, 5
LIVENESS_TIMEOUT = HEARTBEAT * LIVENESS
DEATH_NOTICE = LIVENESS_TIMEOUT + HEARTBEAT + 1.0  # the next heartbeat tick, and slack
PEER_BLOCKS, OWN_BLOCKS = 16, 24  # the two pools differ in num_blocks only
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BACKENDS = [
    pytest.param("shm", marks=pytest.mark.skipif(not shm_available(), reason="no /dev/shm")),
    "zmq",
    pytest.param(
        "ucx", marks=pytest.mark.skipif(not ucx.available(), reason=f"ucxx: {ucx.import_error()}")
    ),
]
SRC, DST = [5, 0, 15, 7], [3, 23, 0, 8]  # peer -> own; reversed roles use DST -> SRC
SIDE_IDS = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def event_loop_for_the_module():
    """One event loop for every test here, as an actor process has: ucxx binds its
    context to the first loop that uses it."""
    global LOOP
    LOOP = asyncio.new_event_loop()
    yield
    LOOP.close()


def run(coro):
    return LOOP.run_until_complete(coro)


class Side(Actor):
    """The test's end: a pool (in shared memory unless shared=False) and its plane. Each
    has a fresh actor id: the module's peers outlive it, and the runtime's liveness of
    a previous Side must not reach this one."""

    role = "decode"  # KvPoolQuery and KvWrite come from workers only

    def __init__(
        self,
        dtype: torch.dtype,
        backend: str,
        shared: bool = True,
        device: str = "cpu",
        chunk_bytes: int = CHUNK_BYTES,
        require_grants: bool = False,
    ) -> None:
        super().__init__(
            ActorConfig(
                actor_id=f"test-{next(SIDE_IDS)}",
                heartbeat_interval=HEARTBEAT,
                liveness=LIVENESS,
                grace_period=1.0,
                linger=0.2,
            )
        )
        layout = make_layout(dtype, OWN_BLOCKS)
        if device != "cpu":
            self.kv_caches, segment = make_cuda_pool(layout, device), None
        elif shared:
            self.kv_caches, segment = allocate_shared_pool(layout, self.actor_id)
        else:
            segment = None
            self.kv_caches = [
                torch.empty((2, OWN_BLOCKS, *layout_tail()), dtype=dtype)
                for _ in range(layout.num_layers)
            ]
        fill_pool(self.kv_caches, seed=2)
        self.kv_plane = KVDataPlane(
            self,
            self.kv_caches,
            segment=segment,
            backend=backend,
            chunk_bytes=chunk_bytes,
            require_grants=require_grants,
        )
        DataPlaneHandlers(self.kv_plane).register(self)

    async def close(self) -> None:
        await super().close()
        await self.kv_plane.close()


def layout_tail() -> tuple[int, int, int]:
    layout = make_layout(torch.float32, 1)
    return layout.block_size, layout.num_kv_heads, layout.head_dim


@contextlib.asynccontextmanager
async def connected(peer: PeerProcess, dtype: torch.dtype, backend: str, **kwargs):
    async with Side(dtype, backend, **kwargs) as side:
        await side.connect("to_peer", peer.ready["endpoint"], timeout=10)
        yield side


async def event(peer: PeerProcess, name: str, timeout: float = 10.0) -> dict:
    """The peer's next event, read without blocking this side's event loop."""
    return await asyncio.to_thread(peer.expect, name, timeout)


def dump(peer: PeerProcess, path: Path, dtype: torch.dtype) -> list[torch.Tensor]:
    """The peer's pool as it is now."""
    peer.command(op="dump", path=str(path))
    peer.expect("dumped")
    data = torch.from_numpy(np.fromfile(path, dtype=np.uint8)).view(dtype)
    return list(data.view(4, 2, PEER_BLOCKS, *layout_tail()).clone().unbind(0))


def expected(before, src_caches, src_ids, dst_ids, layers=range(4)) -> list[torch.Tensor]:
    after = [cache.clone() for cache in before]
    for layer in layers:
        after[layer][:, dst_ids] = src_caches[layer][:, src_ids]
    return after


def assert_same_bytes(actual: list[torch.Tensor], wanted: list[torch.Tensor]) -> None:
    for layer, (a, w) in enumerate(zip(actual, wanted, strict=True)):
        a_bytes, w_bytes = a.view(torch.uint8), w.view(torch.uint8)
        if not torch.equal(a_bytes, w_bytes):
            bad = (a_bytes != w_bytes).nonzero()[:4].tolist()
            raise AssertionError(f"layer {layer} differs at [kv, block, ...] {bad}")


def segment_gone(name: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while (SHM_DIR / name).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def spawn_peer(tmp_path: Path, dtype: str, *args: str) -> PeerProcess:
    return PeerProcess(
        tmp_path,
        "--dtype",
        dtype,
        "--num-blocks",
        str(PEER_BLOCKS),
        "--heartbeat",
        str(HEARTBEAT),
        "--liveness",
        str(LIVENESS),
        *args,
    )


@pytest.fixture(scope="module", params=list(DTYPES))
def peer(request, tmp_path_factory):
    """One peer per dtype, shared by the exchange tests; exits cleanly at the end."""
    with spawn_peer(tmp_path_factory.mktemp("peer"), request.param) as proc:
        proc.dtype = DTYPES[request.param]
        yield proc
        proc.command(op="exit")
        assert proc.wait() == 0, proc.stderr()
        assert segment_gone(proc.ready["shm"]), f"{proc.ready['shm']} left after exit"


# --- exchange: exact bytes ---


@pytest.mark.cluster
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_to_peer(peer, backend, tmp_path):
    """This side's SRC blocks land in the peer's DST blocks; every other byte stays, and
    they are in place when write returns. One layer per chunk: zmq and ucx send 4
    KvWrites, 3 in flight, from reused buffers."""
    src, dst = DST, [3, 15, 0, 8]
    before = dump(peer, tmp_path / "before", peer.dtype)

    async def scenario():
        async with connected(peer, peer.dtype, backend, chunk_bytes=1) as side:
            await side.kv_plane.write("peer", f"to-{backend}", src, dst)
            link, _ = await side.kv_plane.link("peer")
            assert link.backend == backend
            return [cache.clone() for cache in side.kv_caches]

    own = run(scenario())
    after = dump(peer, tmp_path / "after", peer.dtype)
    assert_same_bytes(after, expected(before, own, src, dst))


@pytest.mark.cluster
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_from_peer(peer, backend, tmp_path):
    """The peer's SRC blocks land in this side's DST blocks, in place when the peer's
    write returns; every other byte stays."""
    source = dump(peer, tmp_path / "source", peer.dtype)

    async def scenario():
        async with connected(peer, peer.dtype, "auto") as side:
            before = [cache.clone() for cache in side.kv_caches]
            peer.command(op="write", to=side.actor_id, id="from", src=SRC, dst=DST, backend=backend)
            assert (await event(peer, "written"))["backend"] == backend
            assert_same_bytes(side.kv_caches, expected(before, source, SRC, DST))

    run(scenario())


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["zmq", "shm"])
def test_a_write_needs_a_grant_from_the_receiver(peer, backend, tmp_path):
    """Ungranted, or into blocks beyond the grant: refused before a byte is unpacked
    (zmq), the write fails at its sender; granted: it lands."""
    source = dump(peer, tmp_path / "source", peer.dtype)

    async def attempt(side, transfer_id: str) -> dict:
        peer.command(
            op="write", to=side.actor_id, id=transfer_id, src=SRC, dst=DST, backend=backend
        )
        return await asyncio.to_thread(peer.read_event, 10)

    async def scenario():
        async with connected(peer, peer.dtype, "auto", require_grants=True) as side:
            before = [cache.clone() for cache in side.kv_caches]
            ungranted = await attempt(side, "stranger")
            side.kv_plane.grant("peer", "short", DST[:-1])
            beyond = await attempt(side, "short")
            if backend == "zmq":  # shm copies into the mapped pool before its KvWrite
                assert_same_bytes(side.kv_caches, before)
            side.kv_plane.grant("peer", "granted", DST)
            granted = await attempt(side, "granted")
            assert_same_bytes(side.kv_caches, expected(before, source, SRC, DST))
            return ungranted, beyond, granted

    ungranted, beyond, granted = run(scenario())
    assert (ungranted["event"], ungranted["type"]) == ("error", "RemoteError")
    assert ungranted["message"].endswith(
        "forbidden: KvWrite of transfer 'stranger' from 'peer': no such transfer was granted to it"
    )
    assert (
        beyond["event"] == "error" and f"blocks [{DST[-1]}] were not granted" in beyond["message"]
    )
    assert granted["event"] == "written"


@pytest.mark.cluster
@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_land_one_by_one(peer, backend, tmp_path):
    """A layer-by-layer write: layers 0-1 are in place (2-3 untouched) before 2 is sent."""
    source = dump(peer, tmp_path / "source", peer.dtype)

    async def scenario():
        async with connected(peer, peer.dtype, "auto") as side:
            before = [cache.clone() for cache in side.kv_caches]
            peer.command(
                op="write",
                to=side.actor_id,
                id="layers",
                src=SRC,
                dst=DST,
                backend=backend,
                pause_after=2,
            )
            await event(peer, "paused")
            assert_same_bytes(side.kv_caches, expected(before, source, SRC, DST, range(2)))
            peer.command(op="resume", id="layers")
            await event(peer, "written")
            assert_same_bytes(side.kv_caches, expected(before, source, SRC, DST))

    run(scenario())


# --- a peer killed mid-transfer ---


@pytest.mark.cluster
@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_killed_mid_transfer(backend, tmp_path):
    """Half the layers landed, then SIGKILL: the receiver keeps what landed and nothing
    else (it learns of the failure from the request that asked for the transfer, not
    from the data plane), and the dead peer's segment is unlinked for it."""
    with spawn_peer(tmp_path, "float32") as peer:
        source = dump(peer, tmp_path / "source", torch.float32)

        async def scenario():
            async with connected(peer, torch.float32, "auto") as side:
                before = [cache.clone() for cache in side.kv_caches]
                peer.command(
                    op="write",
                    to=side.actor_id,
                    id="doomed",
                    src=SRC,
                    dst=DST,
                    backend=backend,
                    pause_after=2,
                )
                await event(peer, "paused")
                peer.kill()
                assert_same_bytes(side.kv_caches, expected(before, source, SRC, DST, range(2)))

        run(scenario())
        assert segment_gone(peer.ready["shm"]), "the killed peer's segment is still there"


@pytest.mark.cluster
@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_killed_mid_transfer(backend, tmp_path):
    """The receiver dies while the blocks are on their way: write raises ConnectionError
    within the liveness timeout."""
    with spawn_peer(tmp_path, "float32", "--stall-receive") as peer:

        async def scenario() -> float:
            async with connected(peer, torch.float32, backend) as side:
                write = asyncio.ensure_future(side.kv_plane.write("peer", "doomed", DST, SRC))
                await event(peer, "stalled")
                peer.kill()
                start = time.monotonic()
                with pytest.raises(ConnectionError, match="peer 'peer'"):
                    await write
                return time.monotonic() - start

        assert run(scenario()) < DEATH_NOTICE


# --- errors at the boundary ---


@pytest.mark.cluster
@pytest.mark.parametrize(
    "src, dst, layers, message",
    [
        ([0, 24], [0, 1], None, r"src_block_ids out of range \[0, 24\): \[24\]"),
        ([0, 1], [0, 16], None, r"dst_block_ids out of range \[0, 16\): \[16\]"),
        ([0, 1], [2, 2], None, r"dst_block_ids must be distinct, repeated: \[2\]"),
        ([0, 1], [2], None, "src_block_ids has 2 ids, dst_block_ids 1"),
        ([[0]], [[1]], None, "src_block_ids must be a 1-D sequence of ints"),
        ([0], [1], range(3, 5), r"layers must be a non-empty range\(a, b\) within \[0, 4\)"),
    ],
)
def test_bad_write_names_the_field(peer, src, dst, layers, message):
    async def scenario():
        async with connected(peer, peer.dtype, "zmq") as side:
            with pytest.raises(ValueError, match=message):
                await side.kv_plane.write("peer", "bad", src, dst, layers=layers)

    run(scenario())


@pytest.mark.cluster
def test_pools_of_another_layout_are_refused(peer):
    other = torch.float32 if peer.dtype == torch.bfloat16 else torch.bfloat16
    want = f"another KV pool layout: dtype is {peer.dtype} there, {other} here"

    async def scenario():
        async with connected(peer, other, "auto") as side:
            with pytest.raises(ValueError, match=want):
                await side.kv_plane.write("peer", "bad", [0], [0])

    run(scenario())


@pytest.mark.cluster
def test_receiver_checks_what_comes_off_the_wire(peer):
    """A malformed KvWrite is refused by the receiver, naming the field."""

    async def scenario():
        async with connected(peer, peer.dtype, "zmq") as side:
            bad = KvWrite(
                transfer_id="x", block_ids=[99], first_layer=0, num_layers=4, backend="shm"
            )
            with pytest.raises(RemoteError, match=r"KvWrite.block_ids out of range \[0, 16\)"):
                await side.request("peer", bad, timeout=5)
            bad = KvWrite(
                transfer_id="x", block_ids=[1], first_layer=0, num_layers=4, backend="zmq"
            )
            with pytest.raises(RemoteError, match="exactly 1 extra frame, got 0"):
                await side.request("peer", bad, timeout=5)

    run(scenario())


@pytest.mark.cluster
def test_forced_shm_to_an_unshared_pool_names_the_setting(peer):
    async def scenario():
        async with connected(peer, peer.dtype, "auto", shared=False) as side:
            peer.command(op="write", to=side.actor_id, id="x", src=[0], dst=[0], backend="shm")
            got = await asyncio.to_thread(peer.expect, "error")
            assert got["type"] == "ValueError"
            assert got["message"] == (
                f"backend 'shm' cannot reach peer {side.actor_id!r}: the "
                "peer offers no shared-memory pool"
            )

    run(scenario())


def test_unknown_backend_setting_is_refused():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'shm', 'zmq', 'ucx'"):
        KVDataPlane(None, [torch.zeros(2, 1, 1, 1, 1)], backend="tcp")


# --- shared memory: one copy, cleanup ---


def test_segment_is_unlinked_on_close():
    layout = make_layout(torch.float32, 4)
    kv_caches, segment = allocate_shared_pool(layout, "closer")
    name = segment.name
    assert (SHM_DIR / name).stat().st_size == HEADER_BYTES + layout.pool_bytes
    plane = KVDataPlane(None, kv_caches, segment=segment)
    run(plane.close())
    assert not (SHM_DIR / name).exists()


def make_pools(dtype, num_blocks, one_allocation, seed):
    shape = (2, num_blocks, *layout_tail())
    if one_allocation:
        pools = list(torch.empty((4, *shape), dtype=dtype).unbind(0))
    else:
        pools = [torch.empty(shape, dtype=dtype) for _ in range(4)]
    fill_pool(pools, seed)
    return pools


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
@pytest.mark.parametrize("src_one, dst_one", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("layers", [range(4), range(1, 3)])
def test_copy_blocks_is_exact(dtype, src_one, dst_one, layers):
    src = make_pools(dtype, PEER_BLOCKS, src_one, seed=1)
    dst = make_pools(dtype, OWN_BLOCKS, dst_one, seed=2)
    want = expected(dst, src, SRC, DST, layers)
    copy_blocks(src, np.array(SRC), dst, np.array(DST), layers)
    assert_same_bytes(dst, want)


@pytest.mark.cluster
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_cuda_pools_exchange_blocks(backend, tmp_path):
    """CUDA pools on one host: shm is CUDA IPC (the peer's storages opened here), zmq
    goes through host staging; bytes exact both ways."""
    with spawn_peer(tmp_path, "bfloat16", "--device", "cuda") as peer:
        source = dump(peer, tmp_path / "source", torch.bfloat16)

        async def scenario():
            async with connected(peer, torch.bfloat16, backend, device="cuda") as side:
                link, _ = await side.kv_plane.link("peer")
                assert link.backend == backend
                before = [cache.cpu() for cache in side.kv_caches]
                peer.command(
                    op="write", to=side.actor_id, id="from", src=SRC, dst=DST, backend=backend
                )
                await event(peer, "written")
                got = [cache.cpu() for cache in side.kv_caches]
                assert_same_bytes(got, expected(before, source, SRC, DST))
                await side.kv_plane.write("peer", "to", DST, [1, 2, 3, 4])
                return got

        own = run(scenario())
        after = dump(peer, tmp_path / "after", torch.bfloat16)
        assert_same_bytes(after, expected(source, own, DST, [1, 2, 3, 4]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copy_blocks_on_cuda_is_exact():
    src = [t.cuda() for t in make_pools(torch.bfloat16, PEER_BLOCKS, True, seed=1)]
    dst = [t.cuda() for t in make_pools(torch.bfloat16, OWN_BLOCKS, False, seed=2)]
    want = expected(dst, src, SRC, DST)
    copy_blocks(src, np.array(SRC), dst, np.array(DST), range(4))
    assert_same_bytes(dst, want)
