"""min_free_kbytes, watermark distribution and __zone_watermark_ok, with worked numbers."""

from __future__ import annotations

import pytest

from client.mm import (
    ALLOC_HARDER,
    ALLOC_HIGH,
    ALLOC_NO_WATERMARKS,
    ALLOC_OOM,
    ALLOC_WMARK_HIGH,
    ALLOC_WMARK_LOW,
    ALLOC_WMARK_MIN,
    GFP_ATOMIC,
    AllocFlags,
    Watermarks,
    Zone,
    calculate_watermarks,
    default_min_free_kbytes,
    gfp_to_alloc_flags,
    setup_watermarks,
    zone_watermark_ok,
)

GiB_KB = 1024 * 1024


@pytest.mark.parametrize(
    ("lowmem_kbytes", "expected"),
    [
        (1 * GiB_KB, 4096),  # reference §3 examples
        (4 * GiB_KB, 8192),
        (16 * GiB_KB, 16384),
        (4096, 256),  # 4 MiB: int_sqrt(65536)
        (512, 128),  # clamped up to 128
        (16 * 1024 * GiB_KB, 262144),  # 16 TiB: int_sqrt = 524288, clamped down
    ],
)
def test_default_min_free_kbytes(lowmem_kbytes: int, expected: int) -> None:
    assert default_min_free_kbytes(lowmem_kbytes) == expected


def test_watermarks_shared_over_two_zones_by_managed_pages() -> None:
    # 3 GiB DMA32 + 1 GiB Normal, min_free_kbytes 8192 -> pages_min 2048.
    dma32, normal = calculate_watermarks([786432, 262144], 8192)
    # min = 2048 * 786432 / 1048576 = 1536; gap = max(1536/4 = 384, 786432*10/10000 = 786)
    assert dma32 == Watermarks(min=1536, low=1536 + 786, high=1536 + 2 * 786)
    # min = 512; gap = max(128, mult_frac(262144, 10, 10000) = 262)
    assert normal == Watermarks(min=512, low=774, high=1036)
    assert dma32.min + normal.min == 2048


def test_small_zone_gap_is_a_quarter_of_min() -> None:
    # 4 MiB: 1024 pages, min_free_kbytes 256 -> min 64; gap = max(16, 1) = 16
    assert calculate_watermarks([1024], 256) == [Watermarks(64, 80, 96)]


def test_watermark_scale_factor_widens_the_gap() -> None:
    # 1 GiB zone, factor 100 (1%): gap = max(1024/4, 2621) = 2621
    [wm] = calculate_watermarks([262144], 4096, watermark_scale_factor=100)
    assert wm == Watermarks(1024, 1024 + 2621, 1024 + 2 * 2621)


def test_extra_min_pages_raise_every_watermark() -> None:
    # pages_min 2048 + 1024 extra = 3072 shared 3:1
    dma32, normal = calculate_watermarks([786432, 262144], 8192, extra_min_pages=1024)
    assert (dma32.min, normal.min) == (2304, 768)
    assert normal.low == 768 + 262 and normal.high == 768 + 2 * 262


def test_setup_watermarks_sets_zones() -> None:
    zones = [Zone("DMA32", 0, 3072), Zone("Normal", 3072, 1024)]
    setup_watermarks(zones, 512)  # pages_min 128 -> 96 + 32
    assert [z.watermarks.min for z in zones] == [96, 32]


def test_watermarks_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="min <= low <= high"):
        Watermarks(min=10, low=5, high=20)
    with pytest.raises(ValueError):
        Watermarks(min=1, low=5, high=4)


def test_mark_selects_by_alloc_flags() -> None:
    wm = Watermarks(10, 20, 30)
    assert wm.mark(ALLOC_WMARK_MIN) == 10
    assert wm.mark(ALLOC_WMARK_LOW | ALLOC_HIGH) == 20
    assert wm.mark(ALLOC_WMARK_HIGH) == 30


MIN = 800


@pytest.mark.parametrize(
    ("alloc_flags", "threshold"),
    [
        (ALLOC_WMARK_MIN, 800),  # fails while free <= min
        (ALLOC_HIGH, 400),  # ALLOC_HIGH: min -= min/2
        (ALLOC_HARDER, 600),  # ALLOC_HARDER alone: 3/4 min
        (ALLOC_HIGH | ALLOC_HARDER, 300),  # GFP_ATOMIC: 3/8 min
        (ALLOC_OOM, 400),  # OOM victim (4.16-6.2): "if (alloc_flags & ALLOC_OOM) min -= min / 2"
        (ALLOC_OOM | ALLOC_HARDER, 400),  # ALLOC_OOM instead of ALLOC_HARDER's quarter
        (ALLOC_OOM | ALLOC_HIGH, 200),  # both halvings (never built: ALLOC_OOM replaces HIGH)
    ],
)
def test_zone_watermark_ok_thresholds(alloc_flags: AllocFlags, threshold: int) -> None:
    assert not zone_watermark_ok(threshold, MIN, alloc_flags)
    assert zone_watermark_ok(threshold + 1, MIN, alloc_flags)


def test_gfp_atomic_reaches_three_eighths_of_min() -> None:
    flags = gfp_to_alloc_flags(GFP_ATOMIC, 0)
    assert zone_watermark_ok(301, MIN, flags)
    assert not zone_watermark_ok(300, MIN, flags)
    assert MIN * 3 // 8 == 300


def test_no_watermarks_skips_the_check_down_to_zero() -> None:
    assert zone_watermark_ok(0, MIN, ALLOC_NO_WATERMARKS)
    assert zone_watermark_ok(1, MIN, ALLOC_NO_WATERMARKS | ALLOC_WMARK_LOW)


def test_lowmem_reserve_adds_to_min() -> None:
    assert not zone_watermark_ok(900, MIN, ALLOC_WMARK_MIN, lowmem_reserve=100)
    assert zone_watermark_ok(901, MIN, ALLOC_WMARK_MIN, lowmem_reserve=100)


def test_zone_free_list_is_lazy_and_lifo() -> None:
    zone = Zone("Normal", 100, 3)
    assert zone.nr_free == 3 and zone.managed == 3
    a, b = zone.take(), zone.take()
    assert (a.pfn, b.pfn, zone.nr_free) == (100, 101, 1)
    zone.give(a)
    assert zone.take() is a  # freed pages are reused first, Page objects are kept
    assert zone.take().pfn == 102
    with pytest.raises(RuntimeError):
        zone.take()
