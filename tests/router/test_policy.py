"""Routing policies: kv cost tables (prefix, load, tiers, in-flight predictions), the
conditional disaggregation rule, the baselines, dead workers and settings errors."""

from pathlib import Path

import msgspec
import pytest

from kvmesh.config import load_config
from kvmesh.config.schema import RouterConfig
from kvmesh.protocol import BlockStored
from kvmesh.router.kv_index import KVIndex
from kvmesh.router.policy import NoWorkerError, Router, RouterSettings, WorkerState

BLOCK = 16
PROMPT = list(range(100, 108))  # 8 blocks
NUM_TOKENS = BLOCK * len(PROMPT)  # 128
LOCAL = {"disagg_min_tokens": 10**9}  # settings that keep prefill on the decode worker


def make_worker(worker_id: str, role: str = "decode", **fields) -> WorkerState:
    return WorkerState(worker_id=worker_id, role=role, **fields)


def make_workers(*ids: str, role: str = "decode") -> list[WorkerState]:
    return [make_worker(i, role) for i in ids]


def make_index(**holdings) -> KVIndex:
    """make_index(a=3, b=(2, "host")): a holds PROMPT's first 3 blocks on device, b 2 on host."""
    index = KVIndex()
    for worker_id, holding in holdings.items():
        num_blocks, tier = holding if isinstance(holding, tuple) else (holding, "device")
        index.apply(worker_id, BlockStored(block_hashes=PROMPT[:num_blocks], tier=tier))
    return index


def make_router(policy: str = "kv", **settings) -> Router:
    return Router(RouterSettings(policy=policy, **settings))


def choose(router: Router, workers, index=None, num_tokens: int = NUM_TOKENS):
    return router.choose(PROMPT, num_tokens, BLOCK, workers, index)


# --- kv: prefix, load, tiers ---


def test_kv_picks_the_longest_prefix_with_exact_costs():
    placement = choose(make_router(**LOCAL), make_workers("a", "b", "c"), make_index(a=2, b=5))
    assert placement.decode == "b"
    assert placement.decode_scores == {"a": 96.0, "b": 48.0, "c": 128}
    assert placement.expected_cached_tokens == 80
    assert placement.prefill is None
    assert placement.prefill_tokens == 48


@pytest.mark.parametrize(
    "a_blocks, a_load, load_weight, expected",
    [
        (1, 100, 1.0, "b"),  # a 16-token prefix does not pay for 100 queued tokens
        (7, 100, 1.0, "a"),  # a 112-token prefix does
        (1, 100, 0.0, "a"),  # load ignored: the prefix decides
        (1, 20, 1.0, "b"),  # 128 - 16 + 20 = 132 > 128
        (2, 20, 1.0, "a"),  # 128 - 32 + 20 = 116 < 128
    ],
)
def test_kv_load_against_prefix_gain(a_blocks, a_load, load_weight, expected):
    workers = [make_worker("a", num_queued_tokens=a_load), make_worker("b")]
    router = make_router(load_weight=load_weight, **LOCAL)
    assert choose(router, workers, make_index(a=a_blocks)).decode == expected


def test_kv_load_counts_kv_usage_times_capacity():
    workers = [make_worker("a", kv_usage=0.5, capacity_tokens=1000), make_worker("b")]
    placement = choose(make_router(**LOCAL), workers, make_index(a=8))
    assert placement.decode_scores == {"a": 500.0, "b": 128}
    assert placement.decode == "b"


def test_kv_equal_cost_goes_to_lower_load_then_lower_id():
    # a: 32 tokens cached, 32 queued; b: nothing cached, idle -> both cost 128
    workers = [make_worker("a", num_queued_tokens=32), make_worker("b"), make_worker("c")]
    placement = choose(make_router(**LOCAL), workers, make_index(a=2))
    assert placement.decode_scores == {"a": 128.0, "b": 128, "c": 128}
    assert placement.decode == "b"


@pytest.mark.parametrize(
    "weights, expected",
    [
        ({}, "a"),  # a: 4 host blocks = 48 credit; b: 2 device blocks = 32
        ({"host_weight": 0.25}, "b"),  # a: 16 credit
        ({"device_weight": 2.0}, "b"),  # b: 64 credit
    ],
)
def test_tier_weights_change_the_decision(weights, expected):
    router = make_router(**weights, **LOCAL)
    index = make_index(a=(4, "host"), b=2)
    assert choose(router, make_workers("a", "b"), index).decode == expected


def test_disk_blocks_earn_the_disk_weight():
    placement = choose(make_router(**LOCAL), make_workers("a"), make_index(a=(8, "disk")))
    assert placement.decode_scores == {"a": 128 - 8 * BLOCK * 0.25}
    assert placement.expected_cached_tokens == 128  # held is held, whatever the tier


def test_object_blocks_earn_the_object_weight():
    index = make_index(a=(8, "object"), b=(2, "disk"))
    placement = choose(make_router(**LOCAL), make_workers("a", "b"), index)
    assert placement.decode_scores == {"a": 128 - 8 * BLOCK * 0.1, "b": 128 - 2 * BLOCK * 0.25}
    assert placement.decode == "a"


# --- in-flight predictions ---


def test_predictions_spread_a_burst_until_load_reports_come():
    router, workers = make_router(**LOCAL), make_workers("a", "b", "c")
    burst = []
    for request_id in range(6):
        placement = choose(router, workers, KVIndex())
        router.on_placed(request_id, placement)
        burst.append(placement.decode)
    assert burst == ["a", "b", "c", "a", "b", "c"]
    assert router.pending_tokens == {"a": 256, "b": 256, "c": 256}
    for worker in workers:  # the reports now carry the load: predictions are dropped
        router.on_load_report(worker, num_running=2, num_queued_tokens=0, kv_usage=0.0)
    assert router.pending_tokens == {"a": 0, "b": 0, "c": 0}
    assert choose(router, workers, KVIndex()).decode == "a"


def test_without_predictions_a_burst_piles_onto_one_worker():
    router, workers = make_router(**LOCAL), make_workers("a", "b", "c")
    assert {choose(router, workers, KVIndex()).decode for _ in range(6)} == {"a"}


def test_finished_requests_give_back_their_prediction_once():
    router = make_router(disagg_min_tokens=0)
    workers = make_workers("a", "b") + make_workers("p", role="prefill")
    router.on_placed(1, choose(router, workers, make_index(p=3)))
    router.on_placed(2, choose(router, workers))
    assert router.pending_tokens == {"a": 128, "b": 128, "p": 80 + 128}
    router.on_finished(1)
    assert router.pending_tokens == {"a": 0, "b": 128, "p": 128}
    router.on_load_report(workers[1], num_running=1, num_queued_tokens=0, kv_usage=0.1)
    router.on_finished(2)  # b's report already carries request 2: nothing to subtract there
    router.on_finished(2)  # a second end is a no-op
    router.on_finished("unknown")
    assert router.pending_tokens == {"a": 0, "b": 0, "p": 0}
    assert workers[1].kv_usage == 0.1


def test_removed_worker_loses_its_predictions():
    router, workers = make_router(**LOCAL), make_workers("a")
    router.on_placed(1, choose(router, workers))
    router.on_worker_removed("a")
    router.on_finished(1)
    assert router.pending_tokens == {}


# --- conditional disaggregation ---

DISAGG = {"disagg_min_tokens": 64, "prefill_busy_tokens": 1000}


@pytest.mark.parametrize(
    "decode_blocks, prefill_workers, expected",
    [
        # suffix 128 - 5*16 = 48 < 64: local
        (5, [make_worker("p0", "prefill")], (None, "short_suffix", 48)),
        (0, [], (None, "no_prefill_worker", 128)),
        (0, [make_worker("p0", "prefill", alive=False)], (None, "no_prefill_worker", 128)),
        (0, [make_worker("p0", "prefill", num_queued_tokens=1001)], (None, "prefill_busy", 128)),
        # suffix 128 - 3*16 = 80 >= 64: remote, to the prefill worker of least cost
        (3, [make_worker("p0", "prefill")], ("p0", None, 128)),
        (4, [make_worker("p0", "prefill")], ("p0", None, 128)),  # suffix 64: not below 64
        (
            0,
            [make_worker("p0", "prefill", num_queued_tokens=1001), make_worker("p1", "prefill")],
            ("p1", None, 128),
        ),
        (
            0,
            [make_worker("p0", "prefill", num_queued_tokens=50), make_worker("p1", "prefill")],
            ("p1", None, 128),
        ),
    ],
)
def test_disaggregation_rule(decode_blocks, prefill_workers, expected):
    router = make_router(**DISAGG)
    placement = choose(router, [make_worker("d")] + prefill_workers, make_index(d=decode_blocks))
    assert (placement.prefill, placement.local_reason, placement.prefill_tokens) == expected
    assert placement.decode == "d"
    assert placement.expected_cached_tokens == decode_blocks * BLOCK


def test_remote_prefill_goes_where_the_prefill_prefix_is():
    workers = [make_worker("d")] + make_workers("p0", "p1", role="prefill")
    placement = choose(make_router(**DISAGG), workers, make_index(d=1, p1=6))
    assert placement.prefill == "p1"
    assert placement.prefill_scores == {"p0": 128, "p1": 32.0}
    assert placement.prefill_tokens == 32
    assert placement.expected_cached_tokens == 16


def test_predicted_prefill_queue_makes_a_prefill_worker_busy():
    router = make_router(disagg_min_tokens=64, prefill_busy_tokens=200)
    workers = [make_worker("d")] + make_workers("p0", role="prefill")
    reasons = []
    for request_id in range(3):
        placement = choose(router, workers)
        router.on_placed(request_id, placement)
        reasons.append((placement.prefill, placement.local_reason))
    # p0's predicted queue: 128, then 256 > 200
    assert reasons == [("p0", None), ("p0", None), (None, "prefill_busy")]


# --- baselines ---


def test_round_robin_cycles_exactly_and_skips_the_dead():
    router = make_router("round_robin", **LOCAL)
    workers = make_workers("a", "b", "c")
    assert [choose(router, workers).decode for _ in range(7)] == list("abcabca")
    workers[1].alive = False
    assert [choose(router, workers).decode for _ in range(4)] == list("caca")


def test_round_robin_cycles_prefill_workers_on_their_own():
    router = make_router("round_robin", disagg_min_tokens=0)
    workers = make_workers("a", "b", "c") + make_workers("p0", "p1", role="prefill")
    placements = [choose(router, workers) for _ in range(4)]
    assert [(p.decode, p.prefill) for p in placements] == [
        ("a", "p0"),
        ("b", "p1"),
        ("c", "p0"),
        ("a", "p1"),
    ]


def test_random_is_reproducible_with_a_seed():
    workers = make_workers("a", "b", "c", "d")

    def picks(seed):
        router = make_router("random", seed=seed, **LOCAL)
        return [choose(router, workers).decode for _ in range(20)]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)
    assert set(picks(7)) == {"a", "b", "c", "d"}


def test_least_loaded_ignores_the_prefix():
    workers = [make_worker("a", num_queued_tokens=10), make_worker("b", num_queued_tokens=5)]
    placement = choose(make_router("least_loaded", **LOCAL), workers, make_index(a=8))
    assert placement.decode == "b"
    assert placement.decode_scores == {"a": 10, "b": 5}
    assert placement.expected_cached_tokens == 0  # b holds nothing


@pytest.mark.parametrize(
    "policy, index, expected",
    [
        # (achieved, achievable): what the chosen decode worker held, the most any did
        ("kv", make_index(a=2, b=5), (80, 80)),
        ("least_loaded", make_index(b=5), (0, 80)),  # picks a (lower id): b's prefix wasted
        ("kv", make_index(a=(3, "host"), b=1), (48, 48)),  # any tier counts as held
        ("kv", make_index(), (0, 0)),
        ("kv", make_index(dead=8), (0, 0)),  # a dead worker's blocks are not achievable
    ],
)
def test_placement_reports_achieved_and_achievable_prefix(policy, index, expected):
    workers = make_workers("a", "b") + [make_worker("dead", alive=False)]
    placement = choose(make_router(policy, **LOCAL), workers, index)
    assert (placement.expected_cached_tokens, placement.best_cached_tokens) == expected


def test_achievable_prefix_is_capped_at_the_prompt():
    placement = choose(make_router(**LOCAL), make_workers("a"), make_index(a=8), num_tokens=100)
    assert (placement.expected_cached_tokens, placement.best_cached_tokens) == (100, 100)


@pytest.mark.parametrize("policy", ["round_robin", "random", "least_loaded"])
def test_baselines_apply_the_disaggregation_rule(policy):
    router = make_router(policy, **DISAGG)
    workers = [make_worker("d")] + make_workers("p0", role="prefill")
    assert choose(router, workers, make_index(d=7)).local_reason == "short_suffix"
    assert choose(router, workers, make_index(d=1)).prefill == "p0"


# --- temperature ---


def test_temperature_samples_reproducibly_by_cost():
    workers = make_workers("a", "b")
    index = make_index(a=8)  # a costs 0, b costs 128

    def picks(temperature, seed=0):
        router = make_router(temperature=temperature, seed=seed, **LOCAL)
        return [choose(router, workers, index).decode for _ in range(40)]

    assert set(picks(1.0)) == {"a"}  # b is e^-128 times as likely
    assert set(picks(1e9)) == {"a", "b"}  # all but uniform
    assert picks(64.0, seed=3) == picks(64.0, seed=3)


# --- dead workers, errors, settings ---


@pytest.mark.parametrize("policy", ["kv", "round_robin", "random", "least_loaded"])
def test_a_dead_worker_is_never_chosen(policy):
    router = make_router(policy, disagg_min_tokens=0)
    workers = [
        make_worker("a", alive=False),
        make_worker("b"),
        make_worker("p0", "prefill", alive=False),
        make_worker("p1", "prefill"),
    ]
    index = make_index(a=8, p0=8)
    for _ in range(10):
        placement = choose(router, workers, index)
        assert (placement.decode, placement.prefill) == ("b", "p1")


@pytest.mark.parametrize(
    "workers",
    [[], make_workers("p0", role="prefill"), [make_worker("a", alive=False)]],
)
def test_no_alive_decode_worker_is_a_clear_error(workers):
    with pytest.raises(NoWorkerError, match="no alive decode worker") as error:
        choose(make_router(), workers)
    assert error.value.role == "decode"


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"policy": "fastest"},
            "policy must be one of kv, round_robin, random, least_loaded, got 'fastest'",
        ),
        ({"host_weight": -0.5}, "host_weight must be >= 0, got -0.5"),
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
    ],
)
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        RouterSettings(**settings)


def test_settings_default_to_the_router_table():
    """One default per setting, stated once in the schema: a Router built without settings
    routes as the default cluster.toml does (disagg_min_tokens was 1024 here, 128 there)."""
    defaults = msgspec.structs.asdict(RouterSettings())
    assert defaults == msgspec.structs.asdict(RouterConfig())
    shipped = load_config(Path(__file__).resolve().parents[2] / "cluster.toml").router
    assert defaults == msgspec.structs.asdict(shipped)
    assert RouterSettings().disagg_min_tokens == 128


def test_bad_role_names_the_field():
    with pytest.raises(ValueError, match="role must be one of prefill, decode, got 'both'"):
        make_worker("a", role="both")


# --- LoRA adapters: a credit for the workers that have the request's adapter loaded ---


@pytest.mark.parametrize("scores", [True, False], ids=["scored", "unscored"])
def test_an_adapter_credit_takes_tokens_off_and_loses_to_a_long_prefix(scores):
    router = make_router(**LOCAL)
    workers = make_workers("a", "b", "c")
    credits = {"c": 64.0}
    placed = router.choose(PROMPT, NUM_TOKENS, BLOCK, workers, KVIndex(), scores, credits)
    assert placed.decode == "c"
    if scores:
        assert placed.decode_scores == {"a": 128.0, "b": 128.0, "c": 64.0}
    assert placed.expected_cached_tokens == 0  # a credit is not a cached block
    # a prefix worth more than the credit still wins: b holds 5 blocks (80 tokens)
    placed = router.choose(PROMPT, NUM_TOKENS, BLOCK, workers, make_index(b=5), scores, credits)
    assert placed.decode == "b"


def test_an_adapter_credit_loses_to_a_load_difference_beyond_it():
    router = make_router(**LOCAL)
    workers = [make_worker("a"), make_worker("b", num_queued_tokens=100)]
    assert (
        router.choose(PROMPT, NUM_TOKENS, BLOCK, workers, KVIndex(), credits={"b": 64.0}).decode
        == "a"
    )
    assert (
        router.choose(PROMPT, NUM_TOKENS, BLOCK, workers, KVIndex(), credits={"b": 128.0}).decode
        == "b"
    )
