"""``none``: Linux before 2012.

No socket is special.  Reclaim's own TX still dips below min, because it runs in kswapd or a
direct reclaimer (``PF_MEMALLOC`` → ``ALLOC_NO_WATERMARKS``), but nothing protects the RX side:
the reply to a swap write needs a ``GFP_ATOMIC`` skb, which stops at 3/8·min.
"""

from __future__ import annotations

from client.policy.base import Policy


class NonePolicy(Policy):
    name = "none"
    models = "Linux before 2012: no memalloc sockets, RX is plain GFP_ATOMIC"
