"""The OOM killer and the oom_reaper (mm/oom_kill.c, 6.1).

``out_of_memory`` is what the allocator calls when reclaim has given up
(``__alloc_pages_may_oom``): it chooses a victim, sends it SIGKILL and gives it access to
the reserves (ALLOC_OOM); the oom_reaper unmaps the victim's anonymous memory
``OOM_REAPER_DELAY`` later if it has not exited by then.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from client.mm.facts import Observer, OomKill, OomReaped, drop
from client.mm.gfp import GFP, PF, gfp_t, task_flags
from client.mm.process import Process, current_process
from client.mm.vmstat import VmStat
from client.mm.waits import IDLE, WaitFor, WaitQueue, WaitRegistry

#: mm/oom_kill.c (5.18+, "mm/oom_kill.c: futex: delay the OOM reaper to allow time for proper
#: futex cleanup"): ``#define OOM_REAPER_DELAY (2*HZ)``: the reaper looks at a victim this
#: many seconds after it was chosen, if it has not exited by then.
OOM_REAPER_DELAY = 2.0
#: select_bad_process's "oc->chosen = (void *)-1UL": a victim is pending, choose nobody.
_OOM_ABORT = object()


class OomKiller:
    """One machine's OOM killer: its choice among ``processes``, and its reaper thread.

    ``unmap`` zaps a process's anonymous memory (``Memory``'s unmap_page_range), returning
    (pages unmapped, pages freed, swap entries dropped); ``hook`` learns each victim.
    """

    def __init__(
        self,
        processes: dict[int, Process],
        stat: VmStat,
        waits: WaitRegistry,
        *,
        unmap: Callable[[Process], tuple[int, int, int]],
        observer: Observer = drop,
        hook: Callable[[Process], None] | None = None,
    ) -> None:
        self.processes = processes
        self.stat = stat
        self.waits = waits
        self.observer = observer
        self._unmap = unmap
        self.hook = hook
        #: queue_oom_reaper's timers, in expiry order: (expires, victim).
        self._reaper_timers: deque[tuple[float, Process]] = deque()
        self._reaper_wait = WaitQueue()

    def out_of_memory(self, gfp: gfp_t) -> bool:
        """mm/oom_kill.c out_of_memory: True if the allocation may retry (a victim was chosen,
        one is still pending, or the task itself is dying), False if there is nothing to
        kill (where the kernel panics: "System is deadlocked on memory").

        The victim's memory is not freed here: its tasks get SIGKILL and ALLOC_OOM and free
        it when they reach exit; the oom_reaper frees its anonymous memory
        ``OOM_REAPER_DELAY`` later if they have not.
        """
        current = current_process()
        # "If current has a pending SIGKILL or is exiting, then automatically select it.
        # The goal is to allow it to allocate so that it may quickly exit and free its
        # memory."
        if current is not None and self._task_will_free_mem(current):
            self._mark_oom_victim(current)
            return True
        if not gfp & GFP.FS:  # "The OOM killer does not compensate for IO-less reclaim"
            return True
        chosen = self._select_bad_process()
        if chosen is None:
            return False
        if isinstance(chosen, Process):  # not _OOM_ABORT
            self._oom_kill_process(chosen)
        return True

    @staticmethod
    def _task_will_free_mem(process: Process) -> bool:
        """mm/oom_kill.c task_will_free_mem: it still has its mm, is being killed
        (SIGNAL_GROUP_EXIT), and its mm is not MMF_OOM_SKIP."""
        return process.killed and not process.exited and not process.oom_skip

    def _select_bad_process(self) -> Process | object | None:
        """mm/oom_kill.c select_bad_process: the process of highest oom_badness, or
        ``_OOM_ABORT`` while a victim is pending, or None if there is none.

        oom_evaluate_task: "This task already has access to memory reserves and is being
        killed. Don't allow any other task to have access to the reserves unless the task
        has MMF_OOM_SKIP because chances that it would release any memory is quite low" --
        abort the selection; a victim with MMF_OOM_SKIP is passed over, as oom_badness
        passes over any MMF_OOM_SKIP mm. The first of equal badness wins (the kernel's
        ``points < chosen_points`` test lets the last one win).
        """
        chosen: Process | None = None
        for process in self.processes.values():
            if process.oom_victim and not process.oom_skip:
                return _OOM_ABORT
            if process.oom_skip:
                continue
            if chosen is None or process.oom_badness() > chosen.oom_badness():
                chosen = process
        return chosen

    def _oom_kill_process(self, victim: Process) -> None:
        """mm/oom_kill.c oom_kill_process and __oom_kill_process."""
        # oom_kill_process: "If the task is already exiting, don't alarm the sysadmin or
        # kill its children or threads, just give it access to memory reserves"
        if self._task_will_free_mem(victim):
            self._mark_oom_victim(victim)
            return
        # __oom_kill_process: count_vm_event(OOM_KILL); SIGKILL, which wakes its tasks'
        # killable sleeps; mark_oom_victim; queue_oom_reaper
        self.stat.oom_kill += 1
        self.observer(OomKill(victim.pid, victim.name, victim.rss, victim.swapents))
        victim.kill()
        self._mark_oom_victim(victim)
        if self.hook is not None:
            self.hook(victim)

    def _mark_oom_victim(self, victim: Process) -> None:
        """mark_oom_victim (``signal->oom_mm``: tsk_is_oom_victim, ALLOC_OOM) and
        queue_oom_reaper (5.18+): once per mm (MMF_OOM_REAP_QUEUED), a timer that hands the
        victim to the oom_reaper ``OOM_REAPER_DELAY`` from now."""
        if not victim.oom_victim:
            victim.oom_victim = True
            victim.oom_victim_since = trio.current_time()
        if victim.oom_reap_queued:
            return
        victim.oom_reap_queued = True
        self._reaper_timers.append((trio.current_time() + OOM_REAPER_DELAY, victim))
        self._reaper_wait.unpark_all()

    def oom_wait(self) -> WaitFor | None:
        """What an allocation retrying after the OOM killer waits for: the pending victim."""
        for process in self.processes.values():
            if process.oom_victim and not process.oom_skip:
                return WaitFor("oom_victim", process.name, waker=process.name)
        return None

    async def oom_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The oom_reaper kernel thread (mm/oom_kill.c ``oom_reaper``), with the victims'
        timers (``wake_oom_reaper``): reap each victim when its timer expires."""
        idle = WaitFor(IDLE, "oom_reaper", waker="oom_kill")
        with task_flags(PF.KTHREAD):
            task_status.started()
            timers = self._reaper_timers
            while True:
                if not timers:
                    await self.waits.park(self._reaper_wait, idle)
                    continue
                expires, victim = timers[0]
                now = trio.current_time()
                if now < expires:
                    await self.waits.park(self._reaper_wait, idle, expires - now)
                    continue
                timers.popleft()
                self.oom_reap_task(victim)
                await trio.lowlevel.checkpoint()

    def oom_reap_task(self, victim: Process) -> None:
        """mm/oom_kill.c oom_reap_task: unmap the victim's anonymous memory, then set
        MMF_OOM_SKIP ("Hide this mm from OOM killer because it has been either reaped or
        somebody can't call mmap_write_unlock(mm)").

        wake_oom_reaper and oom_reap_task_mm do nothing for an mm already MMF_OOM_SKIP (the
        victim exited first). The model has no mmap_lock to fail the trylock on, so the first
        attempt always succeeds (no MAX_OOM_REAP_RETRIES), and only anonymous memory to
        reap: __oom_reap_task_mm unmaps anonymous and private vmas, and the page cache pages
        a process reads are not mapped by it.
        """
        if victim.oom_skip:
            return
        unmapped, freed, swapents = self._unmap(victim)
        victim.oom_skip = True
        since = trio.current_time() - (victim.oom_victim_since or 0.0)
        self.observer(OomReaped(victim.pid, victim.name, unmapped, freed, swapents, since))
