"""Request and trace ids: the formats clients and logs see, and no repeats."""

from __future__ import annotations

import os
import uuid

from gateways import ids


def test_request_id_is_a_version_4_uuid_in_hex():
    rid = ids.request_id()
    assert len(rid) == 32 and uuid.UUID(hex=rid).version == 4 and uuid.UUID(hex=rid).hex == rid


def test_trace_id_is_16_hex_digits():
    tid = ids.trace_id()
    assert len(tid) == 16 and int(tid, 16) >= 0


def test_no_repeats_and_a_forked_child_draws_other_ids():
    mine = {ids.request_id() for _ in range(100_000)}
    assert len(mine) == 100_000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what it draws next must not be what the parent draws next
        os.write(write, ids.request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    assert child != ids.request_id() and child not in mine
