//! One client connection: protocol headers, SASL, the open/close state
//! machine, session and link dispatch, flow control, heartbeats.
//!
//! A reader task turns bytes into frames; the connection task owns all state,
//! handles frames, wakes on broker notifications and timers, and writes
//! batched output. Any protocol violation closes this connection with an AMQP
//! error; nothing reachable from the network panics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::definitions::Error as AmqpError;
use fe2o3_amqp_types::definitions::{ErrorCondition, Role, SenderSettleMode};
use fe2o3_amqp_types::messaging::{Accepted, DeliveryState, Rejected, Source, TargetArchetype};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open,
    Performative, Transfer,
};
use fe2o3_amqp_types::sasl::{SaslCode, SaslMechanisms, SaslOutcome};
use serde_amqp::Value;
use serde_amqp::described::Described;
use serde_amqp::primitives::{Array, OrderedMap, Symbol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc, watch};

use crate::broker::{
    Address, Broker, BrokerError, EntityKind, Settlement, condition, parse_address,
};
use crate::codec::{
    AMQP_HEADER, FRAME_TYPE_AMQP, FRAME_TYPE_SASL, Frame, MIN_MAX_FRAME_SIZE, SASL_HEADER,
    decode_performative, descriptor_code, encode, parse_frame_header, sasl_code, write_frame,
    write_heartbeat, write_performative,
};
use crate::link::{Link, LinkKind, Partial};
use crate::message::{AmqpMessage, BATCH_FORMAT};
use crate::session::{INCOMING_WINDOW, Session, Unsettled};
use crate::{cbs, management};

/// Credit granted to client senders, replenished at half.
const LINK_CREDIT: u32 = 5_000;
/// Bytes a message's envelope may add beyond max-message-size.
const ENVELOPE_SLACK: usize = 8 * 1024;
/// Key of the session filter in a source's filter set.
const SESSION_FILTER: &str = "com.microsoft:session-filter";
/// How long a next-available-session receiver waits for a session by default.
const DEFAULT_SESSION_WAIT: Duration = Duration::from_secs(60);

/// Per-server settings shared by connections.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// The max-frame-size the emulator announces and enforces.
    pub max_frame_size: u32,
    /// The idle timeout the emulator announces; a silent peer is closed after it.
    pub idle_timeout: Duration,
    /// Time allowed for the protocol header and SASL exchange.
    pub handshake_timeout: Duration,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            max_frame_size: 256 * 1024,
            idle_timeout: Duration::from_secs(240),
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// A reason to close the connection.
#[derive(Debug)]
struct Failure {
    condition: &'static str,
    description: String,
}

fn fail(condition: &'static str, description: impl Into<String>) -> Failure {
    Failure {
        condition,
        description: description.into(),
    }
}

fn amqp_error(condition: &str, description: impl Into<String>) -> AmqpError {
    // Complete field list (info as an empty map): pyamqp indexes all three fields.
    AmqpError {
        condition: ErrorCondition::Custom(Symbol::from(condition)),
        description: Some(description.into()),
        info: Some(Box::new(OrderedMap::new())),
    }
}

enum Event {
    Frame(Frame),
    Failure(Failure),
}

struct PendingAttach {
    channel: u16,
    attach: Attach,
    entity: String,
    deadline: Instant,
}

struct Conn {
    id: u64,
    broker: Arc<Broker>,
    opts: Arc<ConnectionOptions>,
    notify: Arc<Notify>,
    out: BytesMut,
    opened: bool,
    closing: bool,
    remote_max_frame: u32,
    remote_idle: Option<Duration>,
    last_read: Instant,
    last_write: Instant,
    sessions: std::collections::HashMap<u16, Session>,
    pending_attaches: Vec<PendingAttach>,
}

static LINK_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Serve one accepted TCP connection until it closes or the server shuts down.
pub async fn serve(
    stream: TcpStream,
    broker: Arc<Broker>,
    opts: Arc<ConnectionOptions>,
    mut shutdown: watch::Receiver<bool>,
    id: u64,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    match tokio::time::timeout(opts.handshake_timeout, handshake(&mut rd, &mut wr)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(connection = id, error = %e, "handshake failed");
            let _ = wr.shutdown().await;
            return;
        }
        Err(_) => {
            tracing::debug!(connection = id, "handshake timed out");
            return;
        }
    }
    let (tx, mut rx) = mpsc::channel::<Event>(256);
    let max_frame = opts.max_frame_size;
    let reader = tokio::spawn(read_frames(rd, tx, max_frame));
    let mut conn = Conn {
        id,
        broker,
        opts: opts.clone(),
        notify: Arc::new(Notify::new()),
        out: BytesMut::with_capacity(64 * 1024),
        opened: false,
        closing: false,
        remote_max_frame: MIN_MAX_FRAME_SIZE,
        remote_idle: None,
        last_read: Instant::now(),
        last_write: Instant::now(),
        sessions: Default::default(),
        pending_attaches: Vec::new(),
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let notify = conn.notify.clone();
    loop {
        let result = tokio::select! {
            ev = rx.recv() => match ev {
                None => break,
                Some(ev) => {
                    let mut r = conn.on_event(ev);
                    let mut n = 0;
                    while r.is_ok() && !conn.closing && n < 256 {
                        match rx.try_recv() {
                            Ok(ev) => r = conn.on_event(ev),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                    r
                }
            },
            _ = notify.notified() => {
                conn.pump_all();
                conn.retry_pending_attaches();
                Ok(())
            },
            _ = ticker.tick() => conn.on_tick(),
            _ = shutdown.changed() => {
                conn.send(0, Performative::Close(Close { error: Some(amqp_error("amqp:connection:forced", "The emulator is shutting down.")) }));
                conn.closing = true;
                Ok(())
            }
        };
        if let Err(f) = result {
            tracing::debug!(connection = conn.id, condition = f.condition, description = %f.description, "closing connection with error");
            conn.send(
                0,
                Performative::Close(Close {
                    error: Some(amqp_error(f.condition, f.description)),
                }),
            );
            conn.closing = true;
        }
        conn.flush_accepts();
        if !conn.out.is_empty() {
            if wr.write_all(&conn.out).await.is_err() {
                break;
            }
            conn.out.clear();
            conn.last_write = Instant::now();
        }
        if conn.closing {
            break;
        }
    }
    reader.abort();
    conn.cleanup();
    let _ = wr.shutdown().await;
}

async fn read_sasl_frame(rd: &mut OwnedReadHalf) -> std::io::Result<(u64, Bytes)> {
    let mut h = [0u8; 8];
    rd.read_exact(&mut h).await?;
    let (doff, size) = parse_frame_header(&h, 64 * 1024).map_err(std::io::Error::other)?;
    let mut rest = vec![0u8; size - 8];
    rd.read_exact(&mut rest).await?;
    if h[5] != FRAME_TYPE_SASL {
        return Err(std::io::Error::other("expected a SASL frame"));
    }
    let body = Bytes::from(rest).slice(doff - 8..);
    let code = descriptor_code(&body, 0).map_err(std::io::Error::other)?;
    Ok((code, body))
}

async fn handshake(rd: &mut OwnedReadHalf, wr: &mut OwnedWriteHalf) -> std::io::Result<()> {
    let mut hdr = [0u8; 8];
    rd.read_exact(&mut hdr).await?;
    if hdr == SASL_HEADER {
        let mut out = BytesMut::new();
        out.extend_from_slice(&SASL_HEADER);
        let mechanisms = SaslMechanisms {
            sasl_server_mechanisms: Array(
                ["ANONYMOUS", "PLAIN", "MSSBCBS", "EXTERNAL"]
                    .into_iter()
                    .map(Symbol::from)
                    .collect(),
            ),
        };
        write_frame(&mut out, FRAME_TYPE_SASL, 0, &[&encode(&mechanisms)]);
        wr.write_all(&out).await?;
        let (code, _) = read_sasl_frame(rd).await?;
        if code != sasl_code::INIT {
            return Err(std::io::Error::other("expected sasl-init"));
        }
        let mut out = BytesMut::new();
        let outcome = SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        };
        write_frame(&mut out, FRAME_TYPE_SASL, 0, &[&encode(&outcome)]);
        wr.write_all(&out).await?;
        rd.read_exact(&mut hdr).await?;
    }
    if hdr != AMQP_HEADER {
        // Announce what we speak, then close (2.2).
        wr.write_all(&AMQP_HEADER).await?;
        return Err(std::io::Error::other(format!(
            "unsupported protocol header {hdr:02x?}"
        )));
    }
    wr.write_all(&AMQP_HEADER).await?;
    Ok(())
}

async fn read_frames(mut rd: OwnedReadHalf, tx: mpsc::Sender<Event>, max_frame: u32) {
    loop {
        let mut h = [0u8; 8];
        if rd.read_exact(&mut h).await.is_err() {
            return;
        }
        let (doff, size) = match parse_frame_header(&h, max_frame) {
            Ok(v) => v,
            Err(e) => {
                let _ = tx
                    .send(Event::Failure(fail("amqp:connection:framing-error", e)))
                    .await;
                return;
            }
        };
        let mut rest = vec![0u8; size - 8];
        if rd.read_exact(&mut rest).await.is_err() {
            return;
        }
        let body = Bytes::from(rest).slice(doff - 8..);
        let frame = Frame {
            frame_type: h[5],
            channel: u16::from_be_bytes([h[6], h[7]]),
            body,
        };
        if tx.send(Event::Frame(frame)).await.is_err() {
            return;
        }
    }
}

fn session_filter(source: Option<&Source>) -> Option<Option<Value>> {
    let filter = source?.filter.as_ref()?;
    filter
        .iter()
        .find(|(k, _)| k.0 == SESSION_FILTER)
        .map(|(_, v)| match v {
            Value::Null => None,
            Value::Described(d) if matches!(d.value, Value::Null) => None,
            other => Some(other.clone()),
        })
}

fn filter_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        Value::Described(d) => filter_string(&d.value),
        _ => None,
    }
}

fn target_address(a: &Attach) -> Option<String> {
    match a.target.as_deref() {
        Some(TargetArchetype::Target(t)) => t.address.clone(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

fn to_settlement(state: Option<&DeliveryState>) -> Settlement {
    match state {
        Some(DeliveryState::Accepted(_)) => Settlement::Complete,
        Some(DeliveryState::Modified(m)) => {
            if m.undeliverable_here == Some(true) {
                Settlement::Defer(m.message_annotations.clone())
            } else {
                Settlement::Abandon(m.message_annotations.clone())
            }
        }
        Some(DeliveryState::Rejected(r)) => {
            let info = r.error.as_ref().and_then(|e| e.info.as_deref());
            let text = |k: &str| match info.and_then(|i| i.get(&Symbol::from(k))) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Symbol(s)) => Some(s.0.clone()),
                _ => None,
            };
            Settlement::DeadLetter {
                reason: text("DeadLetterReason"),
                description: text("DeadLetterErrorDescription")
                    .or_else(|| r.error.as_ref().and_then(|e| e.description.clone())),
                annotations: None,
            }
        }
        _ => Settlement::Release,
    }
}

fn echo_state(state: Option<&DeliveryState>) -> DeliveryState {
    match state {
        Some(DeliveryState::Rejected(_)) => DeliveryState::Rejected(Rejected { error: None }),
        Some(s) => s.clone(),
        None => DeliveryState::Released(fe2o3_amqp_types::messaging::Released {}),
    }
}

fn dotnet_ticks(unix_ms: i64) -> i64 {
    unix_ms
        .saturating_mul(10_000)
        .saturating_add(621_355_968_000_000_000)
}

impl Conn {
    fn send(&mut self, channel: u16, p: Performative) {
        tracing::trace!(connection = self.id, channel, performative = ?p, "send");
        write_performative(&mut self.out, channel, &p, &[]);
    }

    fn on_event(&mut self, ev: Event) -> Result<(), Failure> {
        match ev {
            Event::Failure(f) => Err(f),
            Event::Frame(f) => self.on_frame(f),
        }
    }

    fn on_frame(&mut self, f: Frame) -> Result<(), Failure> {
        self.last_read = Instant::now();
        if f.body.is_empty() {
            return Ok(());
        }
        if f.frame_type != FRAME_TYPE_AMQP {
            return Err(fail(
                "amqp:connection:framing-error",
                format!("unexpected frame type {}", f.frame_type),
            ));
        }
        let (p, payload) =
            decode_performative(&f.body).map_err(|e| fail("amqp:decode-error", e.0))?;
        tracing::trace!(connection = self.id, channel = f.channel, performative = ?p, payload = payload.len(), "received");
        if !self.opened && !matches!(p, Performative::Open(_)) {
            return Err(fail("amqp:illegal-state", "the first frame must be open"));
        }
        match p {
            Performative::Open(o) => self.on_open(o),
            Performative::Begin(b) => self.on_begin(f.channel, b),
            Performative::Attach(a) => self.on_attach(f.channel, a),
            Performative::Flow(fl) => self.on_flow(f.channel, fl),
            Performative::Transfer(t) => self.on_transfer(f.channel, t, payload),
            Performative::Disposition(d) => self.on_disposition(f.channel, d),
            Performative::Detach(d) => self.on_detach(f.channel, d),
            Performative::End(_) => self.on_end(f.channel),
            Performative::Close(c) => {
                if let Some(e) = c.error {
                    tracing::debug!(connection = self.id, error = ?e, "peer closed with error");
                }
                self.send(0, Performative::Close(Close { error: None }));
                self.closing = true;
                Ok(())
            }
        }
    }

    fn on_open(&mut self, o: Open) -> Result<(), Failure> {
        if self.opened {
            return Err(fail("amqp:illegal-state", "open received twice"));
        }
        self.opened = true;
        self.remote_max_frame = o.max_frame_size.0.max(MIN_MAX_FRAME_SIZE);
        self.remote_idle = o
            .idle_time_out
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(u64::from(ms)));
        let open = Open {
            container_id: format!("servicebus-emulator-{}", self.id),
            hostname: None,
            max_frame_size: MaxFrameSize(self.opts.max_frame_size),
            channel_max: ChannelMax(4999),
            idle_time_out: Some(self.opts.idle_timeout.as_millis().min(u128::from(u32::MAX)) as u32),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(0, Performative::Open(open));
        Ok(())
    }

    fn on_begin(&mut self, channel: u16, b: Begin) -> Result<(), Failure> {
        if self.sessions.contains_key(&channel) {
            return Err(fail(
                "amqp:illegal-state",
                format!("channel {channel} already has a session"),
            ));
        }
        let session = Session {
            channel,
            next_incoming_id: b.next_outgoing_id,
            next_outgoing_id: 1,
            remote_incoming_window: b.incoming_window,
            ..Default::default()
        };
        self.sessions.insert(channel, session);
        self.send(
            channel,
            Performative::Begin(Begin {
                remote_channel: Some(channel),
                next_outgoing_id: 1,
                incoming_window: INCOMING_WINDOW,
                outgoing_window: u32::MAX,
                handle_max: Default::default(),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
        );
        Ok(())
    }

    fn session(&mut self, channel: u16) -> Result<&mut Session, Failure> {
        self.sessions.get_mut(&channel).ok_or_else(|| {
            fail(
                "amqp:connection:framing-error",
                format!("no session on channel {channel}"),
            )
        })
    }

    fn refuse_attach(&mut self, channel: u16, a: &Attach, error: AmqpError) {
        self.attach_and_detach(channel, a, Some(error), true);
    }

    /// Answer an attach with an attach that creates no link (null terminus on our
    /// side) and a detach: a refusal (with an error), or the answer to the peer's
    /// detach of a link it attached before the emulator replied.
    fn attach_and_detach(
        &mut self,
        channel: u16,
        a: &Attach,
        error: Option<AmqpError>,
        closed: bool,
    ) {
        let we_send = a.role == Role::Receiver;
        let reply = Attach {
            name: a.name.clone(),
            handle: a.handle.clone(),
            role: if we_send {
                Role::Sender
            } else {
                Role::Receiver
            },
            snd_settle_mode: a.snd_settle_mode.clone(),
            rcv_settle_mode: a.rcv_settle_mode.clone(),
            source: if we_send { None } else { a.source.clone() },
            target: if we_send { a.target.clone() } else { None },
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: we_send.then_some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(channel, Performative::Attach(reply));
        // A refusal is the emulator's detach: the peer answers it with its own.
        // An answer to the peer's detach (no error) needs none.
        let answer_expected = error.is_some();
        self.send(
            channel,
            Performative::Detach(Detach {
                handle: a.handle.clone(),
                closed,
                error,
            }),
        );
        if answer_expected && let Some(s) = self.sessions.get_mut(&channel) {
            s.detached_by_us.insert(a.handle.0);
        }
    }

    fn on_attach(&mut self, channel: u16, a: Attach) -> Result<(), Failure> {
        let handle = a.handle.0;
        let s = self.session(channel)?;
        // A peer that reuses a handle we detached first has finished with the old link.
        s.detached_by_us.remove(&handle);
        if s.links.contains_key(&handle) {
            return Err(fail(
                "amqp:session:handle-in-use",
                format!("handle {handle} is in use"),
            ));
        }
        if a.role == Role::Sender {
            let addr = target_address(&a).unwrap_or_default();
            let (kind, max) = match parse_address(&addr) {
                Address::Cbs => (LinkKind::CbsRequests, 1024 * 1024),
                Address::Management(k) => (LinkKind::ManagementRequests(k), 1024 * 1024),
                Address::Entity(k) => match self.broker.entity_kind(&k) {
                    Some(EntityKind::Topic) => {
                        let max = self.broker.max_message_size(&k);
                        (LinkKind::EntitySender(k), max)
                    }
                    Some(EntityKind::Store { .. })
                        if !k.contains("/subscriptions/") && !k.ends_with("$deadletterqueue") =>
                    {
                        let max = self.broker.max_message_size(&k);
                        (LinkKind::EntitySender(k), max)
                    }
                    Some(_) => {
                        self.refuse_attach(
                            channel,
                            &a,
                            amqp_error(condition::NOT_ALLOWED, format!("cannot send to '{addr}'")),
                        );
                        return Ok(());
                    }
                    None => {
                        self.refuse_attach(
                            channel,
                            &a,
                            amqp_error(
                                condition::NOT_FOUND,
                                format!("The messaging entity '{addr}' could not be found."),
                            ),
                        );
                        return Ok(());
                    }
                },
            };
            let dc = a.initial_delivery_count.unwrap_or(0);
            let link = self.new_link(&a, kind, max, dc, LINK_CREDIT);
            let reply = Attach {
                name: a.name.clone(),
                handle: a.handle.clone(),
                role: Role::Receiver,
                snd_settle_mode: a.snd_settle_mode.clone(),
                rcv_settle_mode: a.rcv_settle_mode.clone(),
                source: a.source.clone(),
                target: a.target.clone(),
                unsettled: None,
                incomplete_unsettled: false,
                initial_delivery_count: None,
                max_message_size: Some(max),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            };
            self.send(channel, Performative::Attach(reply));
            self.session(channel)?.links.insert(handle, link);
            self.send_link_flow(channel, handle, false)?;
            return Ok(());
        }
        // The client receives.
        let addr = a
            .source
            .as_ref()
            .and_then(|s| s.address.clone())
            .unwrap_or_default();
        match parse_address(&addr) {
            Address::Cbs => {
                self.accept_sender_attach(channel, &a, LinkKind::Replies(Address::Cbs), None, None)
            }
            Address::Management(k) => self.accept_sender_attach(
                channel,
                &a,
                LinkKind::Replies(Address::Management(k)),
                None,
                None,
            ),
            Address::Entity(k) => {
                let requires_session = match self.broker.entity_kind(&k) {
                    Some(EntityKind::Store {
                        requires_session, ..
                    }) => requires_session,
                    Some(EntityKind::Topic) => {
                        self.refuse_attach(channel, &a, amqp_error(condition::NOT_ALLOWED, format!("cannot receive from topic '{addr}'; use <topic>/Subscriptions/<name>")));
                        return Ok(());
                    }
                    None => {
                        self.refuse_attach(
                            channel,
                            &a,
                            amqp_error(
                                condition::NOT_FOUND,
                                format!("The messaging entity '{addr}' could not be found."),
                            ),
                        );
                        return Ok(());
                    }
                };
                let filter = session_filter(a.source.as_deref());
                match (requires_session, filter) {
                    (false, None) => {
                        let peek_lock = a.snd_settle_mode != SenderSettleMode::Settled;
                        self.accept_sender_attach(
                            channel,
                            &a,
                            LinkKind::EntityReceiver {
                                entity: k,
                                peek_lock,
                                session: None,
                            },
                            None,
                            None,
                        )
                    }
                    (false, Some(_)) => {
                        self.refuse_attach(channel, &a, amqp_error(condition::NOT_ALLOWED, format!("It is not possible for an entity that does not require sessions to create a session receiver ('{addr}').")));
                        Ok(())
                    }
                    (true, None) => {
                        self.refuse_attach(channel, &a, amqp_error(condition::NOT_ALLOWED, format!("It is not possible for an entity that requires sessions to create a non-sessionful message receiver ('{addr}').")));
                        Ok(())
                    }
                    (true, Some(want)) => {
                        let wait = a
                            .properties
                            .as_ref()
                            .and_then(|p| p.get(&Symbol::from("com.microsoft:timeout")))
                            .and_then(|v| match v {
                                Value::Uint(ms) => Some(Duration::from_millis(u64::from(*ms))),
                                Value::Ulong(ms) => Some(Duration::from_millis(*ms)),
                                Value::Int(ms) => {
                                    Some(Duration::from_millis(u64::try_from(*ms).unwrap_or(0)))
                                }
                                Value::Long(ms) => {
                                    Some(Duration::from_millis(u64::try_from(*ms).unwrap_or(0)))
                                }
                                _ => None,
                            })
                            .unwrap_or(DEFAULT_SESSION_WAIT);
                        let want = want.as_ref().and_then(filter_string);
                        let pending = PendingAttach {
                            channel,
                            attach: a,
                            entity: k,
                            deadline: Instant::now() + wait,
                        };
                        if want.is_some() {
                            self.try_session_attach(pending, true);
                        } else {
                            self.pending_attaches.push(pending);
                            self.retry_pending_attaches();
                        }
                        Ok(())
                    }
                }
            }
        }
    }

    fn new_link(
        &mut self,
        a: &Attach,
        kind: LinkKind,
        max: u64,
        delivery_count: u32,
        credit: u32,
    ) -> Link {
        Link {
            name: a.name.clone(),
            handle: a.handle.0,
            id: LINK_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            kind,
            snd_settle_mode: a.snd_settle_mode.clone(),
            rcv_settle_mode: a.rcv_settle_mode.clone(),
            target_address: target_address(a),
            delivery_count,
            credit,
            drain: false,
            pending: Default::default(),
            partial: None,
            max_message_size: max,
        }
    }

    fn accept_sender_attach(
        &mut self,
        channel: u16,
        a: &Attach,
        kind: LinkKind,
        source: Option<Box<Source>>,
        properties: Option<OrderedMap<Symbol, Value>>,
    ) -> Result<(), Failure> {
        let max = match &kind {
            LinkKind::EntityReceiver { entity, .. } => self.broker.max_message_size(entity),
            _ => 1024 * 1024,
        };
        let link = self.new_link(a, kind, max, 0, 0);
        let reply = Attach {
            name: a.name.clone(),
            handle: a.handle.clone(),
            role: Role::Sender,
            snd_settle_mode: a.snd_settle_mode.clone(),
            rcv_settle_mode: a.rcv_settle_mode.clone(),
            source: source.or_else(|| a.source.clone()),
            target: a.target.clone(),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: Some(max),
            offered_capabilities: None,
            desired_capabilities: None,
            properties,
        };
        self.send(channel, Performative::Attach(reply));
        self.session(channel)?.links.insert(a.handle.0, link);
        Ok(())
    }

    /// Try to lock a session for a pending session receiver; returns whether it is resolved.
    fn try_session_attach(&mut self, p: PendingAttach, explicit: bool) -> bool {
        let want = session_filter(p.attach.source.as_deref()).flatten();
        let want_id = want.as_ref().and_then(filter_string);
        let owner = LINK_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self
            .broker
            .lock_session(&p.entity, want_id.as_deref(), owner)
        {
            Ok(Some((sid, until))) => {
                let mut source = p.attach.source.clone().unwrap_or_default();
                let value = match &want {
                    Some(Value::Described(d)) => Value::Described(Box::new(Described {
                        descriptor: d.descriptor.clone(),
                        value: Value::String(sid.clone()),
                    })),
                    _ => Value::String(sid.clone()),
                };
                source
                    .filter
                    .get_or_insert_with(OrderedMap::new)
                    .insert(Symbol::from(SESSION_FILTER), value);
                let mut props = OrderedMap::new();
                props.insert(
                    Symbol::from("com.microsoft:locked-until-utc"),
                    Value::Long(dotnet_ticks(until)),
                );
                let peek_lock = p.attach.snd_settle_mode != SenderSettleMode::Settled;
                let kind = LinkKind::EntityReceiver {
                    entity: p.entity.clone(),
                    peek_lock,
                    session: Some(sid.clone()),
                };
                if self.sessions.contains_key(&p.channel) {
                    let _ = self.accept_sender_attach(
                        p.channel,
                        &p.attach,
                        kind,
                        Some(source),
                        Some(props),
                    );
                    if let Some(l) = self
                        .sessions
                        .get_mut(&p.channel)
                        .and_then(|s| s.links.get_mut(&p.attach.handle.0))
                    {
                        l.id = owner;
                    }
                } else {
                    self.broker.release_session(&p.entity, &sid, owner);
                }
                true
            }
            Ok(None) if !explicit && Instant::now() < p.deadline => {
                self.broker.wait(&p.entity, &self.notify);
                self.pending_attaches.push(p);
                false
            }
            Ok(None) => {
                self.refuse_attach(
                    p.channel,
                    &p.attach,
                    amqp_error(
                        condition::TIMEOUT,
                        "No session available to lock within the operation timeout.",
                    ),
                );
                true
            }
            Err(e) => {
                self.refuse_attach(p.channel, &p.attach, amqp_error(e.condition, e.description));
                true
            }
        }
    }

    fn retry_pending_attaches(&mut self) {
        let pending = std::mem::take(&mut self.pending_attaches);
        for p in pending {
            self.try_session_attach(p, false);
        }
    }

    fn send_link_flow(&mut self, channel: u16, handle: u32, drain: bool) -> Result<(), Failure> {
        let s = self.session(channel)?;
        let (dc, credit) = match s.links.get(&handle) {
            Some(l) => (l.delivery_count, l.credit),
            None => return Ok(()),
        };
        let flow = Flow {
            next_incoming_id: Some(s.next_incoming_id),
            incoming_window: INCOMING_WINDOW,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: u32::MAX,
            handle: Some(handle.into()),
            delivery_count: Some(dc),
            link_credit: Some(credit),
            available: None,
            drain,
            echo: false,
            properties: None,
        };
        s.received_since_flow = 0;
        self.send(channel, Performative::Flow(flow));
        Ok(())
    }

    fn send_session_flow(&mut self, channel: u16) -> Result<(), Failure> {
        let s = self.session(channel)?;
        let flow = Flow {
            next_incoming_id: Some(s.next_incoming_id),
            incoming_window: INCOMING_WINDOW,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: u32::MAX,
            handle: None,
            delivery_count: None,
            link_credit: None,
            available: None,
            drain: false,
            echo: false,
            properties: None,
        };
        s.received_since_flow = 0;
        self.send(channel, Performative::Flow(flow));
        Ok(())
    }

    fn on_flow(&mut self, channel: u16, f: Flow) -> Result<(), Failure> {
        let s = self.session(channel)?;
        s.remote_incoming_window = match f.next_incoming_id {
            Some(nii) => nii
                .wrapping_add(f.incoming_window)
                .wrapping_sub(s.next_outgoing_id),
            None => f.incoming_window,
        };
        let Some(h) = f.handle.map(|h| h.0) else {
            if f.echo {
                self.send_session_flow(channel)?;
            }
            self.pump_session(channel);
            return Ok(());
        };
        if s.detached_by_us.contains(&h) {
            return Ok(());
        }
        let link = s.links.get_mut(&h).ok_or_else(|| {
            fail(
                "amqp:session:unattached-handle",
                format!("flow for unattached handle {h}"),
            )
        })?;
        let we_send = link.we_send();
        if we_send {
            let their_dc = f.delivery_count.unwrap_or(link.delivery_count);
            link.credit = their_dc
                .wrapping_add(f.link_credit.unwrap_or(0))
                .wrapping_sub(link.delivery_count);
            if link.credit > 1_000_000 {
                link.credit = 0;
            }
            link.drain = f.drain;
        }
        self.pump_link(channel, h);
        let drained = {
            let s = self.session(channel)?;
            match s.links.get_mut(&h) {
                Some(l) if we_send && l.drain => {
                    l.delivery_count = l.delivery_count.wrapping_add(l.credit);
                    l.credit = 0;
                    l.drain = false;
                    true
                }
                _ => false,
            }
        };
        if drained || f.echo {
            self.send_link_flow(channel, h, drained)?;
        }
        Ok(())
    }

    fn pump_all(&mut self) {
        let channels: Vec<u16> = self.sessions.keys().copied().collect();
        for ch in channels {
            self.pump_session(ch);
        }
    }

    fn pump_session(&mut self, channel: u16) {
        let handles: Vec<u32> = match self.sessions.get(&channel) {
            Some(s) => s
                .links
                .iter()
                .filter(|(_, l)| l.we_send() && l.credit > 0)
                .map(|(h, _)| *h)
                .collect(),
            None => return,
        };
        for h in handles {
            self.pump_link(channel, h);
        }
    }

    /// Send what the link's credit and the session window allow.
    fn pump_link(&mut self, channel: u16, handle: u32) {
        loop {
            let Some(s) = self.sessions.get_mut(&channel) else {
                return;
            };
            if s.remote_incoming_window == 0 {
                return;
            }
            let Some(link) = s.links.get_mut(&handle) else {
                return;
            };
            if link.credit == 0 {
                return;
            }
            let (payload, tag, settled, lock) = match &link.kind {
                LinkKind::Replies(_) => match link.pending.pop_front() {
                    Some(p) => (p, uuid::Uuid::new_v4().to_bytes_le().to_vec(), true, None),
                    None => return,
                },
                LinkKind::EntityReceiver {
                    entity,
                    peek_lock,
                    session,
                } => {
                    match self
                        .broker
                        .receive(entity, *peek_lock, session.as_deref(), &self.notify)
                    {
                        Some(d) => {
                            let lock = peek_lock.then_some(d.lock_token);
                            (
                                d.payload,
                                d.lock_token.to_bytes_le().to_vec(),
                                !*peek_lock,
                                lock,
                            )
                        }
                        None => return,
                    }
                }
                _ => return,
            };
            link.credit -= 1;
            link.delivery_count = link.delivery_count.wrapping_add(1);
            let delivery_id = s.next_delivery_id;
            s.next_delivery_id = s.next_delivery_id.wrapping_add(1);
            if let Some(lock_token) = lock {
                s.unsettled
                    .insert(delivery_id, Unsettled { handle, lock_token });
            }
            self.write_transfer(channel, handle, delivery_id, tag, settled, &payload);
        }
    }

    fn write_transfer(
        &mut self,
        channel: u16,
        handle: u32,
        delivery_id: u32,
        tag: Vec<u8>,
        settled: bool,
        payload: &[u8],
    ) {
        let make = |more: bool, first: bool| Transfer {
            handle: handle.into(),
            delivery_id: first.then_some(delivery_id),
            delivery_tag: first.then(|| serde_bytes::ByteBuf::from(tag.clone())),
            message_format: first.then_some(0),
            settled: Some(settled),
            more,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        tracing::trace!(
            connection = self.id,
            channel,
            handle,
            delivery_id,
            settled,
            len = payload.len(),
            "send transfer"
        );
        let overhead = encode(&Performative::Transfer(make(true, true))).len() + 8;
        let room = (self.remote_max_frame as usize)
            .saturating_sub(overhead)
            .max(64);
        let mut frames = 0u32;
        let mut offset = 0;
        loop {
            let end = (offset + room).min(payload.len());
            let more = end < payload.len();
            write_performative(
                &mut self.out,
                channel,
                &Performative::Transfer(make(more, offset == 0)),
                &payload[offset..end],
            );
            frames += 1;
            offset = end;
            if !more {
                break;
            }
        }
        if let Some(s) = self.sessions.get_mut(&channel) {
            s.next_outgoing_id = s.next_outgoing_id.wrapping_add(frames);
            s.remote_incoming_window = s.remote_incoming_window.saturating_sub(frames);
        }
    }

    fn on_transfer(&mut self, channel: u16, t: Transfer, payload: Bytes) -> Result<(), Failure> {
        let h = t.handle.0;
        let s = self.session(channel)?;
        s.next_incoming_id = s.next_incoming_id.wrapping_add(1);
        s.received_since_flow += 1;
        let window_low = s.received_since_flow >= INCOMING_WINDOW / 2;
        if s.detached_by_us.contains(&h) {
            // Sent before the peer saw our detach: dropped, as the link is gone.
            if window_low {
                self.send_session_flow(channel)?;
            }
            return Ok(());
        }
        let link = s.links.get_mut(&h).ok_or_else(|| {
            fail(
                "amqp:session:unattached-handle",
                format!("transfer on unattached handle {h}"),
            )
        })?;
        if link.we_send() {
            return Err(fail(
                "amqp:session:unattached-handle",
                format!("transfer on handle {h}, where the emulator is the sender"),
            ));
        }
        let max = link.max_message_size as usize;
        let partial = link.partial.get_or_insert_with(|| Partial {
            delivery_id: t.delivery_id,
            message_format: t.message_format.unwrap_or(0),
            settled: t.settled.unwrap_or(false),
            payload: Vec::new(),
        });
        if t.settled == Some(true) {
            partial.settled = true;
        }
        if partial.payload.len() <= max.saturating_mul(2) {
            partial.payload.extend_from_slice(&payload);
        }
        if t.aborted {
            link.partial = None;
            return Ok(());
        }
        if t.more {
            if window_low {
                self.send_session_flow(channel)?;
            }
            return Ok(());
        }
        let Some(p) = link.partial.take() else {
            return Ok(());
        };
        let Some(delivery_id) = p.delivery_id else {
            return Err(fail(
                "amqp:invalid-field",
                "the first transfer of a delivery has no delivery-id",
            ));
        };
        link.delivery_count = link.delivery_count.wrapping_add(1);
        link.credit = link.credit.saturating_sub(1);
        let replenish = link.credit < LINK_CREDIT / 2;
        if replenish {
            link.credit = LINK_CREDIT;
        }
        let kind = link.kind.clone();
        // Clients size batches before adding per-message ids and annotations
        // (azservicebus overshoots by ~5%), so batches get a quarter extra.
        let limit = if p.message_format == BATCH_FORMAT {
            max + max / 4
        } else {
            max + ENVELOPE_SLACK
        };
        let outcome = if p.payload.len() > limit {
            Err(BrokerError {
                condition: condition::MESSAGE_SIZE_EXCEEDED,
                description: format!(
                    "The received message (delivery-id:{delivery_id}, size:{} bytes) exceeds the limit ({limit} bytes) currently allowed on the link.",
                    p.payload.len()
                ),
            })
        } else {
            self.deliver_to_node(channel, &kind, &p)
        };
        if replenish {
            self.send_link_flow(channel, h, false)?;
        } else if window_low {
            self.send_session_flow(channel)?;
        }
        if !p.settled {
            match outcome {
                Ok(()) => self.session(channel)?.pending_accepts.push(delivery_id),
                Err(e) => {
                    let d = Disposition {
                        role: Role::Receiver,
                        first: delivery_id,
                        last: None,
                        settled: true,
                        state: Some(DeliveryState::Rejected(Rejected {
                            error: Some(amqp_error(e.condition, e.description)),
                        })),
                        batchable: false,
                    };
                    self.send(channel, Performative::Disposition(d));
                }
            }
        }
        Ok(())
    }

    fn deliver_to_node(
        &mut self,
        channel: u16,
        kind: &LinkKind,
        p: &Partial,
    ) -> Result<(), BrokerError> {
        let decode_err = |e: crate::codec::DecodeError| BrokerError {
            condition: "amqp:decode-error",
            description: e.0,
        };
        match kind {
            LinkKind::CbsRequests => {
                let msg = AmqpMessage::decode(&p.payload).map_err(decode_err)?;
                let reply = cbs::reply(&msg);
                self.route_reply(
                    channel,
                    Address::Cbs,
                    msg.properties.as_ref().and_then(|x| x.reply_to.clone()),
                    reply,
                );
                Ok(())
            }
            LinkKind::ManagementRequests(entity) => {
                let msg = AmqpMessage::decode(&p.payload).map_err(decode_err)?;
                let reply = management::handle(&self.broker, entity, &msg);
                self.route_reply(
                    channel,
                    Address::Management(entity.clone()),
                    msg.properties.as_ref().and_then(|x| x.reply_to.clone()),
                    reply,
                );
                Ok(())
            }
            LinkKind::EntitySender(entity) => {
                let msgs = if p.message_format == BATCH_FORMAT {
                    AmqpMessage::decode_batch(&p.payload).map_err(decode_err)?
                } else {
                    vec![AmqpMessage::decode(&p.payload).map_err(decode_err)?]
                };
                self.broker.send(entity, msgs)
            }
            _ => Err(BrokerError {
                condition: condition::NOT_ALLOWED,
                description: "this link does not accept messages".into(),
            }),
        }
    }

    fn route_reply(
        &mut self,
        channel: u16,
        node: Address,
        reply_to: Option<String>,
        reply: Vec<u8>,
    ) {
        let matches_reply_to = |l: &Link| {
            reply_to
                .as_ref()
                .is_some_and(|r| l.target_address.as_deref() == Some(r.as_str()) || &l.name == r)
        };
        let mut best: Option<(u8, u16, u32)> = None;
        for (ch, s) in &self.sessions {
            for (h, l) in &s.links {
                if let LinkKind::Replies(n) = &l.kind {
                    let mut score = 0u8;
                    if *n == node {
                        score += 4;
                    }
                    if matches_reply_to(l) {
                        score += 2;
                    }
                    if *ch == channel {
                        score += 1;
                    }
                    if score >= 2 && best.is_none_or(|(b, _, _)| score > b) {
                        best = Some((score, *ch, *h));
                    }
                }
            }
        }
        if let Some((_, ch, h)) = best {
            if let Some(l) = self.sessions.get_mut(&ch).and_then(|s| s.links.get_mut(&h)) {
                l.pending.push_back(reply);
            }
            self.pump_link(ch, h);
        } else {
            tracing::debug!(
                connection = self.id,
                ?node,
                "no reply link for a request; reply dropped"
            );
        }
    }

    fn on_disposition(&mut self, channel: u16, d: Disposition) -> Result<(), Failure> {
        if d.role != Role::Receiver {
            return Ok(());
        }
        let last = d.last.unwrap_or(d.first);
        let count = last.wrapping_sub(d.first);
        if count > 1_000_000 {
            return Err(fail("amqp:invalid-field", "disposition range too large"));
        }
        let mut echoes = Vec::new();
        {
            let broker = self.broker.clone();
            let s = self.session(channel)?;
            let mut id = d.first;
            loop {
                if let Some(u) = s.unsettled.remove(&id) {
                    let result = broker.settle(u.lock_token, to_settlement(d.state.as_ref()));
                    if !d.settled {
                        let state = match result {
                            Ok(()) => echo_state(d.state.as_ref()),
                            Err(e) => DeliveryState::Rejected(Rejected {
                                error: Some(amqp_error(e.condition, e.description)),
                            }),
                        };
                        echoes.push((id, state));
                    }
                }
                if id == last {
                    break;
                }
                id = id.wrapping_add(1);
            }
        }
        for (id, state) in echoes {
            self.send(
                channel,
                Performative::Disposition(Disposition {
                    role: Role::Sender,
                    first: id,
                    last: None,
                    settled: true,
                    state: Some(state),
                    batchable: false,
                }),
            );
        }
        Ok(())
    }

    fn on_detach(&mut self, channel: u16, d: Detach) -> Result<(), Failure> {
        let h = d.handle.0;
        let s = self.session(channel)?;
        let Some(link) = s.links.remove(&h) else {
            if s.detached_by_us.remove(&h) {
                // The answer to the emulator's own detach (a refused attach).
                return Ok(());
            }
            // The peer gave up on an attach still waiting for a session: answer
            // with an attach and the detach that closes it.
            let pending = self
                .pending_attaches
                .iter()
                .position(|p| p.channel == channel && p.attach.handle.0 == h);
            if let Some(i) = pending {
                let p = self.pending_attaches.remove(i);
                self.attach_and_detach(channel, &p.attach, None, d.closed);
                return Ok(());
            }
            return Err(fail(
                "amqp:session:unattached-handle",
                format!("detach of unattached handle {h}"),
            ));
        };
        s.unsettled.retain(|_, u| u.handle != h);
        self.release_link(&link);
        self.send(
            channel,
            Performative::Detach(Detach {
                handle: d.handle,
                closed: d.closed,
                error: None,
            }),
        );
        Ok(())
    }

    fn release_link(&self, link: &Link) {
        if let LinkKind::EntityReceiver {
            entity,
            session: Some(sid),
            ..
        } = &link.kind
        {
            self.broker.release_session(entity, sid, link.id);
        }
    }

    fn on_end(&mut self, channel: u16) -> Result<(), Failure> {
        let s = self.sessions.remove(&channel).ok_or_else(|| {
            fail(
                "amqp:connection:framing-error",
                format!("end on channel {channel} without a session"),
            )
        })?;
        for l in s.links.values() {
            self.release_link(l);
        }
        self.pending_attaches.retain(|p| p.channel != channel);
        self.send(channel, Performative::End(End { error: None }));
        Ok(())
    }

    fn on_tick(&mut self) -> Result<(), Failure> {
        let now = Instant::now();
        if let Some(idle) = self.remote_idle
            && now.duration_since(self.last_write) >= idle / 2
        {
            write_heartbeat(&mut self.out);
        }
        if self.opened && now.duration_since(self.last_read) > self.opts.idle_timeout {
            return Err(fail(
                "amqp:resource-limit-exceeded",
                format!(
                    "no frames received for {:?} (idle timeout)",
                    self.opts.idle_timeout
                ),
            ));
        }
        if !self.pending_attaches.is_empty() {
            self.retry_pending_attaches();
        }
        self.pump_all();
        Ok(())
    }

    fn flush_accepts(&mut self) {
        let channels: Vec<u16> = self.sessions.keys().copied().collect();
        for ch in channels {
            let mut ids = match self.sessions.get_mut(&ch) {
                Some(s) if !s.pending_accepts.is_empty() => std::mem::take(&mut s.pending_accepts),
                _ => continue,
            };
            ids.sort_unstable();
            let mut i = 0;
            while i < ids.len() {
                let first = ids[i];
                let mut last = first;
                while i + 1 < ids.len() && ids[i + 1] == last.wrapping_add(1) {
                    i += 1;
                    last = ids[i];
                }
                i += 1;
                let d = Disposition {
                    role: Role::Receiver,
                    first,
                    last: (last != first).then_some(last),
                    settled: true,
                    state: Some(DeliveryState::Accepted(Accepted {})),
                    batchable: false,
                };
                self.send(ch, Performative::Disposition(d));
            }
        }
    }

    fn cleanup(&mut self) {
        for s in self.sessions.values() {
            for l in s.links.values() {
                self.release_link(l);
            }
        }
    }
}
