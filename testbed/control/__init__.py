"""The runtime control endpoint: push pressure and faults into a running client machine.

``netswap client --control HOST:PORT`` serves it; ``netswap pressure`` is its client.

Protocol: line-delimited JSON over TCP.  Each request is one JSON object on one line, each
answer one JSON object on one line, in order::

    {"cmd": "hog", "pages": 8192, "rate": 2000, "processes": 2}
    {"ok": true, "cmd": "hog", "id": "hog1", ...}
    {"cmd": "hog", "pages": -1}
    {"ok": false, "error": "hog: 'pages' must be >= 1, got -1"}

Commands (``testbed.control.commands`` is the reference; unknown keys are errors):

``status``
    the machine now: ``vm.sample``, vmstat, PSI, reserves, net, integrity, injected
    pressure, faults, outcome so far.
``hog`` pages:int>=1, rate:number>0 (pages/s, optional: as fast as it can), processes:int>=1
    new anonymous-memory processes that write and verify their pages, then hold them
    until ``release``.
``flood`` mbps:number>0, seconds:number>0
    a peer floods a new ordinary socket while a slow consumer reads it.
``fault`` kind: ``latency`` (ms:number>=0), ``reset``, ``alloc`` (probability 0..1,
    interval:int>=1, times:int>=-1, space:int>=0 bytes, gfp, task), ``clear``
    client faults (client/faults.py).  ``"target": "server"`` addresses the faults of a
    server embedded in the same process (``ServerFaults``: the extension point for
    server/faults.py); ``netswap client`` has none.
``release``
    injected hogs exit and free their memory; floods stop.
``stop``
    end the run as if its workloads had ended; the answer comes first.

A request that is not one JSON object with a known ``cmd`` and valid, typed arguments is
answered ``{"ok": false, "error": ...}`` naming the bad field or value; a line longer than
``MAX_LINE`` is answered so and the connection closed.  Nothing a peer sends can stop the
machine except ``stop``.  Several connections may be open at once.

One job per module: :mod:`~testbed.control.commands` (a request line to a command record,
cattrs), :mod:`~testbed.control.endpoint` (connections, answers, a machine's commands),
:mod:`~testbed.control.server` (``netswap server --control`` and the server's faults).
"""

from testbed.control.commands import (
    CLIENT_FAULTS,
    COMMANDS,
    FAULT_TARGETS,
    MAX_LINE,
    Command,
    CommandError,
    FaultAlloc,
    FaultClear,
    FaultLatency,
    FaultReset,
    Flood,
    Hog,
    Release,
    ServerFault,
    Status,
    Stop,
    parse_command,
)
from testbed.control.endpoint import (
    DEFAULT_CONTROL_PORT,
    ControlEndpoint,
    Endpoint,
    ServerFaults,
    check_control_address,
    encode_answer,
    error_answer,
    serve_control,
)
from testbed.control.server import SERVER_FAULT_KINDS, NBDServerFaults, ServerControlEndpoint

__all__ = [
    "CLIENT_FAULTS",
    "COMMANDS",
    "DEFAULT_CONTROL_PORT",
    "FAULT_TARGETS",
    "MAX_LINE",
    "SERVER_FAULT_KINDS",
    "Command",
    "CommandError",
    "ControlEndpoint",
    "Endpoint",
    "FaultAlloc",
    "FaultClear",
    "FaultLatency",
    "FaultReset",
    "Flood",
    "Hog",
    "NBDServerFaults",
    "Release",
    "ServerControlEndpoint",
    "ServerFault",
    "ServerFaults",
    "Status",
    "Stop",
    "check_control_address",
    "encode_answer",
    "error_answer",
    "parse_command",
    "serve_control",
]
