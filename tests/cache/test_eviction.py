"""Property-based tests of the LRU/quota/age accounting."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hpcsif.cache.eviction import Item, plan_eviction

NOW = 1_000_000.0

items_st = st.lists(
    st.builds(
        Item,
        key=st.text("abcdef0123456789", min_size=4, max_size=8),
        size=st.integers(0, 10_000),
        last_used=st.floats(NOW - 100_000, NOW),
        leased=st.booleans(),
    ),
    max_size=30,
    unique_by=lambda i: i.key,
)
quota_st = st.one_of(st.none(), st.integers(0, 150_000))
age_st = st.one_of(st.none(), st.floats(0, 120_000))


@given(items_st, quota_st, age_st)
def test_plan_respects_leases_quota_and_age(
    items: list[Item], quota: int | None, max_age: float | None
) -> None:
    victims = plan_eviction(items, quota=quota, max_age=max_age, now=NOW)
    by_key = {i.key: i for i in items}
    assert len(victims) == len(set(victims)) and set(victims) <= set(by_key)
    assert not any(by_key[k].leased for k in victims), "a leased image is never evicted"
    kept = [i for i in items if i.key not in set(victims)]
    too_old = {i.key for i in items if max_age is not None and not i.leased and NOW - i.last_used > max_age}
    assert too_old <= set(victims), "every unleased image past the age limit goes"
    if quota is not None:
        total = sum(i.size for i in kept)
        unleased_kept = [i for i in kept if not i.leased]
        # within quota, or nothing more could be evicted
        assert total <= quota or not unleased_kept
        # least recently used first: no kept unleased image is older than one evicted for the quota
        quota_victims = [by_key[k] for k in victims if k not in too_old]
        if quota_victims and unleased_kept:
            assert max((v.last_used, v.key) for v in quota_victims) <= min(
                (i.last_used, i.key) for i in unleased_kept
            )
        # minimal: before the last quota eviction the cache was still over quota
        if quota_victims:
            assert total + quota_victims[-1].size > quota
    else:
        assert set(victims) == too_old


@given(items_st)
def test_no_limits_evict_nothing(items: list[Item]) -> None:
    assert plan_eviction(items, quota=None, max_age=None, now=NOW) == []


@given(items_st, st.integers(0, 150_000))
def test_plan_is_stable(items: list[Item], quota: int) -> None:
    """Applying a plan and planning again evicts nothing more."""
    victims = set(plan_eviction(items, quota=quota, now=NOW))
    rest = [i for i in items if i.key not in victims]
    assert plan_eviction(rest, quota=quota, now=NOW) == []
