"""The Actor runtime between real processes (tests/actors/echo_actor.py) and in one
process: request-reply, PUB/SUB, PUSH/PULL, extra frames, the versioned handshake,
liveness, garbage on every socket, SIGTERM/SIGINT drain, CurveZMQ."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal

import msgspec
import pytest
import structlog.testing
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from kvmesh.actors.base import (
    Actor,
    ActorConfig,
    Inbound,
    PeerDeadError,
    RemoteError,
    Retry,
    any_peer,
)
from kvmesh.protocol import (
    PROTOCOL_VERSION,
    AllBlocksCleared,
    BlockStored,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Message,
    Ping,
    Pong,
    Shutdown,
    Welcome,
    decode,
    encode,
)
from kvmesh.transport.keys import KeyRing, generate
from tests.actors.echo_actor import EchoProcess

pytestmark = pytest.mark.timeout(60)

MARKER = BlockStored(block_hashes=[0])  # sync traffic; payloads use hashes >= 1
ECHO_MAX_SIZE = 65536  # the echo actor's --max-size default
ECHO_MAX_FRAME = 4 << 20  # its --max-frame default
FRAMES = [  # extra frames: empty, small, 1 MiB random, a memoryview of a bytearray
    b"",
    bytes(range(256)),
    random.Random(0).randbytes(1 << 20),
    memoryview(bytearray(b"\x07" * 100_000)),
]


def make_config(actor_id: str = "probe", **overrides) -> ActorConfig:
    settings = dict(heartbeat_interval=0.1, liveness=10, grace_period=2.0, linger=0.5)
    return ActorConfig(actor_id=actor_id, **{**settings, **overrides})


def make_block(n: int) -> BlockStored:
    return BlockStored(block_hashes=[n])


class Probe(Actor):
    """The test's side: opens the sockets it is given, records what it hears."""

    role = "probe"
    senders = {}  # the runtime alone is tested here: no role may send only some messages

    def __init__(self, config: ActorConfig, sockets: list[tuple] = ()) -> None:
        super().__init__(config)
        self.socket_specs = sockets  # (name, kind, endpoint, bind[, peer])
        self.heard: asyncio.Queue[tuple[BlockStored, Inbound]] = asyncio.Queue()
        self.dead: list[str] = []
        self.watch(any_peer, self.peer_died)

    async def setup(self) -> None:
        for name, kind, endpoint, bind, *peer in self.socket_specs:
            self.open(name, kind, endpoint, bind=bind, peer=peer[0] if peer else None)

    async def on_block_stored(self, msg: BlockStored, inbound: Inbound) -> None:
        self.heard.put_nowait((msg, inbound))

    async def peer_died(self, peer_id: str) -> None:
        self.dead.append(peer_id)


async def emit_until_heard(probe: Probe, socket: str, timeout: float = 10.0) -> None:
    """Emit MARKER every 50 ms until it comes back: a SUB hears only once it has joined."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        await probe.emit(socket, MARKER)
        try:
            msg, _ = await asyncio.wait_for(probe.heard.get(), 0.05)
        except TimeoutError:
            continue
        if msg == MARKER:
            return
    raise TimeoutError(f"{socket}: the marker never came back")


async def next_payload(probe: Probe, timeout: float = 5.0) -> tuple[BlockStored, Inbound]:
    """The next heard message that is not a sync marker."""
    while True:
        msg, inbound = await asyncio.wait_for(probe.heard.get(), timeout)
        if msg != MARKER:
            return msg, inbound


def raw_socket(
    context: zmq.Context, kind: int, endpoint: str, *, bind: bool = False, keys=None
) -> zmq.Socket:
    """A bare zmq socket; keys = (public, secret, server public) makes it a CURVE client."""
    sock = context.socket(kind)
    sock.linger = 0
    if kind == zmq.SUB:
        sock.subscribe(b"")
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket, timeout: float = 5.0) -> tuple[Message, list[bytes]]:
    """The next message that is not a Heartbeat on a raw socket, and all its frames."""
    num_head = 0 if sock.type == zmq.DEALER else 1
    while True:
        if not sock.poll(timeout * 1000):
            raise TimeoutError(f"nothing received in {timeout} s")
        frames = sock.recv_multipart()
        msg = decode(frames[num_head])
        if not isinstance(msg, Heartbeat):
            return msg, frames


@pytest.fixture
def zmq_context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="module", params=["tcp", "ipc"])
def echo(request, tmp_path_factory):
    """One echo actor per transport, shared by the tests that leave it running."""
    with EchoProcess(tmp_path_factory.mktemp("echo"), "--transport", request.param) as echo:
        yield echo


# --- request-reply, PUB/SUB, PUSH/PULL, extra frames ---


@pytest.mark.cluster
def test_request_reply_round_trip(echo):
    async def scenario():
        async with Probe(make_config("probe-rr")) as probe:
            peer = await probe.connect("to_echo", echo.endpoints["from_peers"], timeout=10)
            reply = await probe.request(peer, Ping(), timeout=10)
            return peer, probe.peers[peer].role, reply

    peer, role, reply = asyncio.run(scenario())
    assert (peer, role) == ("echo", "echo")
    assert reply == Pong(in_reply_to=2)  # request 1 was the Hello


@pytest.mark.cluster
@pytest.mark.parametrize(
    "out_kind, echo_in, in_kind, echo_out",
    [
        (zmq.PUB, "events_in", zmq.SUB, "events_out"),
        (zmq.PUSH, "jobs_in", zmq.PULL, "jobs_out"),
    ],
    ids=["pub_sub", "push_pull"],
)
def test_one_way_messages_arrive_in_order(echo, out_kind, echo_in, in_kind, echo_out):
    sockets = [
        ("out", out_kind, echo.endpoints[echo_in], False),
        ("in", in_kind, echo.endpoints[echo_out], False),
    ]

    async def scenario():
        async with Probe(make_config("probe-one-way"), sockets) as probe:
            await emit_until_heard(probe, "out")
            for n in (1, 2, 3):
                await probe.emit("out", make_block(n))
            return [await next_payload(probe) for _ in range(3)]

    heard = asyncio.run(scenario())
    assert [(msg, inbound.socket, inbound.peer) for msg, inbound in heard] == [
        (make_block(n), "in", "echo") for n in (1, 2, 3)
    ]


@pytest.mark.cluster
@pytest.mark.parametrize("path", ["request", "push_tracked"])
def test_extra_frames_arrive_byte_identical(echo, path):
    sockets = [
        ("jobs_out", zmq.PUSH, echo.endpoints["jobs_in"], False),
        ("jobs_in", zmq.PULL, echo.endpoints["jobs_out"], False),
    ]

    async def scenario():
        async with Probe(make_config(f"probe-frames-{path}"), sockets) as probe:
            if path == "request":
                peer = await probe.connect("to_echo", echo.endpoints["from_peers"], timeout=10)
                _, frames = await probe.request_frames(peer, Ping(), 10, frames=FRAMES)
                return frames
            tracker = await probe.emit("jobs_out", make_block(1), frames=FRAMES, track=True)
            _, inbound = await next_payload(probe)
            await asyncio.to_thread(tracker.wait, 5)  # raises zmq.NotDone if never released
            return inbound.frames

    frames = asyncio.run(scenario())
    assert [frame.bytes for frame in frames] == [bytes(frame) for frame in FRAMES]


# --- handshake ---

HELLO_FIELDS = dict(actor_id="stranger", role="probe", node="n")


@pytest.mark.cluster
@pytest.mark.parametrize(
    "hello, version",
    [
        (
            encode(Hello(version=PROTOCOL_VERSION + 1, call_id=7, **HELLO_FIELDS)),
            PROTOCOL_VERSION + 1,
        ),
        (encode(Hello(version=0, call_id=7, **HELLO_FIELDS)), 0),
        # a future version's Hello whose other fields this version cannot decode
        (msgspec.msgpack.encode({"type": "Hello", "version": 99, "call_id": 7}), 99),
    ],
    ids=["newer", "older", "undecodable_newer"],
)
def test_other_protocol_version_is_refused_and_not_registered(echo, zmq_context, hello, version):
    dealer = raw_socket(zmq_context, zmq.DEALER, echo.endpoints["from_peers"])
    dealer.send(hello)
    refusal, _ = receive(dealer)
    dealer.send(encode(Ping(call_id=8)))
    after, _ = receive(dealer)

    assert refusal == Error(
        code=ErrorCode.VERSION_MISMATCH,
        message=f"peer speaks protocol version {version}, "
        f"this actor speaks version {PROTOCOL_VERSION}",
        in_reply_to=7,
    )
    assert after == Error(
        code=ErrorCode.NOT_REGISTERED,
        message="Ping from an unregistered peer; send Hello first",
        in_reply_to=8,
    )


# --- liveness ---


@pytest.mark.cluster
def test_request_to_a_killed_peer_raises_peer_dead(tmp_path):
    async def scenario(echo):
        async with Probe(make_config()) as probe:
            peer = await probe.connect("to_echo", echo.endpoints["from_peers"], timeout=10)
            pending = asyncio.create_task(probe.request(peer, Ping(), timeout=60))
            await asyncio.to_thread(echo.expect_line, "ping_started")
            echo.signal(signal.SIGKILL)
            with pytest.raises(PeerDeadError) as caught:
                await asyncio.wait_for(pending, 20)  # a hang guard, not the assertion
            return caught.value, probe.dead, dict(probe.peers)

    with EchoProcess(tmp_path, "--ping-delay", "60") as echo:
        error, dead, peers = asyncio.run(scenario(echo))
    assert error.peer == "echo"
    assert re.fullmatch(r"silent for \d+\.\d\d s \(liveness 10 x 0\.1 s\)", error.reason)
    assert (dead, peers) == (["echo"], {})


# --- garbage on every socket ---

GARBAGE = [  # name, body frames, code, a fragment of the reason
    ("random_bytes", [random.Random(1).randbytes(64)], ErrorCode.MALFORMED, ""),
    ("not_messagepack", [b"\xc1\x00"], ErrorCode.MALFORMED, "MessagePack data is malformed"),
    (
        "wrong_shape",
        [msgspec.msgpack.encode([1, 2, 3])],
        ErrorCode.MALFORMED,
        "Expected `object`, got `array`",
    ),
    (
        "unknown_tag",
        [msgspec.msgpack.encode({"type": "Nope"})],
        ErrorCode.MALFORMED,
        "Invalid value 'Nope' - at `$.type`",
    ),
    (
        "missing_field",
        [msgspec.msgpack.encode({"type": "BlockStored"})],
        ErrorCode.MALFORMED,
        "Object missing required field `block_hashes`",
    ),
    (
        "oversize",
        [b"\x00" * (ECHO_MAX_SIZE + 1)],
        ErrorCode.TOO_LARGE,
        f"message of {ECHO_MAX_SIZE + 1} bytes exceeds the limit of {ECHO_MAX_SIZE}",
    ),
    (
        "no_handler",
        [encode(AllBlocksCleared())],
        ErrorCode.UNKNOWN_TYPE,
        "actor echo (echo) has no AllBlocksCleared handler",
    ),
    ("wrong_frame_count", None, ErrorCode.MALFORMED, None),  # per socket kind, below
]


class RouterDriver:
    """Feeds the echo's ROUTER from a raw DEALER that said Hello."""

    wrong_frames = ([b"", encode(Ping())], "Input data was truncated")

    def __init__(self, context, echo):
        self.sock = raw_socket(context, zmq.DEALER, echo.endpoints["from_peers"])
        self.sock.send(encode(Hello(version=PROTOCOL_VERSION, call_id=1, **HELLO_FIELDS)))
        assert type(receive(self.sock)[0]) is Welcome

    def send(self, body_frames):
        self.sock.send_multipart(body_frames)

    def receive(self):
        return receive(self.sock)[0]

    def expect_rejected(self, code, fragment):
        error = self.receive()
        assert (type(error), error.code, error.in_reply_to) == (Error, code, None)
        assert fragment in error.message

    def expect_serving(self, n):
        self.send([encode(Ping(call_id=n))])
        assert self.receive() == Pong(in_reply_to=n)


class DealerDriver(RouterDriver):
    """Feeds the echo's DEALER (to_server) from the raw ROUTER it connected to."""

    def __init__(self, context, echo):
        self.sock = context.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(echo.connect_to)
        hello, frames = receive(self.sock, timeout=10)
        self.identity = frames[0]
        welcome = Welcome(version=PROTOCOL_VERSION, in_reply_to=hello.call_id, **HELLO_FIELDS)
        self.sock.send_multipart([self.identity, encode(welcome)])

    def send(self, body_frames):
        self.sock.send_multipart([self.identity, *body_frames])


class SubDriver:
    """Feeds the echo's SUB from a raw PUB; valid events come back on its PUB."""

    wrong_frames = ([], "1 frame(s); a message on this socket has [head, body, *extra]")
    into, out_of = (zmq.PUB, "events_in"), (zmq.SUB, "events_out")

    def __init__(self, context, echo):
        self.sock = raw_socket(context, self.into[0], echo.endpoints[self.into[1]])
        self.relayed = raw_socket(context, self.out_of[0], echo.endpoints[self.out_of[1]])
        while not self._relays(MARKER, timeout=0.05):  # wait until both ends have joined
            pass
        while self.relayed.poll(100):
            self.relayed.recv_multipart()

    def _relays(self, msg, timeout):
        self.send([encode(msg)])
        return self.relayed.poll(timeout * 1000) and decode(self.relayed.recv_multipart()[1]) == msg

    def send(self, body_frames):
        self.sock.send_multipart([b"garbler", *body_frames])

    def expect_rejected(self, code, fragment):
        pass  # no way back: the log line is checked at the end

    def expect_serving(self, n):
        assert self._relays(make_block(n), timeout=5)


class PullDriver(SubDriver):
    """Feeds the echo's PULL from a raw PUSH; valid jobs come back on its PUSH."""

    into, out_of = (zmq.PUSH, "jobs_in"), (zmq.PULL, "jobs_out")


@pytest.mark.cluster
@pytest.mark.parametrize(
    "driver", [RouterDriver, DealerDriver, SubDriver, PullDriver], ids=lambda d: d.__name__
)
def test_garbage_on_every_socket_is_rejected_and_serving_goes_on(tmp_path, zmq_context, driver):
    connect_to = f"ipc://{tmp_path}/server.sock"
    args = ("--liveness", "1000")  # the raw peers send no heartbeats
    if driver is DealerDriver:
        args += ("--connect", connect_to)
    with EchoProcess(tmp_path, *args) as echo:
        echo.connect_to = connect_to
        feeder = driver(zmq_context, echo)
        feeder.expect_serving(1)
        for n, (_, frames, code, fragment) in enumerate(GARBAGE, start=2):
            if frames is None:
                frames, fragment = driver.wrong_frames
            feeder.send(frames)
            feeder.expect_rejected(code, fragment)
            feeder.expect_serving(n)
        echo.signal(signal.SIGTERM)
        assert echo.wait() == 0
        rejected = re.findall(r"message_rejected .*code=(\w+)", echo.stderr())
    assert rejected == [code for _, _, code, _ in GARBAGE]


# --- graceful shutdown ---


@pytest.mark.cluster
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_the_handler_in_progress_and_exits_0(tmp_path, signum):
    async def scenario(echo):
        async with Probe(make_config()) as probe:
            peer = await probe.connect("to_echo", echo.endpoints["from_peers"], timeout=10)
            in_progress = asyncio.create_task(probe.request(peer, Ping(), timeout=20))
            await asyncio.to_thread(echo.expect_line, "ping_started")
            echo.signal(signum)
            await asyncio.to_thread(echo.expect_line, "draining")
            with pytest.raises(RemoteError) as refused:
                await probe.request(peer, Ping(), timeout=20)
            return await in_progress, refused.value.error

    with EchoProcess(tmp_path, "--ping-delay", "1.5") as echo:
        reply, refusal = asyncio.run(scenario(echo))
        assert echo.wait() == 0
    assert reply == Pong(in_reply_to=2)
    assert refusal == Error(
        code=ErrorCode.SHUTTING_DOWN,
        message="actor echo is draining and takes no new work",
        in_reply_to=3,
    )


# --- CurveZMQ: one key per actor ---


def window(expected: bool) -> float:
    """How long to try: long enough for a CURVE handshake on a busy machine when success
    is expected, short when silence is: either way a wrong outcome fails the test."""
    return 5.0 if expected else 0.5


class KeyedProbe(Probe):
    role = "decode"  # the role its key, decode-0's, names


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    """An echo actor holding cache-0's key, and the key material of three clients: a key
    of the ring (decode-0's), a stranger's, none."""
    directory = tmp_path_factory.mktemp("curve")
    keys = directory / "keys"
    generate(keys, [("cache-0", "cache"), ("decode-0", "decode"), ("decode-1", "decode")])
    ring = KeyRing(keys, "decode-0")
    server = ring.identity("cache-0").public
    clients = {
        "ring": (ring.own.public, ring.secret, server),
        "stranger": (*zmq.curve_keypair(), server),
        "plain": None,
    }
    with EchoProcess(
        directory, "--key-dir", str(keys), "--id", "cache-0", "--role", "cache"
    ) as echo:
        yield echo, keys, clients


def test_curve_actor_with_a_ring_key_is_answered(curve):
    echo, key_dir, _ = curve

    async def scenario():
        async with KeyedProbe(make_config("decode-0", key_dir=key_dir)) as probe:
            peer = await probe.connect(
                "to_echo", echo.endpoints["from_peers"], timeout=10, peer="cache-0"
            )
            return peer, await probe.request(peer, Ping(), timeout=10)

    assert asyncio.run(scenario()) == ("cache-0", Pong(in_reply_to=2))


def test_curve_connect_refuses_a_peer_that_is_not_the_actor_meant(curve):
    """decode-1's key pinned for the echo's endpoint: the echo (cache-0) cannot complete
    the handshake, so no Welcome ever comes."""
    echo, key_dir, _ = curve

    async def scenario():
        async with KeyedProbe(make_config("decode-0", key_dir=key_dir)) as probe:
            with pytest.raises(TimeoutError):
                await probe.connect(
                    "to_echo", echo.endpoints["from_peers"], timeout=1, peer="decode-1"
                )
            return list(probe.peers)

    assert asyncio.run(scenario()) == []


@pytest.mark.parametrize(
    "client, answered", [("ring", True), ("stranger", False), ("plain", False)]
)
def test_curve_client_without_a_ring_key_gets_no_reply(curve, zmq_context, client, answered):
    echo, _, clients = curve
    dealer = raw_socket(zmq_context, zmq.DEALER, echo.endpoints["from_peers"], keys=clients[client])
    dealer.send(
        encode(
            Hello(version=PROTOCOL_VERSION, call_id=1, actor_id="decode-0", role="decode", node="n")
        )
    )
    assert bool(dealer.poll(window(answered) * 1000)) == answered


@pytest.mark.parametrize(
    "actor_id, role", [("decode-1", "decode"), ("decode-0", "prefill"), ("cache-0", "cache")]
)
def test_curve_hello_as_another_actor_or_role_than_the_key_is_refused(
    curve, zmq_context, actor_id, role
):
    """decode-0's key may say Hello only as decode 'decode-0': not as another worker (to
    take its traffic or have it declared dead), not in another role."""
    echo, _, clients = curve
    dealer = raw_socket(zmq_context, zmq.DEALER, echo.endpoints["from_peers"], keys=clients["ring"])
    dealer.send(
        encode(Hello(version=PROTOCOL_VERSION, call_id=1, actor_id=actor_id, role=role, node="n"))
    )
    reply, _ = receive(dealer)
    dealer.send(encode(Ping(call_id=2)))
    after, _ = receive(dealer)

    assert reply == Error(
        code=ErrorCode.FORBIDDEN,
        in_reply_to=1,
        message=(f"key 'decode-0' (decode) may not say Hello as {role} {actor_id!r}"),
    )
    assert (after.code, after.in_reply_to) == (ErrorCode.NOT_REGISTERED, 2)
    assert "hello_refused" in echo.stderr() and f"claimed={actor_id}" in echo.stderr()


@pytest.mark.parametrize(
    "client, head, heard",
    [
        ("ring", b"decode-0", True),
        ("ring", b"decode-1", False),
        ("stranger", b"decode-0", False),
        ("plain", b"decode-0", False),
    ],
)
def test_curve_publisher_is_heard_only_with_a_ring_key_and_as_itself(
    curve, zmq_context, client, head, heard
):
    """The echo's SUB is bound: ZAP admits ring keys only, and each message is the key's
    actor's; one whose sender frame names another actor is dropped."""
    echo, key_dir, clients = curve
    sockets = [("events_in", zmq.SUB, echo.endpoints["events_out"], False, "cache-0")]

    async def scenario():
        async with KeyedProbe(make_config("decode-0", key_dir=key_dir), sockets) as probe:
            publisher = raw_socket(
                zmq_context, zmq.PUB, echo.endpoints["events_in"], keys=clients[client]
            )
            if client == "ring":
                while True:  # joined once the echo relays decode-0's own marker
                    publisher.send_multipart([b"decode-0", encode(MARKER)])
                    with contextlib.suppress(asyncio.TimeoutError):
                        if (await asyncio.wait_for(probe.heard.get(), 0.05))[0] == MARKER:
                            break
            deadline = asyncio.get_running_loop().time() + window(heard)
            while asyncio.get_running_loop().time() < deadline:
                publisher.send_multipart([head, encode(make_block(666))])
                with contextlib.suppress(asyncio.TimeoutError):
                    if (await next_payload(probe, timeout=0.05))[0] == make_block(666):
                        return True
            return False

    assert asyncio.run(scenario()) == heard


@pytest.mark.parametrize("client, hears", [("ring", True), ("stranger", False), ("plain", False)])
def test_curve_subscriber_without_a_ring_key_hears_nothing(curve, zmq_context, client, hears):
    echo, key_dir, clients = curve
    subscriber = raw_socket(
        zmq_context, zmq.SUB, echo.endpoints["events_out"], keys=clients[client]
    )
    sockets = [("events_out", zmq.PUB, echo.endpoints["events_in"], False, "cache-0")]

    async def scenario():
        async with KeyedProbe(make_config("decode-0", key_dir=key_dir), sockets) as probe:
            deadline = asyncio.get_running_loop().time() + window(hears)
            while asyncio.get_running_loop().time() < deadline:
                await probe.emit("events_out", make_block(1))
                if subscriber.poll(50):  # blocks this loop 50 ms: harmless, no peers here
                    return True
            return False

    assert asyncio.run(scenario()) == hears


# --- in one process: dispatch, timeouts, failures, peer death, Shutdown ---


class Server(Probe):
    """Binds a ROUTER; Ping waits `ping_delay` s or raises when ping_error is set."""

    role = "server"
    ping_delay = 0.0
    ping_error: Exception | None = None

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)

    async def on_ping(self, msg: Ping, inbound: Inbound) -> Pong:
        await asyncio.sleep(self.ping_delay)
        if self.ping_error is not None:
            raise self.ping_error
        return Pong()


async def connected_pair(server: Server, client: Probe) -> str:
    return await client.connect("to_server", server.endpoints["from_peers"], timeout=5)


@pytest.mark.parametrize(
    "ping_delay, ping_error, timeout, raised, text",
    [
        (5.0, None, 0.2, TimeoutError, "server sent no reply to Ping within 0.2 s"),
        (  # a generous timeout: logging the handler's traceback takes a while on a busy box
            0.0,
            RuntimeError("boom"),
            10.0,
            RemoteError,
            "server answered handler_failed: Ping handler: RuntimeError('boom')",
        ),
    ],
    ids=["timeout", "handler_raises"],
)
def test_request_failures_are_clear_errors(ping_delay, ping_error, timeout, raised, text):
    async def scenario():
        server = Server(make_config("server"))
        server.ping_delay, server.ping_error = ping_delay, ping_error
        async with server, Probe(make_config("client")) as client:
            peer = await connected_pair(server, client)
            with pytest.raises(raised) as caught:
                await client.request(peer, Ping(), timeout=timeout)
            return str(caught.value)

    assert asyncio.run(scenario()) == text


def test_request_to_an_unknown_peer_raises_peer_dead():
    async def scenario():
        async with Probe(make_config()) as probe:
            with pytest.raises(PeerDeadError) as caught:
                await probe.request("nobody", Ping(), timeout=1)
            return str(caught.value)

    assert asyncio.run(scenario()) == "peer 'nobody' is dead: not connected"


def test_a_vanished_client_fires_the_watch_on_the_server():
    async def scenario():
        async with Server(make_config("server")) as server:
            client = Probe(make_config("client"))
            async with client:
                await connected_pair(server, client)
                assert list(server.peers) == ["client"]
            for _ in range(100):  # hang guard: 5 s
                if server.dead:
                    break
                await asyncio.sleep(0.05)
            return server.dead, dict(server.peers)

    assert asyncio.run(scenario()) == (["client"], {})


class Farewells(Server):
    """Records, for each peer declared dead, whether it said Goodbye."""

    def __init__(self, config: ActorConfig) -> None:
        super().__init__(config)
        self.left: dict[str, bool] = {}

    async def peer_died(self, peer_id: str) -> None:
        self.left[peer_id] = self.peers.left(peer_id)


@pytest.mark.parametrize("closing", ["client", "server"])
def test_an_actor_that_closes_says_goodbye_and_the_other_side_forgets_it(closing):
    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            # liveness of 100 s: only a Goodbye (or a failed send) ends the connection soon
            server = await stack.enter_async_context(
                Farewells(make_config("server", liveness=1000))
            )
            client = await stack.enter_async_context(
                Farewells(make_config("client", liveness=1000))
            )
            await connected_pair(server, client)
            leaver, stayer = (client, server) if closing == "client" else (server, client)
            await leaver.close()  # closing twice (again on exit) is harmless
            for _ in range(100):  # hang guard: 5 s
                if stayer.left:
                    break
                await asyncio.sleep(0.05)
            return stayer.left, dict(stayer.peers)

    assert asyncio.run(scenario()) == ({closing: True}, {})


class Sessions(Server):
    """Keeps a session per peer from BlockStored; its death watch awaits (as one that
    aborts work on an engine does) before dropping the dead peer's session."""

    def __init__(self, config: ActorConfig) -> None:
        super().__init__(config)
        self.sessions: dict[str, int] = {}
        self.num_stored = 0

    async def on_block_stored(self, msg: BlockStored, inbound: Inbound) -> None:
        self.sessions[inbound.peer] = msg.block_hashes[0]
        self.num_stored += 1

    async def peer_died(self, peer_id: str) -> None:
        await asyncio.sleep(0.3)
        self.sessions.pop(peer_id, None)
        self.dead.append(peer_id)


def test_the_watch_of_a_replaced_connection_does_not_act_on_its_successor():
    async def scenario():
        async with (
            Sessions(make_config("server")) as server,
            Probe(make_config("client")) as old,
            Probe(make_config("client")) as new,
        ):
            await old.send(await connected_pair(server, old), make_block(1))
            for _ in range(100):  # hang guard: 5 s
                if server.sessions:
                    break
                await asyncio.sleep(0.05)
            await new.send(await connected_pair(server, new), make_block(2))  # replaces old
            for _ in range(100):
                if server.num_stored == 2 and server.dead:
                    break
                await asyncio.sleep(0.05)
            return server.dead, server.sessions

    assert asyncio.run(scenario()) == (["client"], {"client": 2})


def test_shutdown_message_ends_serve():
    async def scenario():
        server = Server(make_config("server"))
        serving = asyncio.create_task(server.serve())
        while "from_peers" not in server.endpoints:
            await asyncio.sleep(0.01)
        async with Probe(make_config("client")) as client:
            peer = await connected_pair(server, client)
            await client.send(peer, Shutdown(reason="test"))
            await asyncio.wait_for(serving, 10)
        return serving.result()

    assert asyncio.run(scenario()) is None


def misspelled():
    class Misspelled(Actor):
        async def on_blok_stored(self, msg, inbound):
            pass

        async def on_generat(self, msg, inbound):
            pass


def reply_handler():
    class ReplyHandler(Actor):
        async def on_pong(self, msg, inbound):
            pass


def hook():
    class Hook(Actor):
        async def on_peer_dead(self, peer_id):
            pass


def sync_handler():
    class SyncHandler(Actor):
        def on_ping(self, msg, inbound):
            return Pong()


@pytest.mark.parametrize(
    "define, text",
    [
        (
            misspelled,
            "Misspelled defines on_* methods that match no message it can receive "
            "(kvmesh.protocol): on_blok_stored: did you mean on_block_stored?; "
            "on_generat: did you mean on_generate?",
        ),
        (
            reply_handler,
            "ReplyHandler defines on_* methods that match no message it can receive "
            "(kvmesh.protocol): on_pong: Pong is a reply, which request() returns",
        ),
        (
            hook,
            "Hook defines on_* methods that match no message it can receive "
            "(kvmesh.protocol): on_peer_dead: a peer's death is watched with "
            "self.watch(peer, callback)",
        ),
        (sync_handler, "SyncHandler: handlers must be async def: ['on_ping']"),
    ],
)
def test_a_class_with_a_handler_that_matches_nothing_is_refused_when_created(define, text):
    with pytest.raises(TypeError) as caught:
        define()
    assert str(caught.value) == text


async def on_any_ping(msg, inbound):
    return Pong()


class Bare(Actor):
    """No handlers of its own but the runtime's: a part adds them with handle()."""

    role = "bare"
    senders = {}

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)


@pytest.mark.parametrize(
    "message_type, handler, text",
    [
        (Ping, on_any_ping, "Bare.handle: Ping is handled already, by Actor.on_ping"),
        (
            Pong,
            on_any_ping,
            "Bare.handle: <class 'kvmesh.protocol.Pong'> is not a non-reply message of "
            "kvmesh.protocol",
        ),
        (BlockStored, Pong, "Bare.handle: <class 'kvmesh.protocol.Pong'> must be async def"),
    ],
)
def test_handle_refuses_a_reply_a_sync_handler_and_a_second_handler(message_type, handler, text):
    with pytest.raises(TypeError) as caught:
        Bare(make_config()).handle(message_type, handler)
    assert str(caught.value) == text


def test_a_handler_added_with_handle_is_dispatched():
    async def scenario():
        heard = asyncio.Queue()

        async def on_block_stored(msg, inbound):
            heard.put_nowait((msg, inbound.peer))

        server = Bare(make_config("server"))
        server.handle(BlockStored, on_block_stored)
        async with server, Probe(make_config("client")) as client:
            await client.send(await connected_pair(server, client), make_block(7))
            return await asyncio.wait_for(heard.get(), 5)

    assert asyncio.run(scenario()) == (make_block(7), "client")


# --- supervise and watch ---


def test_a_supervised_task_is_retried_on_the_retry_errors_until_it_succeeds():
    async def scenario():
        attempts = []

        async def flaky(label: str) -> None:
            attempts.append(label)
            if len(attempts) < 3:
                raise ConnectionError(f"attempt {len(attempts)} failed")

        async with Probe(make_config()) as probe:
            retry = Retry((ConnectionError,), "flaky_failed", delay=0.01)
            with structlog.testing.capture_logs() as logs:
                task = probe.supervise("flaky", flaky, "x", retry=retry)
                await asyncio.wait_for(task, 5)
            return attempts, [(e["event"], e.get("task"), e.get("error")) for e in logs]

    assert asyncio.run(scenario()) == (
        ["x", "x", "x"],
        [
            ("flaky_failed", "flaky", "attempt 1 failed"),
            ("flaky_failed", "flaky", "attempt 2 failed"),
        ],
    )


def test_a_supervised_crash_is_logged_and_ends_the_task_and_no_retry_once_draining():
    async def scenario():
        attempts = 0

        async def broken() -> None:
            nonlocal attempts
            attempts += 1
            raise KeyError("bug")

        async def unreachable() -> None:
            nonlocal attempts
            attempts += 100
            raise ConnectionError("nobody there")

        async with Probe(make_config()) as probe:
            with structlog.testing.capture_logs() as logs:
                # not in retry.errors: a crash, not retried
                crash = probe.supervise("broken", broken, retry=Retry((ConnectionError,), "x"))
                await asyncio.wait_for(crash, 5)
                probe.stop()  # the actor drains: a retried task makes no attempt
                await asyncio.wait_for(
                    probe.supervise("late", unreachable, retry=Retry((ConnectionError,), "x")), 5
                )
            return attempts, [(e["event"], e["task"], e["log_level"]) for e in logs if "task" in e]

    assert asyncio.run(scenario()) == (1, [("task_failed", "broken", "error")])


def test_supervised_tasks_are_cancelled_at_close():
    async def scenario():
        probe = Probe(make_config())
        async with probe:
            task = probe.supervise("forever", asyncio.sleep, 3600)
            await asyncio.sleep(0)
        return task.cancelled()

    assert asyncio.run(scenario()) is True


def test_a_watch_fires_once_per_death_and_never_after_unwatch_or_close():
    async def scenario():
        fired: list[tuple[str, str]] = []

        def recorder(label: str):
            async def on_dead(peer_id: str) -> None:
                fired.append((label, peer_id))

            return on_dead

        async with Server(make_config("server")) as server:
            server.watch("client", recorder("by id"))
            server.watch(lambda peer_id: peer_id.startswith("cli"), recorder("by predicate"))
            server.watch("someone else", recorder("another id"))
            server.unwatch(server.watch("client", recorder("unwatched")))
            async with Probe(make_config("client")) as client:
                await connected_pair(server, client)
            for _ in range(100):  # hang guard: 5 s
                if server.dead:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # a second firing would come now
            async with Probe(make_config("client")) as client:
                await connected_pair(server, client)
                await server.close()  # its watches go with it
                server.peers.declare_dead(server.peers["client"], "test")
                await asyncio.sleep(0.2)
        return fired, server.dead

    assert asyncio.run(scenario()) == (
        [("by id", "client"), ("by predicate", "client")],
        ["client"],
    )


def test_a_failing_watch_is_logged_and_the_others_still_run():
    async def scenario():
        async def broken(peer_id: str) -> None:
            raise RuntimeError(f"cannot bury {peer_id}")

        async with Server(make_config("server")) as server:
            server.watch("client", broken)
            server.watch("client", server.peer_died)  # after Probe's own: runs twice
            with structlog.testing.capture_logs() as logs:
                async with Probe(make_config("client")) as client:
                    await connected_pair(server, client)
                for _ in range(100):  # hang guard: 5 s
                    if len(server.dead) == 2:
                        break
                    await asyncio.sleep(0.05)
            failed = [e["peer"] for e in logs if e["event"] == "watch_failed"]
            return server.dead, failed

    assert asyncio.run(scenario()) == (["client", "client"], ["client"])


@pytest.mark.parametrize(
    "overrides, text",
    [
        (dict(actor_id=""), "actor_id must be a non-empty string"),
        (dict(heartbeat_interval=0), "heartbeat_interval must be > 0, got 0"),
        (dict(liveness=0), "liveness must be > 0, got 0"),
        (dict(max_message_size=-1), "max_message_size must be > 0, got -1"),
        (dict(grace_period=-1.0), "grace_period must be >= 0, got -1.0"),
    ],
)
def test_actor_config_names_the_bad_field(overrides, text):
    with pytest.raises(ValueError) as caught:
        make_config(**overrides)
    assert str(caught.value) == text


@pytest.mark.cluster
def test_a_refused_one_way_message_names_its_request(echo):
    """A Generate the peer cannot take (here: no handler; in a cluster, a draining worker)
    comes back as an Error naming its request_id, handed to request_refused, so the
    request's owner can end or move it at once instead of waiting for its timeout."""
    from kvmesh.params import SamplingParams
    from kvmesh.protocol import Generate

    class Owner(Probe):
        def __init__(self, config):
            super().__init__(config)
            self.refused: asyncio.Queue = asyncio.Queue()

        def request_refused(self, error, inbound):
            self.refused.put_nowait((error, inbound.peer))

    async def scenario():
        async with Owner(make_config("probe-refused")) as owner:
            peer = await owner.connect("to_echo", echo.endpoints["from_peers"], timeout=10)
            await owner.send(
                peer, Generate(request_id="r-7", prompt_token_ids=[1, 2], params=SamplingParams())
            )
            return await asyncio.wait_for(owner.refused.get(), 10)

    error, peer = asyncio.run(scenario())
    assert (error.request_id, error.code, peer) == ("r-7", ErrorCode.UNKNOWN_TYPE, "echo")
    assert error.in_reply_to is None


# --- ZeroMQ limits: frames, handlers, replays ---


def test_sockets_carry_the_frame_limit():
    async def scenario():
        async with Probe(make_config("probe-frames", max_message_size=1000)) as probe:
            sock, _ = probe._sockets.open(zmq.DEALER, "tcp://127.0.0.1:9", bind=False)
            return sock.maxmsgsize

    assert asyncio.run(scenario()) == 4000
    assert make_config(max_frame_size=123).frame_limit == 123


@pytest.mark.cluster
def test_a_frame_over_the_limit_drops_its_sender_unread(echo, zmq_context):
    """Past max_frame_size ZeroMQ cuts the connection before holding the frame (a 1 GB
    frame costs the actor nothing); the actor goes on serving."""
    sock = raw_socket(zmq_context, zmq.DEALER, echo.endpoints["from_peers"])
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.send(encode(Hello(version=PROTOCOL_VERSION, call_id=1, **HELLO_FIELDS)))
    assert type(receive(sock)[0]) is Welcome
    sock.send(b"\x00" * (ECHO_MAX_FRAME + 1))
    assert monitor.poll(10_000), "the oversized frame did not cut the connection"
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED

    async def still_serving():
        async with Probe(make_config("probe-after-frame")) as probe:
            peer = await probe.connect("to_echo", echo.endpoints["from_peers"], timeout=10)
            return await probe.request(peer, Ping(), timeout=10)

    assert isinstance(asyncio.run(still_serving()), Pong)


@pytest.mark.cluster
def test_handlers_past_max_handlers_are_refused_and_serving_goes_on(tmp_path):
    async def scenario(echo):
        async with Probe(make_config("probe-flood")) as probe:
            peer = await probe.connect("to_echo", echo.endpoints["from_peers"], timeout=10)
            pings = [asyncio.create_task(probe.request(peer, Ping(), timeout=30)) for _ in range(6)]
            results = await asyncio.gather(*pings, return_exceptions=True)
            after = await probe.request(peer, Ping(), timeout=30)
            return results, after

    with EchoProcess(tmp_path, "--ping-delay", "1", "--max-handlers", "2") as echo:
        results, after = asyncio.run(scenario(echo))
    refused = [r for r in results if isinstance(r, RemoteError)]
    assert 0 < len(refused) < 6 and all(isinstance(r, Pong | RemoteError) for r in results)
    assert all(
        r.error.code == ErrorCode.OVERLOADED and "max_handlers" in r.error.message for r in refused
    )
    assert isinstance(after, Pong)


@pytest.mark.cluster
def test_replayed_frames_are_answered_or_ignored_never_a_crash(echo, zmq_context):
    """A captured request sent again is just another request; a replayed or forged reply
    answers nothing pending and is dropped; the actor serves on."""
    sock = raw_socket(zmq_context, zmq.DEALER, echo.endpoints["from_peers"])
    sock.send(encode(Hello(version=PROTOCOL_VERSION, call_id=1, **HELLO_FIELDS)))
    assert type(receive(sock)[0]) is Welcome
    ping = encode(Ping(call_id=7))
    for _ in range(3):
        sock.send(ping)
    assert [receive(sock)[0] for _ in range(3)] == [Pong(in_reply_to=7)] * 3
    sock.send(encode(Pong(in_reply_to=7)))  # a reply to nothing the echo asked
    sock.send(
        encode(Welcome(in_reply_to=1, version=PROTOCOL_VERSION, actor_id="x", role="y", node="z"))
    )
    sock.send(encode(Ping(call_id=8)))
    assert receive(sock)[0] == Pong(in_reply_to=8)
