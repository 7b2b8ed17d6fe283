//! The task that owns one receive link: it receives, settles what it received (AMQP
//! settles on the receiving link) without waiting behind a pending receive, renews locks
//! it was asked to hold (`extend`, and a delayed `nack`), and for session-enabled entities
//! takes sessions one at a time, each on a link (and AMQP session) of its own.
//!
//! Credit: a receive call grants what it asks for (plus `prefetch`) and drains the link
//! when it returns, so the broker stops sending. What a drain still brings waits for the
//! next call, and is released if none comes within [`BUFFER_HOLD`] (or at close), so that
//! nothing sits locked on a link nobody reads.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use cloudbus_core::driver::DeliveryInfo;
use cloudbus_core::{Delivery, Error, Result};
use fe2o3_amqp::link::Receiver;
use fe2o3_amqp::link::delivery::{Delivery as AmqpDelivery, DeliveryInfo as AmqpDeliveryInfo};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp_types::definitions::{self, ErrorCondition, Fields};
use fe2o3_amqp_types::messaging::{Body, Modified, Source};
use fe2o3_amqp_types::primitives::{Symbol, Value};
use futures::FutureExt;
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use tokio::sync::{mpsc, oneshot};

use crate::TRANSPORT;
use crate::config::{ReceiveMode, ServiceBusConfig};
use crate::error::{closed, lock_lost, map_amqp_error};
use crate::mapping::from_servicebus;
use crate::protocol::codec::received;
use crate::protocol::connection::ReceiverSpec;
use crate::protocol::management::Management;
use crate::protocol::{Connection, Lost};
use crate::settle::ServiceBusSettle;

/// After the first message of a receive, how long to wait for more.
const FOLLOW_UP_WAIT: Duration = Duration::from_millis(10);
/// How often the task looks at locks to renew, delayed nacks to release and deliveries
/// nobody took.
const MAINTENANCE: Duration = Duration::from_millis(250);
/// A session that brings nothing for this long within a receive call is let go (once its
/// deliveries are settled), and the next one is taken.
const SESSION_IDLE: Duration = Duration::from_millis(500);
/// Renew a held lock when it has less than this left.
const RENEW_MARGIN: Duration = Duration::from_secs(2);
/// Deliveries that arrived after a call ended wait this long for the next call, then are
/// released (unlocked without counting a delivery).
const BUFFER_HOLD: Duration = Duration::from_secs(1);
/// How long the broker may hold an attach for the next available session.
const SESSION_WAIT_MS: u32 = 5_000;
/// The session filter, and the descriptor of its value.
const SESSION_FILTER: &str = "com.microsoft:session-filter";
const SESSION_FILTER_DESCRIPTOR: u64 = 0x0000_0137_0000_000C;

/// Settlements taken from the queue at once, at most.
const SETTLE_BATCH: usize = 256;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// Where a settlement's outcome goes.
type Reply = oneshot::Sender<Result<SystemTime>>;
/// The deliveries of one link to accept together, and who waits for each (with its
/// message id).
type Accepting = (Vec<AmqpDeliveryInfo>, Vec<(String, Reply)>);

pub(crate) enum Command {
    Receive {
        max: usize,
        wait: Duration,
        reply: oneshot::Sender<Result<Vec<Delivery>>>,
    },
    Settle {
        token: uuid::Uuid,
        how: Settlement,
        reply: Reply,
    },
    Close(oneshot::Sender<()>),
}

pub(crate) enum Settlement {
    Complete,
    Abandon,
    /// Keep locked until the delay passed, then abandon.
    AbandonAfter(Duration),
    DeadLetter {
        reason: String,
        description: String,
    },
    /// Keep locked for this long from now.
    Extend(Duration),
}

/// One receive link.
struct Link {
    id: u64,
    name: String,
    receiver: Receiver,
    lost: Lost,
    /// The session it holds (session-enabled entities), its lock's expiry, and the AMQP
    /// session the link is on.
    session: Option<String>,
    session_locked_until: SystemTime,
    own_session: Option<SessionHandle<()>>,
    /// Credit granted and neither used nor taken back since: a call that used all it
    /// granted has nothing to take back (a frame saved when messages are flowing).
    credit: u32,
    /// When it last brought a message (for letting an idle session go).
    last_arrival: Instant,
}

impl Link {
    /// Closes the link (and its own AMQP session), quietly.
    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.receiver.close()).await;
        if let Some(mut session) = self.own_session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.end()).await;
        }
    }
}

/// A delivery that arrived and was not handed out yet.
struct Buffered {
    link: u64,
    delivery: AmqpDelivery<Body<Value>>,
    arrived: Instant,
}

/// A received, unsettled message.
struct InFlight {
    link: u64,
    info: AmqpDeliveryInfo,
    message_id: String,
    session: Option<String>,
    locked_until: Option<SystemTime>,
    /// Keep the lock until then (extend, or a delayed nack).
    hold_until: Option<Instant>,
    /// Abandon when the hold ends (a delayed nack).
    abandon_after_hold: bool,
}

/// What woke the receive loop.
enum Event {
    Command(Option<Command>),
    Delivery(std::result::Result<AmqpDelivery<Body<Value>>, String>),
    /// A session lock attempt ended: the link, or `None` if no session became free.
    Session(Result<Option<Link>>),
    Lost,
    Deadline,
    Tick,
}

pub(crate) struct ReceiverTask {
    connection: Connection,
    management: Arc<Management>,
    path: String,
    /// Whether session ids are ordering keys.
    sessions: bool,
    /// Links take sessions (a session-enabled entity's queue, not its dead-letter queue).
    session_links: bool,
    pinned: Option<String>,
    peek_lock: bool,
    prefetch: u32,
    current: Option<Link>,
    /// Session links no longer received from, kept until their deliveries are settled.
    draining: Vec<Link>,
    /// A session being locked for this receiver.
    pending_session: Option<tokio::task::JoinHandle<Result<Option<Link>>>>,
    /// When the last receive call ended (`None` during one).
    idle_since: Option<Instant>,
    buffered: VecDeque<Buffered>,
    in_flight: HashMap<uuid::Uuid, InFlight>,
    /// For building deliveries; weak, so dropping the subscriber ends the task.
    commands: mpsc::WeakSender<Command>,
    /// Commands that arrived while a receive was in progress.
    backlog: VecDeque<Command>,
}

impl ReceiverTask {
    /// The task of one receive link on `connection` for `config`; `commands` is the
    /// sending side of the channel it serves, for building deliveries.
    pub(crate) fn new(
        config: &ServiceBusConfig,
        connection: Connection,
        management: Arc<Management>,
        commands: mpsc::WeakSender<Command>,
    ) -> Self {
        ReceiverTask {
            connection,
            management,
            path: config.receive_path(),
            sessions: config.uses_sessions(),
            session_links: config.uses_sessions() && !config.dead_letter,
            pinned: config.session.clone().filter(|_| !config.dead_letter),
            peek_lock: config.receive_mode == ReceiveMode::PeekLock,
            prefetch: config.prefetch,
            current: None,
            draining: Vec::new(),
            pending_session: None,
            idle_since: Some(Instant::now()),
            buffered: VecDeque::new(),
            in_flight: HashMap::new(),
            commands,
            backlog: VecDeque::new(),
        }
    }

    /// Attaches the first link (a plain one: sessions are taken by receive calls), so that
    /// a missing entity is reported at connect.
    pub(crate) async fn open(&mut self) -> Result<()> {
        if !self.session_links {
            self.current = Some(self.attach_plain().await?);
        }
        Ok(())
    }

    pub(crate) async fn run(mut self, mut incoming: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(MAINTENANCE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let command = match self.backlog.pop_front() {
                Some(command) => command,
                None => tokio::select! {
                    command = incoming.recv() => match command {
                        Some(command) => command,
                        None => break,
                    },
                    _ = tick.tick() => {
                        self.maintain().await;
                        continue;
                    }
                },
            };
            match command {
                Command::Receive { max, wait, reply } => {
                    self.idle_since = None;
                    let outcome = self.receive(max, wait, &mut incoming).await;
                    self.end_of_call().await;
                    self.idle_since = Some(Instant::now());
                    let _ = reply.send(outcome);
                }
                Command::Settle { token, how, reply } => {
                    if let Some(next) = self.settle_queued(token, how, reply, &mut incoming).await {
                        self.backlog.push_front(next);
                    }
                }
                Command::Close(reply) => {
                    self.shutdown().await;
                    let _ = reply.send(());
                    return;
                }
            }
        }
        self.shutdown().await;
    }

    async fn attach_plain(&self) -> Result<Link> {
        let name = link_name();
        let spec = ReceiverSpec {
            name: name.clone(),
            source: Source::builder().address(self.path.clone()).build(),
            peek_lock: self.peek_lock,
            properties: None,
        };
        let (receiver, lost) = self.connection.receiver(&self.path, spec, None).await?;
        Ok(Link {
            id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
            name,
            receiver,
            lost,
            session: None,
            session_locked_until: SystemTime::now(),
            own_session: None,
            credit: 0,
            last_arrival: Instant::now(),
        })
    }

    /// Starts locking a session (the pinned one, or the next available) in the background.
    fn request_session(&mut self) {
        if self.pending_session.is_some() {
            return;
        }
        let connection = self.connection.clone();
        let management = self.management.clone();
        let path = self.path.clone();
        let pinned = self.pinned.clone();
        let peek_lock = self.peek_lock;
        self.pending_session = Some(tokio::spawn(async move {
            lock_session(
                &connection,
                &management,
                &path,
                pinned.as_deref(),
                peek_lock,
            )
            .await
        }));
    }

    /// Receives up to `max` messages within `wait`, settling what is asked meanwhile.
    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
        incoming: &mut mpsc::Receiver<Command>,
    ) -> Result<Vec<Delivery>> {
        let started = Instant::now();
        let mut deadline = started + wait;
        let mut got: Vec<(u64, AmqpDelivery<Body<Value>>)> = Vec::new();
        if let Some(link) = self.current.as_mut() {
            link.last_arrival = started;
        }
        loop {
            if self.current.is_none() {
                if self.session_links {
                    self.request_session();
                } else {
                    match self.attach_plain().await {
                        Ok(link) => self.current = Some(link),
                        Err(error) if got.is_empty() => return Err(error),
                        Err(_) => break,
                    }
                }
            }
            // What arrived earlier for the current link comes first.
            if let Some(id) = self.current.as_ref().map(|l| l.id) {
                while got.len() < max {
                    let Some(at) = self.buffered.iter().position(|b| b.link == id) else {
                        break;
                    };
                    if let Some(b) = self.buffered.remove(at) {
                        got.push((b.link, b.delivery));
                    }
                }
            }
            if got.len() >= max {
                break;
            }
            let want = (max - got.len()) as u32 + self.prefetch;
            if let Some(link) = self.current.as_mut() {
                if link.credit == 0 {
                    match link.receiver.set_credit(want).await {
                        Ok(()) => link.credit = want,
                        Err(_) => {
                            self.lose_current().await;
                            continue;
                        }
                    }
                }
            }
            let session_idle = self
                .current
                .as_ref()
                .filter(|l| l.session.is_some() && self.pinned.is_none())
                .map(|l| l.last_arrival + SESSION_IDLE);
            let until = session_idle.map_or(deadline, |idle| idle.min(deadline));
            let event = {
                let pending = self.pending_session.as_mut();
                let current = self.current.as_mut();
                next_event(incoming, current, pending, until).await
            };
            match event {
                Event::Command(None) => return Err(closed("subscriber")),
                Event::Command(Some(Command::Settle { token, how, reply })) => {
                    if let Some(next) = self.settle_queued(token, how, reply, incoming).await {
                        self.backlog.push_back(next);
                    }
                }
                Event::Command(Some(other)) => self.backlog.push_back(other),
                Event::Delivery(Ok(delivery)) => {
                    if let Some(link) = self.current.as_mut() {
                        link.last_arrival = Instant::now();
                        link.credit = link.credit.saturating_sub(1);
                        got.push((link.id, delivery));
                    }
                    if got.len() >= max {
                        break;
                    }
                    deadline = deadline.min(Instant::now() + FOLLOW_UP_WAIT);
                }
                Event::Delivery(Err(error)) => {
                    tracing::debug!(messaging.system = "servicebus", messaging.source.name = %self.path, %error, "the receive link failed; attaching a new one");
                    self.lose_current().await;
                    if !got.is_empty() {
                        break;
                    }
                }
                Event::Lost => {
                    self.lose_current().await;
                    if !got.is_empty() || Instant::now() >= deadline {
                        break;
                    }
                }
                Event::Session(Ok(link)) => {
                    self.pending_session = None;
                    self.current = link;
                }
                Event::Session(Err(error)) => {
                    self.pending_session = None;
                    if got.is_empty() {
                        return Err(error);
                    }
                    break;
                }
                Event::Tick => self.maintain().await,
                Event::Deadline => {
                    if Instant::now() >= deadline || !got.is_empty() {
                        break;
                    }
                    // The session brought nothing for a while: let it go, take the next.
                    self.retire_current().await;
                }
            }
        }
        Ok(self.deliveries(got))
    }

    /// After a receive call: take back the credit left, so that the broker stops sending
    /// until the next call grants credit again (what was already on its way is buffered).
    ///
    /// Credit goes back to zero rather than by a drain: a drain moves the broker's delivery
    /// count past the unused credit, and fe2o3 grants the next credit without waiting for
    /// the broker's answer, counting from the old delivery count — so the broker saw less
    /// credit than granted, or none (a redelivered message then waited for the next drain).
    async fn end_of_call(&mut self) {
        if let Some(link) = self.current.as_mut() {
            if link.credit > 0 {
                link.credit = 0;
                if link.receiver.set_credit(0).await.is_err() {
                    self.lose_current().await;
                }
            }
        }
    }

    /// The current link failed or its connection was lost: its unsettled deliveries come
    /// back through the broker.
    async fn lose_current(&mut self) {
        if let Some(link) = self.current.take() {
            let id = link.id;
            self.in_flight.retain(|_, e| e.link != id);
            self.buffered.retain(|b| b.link != id);
            tokio::spawn(link.close());
        }
    }

    /// Stops receiving from the current session; it is kept (lock renewed) until its
    /// deliveries are settled.
    async fn retire_current(&mut self) {
        if let Some(mut link) = self.current.take() {
            if link.credit > 0 {
                link.credit = 0;
                let _ = link.receiver.drain().await;
            }
            self.draining.push(link);
        }
        self.release_buffered_of_retired().await;
        self.close_settled_links().await;
    }

    fn deliveries(&mut self, got: Vec<(u64, AmqpDelivery<Body<Value>>)>) -> Vec<Delivery> {
        let mut deliveries = Vec::with_capacity(got.len());
        for (link, delivery) in got {
            let facts = received(delivery.message(), delivery.delivery_tag().as_ref());
            let (info, raw) = delivery.into_parts();
            let message = from_servicebus(&raw, self.sessions);
            let session = raw.properties.as_ref().and_then(|p| p.group_id.clone());
            let delivery_info = DeliveryInfo {
                delivery_count: facts.delivery_count,
                enqueued_at: facts.enqueued_at,
                transport_id: facts.sequence_number.to_string(),
                locked_until: facts.locked_until,
            };
            let Some(commands) = self.commands.upgrade() else {
                continue;
            };
            if self.peek_lock {
                self.in_flight.insert(
                    facts.lock_token,
                    InFlight {
                        link,
                        info,
                        message_id: message.id.clone(),
                        session,
                        locked_until: facts.locked_until,
                        hold_until: None,
                        abandon_after_hold: false,
                    },
                );
            }
            let settle = ServiceBusSettle {
                commands,
                token: facts.lock_token,
                message_id: message.id.clone(),
                receive_and_delete: !self.peek_lock,
            };
            deliveries.push(Delivery::new(message, delivery_info, Box::new(settle)));
        }
        deliveries
    }

    fn link_mut(&mut self, id: u64) -> Option<&mut Link> {
        self.current
            .iter_mut()
            .chain(self.draining.iter_mut())
            .find(|l| l.id == id)
    }

    /// Settles one delivery and the settlements queued behind it. Completions (the common
    /// case under load) go together: one disposition per run of consecutive deliveries of a
    /// link, instead of a frame and a write each. Returns the first queued command that is
    /// not a settlement, for the caller to serve next.
    async fn settle_queued(
        &mut self,
        token: uuid::Uuid,
        how: Settlement,
        reply: Reply,
        incoming: &mut mpsc::Receiver<Command>,
    ) -> Option<Command> {
        let mut completions = Vec::new();
        let mut extensions = Vec::new();
        let first = Command::Settle { token, how, reply };
        let queued = std::iter::from_fn(|| incoming.try_recv().ok());
        let mut next = None;
        for command in std::iter::once(first).chain(queued).take(SETTLE_BATCH) {
            match command {
                Command::Settle {
                    token,
                    how: Settlement::Complete,
                    reply,
                } => completions.push((token, reply)),
                Command::Settle {
                    token,
                    how: Settlement::Extend(by),
                    reply,
                } => extensions.push((token, by, reply)),
                Command::Settle { token, how, reply } => {
                    let _ = reply.send(self.settle(token, how).await);
                }
                other => {
                    next = Some(other);
                    break;
                }
            }
        }
        self.complete_all(completions).await;
        self.extend_all(extensions).await;
        next
    }

    /// Extends deliveries together: their locks renewed in one request per link (see
    /// [`Self::renew_all`]), so that many held messages cost one round trip, not one each.
    async fn extend_all(&mut self, extensions: Vec<(uuid::Uuid, Duration, Reply)>) {
        if extensions.is_empty() {
            return;
        }
        let now = Instant::now();
        for (token, by, _) in &extensions {
            if let Some(entry) = self.in_flight.get_mut(token) {
                entry.hold_until = Some(now + *by);
            }
        }
        let tokens = extensions.iter().map(|(token, _, _)| *token).collect();
        let mut outcomes: HashMap<uuid::Uuid, Result<()>> =
            self.renew_all(tokens).await.into_iter().collect();
        for (token, by, reply) in extensions {
            let outcome = outcomes
                .remove(&token)
                .unwrap_or_else(|| Err(lock_lost(&token.to_string())));
            let _ = reply.send(outcome.map(|()| SystemTime::now() + by));
        }
    }

    /// Renews the locks of `tokens`: those of a sessionless link together, in one
    /// renew-lock request with every token (one round trip however many are held); the
    /// others, and all of a request that failed (a lost lock fails the whole request), one
    /// by one with [`Self::renew`].
    async fn renew_all(&mut self, tokens: Vec<uuid::Uuid>) -> Vec<(uuid::Uuid, Result<()>)> {
        let mut outcomes = Vec::with_capacity(tokens.len());
        let mut alone = Vec::new();
        let mut by_link: HashMap<String, Vec<uuid::Uuid>> = HashMap::new();
        for token in tokens {
            let link = self.in_flight.get(&token).map(|entry| entry.link);
            match link.and_then(|id| self.link_mut(id)) {
                Some(link) if link.session.is_none() => {
                    by_link.entry(link.name.clone()).or_default().push(token);
                }
                _ => alone.push(token),
            }
        }
        for (name, group) in by_link {
            if group.len() == 1 {
                alone.extend(group);
                continue;
            }
            match self.management.renew_locks(&group, &name).await {
                Ok(expiries) if expiries.len() == group.len() => {
                    for (token, until) in group.into_iter().zip(expiries) {
                        if let Some(entry) = self.in_flight.get_mut(&token) {
                            entry.locked_until = Some(until);
                        }
                        outcomes.push((token, Ok(())));
                    }
                }
                _ => alone.extend(group),
            }
        }
        for token in alone {
            let outcome = self.renew(token).await;
            outcomes.push((token, outcome));
        }
        outcomes
    }

    /// Completes deliveries together: one `accept_all` per link.
    async fn complete_all(&mut self, completions: Vec<(uuid::Uuid, Reply)>) {
        if completions.is_empty() {
            return;
        }
        let mut by_link: HashMap<u64, Accepting> = HashMap::new();
        for (token, reply) in completions {
            let Some(entry) = self.in_flight.remove(&token) else {
                let _ = reply.send(Err(lock_lost(&token.to_string())));
                continue;
            };
            let (infos, waiting) = by_link.entry(entry.link).or_default();
            infos.push(entry.info);
            waiting.push((entry.message_id, reply));
        }
        let path = self.path.clone();
        for (id, (infos, waiting)) in by_link {
            let outcome = match self.link_mut(id) {
                Some(link) => link.receiver.accept_all(infos).await.map_err(Some),
                None => Err(None),
            };
            for (message_id, reply) in waiting {
                let _ = reply.send(match &outcome {
                    Ok(()) => Ok(SystemTime::now()),
                    Err(Some(e)) => Err(settle_error(&format!("{e:?}"), &message_id, &path)),
                    Err(None) => Err(lock_lost(&message_id)),
                });
            }
        }
        self.close_settled_links().await;
    }

    async fn settle(&mut self, token: uuid::Uuid, how: Settlement) -> Result<SystemTime> {
        let Some(entry) = self.in_flight.get_mut(&token) else {
            return Err(lock_lost(&token.to_string()));
        };
        match how {
            Settlement::Extend(by) => {
                entry.hold_until = Some(Instant::now() + by);
                self.renew(token).await?;
                return Ok(SystemTime::now() + by);
            }
            Settlement::AbandonAfter(delay) => {
                entry.hold_until = Some(Instant::now() + delay);
                entry.abandon_after_hold = true;
                let short = entry
                    .locked_until
                    .and_then(|l| l.duration_since(SystemTime::now()).ok())
                    .is_none_or(|left| left < RENEW_MARGIN);
                if short {
                    self.renew(token).await?;
                }
                return Ok(SystemTime::now());
            }
            _ => {}
        }
        let Some(entry) = self.in_flight.remove(&token) else {
            return Err(lock_lost(&token.to_string()));
        };
        let path = self.path.clone();
        let Some(link) = self.link_mut(entry.link) else {
            return Err(lock_lost(&entry.message_id));
        };
        let outcome = match how {
            Settlement::Complete => link.receiver.accept(entry.info).await,
            Settlement::DeadLetter {
                reason,
                description,
            } => {
                let info: Fields = [
                    (Symbol::from("DeadLetterReason"), Value::String(reason)),
                    (
                        Symbol::from("DeadLetterErrorDescription"),
                        Value::String(description),
                    ),
                ]
                .into_iter()
                .collect();
                let error = definitions::Error {
                    condition: ErrorCondition::Custom(Symbol::from("com.microsoft:dead-letter")),
                    description: None,
                    info: Some(Box::new(info)),
                };
                link.receiver.reject(entry.info, error).await
            }
            _ => {
                link.receiver
                    .modify(
                        entry.info,
                        Modified {
                            delivery_failed: Some(true),
                            undeliverable_here: None,
                            message_annotations: None,
                        },
                    )
                    .await
            }
        };
        self.close_settled_links().await;
        outcome
            .map(|()| SystemTime::now())
            .map_err(|e| settle_error(&format!("{e:?}"), &entry.message_id, &path))
    }

    /// Renews the lock of `token`: its message's, or for a session its session's.
    async fn renew(&mut self, token: uuid::Uuid) -> Result<()> {
        let Some(entry) = self.in_flight.get(&token) else {
            return Err(lock_lost(&token.to_string()));
        };
        let (link_id, session, message_id) =
            (entry.link, entry.session.clone(), entry.message_id.clone());
        let Some(link) = self.link_mut(link_id) else {
            return Err(lock_lost(&message_id));
        };
        let name = link.name.clone();
        let in_session = link.session.is_some();
        if in_session {
            // A session's messages are locked with their session: renew it first.
            let session = session.unwrap_or_default();
            match self.management.renew_session_lock(&session, &name).await {
                Ok(until) => {
                    if let Some(link) = self.link_mut(link_id) {
                        link.session_locked_until = until;
                    }
                }
                Err(Error::LockLost { .. }) => {
                    self.in_flight.remove(&token);
                    return Err(lock_lost(&message_id));
                }
                Err(error) => return Err(error),
            }
        }
        let outcome = self
            .management
            .renew_locks(&[token], &name)
            .await
            .map(|expiries| expiries.first().copied().unwrap_or_else(SystemTime::now));
        // Some brokers keep no message lock apart from the session's: that renewal is enough.
        let outcome = match outcome {
            Err(Error::Transport { .. }) if in_session => Ok(SystemTime::now() + RENEW_MARGIN),
            other => other,
        };
        match outcome {
            Ok(until) => {
                if let Some(entry) = self.in_flight.get_mut(&token) {
                    entry.locked_until = Some(until);
                }
                Ok(())
            }
            Err(Error::LockLost { .. }) => {
                self.in_flight.remove(&token);
                Err(lock_lost(&message_id))
            }
            Err(error) => Err(error),
        }
    }

    /// Renews held locks that are about to expire, abandons delayed nacks whose delay has
    /// passed, forgets deliveries whose lock expired (they are redelivered), renews session
    /// locks, and releases deliveries that waited too long for a call.
    async fn maintain(&mut self) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut expired = Vec::new();
        let mut to_abandon = Vec::new();
        let mut to_renew = Vec::new();
        for (token, entry) in &self.in_flight {
            let left = entry.locked_until.and_then(|l| l.duration_since(wall).ok());
            let held = entry.hold_until.is_some_and(|until| until > now);
            let hold_ended = entry.hold_until.is_some_and(|until| until <= now);
            if hold_ended && entry.abandon_after_hold {
                to_abandon.push(*token);
            } else if held && left.is_none_or(|l| l < RENEW_MARGIN) {
                to_renew.push(*token);
            } else if !held && left.is_none() && entry.locked_until.is_some() {
                expired.push(*token);
            }
        }
        let lapsed: Vec<u64> = self
            .draining
            .iter()
            .filter(|l| l.session.is_some() && l.session_locked_until <= wall)
            .map(|l| l.id)
            .collect();
        for token in expired {
            self.in_flight.remove(&token);
        }
        self.in_flight.retain(|_, e| !lapsed.contains(&e.link));
        for (_, outcome) in self.renew_all(to_renew).await {
            if let Err(error) = outcome {
                tracing::warn!(messaging.system = "servicebus", messaging.source.name = %self.path, %error, "cannot renew a held lock");
            }
        }
        for token in to_abandon {
            if let Some(entry) = self.in_flight.get_mut(&token) {
                entry.hold_until = None;
            }
            if let Err(error) = self.settle(token, Settlement::Abandon).await {
                tracing::warn!(messaging.system = "servicebus", messaging.source.name = %self.path, %error, "cannot abandon a nacked message after its delay");
            }
        }
        // Holds that ended without an abandon (extend) just stop being renewed.
        for entry in self.in_flight.values_mut() {
            if entry.hold_until.is_some_and(|until| until <= now) && !entry.abandon_after_hold {
                entry.hold_until = None;
            }
        }
        // Nobody has received for a while: let the session go (once its deliveries are
        // settled), so that other subscribers can take it; one locked meanwhile goes too.
        let idle = self
            .idle_since
            .is_some_and(|since| now.duration_since(since) > SESSION_IDLE);
        if self
            .pending_session
            .as_ref()
            .is_some_and(|p| p.is_finished())
        {
            if let Some(Some(Ok(Ok(Some(link))))) =
                self.pending_session.take().map(|p| p.now_or_never())
            {
                if self.current.is_none() && !idle {
                    self.current = Some(link);
                } else {
                    self.draining.push(link);
                }
            }
        }
        if idle
            && self.pinned.is_none()
            && self.current.as_ref().is_some_and(|l| l.session.is_some())
        {
            self.retire_current().await;
        }
        // Session locks: of the session received from, and of sessions let go that still
        // have a message held (extend, delayed nack); the others' locks lapse, so that
        // what was never settled comes back.
        let held: Vec<u64> = self
            .in_flight
            .values()
            .filter(|e| e.hold_until.is_some())
            .map(|e| e.link)
            .collect();
        let mut renewals = Vec::new();
        let current = self.current.iter();
        let draining = self.draining.iter().filter(|l| held.contains(&l.id));
        for link in current.chain(draining) {
            if let Some(session) = &link.session {
                let left = link
                    .session_locked_until
                    .duration_since(wall)
                    .unwrap_or_default();
                if left < RENEW_MARGIN {
                    renewals.push((link.id, session.clone(), link.name.clone()));
                }
            }
        }
        for (id, session, name) in renewals {
            match self.management.renew_session_lock(&session, &name).await {
                Ok(until) => {
                    if let Some(link) = self.link_mut(id) {
                        link.session_locked_until = until;
                    }
                }
                Err(error) => {
                    tracing::warn!(messaging.system = "servicebus", session = %session, %error, "cannot renew a session lock");
                }
            }
        }
        // Deliveries that came after their call ended.
        self.collect_arrivals();
        let stale: VecDeque<Buffered> = {
            let (stale, keep) = std::mem::take(&mut self.buffered)
                .into_iter()
                .partition(|b| now.duration_since(b.arrived) >= BUFFER_HOLD);
            self.buffered = keep;
            stale
        };
        self.release(stale.into()).await;
        self.release_buffered_of_retired().await;
        self.close_settled_links().await;
        if self.current.as_ref().is_some_and(|l| l.lost.is_gone()) {
            self.lose_current().await;
        }
    }

    /// Moves what already arrived on the links into the buffer.
    fn collect_arrivals(&mut self) {
        let now = Instant::now();
        for link in self.current.iter_mut().chain(self.draining.iter_mut()) {
            while let Some(Ok(delivery)) = link.receiver.recv::<Body<Value>>().now_or_never() {
                self.buffered.push_back(Buffered {
                    link: link.id,
                    delivery,
                    arrived: now,
                });
            }
        }
    }

    /// Releases deliveries (unlocked at once, no delivery counted).
    async fn release(&mut self, deliveries: Vec<Buffered>) {
        for b in deliveries {
            let id = b.link;
            if let Some(link) = self.link_mut(id) {
                let _ = link.receiver.release(&b.delivery).await;
            }
        }
    }

    /// Releases what reached links no longer received from.
    async fn release_buffered_of_retired(&mut self) {
        self.collect_arrivals();
        let current = self.current.as_ref().map(|l| l.id);
        let (retired, keep): (Vec<Buffered>, Vec<Buffered>) = std::mem::take(&mut self.buffered)
            .into_iter()
            .partition(|b| Some(b.link) != current);
        self.buffered = keep.into();
        self.release(retired).await;
    }

    /// Closes retired session links that have nothing unsettled.
    async fn close_settled_links(&mut self) {
        if self.draining.is_empty() {
            return;
        }
        let busy: Vec<u64> = self.in_flight.values().map(|e| e.link).collect();
        let (keep, done): (Vec<Link>, Vec<Link>) = std::mem::take(&mut self.draining)
            .into_iter()
            .partition(|l| busy.contains(&l.id));
        self.draining = keep;
        for link in done {
            link.close().await;
        }
    }

    async fn shutdown(&mut self) {
        if let Some(pending) = self.pending_session.take() {
            pending.abort();
            if let Ok(Ok(Some(link))) = pending.await {
                link.close().await;
            }
        }
        // Nothing stays locked on a link that goes away: what nobody took is released.
        if let Some(mut link) = self.current.take() {
            if link.credit > 0 {
                let _ = link.receiver.drain().await;
            }
            self.draining.push(link);
        }
        self.collect_arrivals();
        let buffered: Vec<Buffered> = std::mem::take(&mut self.buffered).into();
        self.release(buffered).await;
        for link in std::mem::take(&mut self.draining) {
            link.close().await;
        }
        self.in_flight.clear();
    }
}

/// Waits for whichever comes first: a command, a delivery on `current`, the session being
/// locked, the connection's loss, or `until`.
async fn next_event(
    incoming: &mut mpsc::Receiver<Command>,
    current: Option<&mut Link>,
    pending: Option<&mut tokio::task::JoinHandle<Result<Option<Link>>>>,
    until: Instant,
) -> Event {
    let (delivery, lost) = match current {
        Some(link) => {
            let Link { receiver, lost, .. } = link;
            (
                futures::future::Either::Left(async move {
                    receiver
                        .recv::<Body<Value>>()
                        .await
                        .map_err(|e| format!("{e:?}"))
                }),
                futures::future::Either::Left(lost.gone()),
            )
        }
        None => (
            futures::future::Either::Right(futures::future::pending()),
            futures::future::Either::Right(futures::future::pending()),
        ),
    };
    let session = async move {
        match pending {
            Some(handle) => match handle.await {
                Ok(outcome) => outcome,
                Err(_) => Err(closed("subscriber")),
            },
            None => futures::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        command = incoming.recv() => Event::Command(command),
        delivery = delivery => Event::Delivery(delivery),
        () = lost => Event::Lost,
        link = session => Event::Session(link),
        () = tokio::time::sleep_until(until.into()) => Event::Deadline,
        () = tokio::time::sleep(MAINTENANCE) => Event::Tick,
    }
}

fn link_name() -> String {
    format!(
        "cloudbus-receiver-{}-{}",
        std::process::id(),
        NEXT_LINK.fetch_add(1, Ordering::Relaxed)
    )
}

/// Locks a session on a link (and AMQP session) of its own: `pinned`, or the next
/// available one. `None` when none became free within the broker's wait.
async fn lock_session(
    connection: &Connection,
    management: &Management,
    path: &str,
    pinned: Option<&str>,
    peek_lock: bool,
) -> Result<Option<Link>> {
    let filter = pinned.map(|id| Described {
        descriptor: Descriptor::Code(SESSION_FILTER_DESCRIPTOR),
        value: Value::String(id.to_string()),
    });
    let name = link_name();
    let properties: Fields = [(
        Symbol::from("com.microsoft:timeout"),
        Value::Uint(SESSION_WAIT_MS),
    )]
    .into_iter()
    .collect();
    let spec = ReceiverSpec {
        name: name.clone(),
        source: Source::builder()
            .address(path.to_string())
            .add_to_filter(Symbol::from(SESSION_FILTER), filter)
            .build(),
        peek_lock,
        properties: Some(properties),
    };
    let (mut own, _) = connection.own_session(path).await?;
    let attached = connection.receiver(path, spec, Some(&mut own)).await;
    let (receiver, lost) = match attached {
        Ok(attached) => attached,
        Err(error) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), own.end()).await;
            let text = error.to_string().to_ascii_lowercase();
            if text.contains("timeout")
                || text.contains("session-cannot-be-locked")
                || text.contains("sourceisnone")
            {
                return Ok(None);
            }
            return Err(error);
        }
    };
    let session = receiver
        .source()
        .as_ref()
        .and_then(|s| s.filter.as_ref())
        .and_then(|f| {
            f.iter()
                .find(|(k, _)| k.0 == SESSION_FILTER)
                .and_then(|(_, v)| session_id(v))
        })
        .or_else(|| pinned.map(str::to_string));
    let Some(session) = session else {
        return Err(Error::transport(
            TRANSPORT,
            format!("{path}: the broker locked a session but did not say which"),
            true,
            None,
        ));
    };
    let mut link = Link {
        id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
        name: name.clone(),
        receiver,
        lost,
        session: Some(session.clone()),
        session_locked_until: SystemTime::now(),
        own_session: Some(own),
        credit: 0,
        last_arrival: Instant::now(),
    };
    // The attach reply's lock expiry is not exposed by fe2o3: renewing tells it.
    match management.renew_session_lock(&session, &name).await {
        Ok(until) => link.session_locked_until = until,
        Err(error) => {
            link.close().await;
            return Err(error);
        }
    }
    tracing::debug!(messaging.system = "servicebus", messaging.source.name = %path, session = %session, "locked a session");
    Ok(Some(link))
}

/// The error of a settlement the broker refused: a lost lock, or what the broker said.
fn settle_error(text: &str, message_id: &str, path: &str) -> Error {
    if text.to_ascii_lowercase().contains("lock") {
        lock_lost(message_id)
    } else {
        map_amqp_error("settle", text, "queue", path)
    }
}

fn session_id(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        Value::Described(d) => session_id(&d.value),
        _ => None,
    }
}
