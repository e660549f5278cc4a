#!/usr/bin/env python3
"""What trio itself costs a virtual-clock run: the floor under the model's own code.

A benchmark, not a test: it prints microseconds per operation and, given a run's counts,
the share of that run's CPU they explain.  Profilers (cProfile, py-spy) charge trio's many
small calls far more than they cost; this times them bare, each in its own ``trio.run`` on
the ``MockClock`` the model runs on:

* one task stepping through ``checkpoint()``: a whole run-loop batch with one task in it
  (deadline expiry, ``epoll_wait(0)``, the batch shuffle, the task's step);
* two tasks stepping in the same batches: what a second task step in a batch adds;
* ``trio.current_time()`` (the model asks it several times per page I/O);
* ``epoll.poll(0)`` alone, the system call each batch makes.

``--batches N --steps M --cpu S`` (a run's batches, task steps and CPU seconds, e.g. from
``bench/model_speed.py --profile``: batches are ``unrolled_run``'s calls, task steps the
calls of ``Context.run``) prints what the floor comes to for that run.

Usage::

    .venv/bin/python bench/trio_floor.py [--n 200000]
        [--batches 293482 --steps 426254 --cpu 13.5]
"""

from __future__ import annotations

import argparse
import select
import socket
import time

import trio
import trio.testing


def _per_op(seconds: float, n: int) -> float:
    return seconds / n * 1e6


def one_task_batches(n: int) -> float:
    async def main() -> None:
        for _ in range(n):
            await trio.lowlevel.checkpoint()

    start = time.process_time()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return _per_op(time.process_time() - start, n)


def two_task_batches(n: int) -> float:
    async def stepper() -> None:
        for _ in range(n):
            await trio.lowlevel.checkpoint()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stepper)
            nursery.start_soon(stepper)

    start = time.process_time()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return _per_op(time.process_time() - start, n)


def current_time(n: int) -> float:
    result = 0.0

    async def main() -> None:
        nonlocal result
        start = time.process_time()
        for _ in range(n):
            trio.current_time()
        result = _per_op(time.process_time() - start, n)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return result


def epoll_zero(n: int) -> float:
    epoll = select.epoll()
    a, b = socket.socketpair()
    try:
        epoll.register(a.fileno(), select.EPOLLIN)
        start = time.process_time()
        for _ in range(n):
            epoll.poll(0, 1)
        return _per_op(time.process_time() - start, n)
    finally:
        epoll.close()
        a.close()
        b.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="operations per measurement")
    parser.add_argument("--batches", type=int, help="a run's run-loop batches")
    parser.add_argument("--steps", type=int, help="a run's task steps")
    parser.add_argument("--cpu", type=float, help="that run's CPU seconds")
    parser.add_argument("--now-calls", type=int, help="that run's trio.current_time() calls")
    args = parser.parse_args(argv)
    if args.n <= 0:
        parser.error("--n must be positive")
    batch = one_task_batches(args.n)
    two = two_task_batches(args.n)
    step = max(two - batch, 0.0)
    now = current_time(args.n)
    poll = epoll_zero(args.n)
    print(f"one batch of one task step (checkpoint):   {batch:6.2f} us")
    print(f"one batch of two task steps:               {two:6.2f} us (a step: {step:.2f} us)")
    print(f"trio.current_time() on the MockClock:      {now:6.2f} us")
    print(f"epoll.poll(0):                             {poll:6.2f} us")
    if args.batches and args.steps is not None and args.cpu:
        extra = max(args.steps - args.batches, 0)
        floor = (args.batches * batch + extra * step) / 1e6
        if args.now_calls:
            floor += args.now_calls * now / 1e6
        print(
            f"for {args.batches:,} batches and {args.steps:,} task steps"
            + (f" and {args.now_calls:,} clock reads" if args.now_calls else "")
            + f": {floor:.2f} s of trio, {100 * floor / args.cpu:.0f}% of {args.cpu:.1f} s CPU"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
