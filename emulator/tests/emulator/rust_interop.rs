//! Interop with the Rust crate `azservicebus` (which this project did not
//! write). The crate always dials port 5672, so each test's emulator listens
//! on a loopback address of its own (127.x.y.z:5672).
//!
//! Clients run on the tests' current-thread runtimes: fe2o3-amqp 0.14 registers a sent
//! delivery as unsettled only after handing its transfer to the session task, so on a
//! multi-threaded runtime a fast broker's disposition can be lost (the send then times out,
//! azservicebus recovers by dropping its management link, and the session ends with
//! "unattached handle" / "Session is not found"). That is a client bug, not the emulator's.

use crate::common;

use std::time::Duration;

use azservicebus::prelude::*;
use azservicebus::receiver::DeadLetterOptions;
use servicebus_emulator::EmulatorHandle;
use time::OffsetDateTime;

type Client = ServiceBusClient<azservicebus::core::BasicRetryPolicy>;

const WAIT: Duration = Duration::from_secs(15);

async fn client(h: &EmulatorHandle) -> Client {
    let mut options = ServiceBusClientOptions::default();
    options.retry_options.try_timeout = Duration::from_secs(20);
    options.retry_options.max_retries = 1;
    ServiceBusClient::unsecured()
        .new_from_connection_string(h.connection_string(), options)
        .await
        .expect("client connects")
}

async fn sender(c: &mut Client, entity: &str) -> ServiceBusSender {
    c.create_sender(entity, ServiceBusSenderOptions::default())
        .await
        .expect("sender")
}

async fn receiver(
    c: &mut Client,
    queue: &str,
    mode: ServiceBusReceiveMode,
    sub_queue: SubQueue,
) -> ServiceBusReceiver {
    let options = ServiceBusReceiverOptions {
        receive_mode: mode,
        sub_queue,
        ..Default::default()
    };
    c.create_receiver_for_queue(queue, options)
        .await
        .expect("receiver")
}

async fn peek_lock(c: &mut Client, queue: &str) -> ServiceBusReceiver {
    receiver(c, queue, ServiceBusReceiveMode::PeekLock, SubQueue::None).await
}

/// Receive exactly `n` messages, waiting up to `WAIT` overall.
async fn receive_n(r: &mut ServiceBusReceiver, n: usize) -> Vec<ServiceBusReceivedMessage> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n && tokio::time::Instant::now() < deadline {
        let got = r
            .receive_messages_with_max_wait_time(
                (n - out.len()) as u32,
                Some(Duration::from_secs(1)),
            )
            .await
            .expect("receive");
        out.extend(got);
    }
    assert_eq!(out.len(), n, "expected {n} messages");
    out
}

async fn receive_none(r: &mut ServiceBusReceiver) {
    let got = r
        .receive_messages_with_max_wait_time(1, Some(Duration::from_secs(1)))
        .await
        .expect("receive");
    assert!(got.is_empty(), "expected no message, got {}", got.len());
}

fn body(m: &ServiceBusReceivedMessage) -> String {
    String::from_utf8_lossy(m.body().expect("data body")).into_owned()
}

async fn with_emulator<F, Fut>(f: F)
where
    F: FnOnce(EmulatorHandle) -> Fut,
    Fut: std::future::Future<Output = EmulatorHandle>,
{
    let h = common::start_on_5672(common::topology()).await;
    let h = tokio::time::timeout(Duration::from_secs(240), f(h))
        .await
        .expect("test finished in time");
    h.shutdown().await;
}

#[tokio::test]
async fn send_single_and_batch_then_receive_and_delete() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q").await;
        let mut m = ServiceBusMessage::new("single");
        m.set_subject("subj".to_string());
        m.set_correlation_id("corr".to_string());
        s.send_message(m).await.expect("send");
        let mut batch = s.create_message_batch(Default::default()).expect("batch");
        for i in 0..3 {
            batch
                .try_add_message(ServiceBusMessage::new(format!("batch-{i}")))
                .expect("fits");
        }
        s.send_message_batch(batch).await.expect("send batch");
        let mut r = receiver(
            &mut c,
            "q",
            ServiceBusReceiveMode::ReceiveAndDelete,
            SubQueue::None,
        )
        .await;
        let msgs = receive_n(&mut r, 4).await;
        let bodies: Vec<String> = msgs.iter().map(body).collect();
        assert_eq!(bodies, ["single", "batch-0", "batch-1", "batch-2"]);
        assert_eq!(msgs[0].subject(), Some("subj"));
        assert_eq!(msgs[0].correlation_id().as_deref(), Some("corr"));
        assert!(
            msgs.windows(2)
                .all(|w| w[0].sequence_number() < w[1].sequence_number())
        );
        receive_none(&mut r).await;
        r.dispose().await.expect("dispose receiver");
        s.dispose().await.expect("dispose sender");
        c.dispose().await.expect("dispose client");
        h
    })
    .await;
}

#[tokio::test]
async fn peek_lock_complete_abandon_and_redelivery_count() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q").await;
        s.send_message(ServiceBusMessage::new("m1"))
            .await
            .expect("send");
        let mut r = peek_lock(&mut c, "q").await;
        let m = receive_n(&mut r, 1).await.remove(0);
        assert_eq!(body(&m), "m1");
        let first = m.delivery_count().unwrap_or(0);
        assert!(
            m.locked_until()
                .is_some_and(|t| t > OffsetDateTime::now_utc())
        );
        r.abandon_message(&m, None).await.expect("abandon");
        let m2 = receive_n(&mut r, 1).await.remove(0);
        assert_eq!(m2.sequence_number(), m.sequence_number());
        assert_eq!(m2.delivery_count().unwrap_or(0), first + 1);
        r.complete_message(&m2).await.expect("complete");
        receive_none(&mut r).await;
        assert_eq!(h.message_count("q"), Some(0));
        h
    })
    .await;
}

#[tokio::test]
async fn dead_letter_with_reason_and_description() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q").await;
        s.send_message(ServiceBusMessage::new("poison"))
            .await
            .expect("send");
        let mut r = peek_lock(&mut c, "q").await;
        let m = receive_n(&mut r, 1).await.remove(0);
        let options = DeadLetterOptions {
            dead_letter_reason: Some("bad-input".into()),
            dead_letter_error_description: Some("could not parse".into()),
            properties_to_modify: None,
        };
        r.dead_letter_message(&m, options)
            .await
            .expect("dead-letter");
        let mut d = receiver(
            &mut c,
            "q",
            ServiceBusReceiveMode::PeekLock,
            SubQueue::DeadLetter,
        )
        .await;
        let dm = receive_n(&mut d, 1).await.remove(0);
        assert_eq!(body(&dm), "poison");
        assert_eq!(dm.dead_letter_reason(), Some("bad-input"));
        assert_eq!(dm.dead_letter_error_description(), Some("could not parse"));
        d.complete_message(&dm).await.expect("complete");
        h
    })
    .await;
}

#[tokio::test]
async fn defer_then_receive_by_sequence_number() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q").await;
        s.send_message(ServiceBusMessage::new("later"))
            .await
            .expect("send");
        let mut r = peek_lock(&mut c, "q").await;
        let m = receive_n(&mut r, 1).await.remove(0);
        let seq = m.sequence_number();
        r.defer_message(&m, None).await.expect("defer");
        receive_none(&mut r).await;
        let d = r
            .receive_deferred_message(seq)
            .await
            .expect("receive deferred")
            .expect("found");
        assert_eq!(body(&d), "later");
        assert_eq!(d.sequence_number(), seq);
        r.complete_message(&d).await.expect("complete deferred");
        assert_eq!(h.message_count("q"), Some(0));
        h
    })
    .await;
}

#[tokio::test]
async fn renew_lock_extends_it() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q").await;
        s.send_message(ServiceBusMessage::new("renew"))
            .await
            .expect("send");
        let mut r = peek_lock(&mut c, "q").await;
        let mut m = receive_n(&mut r, 1).await.remove(0);
        let before = m.locked_until().expect("locked");
        r.renew_message_lock(&mut m).await.expect("renew");
        assert!(m.locked_until().expect("locked") >= before);
        r.complete_message(&m).await.expect("complete");
        h
    })
    .await;
}

#[tokio::test]
async fn lock_expiry_redelivers() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q-short-lock").await;
        s.send_message(ServiceBusMessage::new("expire"))
            .await
            .expect("send");
        let mut r = peek_lock(&mut c, "q-short-lock").await;
        let m = receive_n(&mut r, 1).await.remove(0);
        // azservicebus reports delivery counts starting at 1 (AMQP header + 1).
        assert_eq!(m.delivery_count(), Some(1));
        // The 1 s lock runs out and the message comes back.
        let m2 = receive_n(&mut r, 1).await.remove(0);
        assert_eq!(body(&m2), "expire");
        assert_eq!(m2.delivery_count(), Some(2));
        r.complete_message(&m2).await.expect("complete");
        h
    })
    .await;
}

#[tokio::test]
async fn max_delivery_count_dead_letters() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q-mdc").await;
        s.send_message(ServiceBusMessage::new("doomed"))
            .await
            .expect("send");
        let mut r = peek_lock(&mut c, "q-mdc").await;
        for _ in 0..2 {
            let m = receive_n(&mut r, 1).await.remove(0);
            r.abandon_message(&m, None).await.expect("abandon");
        }
        let mut d = receiver(
            &mut c,
            "q-mdc",
            ServiceBusReceiveMode::ReceiveAndDelete,
            SubQueue::DeadLetter,
        )
        .await;
        let dm = receive_n(&mut d, 1).await.remove(0);
        assert_eq!(body(&dm), "doomed");
        assert_eq!(dm.dead_letter_reason(), Some("MaxDeliveryCountExceeded"));
        receive_none(&mut r).await;
        h
    })
    .await;
}

#[tokio::test]
async fn schedule_cancel_and_peek() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q").await;
        let far = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let seq = s
            .schedule_message(ServiceBusMessage::new("cancel-me"), far)
            .await
            .expect("schedule");
        let mut r = peek_lock(&mut c, "q").await;
        let peeked = r.peek_messages(10, None).await.expect("peek");
        assert_eq!(peeked.len(), 1);
        assert_eq!(peeked[0].sequence_number(), seq);
        assert_eq!(peeked[0].state(), ServiceBusMessageState::Scheduled);
        s.cancel_scheduled_message(seq).await.expect("cancel");
        assert!(r.peek_messages(10, None).await.expect("peek").is_empty());
        let soon = OffsetDateTime::now_utc() + time::Duration::seconds(1);
        s.schedule_message(ServiceBusMessage::new("arrives"), soon)
            .await
            .expect("schedule");
        let m = receive_n(&mut r, 1).await.remove(0);
        assert_eq!(body(&m), "arrives");
        r.complete_message(&m).await.expect("complete");
        s.send_messages([
            ServiceBusMessage::new("p0"),
            ServiceBusMessage::new("p1"),
            ServiceBusMessage::new("p2"),
        ])
        .await
        .expect("send");
        let peeked = r.peek_messages(10, None).await.expect("peek");
        let bodies: Vec<String> = peeked
            .iter()
            .map(|p| String::from_utf8_lossy(p.body().expect("body")).into_owned())
            .collect();
        assert_eq!(bodies, ["p0", "p1", "p2"]);
        assert_eq!(receive_n(&mut r, 3).await.len(), 3);
        h
    })
    .await;
}

#[tokio::test]
async fn topic_fan_out_and_correlation_filter() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "t").await;
        let mut red = ServiceBusMessage::new("red");
        red.set_subject("red".to_string());
        s.send_message(red).await.expect("send");
        let mut blue = ServiceBusMessage::new("blue");
        blue.set_subject("blue".to_string());
        s.send_message(blue).await.expect("send");
        for sub in ["s1", "s2"] {
            let options = ServiceBusReceiverOptions {
                receive_mode: ServiceBusReceiveMode::ReceiveAndDelete,
                ..Default::default()
            };
            let mut r = c
                .create_receiver_for_subscription("t", sub, options)
                .await
                .expect("receiver");
            let got: Vec<String> = receive_n(&mut r, 2).await.iter().map(body).collect();
            assert_eq!(got, ["red", "blue"], "subscription {sub}");
            // Dispose (not drop): fe2o3 forgets a dropped link before the detach reply arrives.
            r.dispose().await.expect("dispose");
        }
        let options = ServiceBusReceiverOptions {
            receive_mode: ServiceBusReceiveMode::ReceiveAndDelete,
            ..Default::default()
        };
        let mut r = c
            .create_receiver_for_subscription("t", "s-corr", options)
            .await
            .expect("receiver");
        let got: Vec<String> = receive_n(&mut r, 1).await.iter().map(body).collect();
        assert_eq!(got, ["red"]);
        receive_none(&mut r).await;
        h
    })
    .await;
}

#[tokio::test]
async fn ttl_expiry_dead_letters() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q-ttl").await;
        let mut m = ServiceBusMessage::new("short-lived");
        m.set_time_to_live(Duration::from_secs(1)).expect("ttl");
        s.send_message(m).await.expect("send");
        let mut d = receiver(
            &mut c,
            "q-ttl",
            ServiceBusReceiveMode::ReceiveAndDelete,
            SubQueue::DeadLetter,
        )
        .await;
        let dm = receive_n(&mut d, 1).await.remove(0);
        assert_eq!(body(&dm), "short-lived");
        assert_eq!(dm.dead_letter_reason(), Some("TTLExpiredException"));
        h
    })
    .await;
}

#[tokio::test]
async fn sessions_ordered_with_state() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q-sess").await;
        for i in 0..3 {
            for sid in ["a", "b"] {
                let mut m = ServiceBusMessage::new(format!("{sid}{i}"));
                m.set_session_id(sid.to_string()).expect("session id");
                s.send_message(m).await.expect("send");
            }
        }
        let mut a = c
            .accept_session_for_queue("q-sess", "a", Default::default())
            .await
            .expect("accept a");
        assert_eq!(a.session_id(), "a");
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut got = Vec::new();
        while got.len() < 3 && tokio::time::Instant::now() < deadline {
            for m in a
                .receive_messages_with_max_wait_time(3, Some(Duration::from_secs(1)))
                .await
                .expect("receive")
            {
                a.complete_message(&m).await.expect("complete");
                got.push(body(&m));
            }
        }
        assert_eq!(got, ["a0", "a1", "a2"]);
        a.set_session_state(b"state-a".to_vec())
            .await
            .expect("set state");
        assert_eq!(a.session_state().await.expect("get state"), b"state-a");
        a.renew_session_lock().await.expect("renew session lock");
        a.dispose().await.expect("dispose");
        let mut b = c
            .accept_next_session_for_queue("q-sess", Default::default())
            .await
            .expect("accept next");
        assert_eq!(b.session_id(), "b");
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < 3 && tokio::time::Instant::now() < deadline {
            for m in b
                .receive_messages_with_max_wait_time(3, Some(Duration::from_secs(1)))
                .await
                .expect("receive")
            {
                assert_eq!(m.session_id(), Some("b"));
                b.complete_message(&m).await.expect("complete");
                got.push(body(&m));
            }
        }
        assert_eq!(got, ["b0", "b1", "b2"]);
        h
    })
    .await;
}

#[tokio::test]
async fn ten_thousand_messages_without_stall() {
    with_emulator(|h| async move {
        let n = 10_000;
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q").await;
        let mut sent = 0;
        while sent < n {
            let mut batch = s.create_message_batch(Default::default()).expect("batch");
            while sent < n
                && batch
                    .try_add_message(ServiceBusMessage::new(format!("m{sent}")))
                    .is_ok()
            {
                sent += 1;
            }
            s.send_message_batch(batch).await.expect("send batch");
        }
        let options = ServiceBusReceiverOptions {
            prefetch_count: 100,
            ..Default::default()
        };
        let mut r = c
            .create_receiver_for_queue("q", options)
            .await
            .expect("receiver");
        let mut seen = std::collections::HashSet::new();
        while seen.len() < n {
            let msgs = r
                .receive_messages_with_max_wait_time(100, Some(Duration::from_secs(10)))
                .await
                .expect("receive");
            assert!(
                !msgs.is_empty(),
                "receiver stalled after {} messages",
                seen.len()
            );
            for m in msgs {
                r.complete_message(&m).await.expect("complete");
                seen.insert(body(&m));
            }
        }
        assert_eq!(seen.len(), n);
        receive_none(&mut r).await;
        h
    })
    .await;
}

#[tokio::test]
async fn large_message_crosses_frames_both_ways() {
    with_emulator(|h| async move {
        // fe2o3 announces 64 KiB frames: 200 KiB travels as several transfer frames each way.
        let payload: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q").await;
        s.send_message(ServiceBusMessage::new(payload.clone()))
            .await
            .expect("send");
        let mut r = peek_lock(&mut c, "q").await;
        let m = receive_n(&mut r, 1).await.remove(0);
        assert_eq!(m.body().expect("body"), &payload[..]);
        r.complete_message(&m).await.expect("complete");
        h
    })
    .await;
}

#[tokio::test]
async fn duplicate_detection_drops_repeats() {
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "q-dup").await;
        for body in ["once", "once", "other"] {
            let mut m = ServiceBusMessage::new(body);
            m.set_message_id(format!("id-{body}")).expect("message id");
            s.send_message(m).await.expect("send");
        }
        let mut r = receiver(
            &mut c,
            "q-dup",
            ServiceBusReceiveMode::ReceiveAndDelete,
            SubQueue::None,
        )
        .await;
        let got: Vec<String> = receive_n(&mut r, 2).await.iter().map(body).collect();
        assert_eq!(got, ["once", "other"]);
        receive_none(&mut r).await;
        h
    })
    .await;
}

#[tokio::test]
async fn rule_manager_adds_and_removes_rules() {
    use azservicebus::administration::{CorrelationRuleFilter, SqlRuleFilter};
    with_emulator(|h| async move {
        let mut c = client(&h).await;
        let mut rules = c
            .create_rule_manager("t", "s1")
            .await
            .expect("rule manager");
        rules
            .delete_rule("$Default")
            .await
            .expect("delete $Default");
        rules
            .create_rule(
                "green",
                CorrelationRuleFilter::builder().subject("green").build(),
            )
            .await
            .expect("add correlation rule");
        rules
            .create_rule("big", SqlRuleFilter::new("size > 10"))
            .await
            .expect("add sql rule");
        assert!(rules.delete_rule("missing").await.is_err());
        rules.dispose().await.expect("dispose rule manager");
        let mut s = sender(&mut c, "t").await;
        for (body, subject, size) in [
            ("green", "green", 1),
            ("big", "red", 20),
            ("neither", "red", 1),
        ] {
            let mut m = ServiceBusMessage::new(body);
            m.set_subject(subject.to_string());
            m.application_properties_mut()
                .get_or_insert_with(Default::default)
                .insert("size".to_string(), size.into());
            s.send_message(m).await.expect("send");
        }
        let options = ServiceBusReceiverOptions {
            receive_mode: ServiceBusReceiveMode::ReceiveAndDelete,
            ..Default::default()
        };
        let mut r = c
            .create_receiver_for_subscription("t", "s1", options)
            .await
            .expect("receiver");
        let got: Vec<String> = receive_n(&mut r, 2).await.iter().map(body).collect();
        assert_eq!(got, ["green", "big"]);
        receive_none(&mut r).await;
        h
    })
    .await;
}

/// The standard topology plus `n` plain queues `m0`, `m1`, … for tests with many links.
fn topology_with_queues(n: usize) -> servicebus_emulator::Topology {
    let mut t = common::topology();
    for i in 0..n {
        t.queues
            .push(servicebus_emulator::QueueConfig::new(format!("m{i}")));
    }
    t
}

/// Runs `f` against an emulator with `topology` on a multi-threaded runtime of its own
/// (as a separate process would), so that its replies race the client's tasks; the client
/// stays on the test's current-thread runtime (see the module notes).
async fn with_topology_apart<F, Fut>(topology: servicebus_emulator::Topology, f: F)
where
    F: FnOnce(EmulatorHandle) -> Fut,
    Fut: std::future::Future<Output = EmulatorHandle>,
{
    let (rt, h) = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let h = rt.block_on(common::start_on_5672(topology));
        (rt, h)
    })
    .join()
    .expect("emulator thread");
    let h = tokio::time::timeout(Duration::from_secs(240), Box::pin(f(h)))
        .await
        .expect("test finished in time");
    std::thread::spawn(move || rt.block_on(h.shutdown()))
        .join()
        .expect("emulator shutdown");
}

/// Wait (up to 5 s) until `entity` holds `n` messages: settlements travel asynchronously.
async fn wait_count(h: &EmulatorHandle, entity: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.message_count(entity) != Some(n) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.message_count(entity), Some(n), "messages in {entity}");
}

/// Send `n` messages tagged `tag` and receive/complete them on the same link pair;
/// returns the bodies of other messages received (and completed) meanwhile.
async fn round_trip(
    s: &mut ServiceBusSender,
    r: &mut ServiceBusReceiver,
    tag: &str,
    n: usize,
) -> Vec<String> {
    for i in 0..n {
        s.send_message(ServiceBusMessage::new(format!("{tag}-{i}")))
            .await
            .expect("send");
    }
    let prefix = format!("{tag}-");
    let (mut got, mut others) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n && tokio::time::Instant::now() < deadline {
        for m in r
            .receive_messages_with_max_wait_time(
                (n - got.len()) as u32,
                Some(Duration::from_secs(1)),
            )
            .await
            .expect("receive")
        {
            r.complete_message(&m).await.expect("complete");
            let b = body(&m);
            if b.starts_with(&prefix) {
                got.push(b);
            } else {
                others.push(b);
            }
        }
    }
    let want: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    assert_eq!(got, want, "round trip {tag}");
    others
}

#[tokio::test]
async fn many_senders_and_receivers_on_one_client() {
    with_topology_apart(topology_with_queues(3), |h| async move {
        let mut c = client(&h).await;
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for i in 0..3 {
            senders.push(sender(&mut c, &format!("m{i}")).await);
            receivers.push(peek_lock(&mut c, &format!("m{i}")).await);
        }
        // A second sender to an entity that already has one.
        let mut extra = sender(&mut c, "m0").await;
        // Sequentially, link by link.
        for (i, (s, r)) in senders.iter_mut().zip(receivers.iter_mut()).enumerate() {
            assert!(round_trip(s, r, &format!("seq{i}"), 5).await.is_empty());
        }
        extra
            .send_message(ServiceBusMessage::new("extra"))
            .await
            .expect("send on the extra sender");
        let m = receive_n(&mut receivers[0], 1).await.remove(0);
        assert_eq!(body(&m), "extra");
        receivers[0].complete_message(&m).await.expect("complete");
        // Concurrently on all links of the one session.
        let others = {
            let mut it = senders.iter_mut().zip(receivers.iter_mut());
            let (s0, r0) = it.next().expect("0");
            let (s1, r1) = it.next().expect("1");
            let (s2, r2) = it.next().expect("2");
            let (others, ..) = tokio::join!(
                Box::pin(round_trip(s0, r0, "par0", 20)),
                Box::pin(round_trip(s1, r1, "par1", 20)),
                Box::pin(round_trip(s2, r2, "par2", 20)),
                Box::pin(async {
                    for i in 0..20 {
                        extra
                            .send_message(ServiceBusMessage::new(format!("x{i}")))
                            .await
                            .expect("send extra");
                    }
                }),
            );
            others
        };
        let mut extras = others;
        if extras.len() < 20 {
            for m in receive_n(&mut receivers[0], 20 - extras.len()).await {
                receivers[0].complete_message(&m).await.expect("complete");
                extras.push(body(&m));
            }
        }
        let want: Vec<String> = (0..20).map(|i| format!("x{i}")).collect();
        assert_eq!(extras, want);
        for i in 0..3 {
            wait_count(&h, &format!("m{i}"), 0).await;
        }
        // Close some links while others stay open and keep working.
        extra.dispose().await.expect("dispose extra sender");
        let r2 = receivers.pop().expect("r2");
        r2.dispose().await.expect("dispose receiver 2");
        assert!(
            round_trip(&mut senders[0], &mut receivers[0], "after", 3)
                .await
                .is_empty()
        );
        // A new sender after others were closed (handles get reused).
        let mut again = sender(&mut c, "m2").await;
        again
            .send_message(ServiceBusMessage::new("again"))
            .await
            .expect("send again");
        for r in receivers {
            r.dispose().await.expect("dispose receiver");
        }
        for s in senders {
            s.dispose().await.expect("dispose sender");
        }
        again.dispose().await.expect("dispose sender again");
        c.dispose().await.expect("dispose client");
        wait_count(&h, "m2", 1).await;
        h
    })
    .await;
}

#[tokio::test]
async fn dispose_client_with_links_still_open() {
    with_topology_apart(topology_with_queues(2), |h| async move {
        let mut c = client(&h).await;
        let mut s0 = sender(&mut c, "m0").await;
        let mut s1 = sender(&mut c, "m1").await;
        let mut r0 = peek_lock(&mut c, "m0").await;
        s0.send_message(ServiceBusMessage::new("a"))
            .await
            .expect("send");
        s1.send_message(ServiceBusMessage::new("b"))
            .await
            .expect("send");
        let m = receive_n(&mut r0, 1).await.remove(0);
        r0.complete_message(&m).await.expect("complete");
        // Batches in flight on the session just before it ends.
        for i in 0..20 {
            let mut batch = s1.create_message_batch(Default::default()).expect("batch");
            for j in 0..10 {
                batch
                    .try_add_message(ServiceBusMessage::new(format!("{i}-{j}")))
                    .expect("fits");
            }
            s1.send_message_batch(batch).await.expect("send batch");
        }
        c.dispose().await.expect("dispose client with links open");
        drop((s0, s1, r0));
        wait_count(&h, "m0", 0).await;
        wait_count(&h, "m1", 201).await;
        // The emulator still serves new clients.
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "m1").await;
        s.send_message(ServiceBusMessage::new("c"))
            .await
            .expect("send");
        s.dispose().await.expect("dispose sender");
        c.dispose().await.expect("dispose client");
        wait_count(&h, "m1", 202).await;
        h
    })
    .await;
}

/// The benchmark's pattern on one client: many spawned tasks, each with its own sender
/// (then receiver) on the same queue, all links on the client's one AMQP session.
#[tokio::test]
async fn many_spawned_links_on_one_client_same_queue() {
    with_topology_apart(topology_with_queues(1), |h| async move {
        const TASKS: usize = 16;
        const PER_TASK: usize = 50;
        let mut c = client(&h).await;
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let mut s = sender(&mut c, "m0").await;
            tasks.spawn(async move {
                for i in 0..PER_TASK {
                    if i % 10 == 0 {
                        let mut batch = s.create_message_batch(Default::default()).expect("batch");
                        for j in 0..10 {
                            batch
                                .try_add_message(ServiceBusMessage::new(format!("b{t}-{i}-{j}")))
                                .expect("fits");
                        }
                        s.send_message_batch(batch).await.expect("send batch");
                    } else {
                        s.send_message(ServiceBusMessage::new(format!("s{t}-{i}")))
                            .await
                            .expect("send");
                    }
                }
                s.dispose().await.expect("dispose sender");
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("sender task");
        }
        let total = TASKS * (PER_TASK / 10 * 10 + PER_TASK - PER_TASK / 10);
        wait_count(&h, "m0", total).await;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..8 {
            let mut r = peek_lock(&mut c, "m0").await;
            let done = done.clone();
            tasks.spawn(async move {
                let deadline = tokio::time::Instant::now() + WAIT;
                while done.load(std::sync::atomic::Ordering::Relaxed) < total
                    && tokio::time::Instant::now() < deadline
                {
                    let msgs = r
                        .receive_messages_with_max_wait_time(10, Some(Duration::from_secs(1)))
                        .await
                        .expect("receive");
                    for m in &msgs {
                        r.complete_message(m).await.expect("complete");
                    }
                    done.fetch_add(msgs.len(), std::sync::atomic::Ordering::Relaxed);
                }
                r.dispose().await.expect("dispose receiver");
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("receiver task");
        }
        assert_eq!(done.load(std::sync::atomic::Ordering::Relaxed), total);
        wait_count(&h, "m0", 0).await;
        c.dispose().await.expect("dispose client");
        h
    })
    .await;
}

/// Refused links (a missing entity) leave the client's other links and session working.
#[tokio::test]
async fn refused_links_leave_the_session_working() {
    with_topology_apart(topology_with_queues(1), |h| async move {
        let mut c = client(&h).await;
        let mut s = sender(&mut c, "m0").await;
        let mut r = peek_lock(&mut c, "m0").await;
        for _ in 0..2 {
            assert!(
                c.create_sender("no-such-queue", ServiceBusSenderOptions::default())
                    .await
                    .is_err()
            );
            assert!(
                c.create_receiver_for_queue("no-such-queue", ServiceBusReceiverOptions::default())
                    .await
                    .is_err()
            );
        }
        assert!(round_trip(&mut s, &mut r, "still", 3).await.is_empty());
        let mut s2 = sender(&mut c, "m0").await;
        s2.send_message(ServiceBusMessage::new("late"))
            .await
            .expect("send");
        assert_eq!(body(&receive_n(&mut r, 1).await[0]), "late");
        r.dispose().await.expect("dispose receiver");
        s2.dispose().await.expect("dispose sender");
        s.dispose().await.expect("dispose sender");
        c.dispose().await.expect("dispose client");
        h
    })
    .await;
}
