"""sk_buff heads and their sizes as net/core/skbuff.c (Linux 6.1, x86_64) makes them.

An skb is a head (``struct sk_buff``, from ``skbuff_head_cache``, or two of them from
``skbuff_fclone_cache`` for TCP's transmit skbs) and data: a linear area from kmalloc, and
for most packets page fragments.  Its ``truesize`` is what socket accounting charges:

* ``__alloc_skb(size, gfp, flags)``: the head with ``gfp`` ("skb =
  kmem_cache_alloc_node(cache, gfp_mask & ~GFP_DMA, node)"), then the linear area,
  ``SKB_DATA_ALIGN(size) + SKB_DATA_ALIGN(sizeof(struct skb_shared_info))`` bytes, from
  ``kmalloc_reserve`` (first without the reserves, then with them if the caller may have
  them; the second marks the skb pfmemalloc); "osize = ksize(data); size =
  SKB_WITH_OVERHEAD(osize)", and ``truesize = SKB_TRUESIZE(size)``.  A failed data
  allocation frees the head ("nodata: kmem_cache_free(cache, skb)").
* ``build_skb(data, frag_size)``: only a head (``kmem_cache_alloc(skbuff_head_cache,
  GFP_ATOMIC)``), around a receive buffer the driver already has; ``truesize = frag_size +
  SKB_DATA_ALIGN(sizeof(struct sk_buff))``.  ``client/net/device.py`` uses it.

The sizes are a distribution kernel's on x86_64 (Debian's amd64 config): ``struct sk_buff``
232 bytes (``client.mm.slab.SKB_SIZE``), ``struct skb_shared_info`` 48 + 17 frags of 16
bytes = 320, ``SMP_CACHE_BYTES`` 64, ``MAX_TCP_HEADER = L1_CACHE_ALIGN(128 + MAX_HEADER)``
with ``MAX_HEADER = LL_MAX_HEADER (128, CONFIG_HYPERV_NET) + 48`` (IP tunnels) = 320.
"""

from __future__ import annotations

from client.mm import GFP, current_task_flags, gfp_t
from client.mm.gfp import gfp_pfmemalloc_allowed
from client.mm.slab import (
    SKB_SIZE,
    SKBUFF_FCLONE_CACHE,
    SKBUFF_HEAD_CACHE,
    SlabCaches,
    SlabObject,
    kmalloc_size_class,
)

SMP_CACHE_BYTES = 64  # x86_64 L1_CACHE_BYTES


def skb_data_align(size: int) -> int:
    """``SKB_DATA_ALIGN(X)``: ``ALIGN(X, SMP_CACHE_BYTES)``."""
    return -(-size // SMP_CACHE_BYTES) * SMP_CACHE_BYTES


#: SKB_DATA_ALIGN(sizeof(struct skb_shared_info)): 48 bytes of fields and MAX_SKB_FRAGS (17)
#: skb_frag_t of 16 bytes.
SKB_SHINFO_SIZE = skb_data_align(48 + 17 * 16)
#: SKB_DATA_ALIGN(sizeof(struct sk_buff)).
SKB_HEAD_TRUESIZE = skb_data_align(SKB_SIZE)
#: include/net/tcp.h: "#define MAX_TCP_HEADER L1_CACHE_ALIGN(128 + MAX_HEADER)".
MAX_TCP_HEADER = skb_data_align(128 + 128 + 48)


def skb_truesize(size: int) -> int:
    """``SKB_TRUESIZE(X)``: "((X) + SKB_DATA_ALIGN(sizeof(struct sk_buff)) +
    SKB_DATA_ALIGN(sizeof(struct skb_shared_info)))"."""
    return size + SKB_HEAD_TRUESIZE + SKB_SHINFO_SIZE


def alloc_skb_truesize(size: int) -> int:
    """The truesize ``__alloc_skb(size)`` gives: its kmalloc'd area, as ``ksize`` sees it,
    less the shared info (``SKB_WITH_OVERHEAD(osize)``), through ``SKB_TRUESIZE``."""
    return skb_truesize(
        kmalloc_size_class(skb_data_align(size) + SKB_SHINFO_SIZE) - SKB_SHINFO_SIZE
    )


class SkbHead:
    """What ``__alloc_skb`` allocated: the head object and the kmalloc'd linear area."""

    __slots__ = ("data", "head", "pfmemalloc", "truesize")

    def __init__(self, head: SlabObject, data: SlabObject, pfmemalloc: bool) -> None:
        self.head = head
        self.data = data
        self.pfmemalloc = pfmemalloc  # skb->pfmemalloc, from kmalloc_reserve
        self.truesize = skb_truesize(data.cache.object_size - SKB_SHINFO_SIZE)

    def free(self) -> None:
        """``__kfree_skb``: ``skb_release_data`` (kfree of the linear area), then
        ``kfree_skbmem`` (the head back to its cache)."""
        self.data.cache.free(self.data)
        self.head.cache.free(self.head)


async def kmalloc_reserve(
    slab: SlabCaches, size: int, gfp: gfp_t, reserve: object | None = None
) -> tuple[SlabObject | None, bool]:
    """net/core/skbuff.c kmalloc_reserve: "Try a regular allocation, when that fails and
    we're not entitled to the reserves, fail" -- ``kmalloc(size, flags |
    __GFP_NOMEMALLOC | __GFP_NOWARN)``, then, if ``gfp_pfmemalloc_allowed(flags)``, again
    with ``flags`` ("now we are using pfmemalloc reserves"), reporting ``pfmemalloc``."""
    obj = await slab.kmalloc(size, gfp | GFP.NOMEMALLOC | GFP.NOWARN, reserve=reserve)
    if obj is not None or not gfp_pfmemalloc_allowed(gfp, current_task_flags()):
        return obj, False
    obj = await slab.kmalloc(size, gfp, reserve=reserve)
    return obj, obj is not None


async def alloc_skb(
    slab: SlabCaches, size: int, gfp: gfp_t, *, fclone: bool = False, reserve: object | None = None
) -> SkbHead | None:
    """``__alloc_skb(size, gfp, fclone ? SKB_ALLOC_FCLONE : 0)``: a head from
    ``skbuff_fclone_cache`` (``alloc_skb_fclone``, TCP's transmit skbs) or
    ``skbuff_head_cache`` (``alloc_skb``), then the linear area; None if either failed."""
    cache = slab[SKBUFF_FCLONE_CACHE if fclone else SKBUFF_HEAD_CACHE]
    head = await cache.alloc(gfp, reserve=reserve)
    if head is None:
        return None
    data, pfmemalloc = await kmalloc_reserve(
        slab, skb_data_align(size) + SKB_SHINFO_SIZE, gfp, reserve
    )
    if data is None:
        cache.free(head)  # "nodata: kmem_cache_free(cache, skb)"
        return None
    return SkbHead(head, data, pfmemalloc)


__all__ = [
    "MAX_TCP_HEADER",
    "SKB_HEAD_TRUESIZE",
    "SKB_SHINFO_SIZE",
    "SkbHead",
    "alloc_skb",
    "alloc_skb_truesize",
    "kmalloc_reserve",
    "skb_data_align",
    "skb_truesize",
]
