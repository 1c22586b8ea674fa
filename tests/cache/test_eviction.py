"""Eviction policies: exact victim sequences for scripted insert/touch/remove histories,
skip, iteration order, and the policy-name error."""

import pytest

from kvmesh.cache.eviction import EVICTION_POLICIES, make_policy


def make_filled(name: str, script: str):
    """A policy after `script`: "+a" inserts a, "*a" touches a, "-a" removes a."""
    policy = make_policy(name)
    ops = {"+": policy.insert, "*": policy.touch, "-": policy.remove}
    for step in script.split():
        ops[step[0]](step[1:])
    return policy


def drain(policy) -> list[str]:
    """Every victim in turn, each removed before the next is asked for."""
    victims = []
    while (victim := policy.victim()) is not None:
        victims.append(victim)
        policy.remove(victim)
    return victims


@pytest.mark.parametrize(
    ("name", "script", "victims"),
    [
        ("lru", "+a +b +c", ["a", "b", "c"]),
        ("lru", "+a +b +c *a", ["b", "c", "a"]),
        ("lru", "+a +b +c *a *b", ["c", "a", "b"]),
        ("lru", "+a +b +c *b -a +d", ["c", "b", "d"]),
        ("fifo", "+a +b +c", ["a", "b", "c"]),
        ("fifo", "+a +b +c *a *a *c", ["a", "b", "c"]),
        ("fifo", "+a +b +c -a +a", ["b", "c", "a"]),
        # lfu: counts a=3 b=1 c=2 -> b, c, a
        ("lfu", "+a +b +c *a *a *c", ["b", "c", "a"]),
        # equal counts: least recently used first (b touched before a and c)
        ("lfu", "+a +b +c *b *a *c", ["b", "a", "c"]),
        # a new key (count 1) goes before older, more used ones
        ("lfu", "+a *a +b *b +c", ["c", "a", "b"]),
        # removing the only key at the lowest count moves the lowest count up
        ("lfu", "+a *a +b *b *b +c -c", ["a", "b"]),
        ("lfu", "+a *a +b *b *b +c -c +d", ["d", "a", "b"]),
        # re-inserted after removal starts again at count 1
        ("lfu", "+a *a *a +b *b -a +a", ["a", "b"]),
    ],
)
def test_victim_sequence(name, script, victims):
    assert drain(make_filled(name, script)) == victims


@pytest.mark.parametrize(
    ("name", "script", "order"),
    [
        ("lru", "+a +b +c *a", ["b", "c", "a"]),
        ("fifo", "+a +b +c *a", ["a", "b", "c"]),
        ("lfu", "+a +b +c *a *a *c", ["b", "c", "a"]),
    ],
)
def test_iteration_is_eviction_order_and_victim_skips(name, script, order):
    policy = make_filled(name, script)
    assert list(policy) == order
    assert len(policy) == 3
    assert policy.victim(skip={order[0]}) == order[1]
    assert policy.victim(skip=set(order[:2])) == order[2]
    assert policy.victim(skip=set(order)) is None
    assert order[0] in policy and "z" not in policy


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_empty_policy_has_no_victim(name):
    assert make_policy(name).victim() is None
    assert drain(make_filled(name, "+a -a")) == []


@pytest.mark.parametrize("name", ["LRU", "random", ""])
def test_unknown_policy_names_the_allowed_values(name):
    with pytest.raises(ValueError, match=r"one of lru, lfu, fifo, got '.*'"):
        make_policy(name)
