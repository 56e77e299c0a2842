"""Operating-system helpers: process trees, parent-death signals, clocks.

Linux gives us the two guarantees the design leans on: PR_SET_PDEATHSIG
(a process is signalled when its parent dies, kill -9 included) and
PR_SET_CHILD_SUBREAPER (orphaned descendants re-parent to us instead of to
init, so a double-forked grandchild stays in our tree and can be found and
killed). Elsewhere both are no-ops and the lifeline pipes do the work.
"""

import ctypes
import errno
import os
import signal
import time

import psutil
import setproctitle

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = None


def _prctl(option: int, value: int) -> bool:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        return _libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies."""
    return _prctl(PR_SET_PDEATHSIG, int(sig))


def become_subreaper() -> bool:
    """Orphaned descendants re-parent to this process (Linux >= 3.4)."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


# jobs.scheduling -> the Linux scheduling policy of a job's process. A
# process may move itself (and what it forks inherits it) into BATCH or IDLE
# without privileges; it could not come back, which a job never needs.
JOB_SCHEDULING = {
    "normal": getattr(os, "SCHED_OTHER", None),
    "batch": getattr(os, "SCHED_BATCH", None),
    "idle": getattr(os, "SCHED_IDLE", None),
}


def set_scheduling(kind: str) -> bool:
    """Put this process in the scheduling class `kind` of jobs.scheduling.

    `idle` (SCHED_IDLE): a runnable process of the normal class (the
    supervisor, a child) preempts it at once, so a handoff does not wait for
    a CPU behind dozens of CPU-bound jobs; the jobs still get every cycle
    nothing else wants. `batch` (SCHED_BATCH): like normal, but never
    preempts others on wake-up. False where the platform has no such
    policy; the job then runs in the normal class at `jobs.nice`."""
    policy = JOB_SCHEDULING.get(kind)
    if kind == "normal" or policy is None:
        return kind == "normal"
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
        return True
    except (OSError, AttributeError):
        return False


def set_title(title: str) -> None:
    """What `ps` and `top` show for this process: the supervisor, a child
    and a job's process must be told apart by an operator about to kill one."""
    setproctitle.setproctitle(title)


def clock() -> float:
    """Seconds on a clock shared by every process of this host that keeps
    counting while the machine is suspended (CLOCK_BOOTTIME), so a deadline
    passed from the supervisor to a child means the same to both."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


def close_fds_except(keep: set[int]) -> None:
    """Close every inherited descriptor above 2 not in `keep`: a forked
    child must not hold other children's lifeline pipes open, or their EOF
    would never come."""
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = list(range(3, 1024))
    for fd in open_fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def has_children() -> bool:
    """Does this process have any child, running or exited but not reaped?
    For a subreaper, no child means no descendant at all."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False


def start_time(pid: int) -> float | None:
    """The process's start time (epoch seconds), None if there is none."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_same_process(pid: int, started_at: float | None) -> bool | None:
    """Is `pid` still the process that started at `started_at`? True: alive
    and the same (safe to signal). False: provably gone (no such process, a
    zombie -- it has exited, only its parent has not collected it yet --, or
    the pid now belongs to a later process). None: alive but nothing to
    compare with, so neither can be proven."""
    if is_zombie(pid):
        return False
    now_started = start_time(pid)
    if now_started is None:
        return False
    if started_at is None:
        return None
    return abs(now_started - started_at) < 0.05


def is_zombie(pid: int) -> bool:
    """Has `pid` exited and is it only waiting for its parent to reap it?"""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below `pid` (children, their children...)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def children_of(pid: int) -> set[int]:
    """The live children of `pid` (of all its threads). Reads the kernel's
    per-thread children lists, which costs a few small reads instead of a
    walk of /proc for every process on the host."""
    found = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as listing:
                found.update(int(child) for child in listing.read().split())
    except FileNotFoundError:
        try:  # a kernel without CONFIG_PROC_CHILDREN
            found = {child.pid for child in psutil.Process(pid).children()}
        except psutil.NoSuchProcess:
            pass
    except OSError:
        pass
    return found


def rss(pid: int) -> int:
    """Resident memory of `pid` alone, in bytes (0 if it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def signal_group(pgid: int, sig: int) -> None:
    """Signal a process group; a group that is already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise


def kill_tree(pid: int, include_root: bool = True) -> list[int]:
    """SIGKILL `pid`'s process group and every process below it, including
    those that left the group (setsid). The tree is listed before anything
    is killed, so nothing re-parents away mid-walk."""
    victims = descendants(pid)
    if include_root:
        signal_group(pid, signal.SIGKILL)
    for proc in victims:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def tree_rss(pid: int) -> int:
    """Resident memory of `pid` and its descendants, in bytes."""
    total = 0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def describe_status(status: int) -> str:
    """A waitpid status in words: 'exit status 3', 'killed by SIGSEGV'."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
