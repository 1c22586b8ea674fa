"""Every wire message of kvmesh, in one place.

Messages are frozen msgspec Structs tagged by class name and encoded as MessagePack.
Bulk tensors never travel inside a message. Plain data: anything may import this
module, and it must never import torch.

Request-reply: a `Request` carries a `call_id` that the sender's runtime stamps
(unique per sending actor); the answer is a `Reply` whose `in_reply_to` holds that id.
Any Reply may answer any Request; an `Error` answers when the request failed.
"""

from __future__ import annotations

import re
import typing

import msgspec

from kvmesh.params import SamplingParams

# 2: Delta.error is a coded StreamError; loads are typed (WorkerLoad, CacheLoad, RouterLoad)
PROTOCOL_VERSION = 2
MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # bytes of one encoded message; bulk frames are apart


class Message(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every wire message; the tag is the class name."""


# --- KV events: what a worker's (or the cache actor's) block pool stored or dropped ---

TIERS = ("device", "host", "disk", "object")


class BlockStored(Message, frozen=True):
    """Full blocks entered a pool's prefix cache, in chain order.

    block_hashes[0]'s parent is parent_hash (None for the first block of a sequence).
    """

    block_hashes: list[int]
    parent_hash: int | None = None
    tier: str = "device"


class BlockRemoved(Message, frozen=True):
    """Blocks left a pool's prefix cache (evicted or overwritten)."""

    block_hashes: list[int]
    tier: str = "device"


class AllBlocksCleared(Message, frozen=True):
    """The pool dropped its whole prefix cache."""

    tier: str = "device"


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


# --- runtime messages: handshake, liveness, errors, shutdown ---


class Request(Message, frozen=True, kw_only=True):
    """A message that expects exactly one Reply. The runtime stamps call_id."""

    call_id: int = 0


class Reply(Message, frozen=True, kw_only=True):
    """The answer to a Request; the runtime stamps in_reply_to."""

    in_reply_to: int | None = None


class Hello(Request, frozen=True, kw_only=True):
    """First message on a new connection: who the connecting actor is.

    `version` and `call_id` keep their names and types in every protocol version, so
    a peer of any version can still read them and answer a mismatch (see peek_hello).
    """

    version: int
    actor_id: str
    role: str
    node: str
    endpoints: dict[str, str] = msgspec.field(default_factory=dict)
    pid: int = 0  # its process, for `kvmesh status` (0: not told)


class Welcome(Reply, frozen=True, kw_only=True):
    """The accepting actor registered the connecting one; who the accepting actor is."""

    version: int
    actor_id: str
    role: str
    node: str
    endpoints: dict[str, str] = msgspec.field(default_factory=dict)
    pid: int = 0  # its process, for `kvmesh status` (0: not told)


class Heartbeat(Message, frozen=True):
    """I am alive: sent on every connection each heartbeat_interval. Any message from a
    peer counts as a sign of life."""


class Goodbye(Message, frozen=True):
    """I am closing on purpose (drained, or a tool done asking): forget me now, quietly,
    as if declared dead. Sent on every connection just before the sockets close."""


class Ping(Request, frozen=True, kw_only=True):
    """Are you serving? Answered with Pong; measures round trips."""


class Pong(Reply, frozen=True, kw_only=True):
    """The answer to Ping."""


class Shutdown(Message, frozen=True, kw_only=True):
    """Drain and exit, as on SIGTERM."""

    reason: str = ""


class ErrorCode:
    """The values of Error.code. Plain strings, not an enum, so that a code added by a
    newer peer still decodes."""

    MALFORMED = "malformed"  # not MessagePack, wrong shape, unknown tag, bad frames
    TOO_LARGE = "too_large"  # the message frame exceeds the receiver's max size
    UNKNOWN_TYPE = "unknown_type"  # a valid message this actor has no handler for
    VERSION_MISMATCH = "version_mismatch"
    NOT_REGISTERED = "not_registered"  # a message before Hello, or after being declared dead
    SHUTTING_DOWN = "shutting_down"  # the actor is draining and takes no new work
    HANDLER_FAILED = "handler_failed"  # the handler raised
    NO_REPLY = "no_reply"  # the handler of a Request returned nothing
    OVERLOADED = "overloaded"  # the actor has max_handlers handlers running already
    FORBIDDEN = "forbidden"  # the sender's role may not send this (or its key is not its id)
    ID_TAKEN = "id_taken"  # Hello with the id of a connected actor of another node


class Error(Reply, frozen=True, kw_only=True):
    """A request failed, or a message was rejected (then in_reply_to may be None, and
    request_id names the request a rejected one-way message was about, e.g. a Generate
    a draining worker refused, so its owner can end or move it at once)."""

    code: str
    message: str
    request_id: str | None = None


# --- KV data plane: blocks written into a peer's pool (bulk bytes travel apart) ---


class KvPoolQuery(Request, frozen=True, kw_only=True):
    """Describe your KV pool; `backends` are the data plane backends the asker can write by."""

    backends: list[str]


class CudaIpcHandle(msgspec.Struct, frozen=True, kw_only=True):
    """One layer of a CUDA KV pool as torch exports it for another process
    (UntypedStorage._share_cuda_), plus the layer's element offset in that storage."""

    device: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool
    element_offset: int


class KvPoolInfo(Reply, frozen=True, kw_only=True):
    """A KV pool's layout and how to reach it: one tensor per layer, [2, num_blocks,
    block_size, num_kv_heads, head_dim] of `dtype`. shm_name/shm_token: the shared-memory
    segment holding it (same host only); cuda_ipc: one handle per layer of a CUDA pool
    (same host only); ucx_address: the owner's UCX worker address."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    node: str
    shm_name: str | None = None
    shm_token: bytes | None = None
    cuda_ipc: list[CudaIpcHandle] | None = None
    ucx_address: bytes | None = None


class KvWrite(Request, frozen=True, kw_only=True):
    """Layers [first_layer, first_layer + num_layers) of transfer `transfer_id` are for
    your blocks `block_ids`. backend "shm": already written into your pool; "zmq": one
    extra frame, packed layer-major; "ucx": arriving as one UCX tag message `ucx_tag`.
    Answered by KvWriteDone once the blocks are in place."""

    transfer_id: str
    block_ids: list[int]
    first_layer: int
    num_layers: int
    backend: str
    ucx_tag: int = 0


class KvWriteDone(Reply, frozen=True, kw_only=True):
    """The layers of a KvWrite are in the receiver's blocks."""

    transfer_id: str


# --- the node's KV cache actor: host DRAM (shared memory) over disk ---


class CacheAttach(Request, frozen=True, kw_only=True):
    """A worker joins its node's cache actor; its block records are record_bytes long
    (refused with an Error when the cache's records differ: another model or dtype)."""

    record_bytes: int


class CacheInfo(Reply, frozen=True, kw_only=True):
    """Where the host tier's slots are: the shared-memory segment a worker maps."""

    shm_name: str
    shm_token: bytes
    num_slots: int
    record_bytes: int


class CacheLookup(Request, frozen=True, kw_only=True):
    """The longest leading run of these block hashes held in the node's tiers? Its first
    window is staged in host slots, evicting no block of `keep` (the worker's hits not
    yet loaded). staging: the unstaged rest of a run looked up before, now that the
    worker has read the blocks before it (not counted again)."""

    block_hashes: list[int]
    keep: list[int] = []
    staging: bool = False


class CacheHit(msgspec.Struct, frozen=True, array_like=True):
    """One block of a CacheLookup's run: the host slot holding it now, and the tier it
    was found in ("host", or "disk" / "object": promoted into a host slot for this read)."""

    block_hash: int
    slot: int
    tier: str


class CacheHits(Reply, frozen=True, kw_only=True):
    """A CacheLookup's run, in the host tier of segment shm_name: `hits` staged in host
    slots, then the blocks held but not staged (the host had no room for more at once),
    by the tier they were found in: the lookup's next len(unstaged) hashes."""

    hits: list[CacheHit]
    shm_name: str
    unstaged: list[str] = []


class CacheReserve(Request, frozen=True, kw_only=True):
    """Host slots to offload these evicted blocks into, one per hash; never evicting a
    block of `keep` for them (blocks the same step is about to load)."""

    block_hashes: list[int]
    keep: list[int] = []


class CacheSlots(Reply, frozen=True, kw_only=True):
    """Per CacheReserve hash: a slot of segment shm_name to write, then CacheCommit; or
    None when there is nothing to write (held already) or no slot to be had."""

    slots: list[int | None]
    shm_name: str


class CacheCommit(Message, frozen=True, kw_only=True):
    """A worker wrote (committed) or gave up (aborted) the slots it reserved."""

    committed: list[int]
    aborted: list[int] = []


class RegisterCache(Request, frozen=True, kw_only=True):
    """A cache actor joins the router: its KV events are its node's workers' host and
    disk tiers. Answered by Registered."""

    events_endpoint: str
    model: str = ""  # the served name of the model whose KV it holds ("" = the first)


class CacheReport(Message, frozen=True, kw_only=True):
    """A cache actor's load, published on its events socket now and then."""

    load: CacheLoad


class CacheSnapshotQuery(Request, frozen=True, kw_only=True):
    """Router -> cache actor or worker: every block you hold, asked once the asker's
    events arrive after a (re)registration, so blocks kept from before (the disk tier's
    files; a worker's device prefix cache across a router restart) are credited too."""


class CacheSnapshot(Reply, frozen=True, kw_only=True):
    """The block hashes a cache actor's tiers (host, disk, object) or a worker's device
    pool hold."""

    host: list[int] = []
    disk: list[int] = []
    device: list[int] = []
    object: list[int] = []  # the object tier's index: the bucket's blocks of this model


# --- serving: registration, load, routing, generation ---


class RegisterWorker(Request, frozen=True, kw_only=True):
    """A worker joins the router's registry. Refused (Error) when its model or block
    size differs from the cluster's: a silent mismatch would make every KV hash miss."""

    model: str
    block_size: int
    num_blocks: int
    max_num_seqs: int
    events_endpoint: str  # where the worker PUBlishes KV events and LoadReports
    salt_id: str = ""  # block_hash.salt_id of its block-hash salt ("" = not told)
    pool: str = ""  # the [[pools]] entry it is in ("" = none)
    role: str = ""  # the role it serves now ("" = its Hello's); a planner may switch it
    # the same process again, after a role switch: its KV (and the router's index of it)
    # is kept
    role_switch: bool = False


class Registered(Reply, frozen=True, kw_only=True):
    router_id: str


# --- load: what each actor reports of itself, typed (one meaning per field) ---
#
#   worker ══LoadReport(WorkerLoad)══► router ──ClusterStatus(ActorStatus.load)──► frontend
#   cache  ══CacheReport(CacheLoad)══►   "                                         kvmesh status
#
# A tier's counters are two structs because two parties count: the tier store (the cache
# actor's, or an in-process connector's) counts the blocks it served to lookups (`hits`);
# a worker's connector counts those it then loaded into its device pool (`onboarded`).

Tier = typing.Literal["host", "disk", "object"]  # the KV tiers behind the device pools


class Counters(msgspec.Struct, frozen=True, kw_only=True):
    """Counts since their owner started; two of a kind add up field by field (the
    frontend sums them across actors)."""

    def __add__(self, other: typing.Self) -> typing.Self:
        names = self.__struct_fields__
        return type(self)(**{name: getattr(self, name) + getattr(other, name) for name in names})


class TierCounters(Counters, frozen=True, kw_only=True):
    """What a tier store (kvmesh.cache.store) counted in one tier, in blocks."""

    offloaded: int = 0  # stored into it: host from workers, disk demoted from host
    lookups: int = 0  # looked up in it (the disk: those the host lacked)
    hits: int = 0  # of those, found there and served to the lookup
    evicted: int = 0  # dropped from it for room


class OnboardCounters(Counters, frozen=True, kw_only=True):
    """What a worker's KV connector counted of the blocks it found in one tier."""

    onboarded: int = 0  # loaded into its device pool instead of computed
    failed: int = 0  # failed their checks at load (gone, rewritten, corrupt): computed


class WorkerLoad(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A worker's load: its engine's (Engine.load, after each step) and the totals the
    worker counts itself since it started (zero in what the engine alone reports)."""

    num_running: int = 0
    num_waiting: int = 0
    num_remote: int = 0  # prompts parked for a remote prefill (decode) or held for sending
    kv_usage: float = 0.0  # share of the device KV pool in use, 0 to 1
    queued_prefill_tokens: int = 0  # prompt tokens of waiting requests not computed yet
    prompt_tokens_total: int = 0  # of requests finished here
    cached_tokens_total: int = 0  # of those prompt tokens, served from a KV cache
    remote_prefills_total: int = 0  # prompts prefilled elsewhere (decode) or here for others
    transfer_bytes_total: int = 0  # KV bytes received (decode) or sent (prefill)
    preemptions_total: int = 0  # sequences preempted for room (recomputed later)
    tiers: dict[Tier, OnboardCounters] = {}  # its connector's, per tier (none: no tiers)
    adapters: list[str] = []  # LoRA adapters loaded now (the router prefers their holders)


class CacheLoad(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A cache actor's tiers (a tier it has not: absent), in blocks."""

    tiers: dict[Tier, TierCounters]  # counted since it started
    blocks: dict[Tier, int]  # held now
    reserved: dict[Tier, int]  # slots workers reserved and have not committed yet (host)
    capacity: dict[Tier, int]  # most it can hold


class RouterLoad(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The router's own: requests placed since it started, what its placements reused
    (routing quality), workers it declared dead, and its predictions of load not
    reported yet (see kvmesh.router.policy)."""

    routed_total: int = 0
    pending_tokens: int = 0
    pending_placements: int = 0
    prompt_tokens_total: int = 0  # of the requests placed
    cached_tokens_total: int = 0  # of those, held by the chosen decode worker (any tier)
    best_cached_tokens_total: int = 0  # held by the best alive decode worker: achievable
    remote_prefills_total: int = 0  # placements with a prefill worker (not local prefill)
    worker_deaths_total: int = 0  # workers gone silent (not a Goodbye): crashed or killed
    pool_routed_total: dict[str, int] = {}  # [[pools]] name -> requests placed there
    pool_fallbacks_total: int = 0  # placed beyond their pool: it had no decode worker alive


class LoadReport(Message, frozen=True, kw_only=True):
    """A worker's load, published on its events socket after each busy step (and idly)."""

    load: WorkerLoad
    # the peers it needs and cannot reach now, each with why (its node's cache actor)
    unreachable: list[str] = []


class RouteRequest(Request, frozen=True, kw_only=True):
    """Where should a prompt with these block hashes go?"""

    request_id: str
    block_hashes: list[int]
    num_prompt_tokens: int
    exclude: list[str] = []  # workers the asker saw die: never place there
    salt_id: str = ""  # the asker's block-hash salt (block_hash.salt_id; "" = not told)
    model: str = ""  # the served name of the model; "" = the cluster's first
    adapter: str = ""  # the model's LoRA adapter it runs through ("" = the base model)


class RequestDone(Message, frozen=True, kw_only=True):
    """Frontend -> router: a placed request ended; its predicted load is gone."""

    request_id: str


class Placement(Reply, frozen=True, kw_only=True):
    """The router's answer: decode here; prefill there first, or locally (None)."""

    decode: str
    decode_endpoint: str
    prefill: str | None = None
    prefill_endpoint: str | None = None
    expected_cached_tokens: int = 0


class ActorStatus(msgspec.Struct, frozen=True, kw_only=True):
    actor_id: str
    role: str
    node: str
    pid: int
    endpoints: dict[str, str]
    alive: bool
    load: WorkerLoad | CacheLoad | RouterLoad | None = None  # by its kind; None: reports none
    model: str = ""  # prefill, decode and cache actors: the served name of their model
    # why the peers that need it cannot use it (its events do not reach the router, it
    # cannot reach its node's cache actor); empty: healthy
    problems: list[str] = []


class StatusQuery(Request, frozen=True, kw_only=True):
    """Ask the router for the registry (kvmesh status, frontend /health)."""


class ClusterStatus(Reply, frozen=True, kw_only=True):
    actors: list[ActorStatus]
    # served name -> "loaded", "loading", "unloading" or "unloaded" (see ModelControl)
    models: dict[str, str] = {}

    def unloaded(self) -> frozenset[str]:
        """The models an operator unloaded (their workers stopping or stopped)."""
        return frozenset(m for m, state in self.models.items() if state in UNLOADED_STATES)


# --- models at runtime: the router holds which models are loaded; launchers follow ---

ModelAction = typing.Literal["load", "unload"]
UNLOADED_STATES = ("unloading", "unloaded")


class ModelControl(Request, frozen=True, kw_only=True):
    """Load or unload a model (the admin API, `kvmesh models`). Unload: the router stops
    placing its requests and tells its workers to drain and exit (UnloadModel); their
    launchers keep them stopped. Load: the launchers start them again. Answered by
    ModelStates at once; the states then move on as the workers go and come."""

    model: str
    action: ModelAction


class ModelQuery(Request, frozen=True, kw_only=True):
    """Every served model's state and workers. Answered by ModelStates."""


class ModelState(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    state: str  # "loaded", "loading", "unloading" or "unloaded"
    workers: list[str] = []  # registered now
    unloaded_workers: list[str] = []  # stopped by an unload, kept stopped by launchers


class ModelStates(Reply, frozen=True, kw_only=True):
    models: list[ModelState]


UNLOADED_EXIT = 75  # a worker's exit code after UnloadModel: its launcher waits for a load


class UnloadModel(Message, frozen=True, kw_only=True):
    """Router -> worker: its model is unloaded; finish what is in flight, then exit with
    UNLOADED_EXIT (its launcher does not restart it until the model is loaded again)."""

    model: str


class SwitchRole(Request, frozen=True, kw_only=True):
    """The planner asks a worker to serve `role` ("prefill" or "decode") from now on:
    the worker re-registers in that role and finishes its requests of the old one."""

    role: str


class RoleSwitched(Reply, frozen=True, kw_only=True):
    role: str
    num_draining: int  # requests of the old role still running when it re-registered


class Generate(Message, frozen=True, kw_only=True):
    """Frontend -> decode worker: run this prompt and stream TokenBatches back."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prefill: str | None = None
    prefill_endpoint: str | None = None
    # A migrated request: the tokens its dead worker generated and the characters of
    # their text the client already has; generation resumes right after them.
    output_token_ids: list[int] = []
    num_sent_chars: int = 0
    adapter: str = ""  # the model's LoRA adapter to run through ("" = the base model)


class Abort(Message, frozen=True, kw_only=True):
    """Stop a request (the client went away)."""

    request_id: str


class StreamErrorCode:
    """The values of StreamError.code: why a request's stream ended in failure. Plain
    strings, not an enum, so that a code added by a newer peer still decodes. Consumers
    branch on the code, never on the words of the message."""

    INVALID_REQUEST = "invalid_request"  # the engine cannot take it; the message names the field
    REQUEST_ID_IN_USE = "request_id_in_use"  # another frontend's request runs under this id
    WORKER_DIED = "worker_died"  # the worker running it died (the frontend's own notice)
    REFUSED = "refused"  # the worker refused the Generate unread: it never started there
    ABORTED = "aborted"  # ended from outside the stream (the client went away)
    ENGINE_DEAD = "engine_dead"  # the engine thread crashed (one-process serving)


class StreamError(msgspec.Struct, frozen=True, kw_only=True):
    """Why a request's stream ended in failure: a StreamErrorCode and words for people."""

    code: str
    message: str


class Delta(msgspec.Struct, frozen=True, kw_only=True):
    """What one step added to one request; `error` ends the stream with a failure."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: StreamError | None = None

    @classmethod
    def failed(cls, request_id: str, code: str, message: str) -> Delta:
        """The Delta that ends a request's stream with StreamError(code, message)."""
        error = StreamError(code=code, message=message)
        return cls(request_id=request_id, new_token_ids=[], new_text="", error=error)


class TokenBatch(Message, frozen=True, kw_only=True):
    """Decode worker -> frontend: one step's deltas for that frontend's requests."""

    deltas: list[Delta]


class RemotePrefill(Request, frozen=True, kw_only=True):
    """Decode -> prefill worker: compute this prompt and write the KV of tokens
    num_cached_tokens.. into my blocks `block_ids` (the prompt's, in order)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    num_cached_tokens: int
    block_ids: list[int]
    adapter: str = ""  # the LoRA adapter the prompt is computed through ("" = none)


class RemotePrefillDone(Reply, frozen=True, kw_only=True):
    """The KV is in the decode worker's blocks; the first token was sampled."""

    request_id: str
    token_id: int
    logprobs: dict[int, float] | None = None
    num_bytes: int = 0


AnyMessage = (
    Hello
    | Welcome
    | Heartbeat
    | Goodbye
    | Ping
    | Pong
    | Shutdown
    | Error
    | BlockStored
    | BlockRemoved
    | AllBlocksCleared
    | KvPoolQuery
    | KvPoolInfo
    | KvWrite
    | KvWriteDone
    | RegisterWorker
    | Registered
    | LoadReport
    | RouteRequest
    | RequestDone
    | Placement
    | StatusQuery
    | ClusterStatus
    | SwitchRole
    | RoleSwitched
    | Generate
    | Abort
    | TokenBatch
    | RemotePrefill
    | RemotePrefillDone
    | CacheAttach
    | CacheInfo
    | CacheLookup
    | CacheHits
    | CacheReserve
    | CacheSlots
    | CacheCommit
    | RegisterCache
    | CacheReport
    | CacheSnapshotQuery
    | CacheSnapshot
    | ModelControl
    | ModelQuery
    | ModelStates
    | UnloadModel
)
MESSAGE_TYPES: tuple[type[Message], ...] = typing.get_args(AnyMessage)

# Who may send each message, by the sender's role: the role its key names when the
# cluster has keys (kvmesh/transport/keys.py), else the role its Hello claimed. A type
# not listed may come from any registered peer: Hello (checked against the key itself),
# Heartbeat, Goodbye, Ping, and every Reply (it must answer a request this actor sent,
# on the route it went out on).
WORKERS = frozenset({"prefill", "decode"})
SENDERS: dict[type[Message], frozenset[str]] = {
    Shutdown: frozenset({"operator"}),
    BlockStored: WORKERS | {"cache"},
    BlockRemoved: WORKERS | {"cache"},
    AllBlocksCleared: WORKERS | {"cache"},
    KvPoolQuery: WORKERS,
    KvWrite: WORKERS,  # and only for a transfer the receiver granted (dataplane.py)
    RegisterWorker: WORKERS,
    LoadReport: WORKERS,
    RouteRequest: frozenset({"frontend"}),
    RequestDone: frozenset({"frontend"}),
    StatusQuery: frozenset({"frontend", "operator", "planner"}),
    Generate: frozenset({"frontend"}),
    Abort: frozenset({"frontend"}),  # and only the frontend that sent the Generate
    TokenBatch: frozenset({"decode"}),  # and only for requests placed on that worker
    RemotePrefill: frozenset({"decode"}),
    CacheAttach: WORKERS,
    CacheLookup: WORKERS,
    CacheReserve: WORKERS,
    CacheCommit: WORKERS,
    RegisterCache: frozenset({"cache"}),
    CacheReport: frozenset({"cache"}),
    CacheSnapshotQuery: frozenset({"router"}),
    SwitchRole: frozenset({"planner"}),
    ModelControl: frozenset({"frontend", "operator"}),
    ModelQuery: frozenset({"frontend", "operator"}),
    UnloadModel: frozenset({"router"}),
}

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


class MalformedMessage(ValueError):
    """Bytes that are not one valid message; `code` is an ErrorCode value."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def encode(msg: Message) -> bytes:
    """MessagePack bytes of one message, tag included."""
    return _encoder.encode(msg)


def decode(data: bytes | memoryview, max_size: int = MAX_MESSAGE_SIZE) -> Message:
    """The message in `data`; raises MalformedMessage, and nothing else, on bad input.

    The size is checked before any byte is parsed.
    """
    if len(data) > max_size:
        raise MalformedMessage(
            ErrorCode.TOO_LARGE, f"message of {len(data)} bytes exceeds the limit of {max_size}"
        )
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise MalformedMessage(ErrorCode.MALFORMED, str(exc)) from None


class HelloHeader(msgspec.Struct):
    """The fields every protocol version's Hello shares; unknown fields are ignored."""

    type: str = ""
    version: int = -1
    call_id: int = 0


_hello_header_decoder = msgspec.msgpack.Decoder(HelloHeader)


def peek_hello(data: bytes | memoryview) -> HelloHeader | None:
    """The version and request id of a Hello this protocol version cannot fully decode
    (another version's fields), or None when `data` is no Hello at all."""
    try:
        header = _hello_header_decoder.decode(data)
    except msgspec.DecodeError:
        return None
    return header if header.type == "Hello" and header.version >= 0 else None


_CAMEL_BOUNDARY = re.compile(r"(?<!^)(?=[A-Z])")


def snake_name(message_type: type[Message]) -> str:
    """BlockStored -> block_stored: the handler of a message type is `on_<snake_name>`."""
    return _CAMEL_BOUNDARY.sub("_", message_type.__name__).lower()
