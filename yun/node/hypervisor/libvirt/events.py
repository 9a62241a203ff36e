"""Libvirt's event loop on asyncio, and libvirt lifecycle events as Yun's DomainEvent.

Libvirt needs an event loop implementation to deliver domain events and to run its
connection keepalive. ``libvirtaio`` provides one on asyncio, but it assumes that
every libvirt call is made on the event loop's thread: libvirt's remote driver
adds, updates and removes its socket watches from whichever thread makes an API
call, and ``libvirtaio`` then touches asyncio (``add_reader``, ``ensure_future``)
from that thread, which asyncio does not allow. The driver makes its blocking calls
in worker threads (``asyncio.to_thread``), so :class:`ThreadSafeAsyncIOImpl` keeps
``libvirtaio``'s bookkeeping under a lock and applies every change to asyncio on the
loop's thread (``call_soon_threadsafe`` when called from elsewhere). Each applied
change *reconciles* asyncio with the current bookkeeping ("watch fd N for what its
callbacks want now"), so the order in which deferred changes run does not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import libvirt
import libvirtaio

from yun.node.hypervisor.base import DomainEvent, HypervisorError
from yun.proto.messages import DomainState

log = logging.getLogger("yun.node.hypervisor.libvirt.events")

_READ = libvirt.VIR_EVENT_HANDLE_READABLE
_WRITE = libvirt.VIR_EVENT_HANDLE_WRITABLE


class ThreadSafeAsyncIOImpl(libvirtaio.virEventAsyncIOImpl):
    """``libvirtaio``'s event implementation, safe to drive from several threads."""

    loop: asyncio.AbstractEventLoop

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._lock = threading.RLock()
        # Constructed on the loop's thread (see ensure_event_impl).
        self._loop_thread = threading.get_ident()

    # -- applying changes on the loop

    def _on_loop(self, fn: Any, *args: Any) -> None:
        if self.loop.is_closed():
            # A connection opened after the loop ended (plain synchronous use): libvirt
            # polls its socket itself during calls; only events go undelivered.
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(fn, *args)

    def _sync_fd(self, fd: int) -> None:
        """Make asyncio watch ``fd`` for exactly what its libvirt callbacks want now."""
        with self._lock:
            desc = dict.get(self.descriptors, fd)  # plain get: no __missing__ insert
            events = 0
            if desc is not None:
                for cb in desc.callbacks.values():
                    events |= cb.event or 0
        try:
            if desc is not None and events & _READ:
                self.loop.add_reader(fd, desc._handle, _READ)
            else:
                self.loop.remove_reader(fd)
            if desc is not None and events & _WRITE:
                self.loop.add_writer(fd, desc._handle, _WRITE)
            else:
                self.loop.remove_writer(fd)
        except (OSError, ValueError) as exc:  # fd already closed by libvirt
            log.debug("libvirt fd %d not watched: %s", fd, exc)

    def _sync_timer(self, tcb: libvirtaio.TimeoutCallback) -> None:
        """Start or stop the asyncio task of timer ``tcb`` to match its current timeout."""
        with self._lock:
            wanted = tcb.iden in self.callbacks and tcb.timeout >= 0
        if wanted and tcb._task is None:
            tcb._task = asyncio.ensure_future(tcb._timer(), loop=self.loop)
        elif not wanted and tcb._task is not None:
            tcb._task.cancel()
            tcb._task = None

    def schedule_ff_callback(self, iden: int, opaque: Any) -> None:
        """Free libvirt's opaque data later on the loop: never inside the remove call."""

        def free() -> None:
            libvirt.virEventInvokeFreeCallback(opaque)
            with self._lock:
                self._pending_dec()

        if not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(free)

    # -- the six functions libvirt calls (from any thread)

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        with self._lock:
            callback = libvirtaio.FDCallback(
                self, cb, opaque, descriptor=self.descriptors[fd], event=event
            )
            self.callbacks[callback.iden] = callback
            callback.descriptor.callbacks[callback.iden] = callback
            self._pending_inc()
        self._on_loop(self._sync_fd, fd)
        return int(callback.iden)

    def _update_handle(self, watch: int, event: int) -> None:
        with self._lock:
            callback = self.callbacks.get(watch)
            if not isinstance(callback, libvirtaio.FDCallback):
                return
            callback.event = event
            fd = callback.descriptor.fd
        self._on_loop(self._sync_fd, fd)

    def _remove_handle(self, watch: int) -> int:
        with self._lock:
            callback = self.callbacks.pop(watch, None)
            if not isinstance(callback, libvirtaio.FDCallback):
                return -1
            fd = callback.descriptor.fd
            callback.descriptor.callbacks.pop(watch, None)
            if not callback.descriptor.callbacks:
                dict.pop(self.descriptors, fd, None)
        self._on_loop(self._sync_fd, fd)
        self.schedule_ff_callback(callback.iden, callback.opaque)
        return 0

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        with self._lock:
            tcb = libvirtaio.TimeoutCallback(self, cb, opaque)
            tcb.timeout = timeout
            self.callbacks[tcb.iden] = tcb
            self._pending_inc()
        self._on_loop(self._sync_timer, tcb)
        return int(tcb.iden)

    def _update_timeout(self, timer: int, timeout: int) -> None:
        with self._lock:
            tcb = self.callbacks.get(timer)
            if not isinstance(tcb, libvirtaio.TimeoutCallback):
                return
            tcb.timeout = timeout
        self._on_loop(self._sync_timer, tcb)

    def _remove_timeout(self, timer: int) -> int:
        with self._lock:
            tcb = self.callbacks.pop(timer, None)
            if not isinstance(tcb, libvirtaio.TimeoutCallback):
                return -1
            tcb.timeout = -1
        self._on_loop(self._sync_timer, tcb)
        self.schedule_ff_callback(tcb.iden, tcb.opaque)
        return 0

    def rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``loop`` (the current thread's) from now on, moving every watch to it."""
        old = self.loop
        if old.is_running() and not old.is_closed():
            raise HypervisorError(
                "libvirt events are already served by another running asyncio loop; "
                "libvirt allows one event loop per process"
            )
        with self._lock:
            self.loop = loop
            self._loop_thread = threading.get_ident()
            self._finished = None  # an asyncio.Event of the old loop
            fds = list(dict.keys(self.descriptors))
            timers = [c for c in self.callbacks.values()
                      if isinstance(c, libvirtaio.TimeoutCallback)]
        for tcb in timers:
            tcb._task = None  # belonged to the old loop, which no longer runs
            self._sync_timer(tcb)
        for fd in fds:
            self._sync_fd(fd)
        log.debug("libvirt event loop moved to a new asyncio loop",
                  extra={"fds": len(fds), "timers": len(timers)})

    def _pending_inc(self) -> None:
        with self._lock:
            super()._pending_inc()


_impl: ThreadSafeAsyncIOImpl | None = None
_impl_lock = threading.Lock()


def ensure_event_impl() -> ThreadSafeAsyncIOImpl:
    """Libvirt's event implementation, serving the running loop; call before connecting.

    Libvirt accepts one event implementation per process, registered once. A node
    agent runs one loop; tests run one loop per test, so when a new loop comes the
    implementation moves to it (the previous loop must have stopped running).
    """
    global _impl
    loop = asyncio.get_running_loop()
    with _impl_lock:
        if _impl is None:
            impl = ThreadSafeAsyncIOImpl(loop)
            try:
                impl.register()
            except RuntimeError as exc:  # someone else registered another one first
                raise HypervisorError(
                    f"cannot use libvirt events on asyncio: {exc} (by another component "
                    "of this process)"
                ) from exc
            _impl = impl
            log.debug("libvirt event loop registered on asyncio")
        elif _impl.loop is not loop:
            _impl.rebind(loop)
        return _impl


# --------------------------------------------------------------------------- lifecycle


def _names(prefix: str) -> dict[int, str]:
    """libvirt constants ``<prefix>FOO`` as {value: "foo"}."""
    return {
        getattr(libvirt, n): n[len(prefix):].lower()
        for n in dir(libvirt)
        if n.startswith(prefix) and not n.endswith("LAST")
    }


_EVENT_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
_DETAIL_PREFIX = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "VIR_DOMAIN_EVENT_DEFINED_",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "VIR_DOMAIN_EVENT_UNDEFINED_",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "VIR_DOMAIN_EVENT_STARTED_",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "VIR_DOMAIN_EVENT_SUSPENDED_",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "VIR_DOMAIN_EVENT_RESUMED_",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "VIR_DOMAIN_EVENT_STOPPED_",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "VIR_DOMAIN_EVENT_SHUTDOWN_",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "VIR_DOMAIN_EVENT_PMSUSPENDED_",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "VIR_DOMAIN_EVENT_CRASHED_",
}
_DETAILS = {event: _names(prefix) for event, prefix in _DETAIL_PREFIX.items()}


def event_reason(event: int, detail: int) -> str:
    """A readable ``event/detail``, e.g. ``stopped/shutdown`` or ``started/booted``."""
    name = _EVENT_NAMES.get(event, f"event{event}")
    return f"{name}/{_DETAILS.get(event, {}).get(detail, str(detail))}"


def lifecycle_state(event: int, detail: int) -> DomainState | None:
    """The state a lifecycle event puts a domain in; None for events that change none.

    ``shutdown`` (the guest finished powering off) is followed by ``stopped``, and
    ``defined`` does not change whether a domain runs, so both map to None.
    """
    if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
        return DomainState.RUNNING
    if event in (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED):
        return DomainState.PAUSED
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        if detail in (libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED,
                      libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED):
            return DomainState.CRASHED
        return DomainState.SHUTOFF
    if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
        return DomainState.CRASHED
    if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
        return DomainState.ABSENT
    return None


def lifecycle_event(uuid: str, event: int, detail: int) -> DomainEvent | None:
    """The Yun event for a libvirt lifecycle callback, or None if it changes no state."""
    state = lifecycle_state(event, detail)
    if state is None:
        return None
    return DomainEvent(uuid=uuid, state=state, reason=event_reason(event, detail))
