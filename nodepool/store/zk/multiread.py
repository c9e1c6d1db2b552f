"""Many reads in one request (ZooKeeper >= 3.6 ``multiRead``) for kazoo 2.11.

kazoo sends one request per ``get``/``get_children``, and each costs the client a fixed amount
of Python work (a queue, a wake-up of the connection thread, an answer to hand back), which is
most of the cost of reading thousands of small records.  One ``multiRead`` carries hundreds of
reads and comes back as one answer.  Reads in it are not atomic together (each sees the tree
as of its own turn), and each read fails on its own: a missing znode is that read's error only.
"""
from collections import namedtuple

from kazoo.exceptions import EXCEPTIONS
from kazoo.protocol.serialization import (GetChildren, GetData, MultiHeader, ZnodeStat,
                                          int_struct, multiheader_struct, read_buffer,
                                          read_string, stat_struct)

MULTI_READ_OPCODE = 22


class MultiRead(namedtuple("MultiRead", "operations")):
    """The jute ``MultiOperationRecord`` of reads; the answer is a list, in order, of
    ``(data, ZnodeStat)`` for a get, a list of names for a listing, or the read's exception."""

    type = MULTI_READ_OPCODE

    def serialize(self):
        out = bytearray()
        for op in self.operations:
            out.extend(MultiHeader(op.type, False, -1).serialize())
            out.extend(op.serialize())
        out.extend(multiheader_struct.pack(-1, True, -1))
        return out

    @classmethod
    def deserialize(cls, buffer, offset):
        results = []
        header, offset = MultiHeader.deserialize(buffer, offset)
        while not header.done:
            if header.type == GetData.type:
                data, offset = read_buffer(buffer, offset)
                stat = ZnodeStat._make(stat_struct.unpack_from(buffer, offset))
                offset += stat_struct.size
                results.append((data, stat))
            elif header.type == GetChildren.type:
                count = int_struct.unpack_from(buffer, offset)[0]
                offset += int_struct.size
                names = []
                for _ in range(max(count, 0)):
                    name, offset = read_string(buffer, offset)
                    names.append(name)
                results.append(names)
            else:       # -1: this read failed
                err = int_struct.unpack_from(buffer, offset)[0]
                offset += int_struct.size
                results.append(EXCEPTIONS[err]())
            header, offset = MultiHeader.deserialize(buffer, offset)
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
