"""The set writer's helper process: applies set-element scripts, one transaction each.

Started once by :class:`~codetainer.network.setwriter.SetHelper` (``python -I -B -m
codetainer.network.sethelper nft|ipset``) and kept: the DNS hook's insertions cost a pipe
round trip instead of a ``nft``/``ipset`` process each. It imports only the standard
library, so it starts in ~20 ms.

Protocol on stdin/stdout, binary frames:

* request: ``!II`` number and length, then that many bytes of script (UTF-8): an ``nft
  -f`` script (``nft``) or ``ipset restore`` lines (``ipset``, only ``add SET ADDR timeout
  N -exist`` and ``del SET ADDR -exist``), exactly what the one-shot tools would be given;
* answer: ``!IiI`` the request's number, status and length, then the message (UTF-8).
  Status 0: the kernel has acknowledged the whole transaction. Anything else: it failed,
  the message says why. The number lets the daemon tell its answer from a stale one.

The first frame is sent unasked, number 0: status 0 ``ready ENGINE`` once the library is
loaded and the netlink side is open, or a non-zero status with the reason, after which
the helper exits. End of input (the daemon closed the pipe or died) ends it.

``nft``: libnftables (``libnftables.so.1``, the library the ``nft`` binary is) in this
process, through ctypes: one request is one ``nft -f`` run without the process (one
netlink batch, atomic; libnftables re-reads its cache when the ruleset's generation
changed, so sets created or replaced since the helper started are found). Its own
process, not the daemon's: libnftables exits the process on some errors (no netlink
socket, no memory), and a crash here costs one restarted helper, not the daemon.

``ipset``: ipset's netlink protocol spoken directly, on the standard library's netlink
socket (libipset reports errors through variadic callbacks ctypes cannot define;
pyroute2's client is ~10x slower an element): one request per line, each acknowledged
(``ipset restore`` is not atomic either); ``-exist`` is an add without ``NLM_F_EXCL``,
which refreshes the timeout.
"""

from __future__ import annotations

import os
import struct
import sys

# Each engine imports what only it uses (ctypes; ipaddress, re, socket), and typing is
# not imported at all: the daemon's DNS hook waits for this helper's greeting before its
# first answer.
TYPE_CHECKING = False  # typing.TYPE_CHECKING, as init/pid1.py has it
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    Apply = Callable[[str], tuple[int, str]]

#: ``ipset restore`` lines the ipset engine takes
ADD_LINE = r"add (\S+) (\S+) timeout (\d+) -exist\Z"
DEL_LINE = r"del (\S+) (\S+) -exist\Z"


def nft_engine() -> Apply:
    import ctypes

    lib = ctypes.CDLL("libnftables.so.1")
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
        fn.argtypes = [ctypes.c_void_p]
    for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_char_p
    lib.nft_run_cmd_from_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
    if not ctx:
        raise OSError("nft_ctx_new() failed")
    # buffered: errors come back to us instead of going to stderr
    if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
        raise OSError("cannot buffer libnftables' output")
    # The script goes through a memory file, not nft_run_cmd_from_buffer: from a buffer,
    # libnftables 1.0.6 prints an error under the first line of the script, whichever
    # line failed; from a file it names the line (measured: same speed, ~0.07 ms).
    fd = os.memfd_create("nft-script", os.MFD_CLOEXEC)
    path = f"/proc/self/fd/{fd}"

    def apply(script: str) -> tuple[int, str]:
        os.ftruncate(fd, 0)
        os.pwrite(fd, script.encode(), 0)
        rc = int(lib.nft_run_cmd_from_filename(ctx, path.encode()))
        err = lib.nft_ctx_get_error_buffer(ctx) or b""  # reading resets the buffer
        lib.nft_ctx_get_output_buffer(ctx)
        if rc == 0:
            return 0, ""
        text = err.decode(errors="replace").strip().replace(f"{path}:", "line ")
        return 1, text or f"libnftables returned {rc} (no message)"

    return apply


# ipset's netlink protocol (linux/netfilter/ipset/ip_set.h), the part an add/del needs
_NFNL_SUBSYS_IPSET = 6
_IPSET_CMD = {"add": 9, "del": 10}
_IPSET_PROTOCOL = 6  # the oldest the kernel speaks (6..7): any kernel with ipset v7
_ATTR_PROTOCOL, _ATTR_SETNAME, _ATTR_DATA = 1, 2, 7  # command level
_ATTR_IP, _ATTR_TIMEOUT = 1, 6  # in DATA
_ATTR_IPADDR_IPV4, _ATTR_IPADDR_IPV6 = 1, 2  # in IP
_NLA_F_NESTED, _NLA_F_NET_BYTEORDER = 0x8000, 0x4000
_NLM_F_REQUEST, _NLM_F_ACK, _NLMSG_ERROR = 0x1, 0x4, 2
_NETLINK_NETFILTER = 12
#: requests sent at once: their acks must fit the socket's receive buffer (measured:
#: 2,000 at once overflow it, ENOBUFS)
_CHUNK = 64
_IPSET_ERRORS = {
    2: "the set does not exist",
    4097: "protocol error",
    4102: "set type mismatch",
    4106: "invalid family (an IPv4 address for an IPv6 set, or the reverse)",
    4107: "the set has no timeout support",
    4352: "the set is full (maxelem)",
}


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def ipset_request(seq: int, cmd: str, set_name: str, addr: str, timeout: int | None) -> bytes:
    """One netlink request: ``cmd`` (add, del) ``addr`` in ``set_name``, without
    NLM_F_EXCL (``-exist``: an add refreshes the timeout, a del of a missing one is fine)."""
    import ipaddress
    import socket

    ip = ipaddress.ip_address(addr)
    kind = _ATTR_IPADDR_IPV4 if ip.version == 4 else _ATTR_IPADDR_IPV6
    data = _attr(_ATTR_IP | _NLA_F_NESTED, _attr(kind | _NLA_F_NET_BYTEORDER, ip.packed))
    if timeout is not None:
        data += _attr(_ATTR_TIMEOUT | _NLA_F_NET_BYTEORDER, struct.pack("!I", timeout))
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    body = (struct.pack("=BBH", family, 0, 0)  # nfgenmsg
            + _attr(_ATTR_PROTOCOL, bytes([_IPSET_PROTOCOL]))
            + _attr(_ATTR_SETNAME, set_name.encode() + b"\0")
            + _attr(_ATTR_DATA | _NLA_F_NESTED, data))
    kind = _NFNL_SUBSYS_IPSET << 8 | _IPSET_CMD[cmd]
    return struct.pack("=IHHII", 16 + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body


def ipset_engine() -> Apply:
    """ipset over netlink directly: ``ipset restore`` lines become requests sent
    ``_CHUNK`` at a time, each acknowledged by the kernel (~0.04 ms an element; pyroute2's
    client measured 0.34 ms and 0.2 s of import)."""
    import re
    import socket

    add_line, del_line = re.compile(ADD_LINE), re.compile(DEL_LINE)
    sock: list[socket.socket] = []
    seq = 0

    def connected() -> socket.socket:
        if not sock:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
            s.settimeout(5.0)
            s.bind((0, 0))
            sock.append(s)
        return sock[0]

    connected()  # fail at start, not at the first answer, if netlink is closed to us

    def apply(script: str) -> tuple[int, str]:
        nonlocal seq
        batch: list[tuple[int, int, str, bytes]] = []  # (seq, line no, line, request)
        for no, line in enumerate(script.splitlines(), 1):
            add, remove = add_line.match(line), del_line.match(line)
            m = add or remove
            if m is None:
                return 1, f"line {no}: not an add/del line: {line[:100]!r}"
            seq = seq % 0x7FFFFFFF + 1
            try:
                req = ipset_request(seq, "add" if add else "del", m[1], m[2],
                                    int(add[3]) if add else None)
            except ValueError as exc:
                return 1, f"line {no}: {line}: {exc}"
            batch.append((seq, no, line, req))
        for i in range(0, len(batch), _CHUNK):
            try:
                error = _exchange(connected(), batch[i : i + _CHUNK])
            except OSError as exc:  # acks may be lost or left over: a new socket next time
                sock.pop().close()
                return 1, f"ipset netlink: {exc}"
            if error:
                return 1, error
        return 0, ""

    return apply


def _exchange(s: socket.socket, batch: list[tuple[int, int, str, bytes]]) -> str | None:
    """Send the requests at once and read every ack; the first error, or None."""
    s.send(b"".join(req for *_, req in batch))
    lines = {seq: (no, line) for seq, no, line, _ in batch}
    errors: list[str] = []
    while lines:
        data = s.recv(1 << 16)
        off = 0
        while off + 20 <= len(data):
            size, kind, _flags, seq = struct.unpack_from("=IHHI", data, off)
            if kind == _NLMSG_ERROR and seq in lines:
                no, line = lines.pop(seq)
                (code,) = struct.unpack_from("=i", data, off + 16)
                if code:
                    why = _IPSET_ERRORS.get(-code) or (os.strerror(-code) if -code < 4096
                                                       else f"ipset error {-code}")
                    errors.append(f"line {no}: {line}: {why}")
            off += max(16, (size + 3) & ~3)
    return errors[0] if errors else None


ENGINES: dict[str, Callable[[], Apply]] = {"nft": nft_engine, "ipset": ipset_engine}


def _read(n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _send(number: int, status: int, message: str) -> None:
    text = message.encode(errors="replace")
    data = struct.pack("!IiI", number, status, len(text)) + text
    while data:  # a pipe may take less than all of it
        data = data[os.write(1, data) :]


def main(argv: list[str]) -> int:
    engine = argv[1] if len(argv) == 2 else ""
    if engine not in ENGINES:
        _send(0, 2, f"usage: sethelper {'|'.join(ENGINES)}")
        return 2
    try:
        apply = ENGINES[engine]()
    except Exception as exc:
        _send(0, 2, f"cannot start the {engine} helper: {type(exc).__name__}: {exc}")
        return 1
    _send(0, 0, f"ready {engine}")
    while True:
        head = _read(8)
        if head is None:
            return 0
        number, size = struct.unpack("!II", head)
        body = _read(size)
        if body is None:
            return 0
        try:
            status, message = apply(body.decode())
        except Exception as exc:  # the answer names it; the helper keeps serving
            status, message = 1, f"{type(exc).__name__}: {exc}"
        _send(number, status, message)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
