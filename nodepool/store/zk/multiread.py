"""Many reads in one request (ZooKeeper >= 3.6 ``multiRead``) for kazoo 2.11.

kazoo sends one request per ``get``/``get_children``, and each costs the client a fixed amount
of Python work (a queue, a wake-up of the connection thread, an answer to hand back), which is
most of the cost of reading thousands of small records.  One ``multiRead`` carries hundreds of
reads and comes back as one answer.  Reads in it are not atomic together (each sees the tree
as of its own turn), and each read fails on its own: a missing znode is that read's error only.
"""
from collections import namedtuple

from kazoo.exceptions import EXCEPTIONS
import struct

from kazoo.protocol.serialization import (GetChildren, GetData, ZnodeStat, int_struct,
                                          multiheader_struct, read_string, stat_struct)

MULTI_READ_OPCODE = 22
_READ_HEAD = struct.Struct("!iBii")     # a read's multi header, then its path's length


class MultiRead(namedtuple("MultiRead", "operations")):
    """The jute ``MultiOperationRecord`` of reads; the answer is a list, in order, of
    ``(data, ZnodeStat)`` for a get, a list of names for a listing, or the read's exception."""

    type = MULTI_READ_OPCODE

    def serialize(self):
        # one header and one path per read, laid out here (kazoo's per-record serializers
        # cost more than the socket write of a few hundred reads)
        out = bytearray()
        for op in self.operations:
            path = op.path.encode("utf-8")
            out += _READ_HEAD.pack(op.type, 0, -1, len(path))
            out += path
            out += b"\x01" if op.watcher else b"\x00"
        out += multiheader_struct.pack(-1, True, -1)
        return out

    @classmethod
    def deserialize(cls, buffer, offset):
        results = []
        append = results.append
        head = multiheader_struct.unpack_from
        head_size = multiheader_struct.size
        int_at = int_struct.unpack_from
        stat_at = stat_struct.unpack_from
        stat_size = stat_struct.size
        make_stat = ZnodeStat._make
        kind, done, _ = head(buffer, offset)
        offset += head_size
        while done != 1:
            if kind == GetData.type:
                length = int_at(buffer, offset)[0]
                offset += 4
                if length < 0:
                    data = None
                else:
                    data = buffer[offset:offset + length]
                    offset += length
                append((data, make_stat(stat_at(buffer, offset))))
                offset += stat_size
            elif kind == GetChildren.type:
                count = int_at(buffer, offset)[0]
                offset += 4
                names = []
                for _ in range(max(count, 0)):
                    name, offset = read_string(buffer, offset)
                    names.append(name)
                append(names)
            else:       # -1: this read failed
                err = int_at(buffer, offset)[0]
                offset += 4
                append(EXCEPTIONS[err]())
            kind, done, _ = head(buffer, offset)
            offset += head_size
        return results


def multi_read_async(client, reads):
    """Send ``reads`` (``("get", path)`` or ``("children", path)``, paths without the chroot)
    as one request; an async result of the answers in order."""
    ops = []
    for kind, path in reads:
        full = client.chroot + path if client.chroot else path
        ops.append(GetData(full, None) if kind == "get" else GetChildren(full, None))
    result = client.handler.async_result()
    client._call(MultiRead(ops), result)
    return result
