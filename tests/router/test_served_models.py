"""ServedModels: the router's per-model facts, without sockets."""

from kvmesh.protocol import ModelState, RegisterWorker
from kvmesh.router.models import ServedModels
from kvmesh.router.policy import WorkerState


def register(model: str, block_size: int = 16, salt_id: str = "", pool: str = "") -> RegisterWorker:
    return RegisterWorker(
        model=model,
        block_size=block_size,
        num_blocks=8,
        max_num_seqs=4,
        events_endpoint="tcp://127.0.0.1:1",
        salt_id=salt_id,
        pool=pool,
    )


def test_registration_is_refused_naming_the_mismatch():
    models = ServedModels({"alpha": 16, "beta": 32})
    assert models.registration_problem(register("gamma")) == (
        "model 'gamma' is not served here; the cluster serves 'alpha', 'beta'"
    )
    assert models.registration_problem(register("beta", 16)) == (
        "block_size 16 differs from the cluster's 32 for 'beta': its KV hashes would never match"
    )
    models.add_worker("decode-0", register("alpha", salt_id="aaaa"))
    assert models.registration_problem(register("alpha", salt_id="aaaa")) is None
    assert models.registration_problem(register("beta", 32, salt_id="bbbb")) is None  # its own
    assert models.registration_problem(register("alpha", salt_id="bbbb")).startswith(
        "its block hashes are salted bbbb, the workers' aaaa"
    )


def test_a_prompt_goes_to_the_pool_with_the_largest_minimum_it_reaches():
    models = ServedModels({"m": 16}, {"m": ((4096, "huge"), (512, "long"), (0, "short"))})
    assert [models.pool_for("m", n) for n in (0, 511, 512, 4095, 4096)] == [
        "short",
        "short",
        "long",
        "long",
        "huge",
    ]
    assert models.pool_for("other", 10_000) == ""


def test_states_follow_workers_and_unloads():
    models = ServedModels({"alpha": 16, "beta": 16})
    workers = {"prefill-0": WorkerState("prefill-0", "prefill")}
    models.add_worker("prefill-0", register("beta"))
    assert [(m.name, m.state) for m in models.states(workers).models] == [
        ("alpha", "loading"),  # no worker yet
        ("beta", "loading"),  # a prefill worker, no decode worker
    ]
    workers["decode-0"] = WorkerState("decode-0", "decode")
    models.add_worker("decode-0", register("beta"))
    assert models.state("beta", workers) == "loaded"
    models.unloaded["beta"] = {"decode-0", "prefill-0"}
    assert models.state("beta", workers) == "unloading"
    for worker_id in ("decode-0", "prefill-0"):
        del workers[worker_id]
        models.remove(worker_id)
    assert models.states(workers).models[1] == ModelState(
        name="beta", state="unloaded", unloaded_workers=["decode-0", "prefill-0"]
    )


def test_adapter_credits_follow_the_load_reports():
    models = ServedModels({"m": 16, "n": 16})
    models.add_worker("decode-0", register("m"))
    models.add_worker("decode-1", register("m"))
    models.add_worker("decode-2", register("n"))
    models.set_adapters("decode-0", ["sql", "chat"])
    models.set_adapters("decode-1", ["sql"])
    models.set_adapters("decode-2", ["sql"])  # another model's adapter of the same name
    assert models.adapter_credits("m", "sql", 256.0) == {"decode-0": 256.0, "decode-1": 256.0}
    assert models.adapter_credits("m", "chat", 256.0) == {"decode-0": 256.0}
    assert models.adapter_credits("m", "", 256.0) == {}
    assert models.adapter_credits("m", "sql", 0.0) == {}
    models.set_adapters("decode-0", ["chat"])  # sql evicted there
    models.remove("decode-1")
    assert models.adapter_credits("m", "sql", 256.0) == {}
    assert models.adapter_holders == {("m", "chat"): {"decode-0"}, ("n", "sql"): {"decode-2"}}
