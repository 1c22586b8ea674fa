"""kvmesh.protocol: every message round-trips, the wire form is tagged MessagePack, and
the decoder turns any bad input into MalformedMessage and nothing else."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.params import SamplingParams
from kvmesh.protocol import (
    MAX_MESSAGE_SIZE,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Abort,
    ActorStatus,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheAttach,
    CacheCommit,
    CacheHit,
    CacheHits,
    CacheInfo,
    CacheLoad,
    CacheLookup,
    CacheReport,
    CacheReserve,
    CacheSlots,
    CacheSnapshot,
    CacheSnapshotQuery,
    ClusterStatus,
    Delta,
    Error,
    ErrorCode,
    Generate,
    Goodbye,
    Heartbeat,
    Hello,
    HelloHeader,
    KvPoolInfo,
    KvPoolQuery,
    KvWrite,
    KvWriteDone,
    LoadReport,
    MalformedMessage,
    Message,
    ModelControl,
    ModelQuery,
    ModelState,
    ModelStates,
    OnboardCounters,
    Ping,
    Placement,
    Pong,
    RegisterCache,
    Registered,
    RegisterWorker,
    RemotePrefill,
    RemotePrefillDone,
    RequestDone,
    RoleSwitched,
    RouteRequest,
    RouterLoad,
    Shutdown,
    StatusQuery,
    StreamError,
    StreamErrorCode,
    SwitchRole,
    TierCounters,
    TokenBatch,
    UnloadModel,
    Welcome,
    WorkerLoad,
    decode,
    encode,
    peek_hello,
    snake_name,
)

EXAMPLES = [  # one of each message type, with every field away from its default
    Hello(
        call_id=1,
        version=PROTOCOL_VERSION,
        actor_id="decode-0",
        role="decode",
        node="gpu-node-3",
        endpoints={"from_peers": "tcp://127.0.0.1:5555", "events_out": "ipc:///tmp/d0"},
    ),
    Welcome(
        in_reply_to=1,
        version=PROTOCOL_VERSION,
        actor_id="router",
        role="router",
        node="head",
        endpoints={"from_peers": "tcp://10.0.0.1:7000"},
    ),
    Heartbeat(),
    Goodbye(),
    Ping(call_id=2),
    Pong(in_reply_to=2),
    Shutdown(reason="scale down"),
    Error(code=ErrorCode.UNKNOWN_TYPE, message="no handler for Ping", in_reply_to=3),
    BlockStored(block_hashes=[2**64 - 1, 7], parent_hash=5, tier="host"),
    BlockRemoved(block_hashes=[7], tier="disk"),
    AllBlocksCleared(tier="host"),
    KvPoolQuery(call_id=4, backends=["shm", "zmq"]),
    KvPoolInfo(
        in_reply_to=4,
        num_layers=4,
        num_blocks=64,
        block_size=16,
        num_kv_heads=2,
        head_dim=32,
        dtype="bfloat16",
        node="n1",
        shm_name="kvmesh-d0",
        shm_token=b"t",
        ucx_address=b"\x01\x02",
    ),
    KvWrite(
        call_id=5,
        transfer_id="t1",
        block_ids=[3, 1],
        first_layer=1,
        num_layers=2,
        backend="ucx",
        ucx_tag=9,
    ),
    KvWriteDone(in_reply_to=5, transfer_id="t1"),
    RegisterWorker(
        call_id=6,
        model="tiny",
        block_size=16,
        num_blocks=512,
        max_num_seqs=64,
        events_endpoint="tcp://127.0.0.1:7001",
        role="decode",
        role_switch=True,
    ),
    Registered(in_reply_to=6, router_id="router"),
    LoadReport(
        load=WorkerLoad(
            num_running=3,
            num_waiting=1,
            num_remote=2,
            kv_usage=0.5,
            queued_prefill_tokens=100,
            prompt_tokens_total=1000,
            cached_tokens_total=400,
            remote_prefills_total=5,
            transfer_bytes_total=1 << 20,
            tiers={"host": OnboardCounters(onboarded=6, failed=1)},
        )
    ),
    RouteRequest(
        call_id=7,
        request_id="r1",
        block_hashes=[1, 2**63],
        num_prompt_tokens=40,
        exclude=["decode-0"],
    ),
    RequestDone(request_id="r1"),
    Placement(
        in_reply_to=7,
        decode="decode-1",
        decode_endpoint="tcp://127.0.0.1:7002",
        prefill="prefill-0",
        prefill_endpoint="tcp://127.0.0.1:7003",
        expected_cached_tokens=32,
    ),
    StatusQuery(call_id=8),
    ClusterStatus(
        in_reply_to=8,
        actors=[
            ActorStatus(
                actor_id="decode-0",
                role="decode",
                node="n1",
                pid=7,
                endpoints={"a": "b"},
                alive=True,
                load=WorkerLoad(kv_usage=0.25),
            ),
            ActorStatus(
                actor_id="router",
                role="router",
                node="n1",
                pid=8,
                endpoints={},
                alive=True,
                load=RouterLoad(routed_total=3, pending_tokens=40, pending_placements=1),
            ),
            ActorStatus(
                actor_id="frontend-0", role="frontend", node="n1", pid=9, endpoints={}, alive=True
            ),
        ],
    ),
    SwitchRole(call_id=15, role="decode"),
    RoleSwitched(in_reply_to=15, role="decode", num_draining=2),
    Generate(
        request_id="r1",
        prompt_token_ids=[1, 2],
        params=SamplingParams(max_tokens=3, seed=1),
        prefill="prefill-0",
        prefill_endpoint="tcp://127.0.0.1:7003",
        output_token_ids=[9, 8],
        num_sent_chars=3,
    ),
    Abort(request_id="r1"),
    TokenBatch(
        deltas=[
            Delta(
                request_id="r1",
                new_token_ids=[5],
                new_text="a",
                new_logprobs=[{5: -0.1}],
                finish_reason="stop",
                num_prompt_tokens=2,
                num_cached_tokens=0,
                error=StreamError(code=StreamErrorCode.WORKER_DIED, message="worker lost"),
            )
        ]
    ),
    RemotePrefill(
        call_id=9,
        request_id="r1",
        prompt_token_ids=[1, 2, 3],
        params=SamplingParams(top_k=3),
        num_cached_tokens=16,
        block_ids=[4, 5],
    ),
    RemotePrefillDone(
        in_reply_to=9, request_id="r1", token_id=7, logprobs={7: -0.2}, num_bytes=4096
    ),
    CacheAttach(call_id=10, record_bytes=32768),
    CacheInfo(
        in_reply_to=10,
        shm_name="kvmesh-kv-cache-0",
        shm_token=b"t" * 16,
        num_slots=64,
        record_bytes=32768,
    ),
    CacheLookup(call_id=11, block_hashes=[2**64 - 1, 5]),
    CacheHits(in_reply_to=11, hits=[CacheHit(2**64 - 1, 3, "disk")], shm_name="s"),
    CacheReserve(call_id=12, block_hashes=[6, 7], keep=[5]),
    CacheSlots(in_reply_to=12, slots=[4, None], shm_name="s"),
    CacheCommit(committed=[6], aborted=[7]),
    RegisterCache(call_id=13, events_endpoint="tcp://127.0.0.1:5611"),
    CacheReport(
        load=CacheLoad(
            tiers={"host": TierCounters(offloaded=3, lookups=6, hits=3), "disk": TierCounters()},
            blocks={"host": 3, "disk": 2},
            reserved={"host": 1},
            capacity={"host": 20, "disk": 100},
        )
    ),
    CacheSnapshotQuery(call_id=14),
    CacheSnapshot(in_reply_to=14, host=[1, 2], disk=[3]),
    ModelControl(call_id=15, model="beta", action="unload"),
    ModelQuery(call_id=16),
    ModelStates(
        in_reply_to=16,
        models=[
            ModelState(name="alpha", state="loaded", workers=["decode-0"]),
            ModelState(name="beta", state="unloaded", unloaded_workers=["decode-1"]),
        ],
    ),
    UnloadModel(model="beta"),
]


def make_wire(**fields) -> bytes:
    """Raw MessagePack of a map, as a peer of any version (or an attacker) could send."""
    return msgspec.msgpack.encode(fields)


def test_examples_cover_every_message_type():
    assert [type(msg) for msg in EXAMPLES] == list(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_message_round_trips(msg):
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    "msg, wire",
    [
        (Ping(call_id=3), {"type": "Ping", "call_id": 3}),
        (Heartbeat(), {"type": "Heartbeat"}),
        (
            Error(code="malformed", message="bad", in_reply_to=None),
            {
                "type": "Error",
                "in_reply_to": None,
                "code": "malformed",
                "message": "bad",
                "request_id": None,
            },
        ),
    ],
)
def test_wire_form_is_a_map_tagged_by_class_name(msg, wire):
    assert msgspec.msgpack.decode(encode(msg)) == wire


def test_a_stream_error_travels_as_a_code_and_a_message():
    """A failed Delta's error is a map with a code to branch on, not a sentence."""
    batch = TokenBatch(deltas=[Delta.failed("r1", StreamErrorCode.REFUSED, "d0 refused it")])
    wire = msgspec.msgpack.decode(encode(batch))
    assert wire["deltas"][0]["error"] == {"code": "refused", "message": "d0 refused it"}
    assert decode(encode(batch)).deltas[0].error == StreamError(
        code=StreamErrorCode.REFUSED, message="d0 refused it"
    )


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        Ping(call_id=1).call_id = 2


@pytest.mark.parametrize(
    "data, code, text",
    [
        (b"", ErrorCode.MALFORMED, "Input data was truncated"),
        (b"\xc1", ErrorCode.MALFORMED, "MessagePack data is malformed: invalid opcode '\\xc1'"),
        (msgspec.msgpack.encode([1, 2]), ErrorCode.MALFORMED, "Expected `object`, got `array`"),
        (make_wire(type="Nope"), ErrorCode.MALFORMED, "Invalid value 'Nope' - at `$.type`"),
        (make_wire(call_id=1), ErrorCode.MALFORMED, "Object missing required field `type`"),
        (make_wire(type="Ping", call_id="1"), ErrorCode.MALFORMED, "Expected `int`, got `str`"),
        (
            make_wire(type="Error", code="x"),
            ErrorCode.MALFORMED,
            "missing required field `message`",
        ),
        (encode(Ping()) + b"\x00", ErrorCode.MALFORMED, "trailing characters"),
        (
            b"\x00" * (MAX_MESSAGE_SIZE + 1),
            ErrorCode.TOO_LARGE,
            f"message of {MAX_MESSAGE_SIZE + 1} bytes exceeds the limit of {MAX_MESSAGE_SIZE}",
        ),
    ],
    ids=[
        "empty",
        "not_messagepack",
        "wrong_shape",
        "unknown_tag",
        "no_tag",
        "wrong_field_type",
        "missing_field",
        "trailing_bytes",
        "oversize",
    ],
)
def test_bad_input_raises_malformed_message(data, code, text):
    with pytest.raises(MalformedMessage) as caught:
        decode(data)
    assert caught.value.code == code
    assert text in str(caught.value)


def test_a_load_names_only_the_tiers_there_are():
    report = {"type": "WorkerLoad", "tiers": {"ssd": {"onboarded": 1}}}
    with pytest.raises(MalformedMessage) as caught:
        decode(make_wire(type="LoadReport", load=report))
    assert "Invalid enum value 'ssd'" in str(caught.value)


def test_counters_add_up_field_by_field():
    total = TierCounters(offloaded=1, hits=2) + TierCounters(offloaded=3, lookups=4, evicted=5)
    assert total == TierCounters(offloaded=4, lookups=4, hits=2, evicted=5)
    assert OnboardCounters(onboarded=2) + OnboardCounters(failed=1) == OnboardCounters(
        onboarded=2, failed=1
    )


def test_size_is_checked_before_parsing():
    msg = Shutdown(reason="x" * 100)
    data = encode(msg)
    assert decode(data, max_size=len(data)) == msg
    with pytest.raises(MalformedMessage) as caught:
        decode(data, max_size=len(data) - 1)
    assert caught.value.code == ErrorCode.TOO_LARGE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_malformed_only(data):
    try:
        assert isinstance(decode(data), Message)
    except MalformedMessage:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
tagged_maps = st.fixed_dictionaries(
    {"type": st.sampled_from([t.__name__ for t in MESSAGE_TYPES] + ["Nope", ""])},
    optional={
        name: msgpack_values
        for name in ("call_id", "in_reply_to", "version", "actor_id", "code", "block_hashes")
    },
)


@settings(max_examples=300, deadline=None)
@given(msgpack_values | tagged_maps)
def test_well_formed_messagepack_of_any_shape_decodes_or_raises_malformed_only(value):
    try:
        assert isinstance(decode(msgspec.msgpack.encode(value)), Message)
    except MalformedMessage:
        pass


@pytest.mark.parametrize(
    "data, expected",
    [
        (make_wire(type="Hello", version=99, call_id=4), HelloHeader("Hello", 99, 4)),
        (
            make_wire(type="Hello", version=2, call_id=4, brand_new_field=[1]),
            HelloHeader("Hello", 2, 4),
        ),
        (make_wire(type="Hello", call_id=4), None),  # no version: not a Hello of any kind
        (make_wire(type="Ping", version=2), None),
        (b"\xc1", None),
        (msgspec.msgpack.encode([1]), None),
    ],
)
def test_peek_hello_reads_the_fields_every_version_shares(data, expected):
    assert peek_hello(data) == expected


@pytest.mark.parametrize(
    "message_type, name",
    [(Ping, "ping"), (BlockStored, "block_stored"), (AllBlocksCleared, "all_blocks_cleared")],
)
def test_snake_name_gives_the_handler_suffix(message_type, name):
    assert snake_name(message_type) == name
