"""In-process libnftables (``libnftables.so.1``, Debian package ``libnftables1``, which
the ``nftables`` package depends on) through ctypes.

Why: running the ``nft`` command for every change costs a process start, its imports and
a fresh netlink cache, most of a small change's time. One :class:`Libnftables` context
keeps its netlink socket open for the life of the router process and takes the same
``nft -j`` JSON documents as the command. Calls block (a netlink round trip), so async
callers run them in a thread; one context must not be used by two threads at once
(the router serialises its syncs with a lock).
"""

from __future__ import annotations

import ctypes
import threading

LIBRARY = "libnftables.so.1"
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4  # output (and input parsing) in JSON


class LibnftablesError(RuntimeError):
    """libnftables could not be loaded or refused a command."""


def _load(name: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise LibnftablesError(f"cannot load {name} (install libnftables1): {exc}") from exc
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_output_set_flags.restype = None
    for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
        getattr(lib, fn).restype = ctypes.c_int
    for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
        getattr(lib, fn).restype = ctypes.c_char_p
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


class Libnftables:
    """One libnftables context in JSON mode, in the network namespace of the process
    at the time it is made."""

    def __init__(self, library: str = LIBRARY) -> None:
        self._lib = _load(library)
        ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise LibnftablesError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
        # Output and errors go to buffers read after each command, not to stdout/stderr.
        if self._lib.nft_ctx_buffer_output(ctx) or self._lib.nft_ctx_buffer_error(ctx):
            self.close()
            raise LibnftablesError("cannot buffer libnftables output")
        self._busy = threading.Lock()

    def run(self, command: str) -> str:
        """Run ``command`` (a JSON document, or nft syntax) as one transaction; its
        output (JSON for a listing). Raises :class:`LibnftablesError` with nft's message
        when it is refused (nothing of it is applied then)."""
        if self._ctx is None:
            raise LibnftablesError("the libnftables context is closed")
        with self._busy:  # a context is not thread-safe
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise LibnftablesError(err.decode(errors="replace").strip()[:2000]
                                   or f"libnftables failed ({rc})")
        return out.decode()

    def close(self) -> None:
        """Free the context (its netlink socket)."""
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass
