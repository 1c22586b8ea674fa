"""The default cluster fits the machine: fewer than 8 usable CPUs and no cluster.toml
give one aggregated worker; a cluster.toml, or the user's overrides, decide otherwise."""

import pytest

from kvmesh.cli.cluster import load
from kvmesh.config import config_to_toml, load_config, topology


def actor_ids(cfg) -> list[str]:
    return [spec.actor_id for spec in cfg.actors]


@pytest.fixture
def cpus(monkeypatch):
    """Set how many CPUs this process may use, as topology sees it."""

    def set_cpus(n: int) -> None:
        monkeypatch.setattr(topology, "usable_cpus", lambda: n)

    return set_cpus


def test_a_few_cores_get_one_aggregated_worker():
    cfg = load_config(None, topology.machine_overrides(cpus=2))
    assert actor_ids(cfg) == ["frontend-0", "router-0", "decode-0", "cache-0"]


@pytest.mark.parametrize("n", [8, 64])
def test_eight_cores_or_more_get_the_documented_default(n):
    assert topology.machine_overrides(cpus=n) == []
    assert actor_ids(load_config(None, topology.machine_overrides(cpus=n))) == [
        "frontend-0",
        "router-0",
        "prefill-0",
        "decode-0",
        "decode-1",
        "cache-0",
    ]


def test_up_without_a_config_fits_the_cores_and_passes_the_fit_to_its_actors(cpus):
    cpus(2)
    cfg, args = load(None, (), None, None)
    assert actor_ids(cfg) == ["frontend-0", "router-0", "decode-0", "cache-0"]
    # `kvmesh actor` children get the same cluster whatever their own affinity
    assert args == ["--set", "nodes.0.actors.2.count=0", "--set", "nodes.0.actors.3.count=1"]


def test_the_users_overrides_ask_for_more_workers(cpus):
    cpus(4)
    cfg, _ = load(None, ("nodes.0.actors.2.count=1", "nodes.0.actors.3.count=2"), None, None)
    assert actor_ids(cfg) == [
        "frontend-0",
        "router-0",
        "prefill-0",
        "decode-0",
        "decode-1",
        "cache-0",
    ]


def test_a_cluster_toml_is_taken_as_written(cpus, tmp_path):
    cpus(2)
    path = tmp_path / "cluster.toml"
    path.write_text(config_to_toml(load_config()))
    cfg, args = load(str(path), (), None, None)
    assert "prefill-0" in actor_ids(cfg) and "decode-1" in actor_ids(cfg)
    assert args == ["--config", str(path)]


@pytest.mark.parametrize(
    ("cpus", "engines", "threads"),
    [(2, 1, 1), (4, 1, 3), (4, 3, 1), (7, 2, 3), (8, 1, None), (64, 4, None)],
)
def test_engines_on_a_few_cores_leave_one_core_to_serving(monkeypatch, cpus, engines, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert topology.engine_threads(engines, cpus=cpus) == threads


def test_omp_num_threads_set_by_the_user_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert topology.engine_threads(1, cpus=2) is None


def test_each_cpu_worker_of_the_node_gets_its_share(monkeypatch, cpus):
    from kvmesh.actors.roles import init_worker

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus(4)
    cfg, _ = load(None, ("nodes.0.actors.2.count=1", "nodes.0.actors.3.count=2"), None, None)
    spec = next(a for a in cfg.actors if a.actor_id == "decode-1")
    assert init_worker(cfg, spec).settings.threads == 1  # (4 - 1) // 3 engines
