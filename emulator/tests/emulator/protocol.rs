//! Protocol robustness: malformed input closes only the offending connection
//! with the right AMQP error; heartbeats and the idle timeout work. A raw
//! AMQP client built on the emulator's codec drives the wire directly.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{ErrorCondition, Role};
use fe2o3_amqp_types::messaging::{Target, TargetArchetype};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Detach, MaxFrameSize, Open, Performative, Transfer,
};
use servicebus_emulator::codec::{self, AMQP_HEADER, FRAME_TYPE_AMQP};
use servicebus_emulator::{ConnectionOptions, Emulator, EmulatorHandle, QueueConfig, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// A raw AMQP connection (also driven by the fuzz targets).
pub(crate) struct Raw {
    s: TcpStream,
}

impl Raw {
    pub(crate) async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            s: TcpStream::connect(addr).await.expect("connect"),
        }
    }

    pub(crate) async fn write(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    /// Writes `bytes`; `false` once the peer closed the connection.
    pub(crate) async fn try_write(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).await.is_ok()
    }

    pub(crate) async fn read_exact_n(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; n];
        match tokio::time::timeout(WAIT, self.s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf),
            _ => None,
        }
    }

    pub(crate) async fn header(&mut self) {
        self.write(&AMQP_HEADER).await;
        assert_eq!(
            self.read_exact_n(8).await.as_deref(),
            Some(&AMQP_HEADER[..])
        );
    }

    pub(crate) async fn send(&mut self, channel: u16, p: Performative, payload: &[u8]) {
        let mut out = BytesMut::new();
        codec::write_performative(&mut out, channel, &p, payload);
        self.write(&out).await;
    }

    /// The next frame: `(channel, body)`; `None` at EOF or after `WAIT`.
    pub(crate) async fn frame(&mut self) -> Option<(u16, Bytes)> {
        let h = self.read_exact_n(8).await?;
        let size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let rest = self.read_exact_n(size - 8).await?;
        let doff = usize::from(h[4]) * 4;
        assert_eq!(h[5], FRAME_TYPE_AMQP);
        Some((
            u16::from_be_bytes([h[6], h[7]]),
            Bytes::from(rest).slice(doff - 8..),
        ))
    }

    /// The next performative, skipping heartbeats.
    pub(crate) async fn performative(&mut self) -> Option<Performative> {
        loop {
            let (_, body) = self.frame().await?;
            if body.is_empty() {
                continue;
            }
            return Some(
                codec::decode_performative(&body)
                    .expect("emulator frames decode")
                    .0,
            );
        }
    }

    pub(crate) async fn open(&mut self, idle_time_out: Option<u32>) {
        self.header().await;
        let open = Open {
            container_id: "raw-test".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(65536),
            channel_max: ChannelMax(16),
            idle_time_out,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(0, Performative::Open(open), &[]).await;
        assert!(matches!(
            self.performative().await,
            Some(Performative::Open(_))
        ));
    }

    pub(crate) async fn begin(&mut self, channel: u16) {
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: Default::default(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(channel, Performative::Begin(begin), &[]).await;
        assert!(matches!(
            self.performative().await,
            Some(Performative::Begin(_))
        ));
    }

    /// Read until the emulator's close; returns its error condition.
    async fn close_condition(&mut self) -> Option<String> {
        while let Some(p) = self.performative().await {
            if let Performative::Close(c) = p {
                return c.error.map(|e| symbol(&e.condition));
            }
        }
        None
    }

    /// Whether the emulator closed the socket.
    async fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(WAIT, self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// An error condition as its AMQP symbol.
fn symbol(condition: &ErrorCondition) -> String {
    let bytes = serde_amqp::to_vec(condition).expect("encodes");
    serde_amqp::from_slice::<serde_amqp::primitives::Symbol>(&bytes)
        .expect("a symbol")
        .0
}

fn topology() -> Topology {
    Topology {
        queues: vec![QueueConfig::new("q")],
        ..Default::default()
    }
}

async fn emulator() -> EmulatorHandle {
    common::start_ephemeral(topology()).await
}

/// A connection opened before the bad input keeps working, and new ones work.
async fn assert_healthy(addr: SocketAddr, existing: &mut Raw) {
    existing.begin(7).await;
    let mut fresh = Raw::connect(addr).await;
    fresh.open(None).await;
    fresh.begin(0).await;
}

#[tokio::test]
async fn garbage_bytes_get_the_protocol_header_and_a_close() {
    let h = emulator().await;
    let mut good = Raw::connect(h.local_addr()).await;
    good.open(None).await;
    let mut bad = Raw::connect(h.local_addr()).await;
    bad.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(bad.read_exact_n(8).await.as_deref(), Some(&AMQP_HEADER[..]));
    assert!(bad.at_eof().await);
    assert_healthy(h.local_addr(), &mut good).await;
    h.shutdown().await;
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let h = emulator().await;
    let mut good = Raw::connect(h.local_addr()).await;
    good.open(None).await;
    let mut bad = Raw::connect(h.local_addr()).await;
    bad.write(b"AMQP\x00\x00\x09\x01").await;
    assert_eq!(bad.read_exact_n(8).await.as_deref(), Some(&AMQP_HEADER[..]));
    assert!(bad.at_eof().await);
    assert_healthy(h.local_addr(), &mut good).await;
    h.shutdown().await;
}

#[tokio::test]
async fn frame_larger_than_max_frame_size_is_a_framing_error() {
    let h = emulator().await;
    let mut good = Raw::connect(h.local_addr()).await;
    good.open(None).await;
    let mut bad = Raw::connect(h.local_addr()).await;
    bad.open(None).await;
    let size: u32 = ConnectionOptions::default().max_frame_size + 1;
    let mut frame = size.to_be_bytes().to_vec();
    frame.extend_from_slice(&[2, 0, 0, 0]);
    bad.write(&frame).await;
    assert_eq!(
        bad.close_condition().await.as_deref(),
        Some("amqp:connection:framing-error")
    );
    assert!(bad.at_eof().await);
    assert_healthy(h.local_addr(), &mut good).await;
    h.shutdown().await;
}

#[tokio::test]
async fn unknown_performative_is_a_decode_error() {
    let h = emulator().await;
    let mut good = Raw::connect(h.local_addr()).await;
    good.open(None).await;
    let mut bad = Raw::connect(h.local_addr()).await;
    bad.open(None).await;
    let mut out = BytesMut::new();
    codec::write_frame(&mut out, FRAME_TYPE_AMQP, 0, &[&[0x00, 0x53, 0x30, 0x45]]);
    bad.write(&out).await;
    assert_eq!(
        bad.close_condition().await.as_deref(),
        Some("amqp:decode-error")
    );
    assert!(bad.at_eof().await);
    assert_healthy(h.local_addr(), &mut good).await;
    h.shutdown().await;
}

#[tokio::test]
async fn truncated_performative_is_a_decode_error() {
    let h = emulator().await;
    let mut bad = Raw::connect(h.local_addr()).await;
    bad.open(None).await;
    let mut out = BytesMut::new();
    codec::write_frame(
        &mut out,
        FRAME_TYPE_AMQP,
        0,
        &[&[0x00, 0x53, 0x11, 0xc0, 0x20, 0x05]],
    );
    bad.write(&out).await;
    assert_eq!(
        bad.close_condition().await.as_deref(),
        Some("amqp:decode-error")
    );
    let mut fresh = Raw::connect(h.local_addr()).await;
    fresh.open(None).await;
    h.shutdown().await;
}

#[tokio::test]
async fn transfer_on_a_detached_link_is_an_unattached_handle_error() {
    let h = emulator().await;
    let mut good = Raw::connect(h.local_addr()).await;
    good.open(None).await;
    let mut bad = Raw::connect(h.local_addr()).await;
    bad.open(None).await;
    bad.begin(0).await;
    let attach = attach("sender", 0, Role::Sender, "q");
    bad.send(0, Performative::Attach(attach), &[]).await;
    assert!(matches!(
        bad.performative().await,
        Some(Performative::Attach(_))
    ));
    bad.send(
        0,
        Performative::Detach(Detach {
            handle: 0.into(),
            closed: true,
            error: None,
        }),
        &[],
    )
    .await;
    loop {
        match bad.performative().await {
            Some(Performative::Detach(_)) => break,
            Some(Performative::Flow(_)) => continue,
            other => panic!("expected detach, got {other:?}"),
        }
    }
    let transfer = Transfer {
        handle: 0.into(),
        delivery_id: Some(0),
        delivery_tag: Some(serde_bytes::ByteBuf::from(vec![1])),
        message_format: Some(0),
        settled: Some(true),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    };
    bad.send(
        0,
        Performative::Transfer(transfer),
        &[0x00, 0x53, 0x77, 0xa1, 0x01, b'x'],
    )
    .await;
    assert_eq!(
        bad.close_condition().await.as_deref(),
        Some("amqp:session:unattached-handle")
    );
    assert!(bad.at_eof().await);
    assert_healthy(h.local_addr(), &mut good).await;
    assert_eq!(h.message_count("q"), Some(0));
    h.shutdown().await;
}

#[tokio::test]
async fn frames_before_open_are_an_illegal_state() {
    let h = emulator().await;
    let mut bad = Raw::connect(h.local_addr()).await;
    bad.header().await;
    let begin = Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 1,
        outgoing_window: 1,
        handle_max: Default::default(),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    bad.send(0, Performative::Begin(begin), &[]).await;
    assert_eq!(
        bad.close_condition().await.as_deref(),
        Some("amqp:illegal-state")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn heartbeats_are_sent_at_half_the_peer_idle_timeout() {
    let h = emulator().await;
    let mut c = Raw::connect(h.local_addr()).await;
    c.open(Some(400)).await;
    // With nothing else going on, the next frames are empty heartbeats.
    for _ in 0..3 {
        let (_, body) = c.frame().await.expect("a heartbeat arrives");
        assert!(body.is_empty(), "expected an empty frame");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn silent_peer_is_closed_after_the_idle_timeout() {
    let options = ConnectionOptions {
        idle_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let h = Emulator::start_with("127.0.0.1:0", topology(), options)
        .await
        .expect("starts");
    let mut c = Raw::connect(h.local_addr()).await;
    c.open(None).await;
    assert_eq!(
        c.close_condition().await.as_deref(),
        Some("amqp:resource-limit-exceeded")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn sasl_anonymous_then_amqp() {
    use fe2o3_amqp_types::sasl::SaslInit;
    let h = emulator().await;
    let mut c = Raw::connect(h.local_addr()).await;
    c.write(&codec::SASL_HEADER).await;
    assert_eq!(
        c.read_exact_n(8).await.as_deref(),
        Some(&codec::SASL_HEADER[..])
    );
    let mechanisms = c.read_exact_n(8).await.expect("mechanisms frame header");
    let size =
        u32::from_be_bytes([mechanisms[0], mechanisms[1], mechanisms[2], mechanisms[3]]) as usize;
    let body = c.read_exact_n(size - 8).await.expect("mechanisms body");
    let text = String::from_utf8_lossy(&body);
    for m in ["ANONYMOUS", "PLAIN", "MSSBCBS", "EXTERNAL"] {
        assert!(text.contains(m), "{m} advertised");
    }
    let init = SaslInit {
        mechanism: "ANONYMOUS".into(),
        initial_response: None,
        hostname: Some("localhost".into()),
    };
    let mut out = BytesMut::new();
    codec::write_frame(
        &mut out,
        codec::FRAME_TYPE_SASL,
        0,
        &[&codec::encode(&init)],
    );
    c.write(&out).await;
    let outcome = c.read_exact_n(8).await.expect("outcome header");
    let size = u32::from_be_bytes([outcome[0], outcome[1], outcome[2], outcome[3]]) as usize;
    let body = c.read_exact_n(size - 8).await.expect("outcome body");
    assert_eq!(
        codec::descriptor_code(&body, 0),
        Ok(codec::sasl_code::OUTCOME)
    );
    c.open(None).await;
    c.begin(0).await;
    h.shutdown().await;
}

pub(crate) fn attach(name: &str, handle: u32, role: Role, address: &str) -> Attach {
    use fe2o3_amqp_types::messaging::Source;
    let (source, target) = match role {
        Role::Sender => (
            Box::default(),
            Box::new(TargetArchetype::Target(Target::from(address))),
        ),
        Role::Receiver => (
            Box::new(Source::builder().address(address).build()),
            Box::new(TargetArchetype::Target(Target::from("client"))),
        ),
    };
    Attach {
        name: name.into(),
        handle: handle.into(),
        role,
        snd_settle_mode: Default::default(),
        rcv_settle_mode: Default::default(),
        source: Some(source),
        target: Some(target),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: Some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }
}

/// The next performative that is not a flow.
async fn next_non_flow(c: &mut Raw) -> Option<Performative> {
    loop {
        match c.performative().await? {
            Performative::Flow(_) => continue,
            other => return Some(other),
        }
    }
}

#[tokio::test]
async fn refused_attach_then_in_flight_frames_and_the_answering_detach() {
    use fe2o3_amqp_types::performatives::Flow;
    let h = emulator().await;
    let mut c = Raw::connect(h.local_addr()).await;
    c.open(None).await;
    c.begin(0).await;
    c.send(
        0,
        Performative::Attach(attach("missing", 0, Role::Receiver, "no-such-queue")),
        &[],
    )
    .await;
    assert!(matches!(
        c.performative().await,
        Some(Performative::Attach(_))
    ));
    match c.performative().await {
        Some(Performative::Detach(d)) => {
            assert!(d.closed);
            assert_eq!(
                d.error.map(|e| symbol(&e.condition)).as_deref(),
                Some("amqp:not-found")
            );
        }
        other => panic!("expected the refusing detach, got {other:?}"),
    }
    // A flow the client sent before it saw the refusal, then its answering detach.
    let flow = Flow {
        next_incoming_id: Some(1),
        incoming_window: 100,
        next_outgoing_id: 0,
        outgoing_window: 100,
        handle: Some(0.into()),
        delivery_count: Some(0),
        link_credit: Some(10),
        available: None,
        drain: false,
        echo: false,
        properties: None,
    };
    c.send(0, Performative::Flow(flow), &[]).await;
    let detach = Detach {
        handle: 0.into(),
        closed: true,
        error: None,
    };
    c.send(0, Performative::Detach(detach), &[]).await;
    // Handle 0 is free again; the connection and session still work.
    c.send(
        0,
        Performative::Attach(attach("sender", 0, Role::Sender, "q")),
        &[],
    )
    .await;
    match next_non_flow(&mut c).await {
        Some(Performative::Attach(a)) => assert_eq!(a.handle.0, 0),
        other => panic!("expected the attach reply, got {other:?}"),
    }
    // The credit for the new sender link.
    assert!(matches!(
        c.performative().await,
        Some(Performative::Flow(_))
    ));
    c.begin(1).await;
    h.shutdown().await;
}

#[tokio::test]
async fn detach_of_an_attach_still_waiting_for_a_session() {
    let mut sess = QueueConfig::new("qs");
    sess.properties.requires_session = true;
    let h = common::start_ephemeral(Topology {
        queues: vec![sess],
        ..Default::default()
    })
    .await;
    let mut c = Raw::connect(h.local_addr()).await;
    c.open(None).await;
    c.begin(0).await;
    // Next available session (null session filter): nothing to lock, so it waits.
    let mut a = attach("waiting", 3, Role::Receiver, "qs");
    if let Some(source) = a.source.as_mut() {
        let mut filter = fe2o3_amqp_types::messaging::FilterSet::new();
        filter.insert(
            serde_amqp::primitives::Symbol::from("com.microsoft:session-filter"),
            serde_amqp::Value::Null,
        );
        source.filter = Some(filter);
    }
    c.send(0, Performative::Attach(a), &[]).await;
    let detach = Detach {
        handle: 3.into(),
        closed: true,
        error: None,
    };
    c.send(0, Performative::Detach(detach), &[]).await;
    assert!(matches!(
        c.performative().await,
        Some(Performative::Attach(_))
    ));
    match c.performative().await {
        Some(Performative::Detach(d)) => {
            assert_eq!(d.handle.0, 3);
            assert!(d.closed);
            assert!(d.error.is_none());
        }
        other => panic!("expected the answering detach, got {other:?}"),
    }
    c.begin(1).await;
    h.shutdown().await;
}
