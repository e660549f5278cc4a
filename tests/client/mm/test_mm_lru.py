"""The anon LRU lists: order, rotation, isolation, inactive ratio."""

from __future__ import annotations

import pytest

from client.mm import Lru, Page, Zone, inactive_ratio

GB_PAGES = 1 << 18  # 1 GiB of 4 KiB pages


def pages(n: int) -> list[Page]:
    zone = Zone("Normal", 0, n)
    return [zone.take() for _ in range(n)]


@pytest.mark.parametrize(
    ("nr_pages", "ratio"),
    [(0, 1), (GB_PAGES - 1, 1), (GB_PAGES, 3), (4 * GB_PAGES, 6), (10 * GB_PAGES, 10)],
)
def test_inactive_ratio_is_int_sqrt_of_10_gb(nr_pages: int, ratio: int) -> None:
    assert inactive_ratio(nr_pages) == ratio


def test_isolate_takes_the_oldest_first() -> None:
    lru = Lru()
    ps = pages(5)
    for p in ps:
        lru.add(p)
    assert lru.nr_inactive == 5 and all(p.lru for p in ps)
    taken = lru.isolate(2, active=False)
    assert taken == ps[:2]
    assert not any(p.lru for p in taken)
    assert lru.pages(active=False) == ps[2:]


def test_rotate_to_tail_makes_a_page_next_to_reclaim() -> None:
    lru = Lru()
    ps = pages(3)
    for p in ps:
        lru.add(p)
    lru.rotate_to_tail(ps[2])
    assert lru.pages(active=False) == [ps[2], ps[0], ps[1]]
    ps[1].dirty = True  # rotate_reclaimable_page leaves dirty pages alone
    lru.rotate_to_tail(ps[1])
    assert lru.pages(active=False)[0] is ps[2]


def test_active_and_inactive_lists_are_separate() -> None:
    lru = Lru()
    a, b = pages(2)
    a.active = True
    lru.add(a)
    lru.add(b)
    assert (lru.nr_active, lru.nr_inactive, len(lru)) == (1, 1, 2)
    assert a in lru
    lru.remove(a)
    assert a not in lru and not a.lru


def test_inactive_is_low_below_the_target_ratio() -> None:
    lru = Lru()
    ps = pages(3)
    ps[0].active = ps[1].active = True
    for p in ps:
        lru.add(p)
    # < 1 GB: ratio 1, so inactive is low when inactive < active
    assert lru.inactive_is_low()
    lru.remove(ps[1])
    assert not lru.inactive_is_low()
