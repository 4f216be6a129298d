# Drives a bitmirror NBD export with libnbd's Python bindings (Debian's python3-libnbd) and prints what
# it saw as JSON; test/interop/nbd-libnbd.test.ts asserts on it. Usage: nbd-libnbd.py SOCKET
# Exports expected: "rw" (writable, bitmap b0 enabled) and "ro" (read-only). Images start all zero.
import json
import sys

import nbd

sock = sys.argv[1]
out = {}


def errno_of(fn):
    """Run fn; the errno name of the NBD error it raised, or 'ok'."""
    try:
        fn()
        return 'ok'
    except nbd.Error as e:
        import errno
        return errno.errorcode.get(e.errno, str(e.errno))


def connect(name, contexts=(), structured=True, strict=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    if not strict:
        h.set_strict_mode(0)
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


# --- option haggling: LIST, INFO, LIST_META_CONTEXT, then GO, and ABORT -----------------------------
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sock)
names = []
h.opt_list(lambda name, desc: names.append([name, desc]) or 0)
out['list'] = sorted(names)
h.set_export_name('rw')
h.opt_info()
out['info_size'] = h.get_size()
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
out['list_meta'] = ctxs
h.opt_abort()

# --- a writable export with structured replies ------------------------------------------------------
h = connect('rw', ['base:allocation', 'qemu:dirty-bitmap:b0'])
size = h.get_size()
out['size'] = size
out['flags'] = {k: getattr(h, 'can_' + k)() for k in ['flush', 'fua', 'trim', 'zero', 'fast_zero', 'df', 'multi_conn', 'cache']}
out['read_only'] = h.is_read_only()
out['structured'] = h.get_structured_replies_negotiated()
out['contexts'] = [h.can_meta_context('base:allocation'), h.can_meta_context('qemu:dirty-bitmap:b0')]
out['block_size'] = [h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM)]

h.pwrite(b'\xab' * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
h.pwrite(b'\x01' * 3, 5)  # unaligned
out['read_back'] = [h.pread(65536, 1 << 20) == b'\xab' * 65536, h.pread(5, 3) == b'\x00\x00\x01\x01\x01']
chunks = []


def chunk(buf, offset, status, err):
    chunks.append([offset, len(buf), 'data' if status == nbd.READ_DATA else 'hole' if status == nbd.READ_HOLE else status])
    return 0


buf = h.pread_structured((1 << 20) + 65536 + 65536, 0, chunk)
out['structured_read'] = chunks
chunks = []
h.pread_structured(2 << 20, 0, chunk, nbd.CMD_FLAG_DF)
out['read_df'] = chunks
out['structured_read_ok'] = buf[1 << 20:(1 << 20) + 65536] == b'\xab' * 65536 and buf[(1 << 20) + 65536:] == bytes(65536)

h.flush()
h.cache(1 << 20, 0)
h.zero(65536, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, 3 << 20)
h.pwrite(b'\xcd' * 65536, 4 << 20)
h.trim(65536, 4 << 20, nbd.CMD_FLAG_FUA)
out['fast_zero'] = errno_of(lambda: h.zero(65536, 5 << 20, nbd.CMD_FLAG_FAST_ZERO))

extents = {}


def ext(meta, offset, entries, err):
    extents.setdefault(meta, []).append(list(entries))
    return 0


h.block_status(4 << 20, 0, ext)
out['block_status'] = extents
extents = {}
h.block_status(4 << 20, 0, ext, nbd.CMD_FLAG_REQ_ONE)
out['block_status_req_one'] = extents

# Requests a strict client would not send: the server's own errors.
h.set_strict_mode(0)
out['read_past_end'] = errno_of(lambda: h.pread(512, size))
out['write_past_end'] = errno_of(lambda: h.pwrite(b'x' * 512, size))
out['zero_past_end'] = errno_of(lambda: h.zero(512, size))
out['trim_past_end'] = errno_of(lambda: h.trim(512, size))
out['bad_flag'] = errno_of(lambda: h.flush(nbd.CMD_FLAG_NO_HOLE))
out['req_one_on_read'] = errno_of(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
out['too_big_read'] = errno_of(lambda: h.pread((32 << 20) + 512, 0))
out['status_zero_length'] = errno_of(lambda: h.block_status(0, 0, ext))
out['alive_after_errors'] = h.pread(5, 3) == b'\x00\x00\x01\x01\x01'
h.shutdown()

# --- without structured replies: simple replies ----------------------------------------------------
h = connect('rw', structured=False)
out['simple_structured'] = h.get_structured_replies_negotiated()
out['simple_df'] = h.can_df()
out['simple_read'] = h.pread(65536, 1 << 20) == b'\xab' * 65536
h.set_strict_mode(0)
out['simple_read_past_end'] = errno_of(lambda: h.pread(512, size))
out['simple_write_past_end'] = errno_of(lambda: h.pwrite(b'x' * 512, size))
h.shutdown()

# --- read-only export ------------------------------------------------------------------------------
h = connect('ro', strict=False)
out['ro'] = [h.is_read_only(), h.can_trim(), h.can_zero(), h.can_multi_conn()]
out['ro_write'] = errno_of(lambda: h.pwrite(b'x' * 512, 0))
out['ro_trim'] = errno_of(lambda: h.trim(512, 0))
out['ro_no_context'] = errno_of(lambda: h.block_status(512, 0, ext))
h.shutdown()

# --- an export that is not there -------------------------------------------------------------------
out['missing'] = errno_of(lambda: connect('nope'))

print(json.dumps(out))
