"""Interop scenarios for the official Python SDK (azure-servicebus) against the emulator.

Run by emulator/tests/python_interop.rs, one scenario per emulator instance:

    python interop.py <scenario> <connection string>

Each scenario raises on failure and prints "PASS <scenario>" on success. The
topology is created by the Rust test (see `python_topology` there).
"""

import datetime
import sys
import time
import uuid

from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import MessageSizeExceededError

WAIT = 10  # seconds a receive may wait for a message that is expected to arrive


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


def receive_one(receiver, wait=WAIT):
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        msgs = receiver.receive_messages(max_message_count=1, max_wait_time=max(1, deadline - time.monotonic()))
        if msgs:
            return msgs[0]
    raise AssertionError("no message arrived within %ss" % wait)


def receive_n(receiver, n, wait=WAIT):
    out = []
    deadline = time.monotonic() + wait
    while len(out) < n and time.monotonic() < deadline:
        out.extend(receiver.receive_messages(max_message_count=n - len(out), max_wait_time=1))
    assert len(out) == n, "expected %d messages, got %d" % (n, len(out))
    return out


def assert_empty(client, queue, **kw):
    with client.get_queue_receiver(queue, **kw) as r:
        peeked = r.peek_messages(max_message_count=10)
        assert not peeked, "expected %s to be empty, found %r" % (queue, [str(m) for m in peeked])


def send_and_receive_and_delete(c):
    with c.get_queue_sender("q") as s:
        s.send_messages(ServiceBusMessage("single", application_properties={"k": "v", "n": 7}, subject="subj", content_type="text/plain", correlation_id="corr"))
        batch = s.create_message_batch()
        for i in range(3):
            batch.add_message(ServiceBusMessage("batch-%d" % i))
        s.send_messages(batch)
        s.send_messages([ServiceBusMessage("list-0"), ServiceBusMessage("list-1")])
    with c.get_queue_receiver("q", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as r:
        msgs = receive_n(r, 6)
    bodies = [str(m) for m in msgs]
    assert bodies == ["single", "batch-0", "batch-1", "batch-2", "list-0", "list-1"], bodies
    first = msgs[0]
    assert first.application_properties[b"k"] == b"v", first.application_properties
    assert first.application_properties[b"n"] == 7
    assert first.subject == "subj" and first.content_type == "text/plain" and first.correlation_id == "corr"
    seqs = [m.sequence_number for m in msgs]
    assert seqs == sorted(seqs) and seqs[0] >= 1, seqs
    assert first.enqueued_time_utc is not None
    assert_empty(c, "q")


def peek_lock_complete(c):
    with c.get_queue_sender("q") as s:
        s.send_messages(ServiceBusMessage("m1"))
    with c.get_queue_receiver("q") as r:
        m = receive_one(r)
        assert str(m) == "m1" and m.delivery_count == 0, (str(m), m.delivery_count)
        assert m.lock_token is not None and m.locked_until_utc > utcnow()
        r.complete_message(m)
    assert_empty(c, "q")


def abandon_redelivers(c):
    with c.get_queue_sender("q") as s:
        s.send_messages(ServiceBusMessage("again"))
    with c.get_queue_receiver("q") as r:
        m = receive_one(r)
        first_count = m.delivery_count
        r.abandon_message(m)
        m2 = receive_one(r)
        assert str(m2) == "again"
        assert m2.delivery_count == first_count + 1, (first_count, m2.delivery_count)
        assert m2.sequence_number == m.sequence_number
        r.complete_message(m2)


def dead_letter_with_reason(c):
    with c.get_queue_sender("q") as s:
        s.send_messages(ServiceBusMessage("poison"))
    with c.get_queue_receiver("q") as r:
        m = receive_one(r)
        r.dead_letter_message(m, reason="bad-input", error_description="could not parse")
    assert_empty(c, "q")
    with c.get_queue_receiver("q", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as d:
        dm = receive_one(d)
        assert str(dm) == "poison"
        assert dm.dead_letter_reason == "bad-input", dm.dead_letter_reason
        assert dm.dead_letter_error_description == "could not parse", dm.dead_letter_error_description
        assert dm.dead_letter_source is not None and dm.dead_letter_source.lower() == "q", dm.dead_letter_source
        d.complete_message(dm)


def defer_and_receive_by_sequence(c):
    with c.get_queue_sender("q") as s:
        s.send_messages(ServiceBusMessage("later"))
    with c.get_queue_receiver("q") as r:
        m = receive_one(r)
        seq = m.sequence_number
        r.defer_message(m)
        assert not r.receive_messages(max_message_count=1, max_wait_time=1), "deferred message was delivered"
        deferred = r.receive_deferred_messages([seq])
        assert len(deferred) == 1 and str(deferred[0]) == "later"
        assert deferred[0].sequence_number == seq
        r.complete_message(deferred[0])
    assert_empty(c, "q")


def renew_lock(c):
    with c.get_queue_sender("q") as s:
        s.send_messages(ServiceBusMessage("renew-me"))
    with c.get_queue_receiver("q") as r:
        m = receive_one(r)
        before = m.locked_until_utc
        after = r.renew_message_lock(m)
        assert after >= before, (before, after)
        r.complete_message(m)


def lock_expiry_redelivers(c):
    with c.get_queue_sender("q-short-lock") as s:
        s.send_messages(ServiceBusMessage("expire"))
    with c.get_queue_receiver("q-short-lock") as r:
        m = receive_one(r)
        assert m.delivery_count == 0
        # The lock lasts 1 s; the message comes back once it expires.
        m2 = receive_one(r, wait=15)
        assert str(m2) == "expire" and m2.delivery_count == 1, m2.delivery_count
        r.complete_message(m2)


def max_delivery_count_dead_letters(c):
    with c.get_queue_sender("q-mdc") as s:
        s.send_messages(ServiceBusMessage("doomed"))
    with c.get_queue_receiver("q-mdc") as r:
        for _ in range(2):
            m = receive_one(r)
            r.abandon_message(m)
    with c.get_queue_receiver("q-mdc", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as d:
        dm = receive_one(d)
        assert str(dm) == "doomed"
        assert dm.dead_letter_reason == "MaxDeliveryCountExceeded", dm.dead_letter_reason
        d.complete_message(dm)
    assert_empty(c, "q-mdc")


def schedule_and_cancel(c):
    with c.get_queue_sender("q") as s:
        far = utcnow() + datetime.timedelta(hours=1)
        seqs = s.schedule_messages(ServiceBusMessage("cancel-me"), far)
        assert len(seqs) == 1
        with c.get_queue_receiver("q") as r:
            peeked = r.peek_messages(max_message_count=5)
            assert [str(p) for p in peeked] == ["cancel-me"], [str(p) for p in peeked]
            assert peeked[0].scheduled_enqueue_time_utc is not None
        s.cancel_scheduled_messages(seqs)
        assert_empty(c, "q")
        soon = utcnow() + datetime.timedelta(seconds=1)
        s.schedule_messages(ServiceBusMessage("arrives"), soon)
        s.send_messages(ServiceBusMessage("annotated", scheduled_enqueue_time_utc=soon))
    with c.get_queue_receiver("q") as r:
        got = sorted(str(m) for m in receive_n(r, 2, wait=15))
        assert got == ["annotated", "arrives"], got


def peek(c):
    with c.get_queue_sender("q") as s:
        s.send_messages([ServiceBusMessage("p%d" % i) for i in range(3)])
    with c.get_queue_receiver("q") as r:
        peeked = r.peek_messages(max_message_count=10)
        assert [str(m) for m in peeked] == ["p0", "p1", "p2"], [str(m) for m in peeked]
        seqs = [m.sequence_number for m in peeked]
        assert seqs == sorted(seqs)
        more = r.peek_messages(max_message_count=10, sequence_number=seqs[1])
        assert [str(m) for m in more] == ["p1", "p2"], [str(m) for m in more]
        assert len(receive_n(r, 3)) == 3


def topic_fan_out(c):
    with c.get_topic_sender("t") as s:
        s.send_messages(ServiceBusMessage("to-all"))
    for sub in ("s1", "s2"):
        with c.get_subscription_receiver("t", sub) as r:
            m = receive_one(r)
            assert str(m) == "to-all"
            r.complete_message(m)


def correlation_and_sql_filters(c):
    with c.get_topic_sender("t") as s:
        s.send_messages(ServiceBusMessage("red", subject="red", application_properties={"color": "red", "qty": 1}))
        s.send_messages(ServiceBusMessage("blue", subject="blue", application_properties={"color": "blue", "qty": 9}))
        s.send_messages(ServiceBusMessage("blue-few", subject="blue", application_properties={"color": "blue", "qty": 2}))
    with c.get_subscription_receiver("t", "s-corr", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as r:
        got = [str(m) for m in receive_n(r, 1)]
        assert got == ["red"], got
        assert not r.receive_messages(max_wait_time=1)
    with c.get_subscription_receiver("t", "s-sql", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as r:
        got = [str(m) for m in receive_n(r, 1)]
        assert got == ["blue"], got
        assert not r.receive_messages(max_wait_time=1)


def ttl_expiry(c):
    with c.get_queue_sender("q-ttl") as s:
        s.send_messages(ServiceBusMessage("short-lived", time_to_live=datetime.timedelta(seconds=1)))
    with c.get_queue_receiver("q-ttl", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as d:
        dm = receive_one(d, wait=15)
        assert str(dm) == "short-lived"
        assert dm.dead_letter_reason == "TTLExpiredException", dm.dead_letter_reason
        d.complete_message(dm)
    assert_empty(c, "q-ttl")


def sessions(c):
    with c.get_queue_sender("q-sess") as s:
        for i in range(3):
            s.send_messages(ServiceBusMessage("a%d" % i, session_id="a"))
            s.send_messages(ServiceBusMessage("b%d" % i, session_id="b"))
    with c.get_queue_receiver("q-sess", session_id="a") as r:
        got = [str(m) for m in receive_n(r, 3)]
        assert got == ["a0", "a1", "a2"], got
        for m in []:
            pass
        r.session.set_state(b"state-a")
        assert r.session.get_state() == b"state-a"
        r.session.renew_lock()
    with c.get_queue_receiver("q-sess", session_id=NEXT_AVAILABLE_SESSION, max_wait_time=5) as r:
        assert r.session.session_id == "b", r.session.session_id
        msgs = receive_n(r, 3)
        assert [str(m) for m in msgs] == ["b0", "b1", "b2"], [str(m) for m in msgs]
        assert all(m.session_id == "b" for m in msgs)
        for m in msgs:
            r.complete_message(m)


def session_lock_conflict_and_timeout(c):
    from azure.servicebus.exceptions import OperationTimeoutError, ServiceBusError
    # No retries: the refusals below are expected, and retrying them only takes time.
    c = ServiceBusClient.from_connection_string(CONN_STR, retry_total=0)
    with c.get_queue_sender("q-sess") as s:
        s.send_messages(ServiceBusMessage("only", session_id="a"))
    with c.get_queue_receiver("q-sess", session_id="a") as holder:
        assert holder.session.session_id == "a"
        try:
            with c.get_queue_receiver("q-sess", session_id="a") as r2:
                r2.receive_messages(max_wait_time=1)
        except ServiceBusError as e:
            assert "cannot-be-locked" in str(e) or "cannot be accepted" in str(e), repr(e)
        else:
            raise AssertionError("a locked session was locked twice")
        try:
            with c.get_queue_receiver("q-sess", session_id=NEXT_AVAILABLE_SESSION, max_wait_time=2) as r3:
                r3.receive_messages(max_wait_time=1)
        except (OperationTimeoutError, ServiceBusError):
            pass
        else:
            raise AssertionError("next-available found a session although the only one is locked")
        m = receive_one(holder)
        holder.complete_message(m)


def duplicate_detection(c):
    mid = str(uuid.uuid4())
    with c.get_queue_sender("q-dup") as s:
        s.send_messages(ServiceBusMessage("once", message_id=mid))
        s.send_messages(ServiceBusMessage("once", message_id=mid))
        s.send_messages(ServiceBusMessage("other"))
    with c.get_queue_receiver("q-dup", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as r:
        got = [str(m) for m in receive_n(r, 2)]
        assert got == ["once", "other"], got
        assert not r.receive_messages(max_wait_time=1)


def message_size_limit(c):
    with c.get_queue_sender("q") as s:
        try:
            s.send_messages(ServiceBusMessage(b"x" * (300 * 1024)))
        except MessageSizeExceededError:
            pass
        else:
            raise AssertionError("a 300 KiB message was accepted")
        s.send_messages(ServiceBusMessage(b"y" * (200 * 1024)))
    with c.get_queue_receiver("q", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as r:
        m = receive_one(r)
        assert b"".join(m.body) == b"y" * (200 * 1024)


def ten_thousand(c):
    n = 10000
    with c.get_queue_sender("q") as s:
        sent = 0
        while sent < n:
            batch = s.create_message_batch()
            while sent < n:
                try:
                    batch.add_message(ServiceBusMessage("m%d" % sent))
                except ValueError:
                    break
                sent += 1
            s.send_messages(batch)
    seen = set()
    with c.get_queue_receiver("q", prefetch_count=100) as r:
        deadline = time.monotonic() + 300
        while len(seen) < n and time.monotonic() < deadline:
            msgs = r.receive_messages(max_message_count=100, max_wait_time=5)
            assert msgs, "receiver stalled after %d messages" % len(seen)
            for m in msgs:
                r.complete_message(m)
                seen.add(str(m))
    assert len(seen) == n, len(seen)
    assert_empty(c, "q")


SCENARIOS = {f.__name__: f for f in [
    send_and_receive_and_delete, peek_lock_complete, abandon_redelivers, dead_letter_with_reason,
    defer_and_receive_by_sequence, renew_lock, lock_expiry_redelivers, max_delivery_count_dead_letters,
    schedule_and_cancel, peek, topic_fan_out, correlation_and_sql_filters, ttl_expiry, sessions,
    session_lock_conflict_and_timeout,
    duplicate_detection, message_size_limit, ten_thousand,
]}


CONN_STR = None


def main():
    global CONN_STR
    name, conn_str = sys.argv[1], sys.argv[2]
    CONN_STR = conn_str
    with ServiceBusClient.from_connection_string(conn_str) as client:
        SCENARIOS[name](client)
    print("PASS", name)


if __name__ == "__main__":
    main()
