//! [`RabbitMqSubscriber`]: a consumer on one queue, with locks that expire.
//!
//! RabbitMQ keeps an unacknowledged message with the channel that received it until the
//! channel closes; it has no lock that runs out. The subscriber keeps one: a received
//! message is locked for `visibility`, and if it is not settled by then the subscriber
//! returns it to the queue (`basic.nack` with requeue, which counts a delivery), as a lock
//! expiring would. `extend` moves the deadline.
//!
//! The broker sends a consumer at most its prefetch count of unacknowledged messages
//! (`basic.qos`), a count that cannot change once the consumer runs. The subscriber starts
//! with none, and when a receive call asks for more than the window has room for, it adds
//! a consumer on the channel for the shortfall (at least doubling the window): the window
//! follows the free slots receive calls ask for, and what a busy consumer has no slot for
//! stays in the queue for the others. With `prefetch`, the window is at least that from
//! the first receive on: one consumer, as fast as a hand-written loop with that prefetch. Each acknowledgement frees a place that the broker
//! fills again.
//!
//! When the connection or channel drops, the subscriber connects again with backoff,
//! declares what it owns again (with `create`) and goes on consuming; the broker returns
//! the unacknowledged messages of the lost channel to the queue, and settling a delivery of
//! the lost channel is `LockLost`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use cloudbus_core::driver::{DeliveryInfo, Settle, check_receive_max};
use cloudbus_core::subscriber::{
    DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON, MAX_DELIVERY_COUNT_EXCEEDED,
};
use cloudbus_core::{Delivery, Destination, Error, Result, Subscriber};
use futures::StreamExt;
use futures::stream::SelectAll;
use lapin::message::Delivery as Raw;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio::sync::{Notify, mpsc};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use crate::TRANSPORT;
use crate::client::{
    MAX_BACKOFF, MIN_BACKOFF, Route, Sender, Server, by_deadline, close_connection,
    close_in_background,
};
use crate::config::{RabbitMqConfig, dead_letter_queue};
use crate::error::{Subject, is_connection_failure, map_error};
use crate::mapping::{DELAY_TARGET, DELIVERIES, Decoded, copy, decode};
use crate::topology::{
    Target, bind, declare_dead_letter_queue, declare_exchange, declare_queue, entry, queue_exists,
    target,
};

/// Longest sleep of the task that returns messages whose lock ran out: locks end at most
/// this late.
const LOCK_CHECK: Duration = Duration::from_millis(250);

/// Receives from a RabbitMQ queue: a task queue, a subscription's queue, or a dead-letter
/// queue.
pub struct RabbitMqSubscriber {
    shared: Arc<Shared>,
    /// The task that reads the consumers, and the one that ends locks.
    reader: Mutex<Option<JoinHandle<()>>>,
    locks: AbortHandle,
}

impl std::fmt::Debug for RabbitMqSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSubscriber")
            .field("queue", &self.shared.queue)
            .finish_non_exhaustive()
    }
}

struct Shared {
    /// The queue read.
    queue: String,
    /// Where `dead_letter` puts messages: the queue's dead-letter queue (none when the
    /// queue is one).
    dead_letters: Option<String>,
    config: RabbitMqConfig,
    server: Arc<Server>,
    /// Copies: dead letters and delayed nacks.
    sender: Sender,
    state: Mutex<State>,
    /// One widening of the window at a time.
    widening: tokio::sync::Mutex<()>,
    /// A message arrived, or the link changed.
    arrived: Notify,
    closed: AtomicBool,
}

/// The link to the broker and what came through it.
#[derive(Default)]
struct State {
    /// Counts the links: a delivery can only be settled on its own.
    generation: u64,
    link: Option<(Connection, Channel)>,
    /// Where new consumers of the link go, for the task that reads them.
    feed: Option<mpsc::UnboundedSender<Consumer>>,
    /// The sum of the prefetch counts of the link's consumers: how many unacknowledged
    /// messages the broker may have sent.
    window: usize,
    /// The tags of the link's consumers.
    consumers: Vec<String>,
    /// Messages the broker sent, not yet received by anyone.
    waiting: VecDeque<Raw>,
    /// Messages handed out (or being looked at), by delivery tag, until when they are
    /// locked.
    locks: HashMap<u64, Instant>,
    /// Why the subscriber has no link, when another attempt will not cure it (a queue
    /// deleted, a permission withdrawn).
    error: Option<Error>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RabbitMqSubscriber {
    /// Connects to the queue `config` names (declaring what is missing with `create`) and
    /// starts consuming.
    pub async fn connect(config: &RabbitMqConfig) -> Result<Self> {
        config.check()?;
        let server = Arc::new(Server::new(config)?);
        let queue = config.queue();
        let shared = Arc::new(Shared {
            dead_letters: (!config.dead_letter).then(|| dead_letter_queue(&queue)),
            queue,
            config: config.clone(),
            sender: Sender::new(server.clone(), config.publish_timeout),
            server,
            state: Mutex::new(State::default()),
            widening: tokio::sync::Mutex::new(()),
            arrived: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let (connection, channel) = shared.establish().await?;
        let feed = {
            let mut state = lock(&shared.state);
            state.generation = 1;
            state.link = Some((connection, channel.clone()));
            new_feed(&mut state)
        };
        let reader = tokio::spawn(run(shared.clone(), channel, feed, 1));
        let locks = tokio::spawn(release_expired(shared.clone())).abort_handle();
        Ok(RabbitMqSubscriber {
            shared,
            reader: Mutex::new(Some(reader)),
            locks,
        })
    }
}

/// A queue to read as a subscription, or declares it and its dead-letter queue, exchange
/// and binding: what `connect` does with `create`, for set-up code that must create a
/// subscription before anything is published (messages published to an exchange before
/// its queue is bound go nowhere: the publisher's `mandatory` publish then fails).
pub async fn create_subscription(config: &RabbitMqConfig) -> Result<()> {
    config.check()?;
    let server = Server::new(config)?;
    let deadline = Instant::now() + config.publish_timeout;
    let (connection, channel) = server.channel_by(deadline).await?;
    let declared = by_deadline(
        deadline,
        "declaring the subscription",
        declare(&channel, config),
    )
    .await;
    close_connection(&connection, "declared").await;
    declared
}

/// Declares what a subscriber of `config` reads.
async fn declare(channel: &Channel, config: &RabbitMqConfig) -> Result<()> {
    let queue = config.queue();
    if config.dead_letter {
        return declare_dead_letter_queue(channel, &queue).await;
    }
    declare_queue(channel, &queue, config.max_deliveries).await?;
    if config.subscription.is_some() {
        declare_exchange(channel, &config.name).await?;
        bind(channel, &queue, &config.name).await?;
    }
    Ok(())
}

impl Shared {
    fn subject(&self) -> Subject<'_> {
        Subject {
            entity: "queue",
            name: &self.queue,
        }
    }

    /// A new link: a connection and its channel, on which the queue exists (declared, with
    /// `create`).
    async fn establish(&self) -> Result<(Connection, Channel)> {
        let deadline = Instant::now() + self.config.publish_timeout;
        let (connection, channel) = self.server.channel_by(deadline).await?;
        let consuming = by_deadline(deadline, "looking up the queue", async {
            if self.config.create {
                declare(&channel, &self.config).await?;
            }
            queue_exists(&channel, &self.queue).await
        });
        match consuming.await {
            Ok(()) => Ok((connection, channel)),
            Err(error) => {
                close_in_background(connection);
                Err(error)
            }
        }
    }

    /// Makes room in the window for `want` more messages than the subscriber holds, adding
    /// a consumer for the shortfall (see the module's documentation). In a task of its
    /// own: a receive call dropped meanwhile must not leave a consumer on the channel that
    /// nobody reads.
    async fn widen(self: &Arc<Self>, want: usize) -> Result<()> {
        let shared = self.clone();
        tokio::spawn(async move { shared.widen_now(want).await })
            .await
            .unwrap_or_else(|e| {
                Err(Error::transport(
                    TRANSPORT,
                    format!("widening the window failed: {e}"),
                    true,
                    None,
                ))
            })
    }

    async fn widen_now(&self, want: usize) -> Result<()> {
        let _one = self.widening.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let (generation, channel, shortfall) = {
            let state = lock(&self.state);
            let held = state.locks.len() + state.waiting.len();
            let Some((_, channel)) = state.link.as_ref() else {
                return Ok(());
            };
            // The window must cover what the subscriber holds and what is asked, and is at
            // least `prefetch`.
            let target = (held + want).max(usize::from(self.config.prefetch));
            if state.window >= target {
                return Ok(());
            }
            // At least double the window: a consumer that keeps asking for more gets it in
            // a few large steps (each consumer on the channel costs the broker work per
            // message), not in many small ones.
            let shortfall = (target - state.window)
                .max(state.window)
                .min(self.config.max_held.saturating_sub(state.window))
                .min(usize::from(u16::MAX));
            (state.generation, channel.clone(), shortfall)
        };
        if shortfall == 0 {
            return Ok(());
        }
        tracing::debug!(queue = %self.queue, by = shortfall, "widening the window");
        let consumer = async {
            channel
                .basic_qos(shortfall as u16, BasicQosOptions::default())
                .await?;
            channel
                .basic_consume(
                    self.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        }
        .await
        .map_err(|e| map_error("consuming from", self.subject(), e))?;
        let mut state = lock(&self.state);
        if state.generation == generation {
            let tag = consumer.tag().to_string();
            if let Some(feed) = &state.feed {
                if feed.send(consumer).is_ok() {
                    state.window += shortfall;
                    state.consumers.push(tag);
                }
            }
        }
        Ok(())
    }

    /// At close: cancels the link's consumers (the broker sends no more); the link's
    /// generation and whether it had consumers, if there is a link.
    async fn cancel_consumers(&self) -> Option<(u64, bool)> {
        // No widening in progress, and (closed) none after.
        let _one = self.widening.lock().await;
        let (generation, channel, tags) = {
            let state = lock(&self.state);
            let (_, channel) = state.link.as_ref()?;
            (state.generation, channel.clone(), state.consumers.clone())
        };
        let had_consumers = !tags.is_empty();
        for tag in tags {
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        Some((generation, had_consumers))
    }

    /// At close, after [`Shared::cancel_consumers`]: puts a copy of each message the broker sent
    /// ahead and nobody received back into the queue, with its true delivery count, and
    /// acks the original. Returning it with the channel would count a delivery that never
    /// happened (quorum queues count every return). A crash in between duplicates the
    /// message; nothing is lost.
    async fn give_back(&self, generation: u64) {
        let (channel, waiting) = {
            let mut state = lock(&self.state);
            if state.generation != generation {
                return;
            }
            let Some((_, channel)) = state.link.as_ref() else {
                return;
            };
            (
                channel.clone(),
                state.waiting.drain(..).collect::<Vec<Raw>>(),
            )
        };
        tracing::debug!(queue = %self.queue, messages = waiting.len(), "giving back what nobody received");
        for raw in waiting {
            let decoded = decode(&raw.properties, Vec::new(), raw.redelivered, String::new);
            let properties = copy(
                &raw.properties,
                &[(DELIVERIES, decoded.earlier_deliveries.to_string())],
            );
            let route = Route {
                exchange: "",
                routing_key: &self.queue,
            };
            let given_back = self.sender.send(route, &raw.data, &properties).await;
            let settled = match given_back {
                Ok(()) => {
                    channel
                        .basic_ack(raw.delivery_tag, BasicAckOptions::default())
                        .await
                }
                Err(_) => channel.basic_nack(raw.delivery_tag, requeue()).await,
            };
            if let Err(error) = settled {
                tracing::debug!(queue = %self.queue, %error, "settling a message given back failed");
            }
        }
    }

    /// The channel of `generation`, if it is still the link.
    fn channel(&self, generation: u64) -> Option<Channel> {
        let state = lock(&self.state);
        (state.generation == generation)
            .then(|| state.link.as_ref().map(|(_, c)| c.clone()))
            .flatten()
    }

    /// Puts a copy of a message into the dead-letter queue with the reason headers.
    async fn dead_letter_copy(
        &self,
        properties: &BasicProperties,
        payload: &[u8],
        reason: &str,
        description: &str,
    ) -> Result<()> {
        let Some(dead_letters) = &self.dead_letters else {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: format!(
                    "dead-lettering from `{}`, which is a dead-letter queue already: ack the \
                     message, or publish it where it belongs",
                    self.queue
                ),
            });
        };
        let properties = copy(
            properties,
            &[
                (DEAD_LETTER_REASON, reason.to_string()),
                (DEAD_LETTER_DESCRIPTION, description.to_string()),
            ],
        );
        let route = Route {
            exchange: "",
            routing_key: dead_letters,
        };
        self.sender.send(route, payload, &properties).await
    }
}

/// What `close` does: cancels the consumers, waits for the reading task to hand over what
/// arrived before, gives that back, and closes the link (unless deliveries are still out:
/// then when the last of them goes).
async fn shut_down(shared: Arc<Shared>, reader: Option<JoinHandle<()>>, locks: AbortHandle) {
    let cancelled = shared.cancel_consumers().await;
    if let Some(mut reader) = reader {
        let wait = cancelled.is_some_and(|(_, had_consumers)| had_consumers);
        if !wait
            || tokio::time::timeout(Duration::from_secs(2), &mut reader)
                .await
                .is_err()
        {
            reader.abort();
        }
    }
    if let Some((generation, _)) = cancelled {
        shared.give_back(generation).await;
    }
    locks.abort();
    shared.arrived.notify_waiters();
    shared.sender.close().await;
}

fn lock_reader(reader: &Mutex<Option<JoinHandle<()>>>) -> Option<JoinHandle<()>> {
    reader
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
}

/// A new feed of consumers for the link.
fn new_feed(state: &mut State) -> mpsc::UnboundedReceiver<Consumer> {
    let (sender, receiver) = mpsc::unbounded_channel();
    state.feed = Some(sender);
    state.window = 0;
    state.consumers.clear();
    receiver
}

/// How often the reading task looks whether the link is still up while it has nothing to
/// read.
const LINK_CHECK: Duration = Duration::from_secs(1);

/// Moves what the link's consumers receive into `waiting`; when the link drops, connects
/// again (with backoff) until the subscriber closes.
async fn run(
    shared: Arc<Shared>,
    mut channel: Channel,
    mut feed: mpsc::UnboundedReceiver<Consumer>,
    mut generation: u64,
) {
    loop {
        let mut consumers: SelectAll<Consumer> = SelectAll::new();
        let mut check = tokio::time::interval(LINK_CHECK);
        loop {
            tokio::select! {
                Some(consumer) = feed.recv() => consumers.push(consumer),
                item = consumers.next(), if !consumers.is_empty() => match item {
                    Some(Ok(raw)) => {
                        let mut state = lock(&shared.state);
                        if state.generation != generation {
                            break;
                        }
                        state.waiting.push_back(raw);
                        drop(state);
                        shared.arrived.notify_waiters();
                    }
                    Some(Err(error)) => {
                        tracing::debug!(queue = %shared.queue, %error, "a consumer stopped");
                        break;
                    }
                    // The broker cancelled the consumers (the queue was deleted).
                    None => {
                        tracing::trace!(queue = %shared.queue, "every consumer ended");
                        break;
                    }
                },
                _ = check.tick() => {
                    if !channel.status().connected() {
                        break;
                    }
                }
            }
        }
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        {
            // The broker returns the lost channel's unacknowledged messages to the queue.
            let mut state = lock(&shared.state);
            state.generation += 1;
            generation = state.generation;
            state.waiting.clear();
            state.locks.clear();
            state.feed = None;
            state.window = 0;
            if let Some((connection, _)) = state.link.take() {
                close_in_background(connection);
            }
        }
        shared.arrived.notify_waiters();
        tracing::warn!(queue = %shared.queue, server = %shared.server.shown(), "lost the link to the broker; connecting again");
        let mut backoff = MIN_BACKOFF;
        loop {
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            match shared.establish().await {
                Ok((connection, new_channel)) => {
                    let mut state = lock(&shared.state);
                    if shared.closed.load(Ordering::Acquire) {
                        close_in_background(connection);
                        return;
                    }
                    state.link = Some((connection, new_channel.clone()));
                    state.error = None;
                    feed = new_feed(&mut state);
                    channel = new_channel;
                    drop(state);
                    shared.arrived.notify_waiters();
                    tracing::info!(queue = %shared.queue, "connected again");
                    break;
                }
                Err(error) => {
                    tracing::warn!(queue = %shared.queue, %error, ?backoff, "connecting again failed");
                    if !is_connection_failure(&error) {
                        lock(&shared.state).error = Some(error);
                        shared.arrived.notify_waiters();
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// Returns to the queue the messages whose lock ran out unsettled.
async fn release_expired(shared: Arc<Shared>) {
    loop {
        let now = Instant::now();
        let (generation, expired, next) = {
            let mut state = lock(&shared.state);
            let expired: Vec<u64> = state
                .locks
                .iter()
                .filter(|(_, until)| **until <= now)
                .map(|(tag, _)| *tag)
                .collect();
            for tag in &expired {
                state.locks.remove(tag);
            }
            let next = state.locks.values().min().copied();
            (state.generation, expired, next)
        };
        if !expired.is_empty() {
            tracing::debug!(queue = %shared.queue, released = expired.len(), "locks ran out");
            if let Some(channel) = shared.channel(generation) {
                for tag in expired {
                    tracing::trace!(queue = %shared.queue, tag, "lock ran out");
                    let _ = channel.basic_nack(tag, requeue()).await;
                }
            }
        }
        let wake = next.map_or(now + LOCK_CHECK, |next| next.min(now + LOCK_CHECK));
        tokio::time::sleep_until(wake).await;
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue: true,
    }
}

/// FNV-1a of a foreign message's content: an id that stays the same across deliveries.
fn content_id(queue: &str, properties: &BasicProperties, body: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let timestamp = properties.timestamp().unwrap_or(0).to_be_bytes();
    for byte in body.iter().chain(timestamp.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{queue}/{hash:016x}")
}

#[async_trait]
impl Subscriber for RabbitMqSubscriber {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        check_receive_max(TRANSPORT, max)?;
        let shared = &self.shared;
        let deadline = Instant::now() + wait;
        loop {
            if shared.closed.load(Ordering::Acquire) {
                return Err(Error::closed(TRANSPORT, "subscriber"));
            }
            let arrived = shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            // From here to the return nothing awaits, so a dropped call loses nothing.
            let (generation, taken, narrow) = {
                let mut state = lock(&shared.state);
                if state.waiting.is_empty() {
                    if let Some(error) = &state.error {
                        return Err(error.clone());
                    }
                }
                let until = Instant::now() + shared.config.visibility;
                let n = max.min(state.waiting.len());
                let taken: Vec<Raw> = state.waiting.drain(..n).collect();
                for raw in &taken {
                    state.locks.insert(raw.delivery_tag, until);
                }
                let held = state.locks.len() + state.waiting.len();
                let narrow = state.window < (held + max).max(usize::from(shared.config.prefetch))
                    && state.link.is_some();
                (state.generation, taken, narrow)
            };
            let mut deliveries = Vec::with_capacity(taken.len());
            for raw in taken {
                match admit(shared, generation, raw) {
                    Admitted::Deliver(delivery) => deliveries.push(*delivery),
                    Admitted::Expired(settle) => {
                        tokio::spawn(async move {
                            let _ = settle.ack().await;
                        });
                    }
                    Admitted::Exhausted(settle) => {
                        tokio::spawn(dead_letter_exhausted(settle));
                    }
                }
            }
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            if narrow {
                if let Err(error) = shared.widen(max).await {
                    if !is_connection_failure(&error) {
                        return Err(error);
                    }
                    // The reading task notices the lost link and connects again.
                    tracing::debug!(queue = %shared.queue, %error, "widening the window failed");
                }
            }
            tokio::select! {
                () = arrived => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Stops the consumers, gives back what the broker sent ahead and nobody received,
    /// and closes the link; the broker returns what is still unsettled to the queue.
    /// Dropping the subscriber does the same in the background.
    async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        shut_down(
            self.shared.clone(),
            lock_reader(&self.reader),
            self.locks.clone(),
        )
        .await;
        Ok(())
    }

    /// Nothing is taken from the broker for a call until it returns.
    fn receive_is_cancel_safe(&self) -> bool {
        true
    }

    /// Receive calls take from what the broker sent, under a short lock: several at once
    /// keep a busy consumer's slots filled.
    fn concurrent_receives(&self) -> usize {
        8
    }

    fn destination(&self) -> Destination {
        Destination::new(TRANSPORT, self.shared.queue.clone())
    }
}

impl Drop for RabbitMqSubscriber {
    /// Closes as `close` does, in the background; the link stays open for the deliveries
    /// still out, and closes when the last of them is settled or dropped.
    fn drop(&mut self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let reader = lock_reader(&self.reader);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(shut_down(self.shared.clone(), reader, self.locks.clone()));
            }
            Err(_) => {
                if let Some(reader) = reader {
                    reader.abort();
                }
                self.locks.abort();
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let link = lock(&self.state).link.take();
        if let Some((connection, _)) = link {
            if tokio::runtime::Handle::try_current().is_ok() {
                close_in_background(connection);
            }
        }
    }
}

/// What becomes of a received message.
enum Admitted {
    /// Handed out.
    Deliver(Box<Delivery>),
    /// Outlived its time to live: acked, never handed out.
    Expired(Box<RabbitSettle>),
    /// Delivered `max_deliveries` times: dead-lettered, never handed out again.
    Exhausted(Box<RabbitSettle>),
}

/// Decides what becomes of a received (and locked) message, without waiting for anything.
fn admit(shared: &Arc<Shared>, generation: u64, raw: Raw) -> Admitted {
    let Raw {
        delivery_tag: tag,
        redelivered,
        properties,
        data,
        ..
    } = raw;
    let fallback = properties
        .message_id()
        .is_none()
        .then(|| content_id(&shared.queue, &properties, &data));
    let Decoded {
        message,
        earlier_deliveries,
        enqueued_at,
        expires_at,
    } = decode(&properties, data, redelivered, || {
        fallback.unwrap_or_default()
    });
    let settle = Box::new(RabbitSettle {
        shared: shared.clone(),
        generation,
        tag,
        message_id: message.id.clone(),
        properties,
        payload: message.payload.clone(),
        deliveries: earlier_deliveries + 1,
    });
    if expires_at.is_some_and(|at| at <= SystemTime::now()) {
        tracing::debug!(queue = %shared.queue, id = %message.id, "dropping an expired message");
        return Admitted::Expired(settle);
    }
    if settle.deliveries > shared.config.max_deliveries && shared.dead_letters.is_some() {
        return Admitted::Exhausted(settle);
    }
    let locked_until = lock(&shared.state)
        .locks
        .get(&tag)
        .copied()
        .unwrap_or_else(Instant::now);
    let info = DeliveryInfo {
        delivery_count: settle.deliveries,
        enqueued_at,
        transport_id: format!("{}/{generation}.{tag}", shared.queue),
        locked_until: Some(
            SystemTime::now() + locked_until.saturating_duration_since(Instant::now()),
        ),
    };
    Admitted::Deliver(Box::new(Delivery::new(message, info, settle)))
}

/// Moves a message delivered `max_deliveries` times to the dead-letter queue.
async fn dead_letter_exhausted(settle: Box<RabbitSettle>) {
    let queue = settle.shared.queue.clone();
    let description = format!(
        "delivered {} times; the subscription allows {} (max_deliveries)",
        settle.deliveries, settle.shared.config.max_deliveries
    );
    if let Err(error) = settle
        .dead_letter(MAX_DELIVERY_COUNT_EXCEEDED, &description)
        .await
    {
        tracing::warn!(%queue, %error, "moving an exhausted message to the dead-letter queue failed; it comes back");
    }
}

/// Settles one delivery on the channel that received it.
struct RabbitSettle {
    shared: Arc<Shared>,
    generation: u64,
    tag: u64,
    message_id: String,
    properties: BasicProperties,
    payload: Bytes,
    /// This delivery's count.
    deliveries: u32,
}

impl RabbitSettle {
    fn lock_lost(&self) -> Error {
        Error::LockLost {
            transport: TRANSPORT,
            message_id: self.message_id.clone(),
        }
    }

    /// Takes the lock (the delivery can be settled once) and the channel to settle on.
    fn take(&self) -> Result<Channel> {
        let mut state = lock(&self.shared.state);
        if state.generation != self.generation {
            return Err(self.lock_lost());
        }
        match state.locks.get(&self.tag) {
            Some(until) if *until > Instant::now() => {}
            // Expired: the lock task returns it to the queue.
            _ => return Err(self.lock_lost()),
        }
        state.locks.remove(&self.tag);
        state
            .link
            .as_ref()
            .map(|(_, channel)| channel.clone())
            .ok_or_else(|| self.lock_lost())
    }

    fn failed(&self, action: &str, error: lapin::Error) -> Error {
        map_error(action, self.shared.subject(), error)
    }

    async fn ack_on(&self, channel: &Channel) -> Result<()> {
        channel
            .basic_ack(self.tag, BasicAckOptions::default())
            .await
            .map_err(|e| self.failed("acknowledging a message of", e))
    }

    async fn requeue_on(&self, channel: &Channel) -> Result<()> {
        tracing::trace!(queue = %self.shared.queue, tag = self.tag, "requeue");
        channel
            .basic_nack(self.tag, requeue())
            .await
            .map_err(|e| self.failed("returning a message to", e))
    }
}

#[async_trait]
impl Settle for RabbitSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        let channel = self.take()?;
        self.ack_on(&channel).await
    }

    /// A copy with this delivery's count goes back to the queue (at once, or through the
    /// delay queues), then this one is acked. Not `basic.nack` with requeue: brokers count
    /// those differently (RabbitMQ 4.3 stopped counting them in `x-delivery-count`), and
    /// a quorum queue also counts the return of a message that was sent ahead and never
    /// handed out; the copy's `cloudbus-deliveries` counts exactly the deliveries.
    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        let delayed = entry(delay)?;
        let channel = self.take()?;
        let sent = async {
            let mut extra = vec![(DELIVERIES, self.deliveries.to_string())];
            let (exchange, routing_key) = match &delayed {
                None => ("", self.shared.queue.as_str()),
                Some((exchange, routing_key)) => {
                    self.shared
                        .sender
                        .ensure_delays(Target::Queue, &self.shared.queue)
                        .await?;
                    extra.push((DELAY_TARGET, target(Target::Queue, &self.shared.queue)));
                    (exchange.as_str(), routing_key.as_str())
                }
            };
            let properties = copy(&self.properties, &extra);
            let route = Route {
                exchange,
                routing_key,
            };
            self.shared
                .sender
                .send(route, &self.payload, &properties)
                .await
        }
        .await;
        match sent {
            Ok(()) => self.ack_on(&channel).await,
            Err(error) => {
                let _ = self.requeue_on(&channel).await;
                Err(error)
            }
        }
    }

    /// A copy with the reason headers into the dead-letter queue, then the ack of this
    /// one: a crash in between leaves the message in both, never in neither.
    async fn dead_letter(self: Box<Self>, reason: &str, description: &str) -> Result<()> {
        if self.shared.dead_letters.is_none() {
            return self
                .shared
                .dead_letter_copy(&self.properties, &self.payload, reason, description)
                .await;
        }
        let channel = self.take()?;
        match self
            .shared
            .dead_letter_copy(&self.properties, &self.payload, reason, description)
            .await
        {
            Ok(()) => self.ack_on(&channel).await,
            Err(error) => {
                let _ = self.requeue_on(&channel).await;
                Err(error)
            }
        }
    }

    async fn extend(&mut self, by: Duration) -> Result<SystemTime> {
        let mut state = lock(&self.shared.state);
        if state.generation != self.generation {
            return Err(self.lock_lost());
        }
        match state.locks.get_mut(&self.tag) {
            Some(until) if *until > Instant::now() => {
                *until = Instant::now() + by;
                Ok(SystemTime::now() + by)
            }
            _ => Err(self.lock_lost()),
        }
    }
}
