//! The process-wide broker behind `memory://`: named entities (queues, or topics with a
//! queue per subscription), each queue with its messages, locks and dead-letter queue, and
//! the settlement of its deliveries.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::{MemoryConfig, TRANSPORT};
use crate::config::Start;
use crate::driver::{DeliveryInfo, Settle};
use crate::inspector::Peeked;
use crate::subscriber::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON, MAX_DELIVERY_COUNT_EXCEEDED};
use crate::{Delivery, Error, Message, Result};

static BROKER: LazyLock<Mutex<HashMap<String, Arc<Entity>>>> = LazyLock::new(Default::default);

/// Finds (or, with `create`, creates) the entity.
pub(super) fn entity(config: &MemoryConfig) -> Result<Arc<Entity>> {
    let mut broker = lock(&BROKER);
    if let Some(entity) = broker.get(&config.entity) {
        return Ok(entity.clone());
    }
    if !config.create {
        return Err(Error::NotFound {
            transport: TRANSPORT,
            entity: if config.subscription.is_some() {
                "topic"
            } else {
                "queue"
            },
            name: config.entity.clone(),
        });
    }
    let entity = Arc::new(Entity {
        name: config.entity.clone(),
        kind: Mutex::new(Kind::Queue(Queue::with_dead_letter(
            config.entity.clone(),
            config,
        ))),
    });
    broker.insert(config.entity.clone(), entity.clone());
    Ok(entity)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the state half-changed in a way that
    // loses messages (every change is a single insert or remove), so keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) struct Entity {
    name: String,
    kind: Mutex<Kind>,
}

enum Kind {
    Queue(Arc<Queue>),
    Topic(Topic),
}

/// A topic: a queue per subscription, and the log of what was published, for
/// subscriptions that start before they were created (replay).
struct Topic {
    subscriptions: BTreeMap<String, Arc<Queue>>,
    /// The last `capacity` messages published, oldest first.
    log: VecDeque<Logged>,
    capacity: usize,
}

/// A message in a topic's log.
struct Logged {
    message: Message,
    published_at: SystemTime,
    published: Instant,
}

impl Topic {
    fn new(capacity: usize) -> Topic {
        Topic {
            subscriptions: BTreeMap::new(),
            log: VecDeque::new(),
            capacity,
        }
    }

    /// A new subscription's queue, holding what the log has from `start` on.
    fn subscribe(&mut self, entity: &str, name: &str, config: &MemoryConfig) -> Arc<Queue> {
        let queue = Queue::with_dead_letter(format!("{entity}/{name}"), config);
        let from = match config.start {
            Start::Latest => None,
            Start::Earliest => Some(SystemTime::UNIX_EPOCH),
            Start::At(at) => Some(at),
        };
        if let Some(from) = from {
            for logged in self.log.iter().filter(|l| l.published_at >= from) {
                queue.replay(logged);
            }
        }
        self.subscriptions.insert(name.to_string(), queue.clone());
        queue
    }

    fn record(&mut self, message: Message) {
        if self.log.len() >= self.capacity {
            self.log.pop_front();
        }
        self.log.push_back(Logged {
            message,
            published_at: SystemTime::now(),
            published: Instant::now(),
        });
    }
}

impl Entity {
    /// The queue a subscriber with this config receives from, creating a subscription
    /// (and turning an unused queue into a topic) where allowed.
    pub(super) fn queue_for(&self, config: &MemoryConfig) -> Result<Arc<Queue>> {
        if config.start != Start::Latest && config.subscription.is_none() {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: format!(
                    "start={} on the queue memory://{}: replay reads a topic's log, so \
                     receive through a subscription (memory://{}?subscription=<name>&start=...)",
                    config.start, self.name, self.name
                ),
            });
        }
        let mut kind = lock(&self.kind);
        match (&mut *kind, &config.subscription) {
            (Kind::Queue(queue), None) => Ok(queue.clone()),
            (Kind::Topic(_), None) => Err(Error::config(format!(
                "memory://{} is a topic: receive through a subscription, memory://{}?subscription=<name>",
                self.name, self.name
            ))),
            (Kind::Topic(topic), Some(name)) => {
                if let Some(queue) = topic.subscriptions.get(name) {
                    return Ok(queue.clone());
                }
                if !config.create {
                    return Err(Error::NotFound {
                        transport: TRANSPORT,
                        entity: "subscription",
                        name: format!("{}?subscription={name}", self.name),
                    });
                }
                Ok(topic.subscribe(&self.name, name, config))
            }
            (Kind::Queue(queue), Some(name)) => {
                if !queue.is_empty() {
                    return Err(Error::config(format!(
                        "memory://{} is in use as a queue (it holds messages), so it cannot take subscriptions; use another name for the topic",
                        self.name
                    )));
                }
                if !config.create {
                    return Err(Error::NotFound {
                        transport: TRANSPORT,
                        entity: "subscription",
                        name: format!("{}?subscription={name}", self.name),
                    });
                }
                let mut topic = Topic::new(config.capacity);
                let queue = topic.subscribe(&self.name, name, config);
                *kind = Kind::Topic(topic);
                Ok(queue)
            }
        }
    }

    /// Enqueues `message` on the queue, or on every subscription of the topic (and in its
    /// log). All or none: if any target is full, nothing is enqueued.
    pub(super) fn publish(&self, message: Message) -> Result<()> {
        let mut kind = lock(&self.kind);
        let targets: Vec<&Arc<Queue>> = match &*kind {
            Kind::Queue(queue) => vec![queue],
            Kind::Topic(topic) => topic.subscriptions.values().collect(),
        };
        // Publishers enqueue under the entity lock, so no one else can fill a target
        // between this check and the enqueue below.
        if let Some(full) = targets.iter().find(|q| q.is_full()) {
            return Err(full.full_error());
        }
        for queue in targets {
            queue.enqueue(message.clone(), false)?;
        }
        if let Kind::Topic(topic) = &mut *kind {
            topic.record(message);
        }
        Ok(())
    }
}

/// One queue: the messages of a queue entity, of one subscription, or a dead-letter queue.
pub(super) struct Queue {
    name: String,
    capacity: usize,
    max_deliveries: u32,
    pub(super) dead_letter: Option<Arc<Queue>>,
    state: Mutex<State>,
    pub(super) changed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    next_sequence: u64,
    next_lock: u64,
    /// Messages waiting for delivery (including delayed ones), by sequence number.
    available: BTreeMap<u64, Stored>,
    /// Locked messages, by sequence number.
    in_flight: HashMap<u64, Locked>,
}

struct Stored {
    message: Message,
    enqueued_at: SystemTime,
    visible_at: Instant,
    expires_at: Option<Instant>,
    delivery_count: u32,
}

struct Locked {
    stored: Stored,
    lock: u64,
    locked_until: Instant,
}

impl Queue {
    fn with_dead_letter(name: String, config: &MemoryConfig) -> Arc<Queue> {
        let dead_letter = Arc::new(Queue::new(
            format!("{name}/$deadletter"),
            config.capacity,
            u32::MAX,
            None,
        ));
        Arc::new(Queue::new(
            name,
            config.capacity,
            config.max_deliveries.max(1),
            Some(dead_letter),
        ))
    }

    fn new(
        name: String,
        capacity: usize,
        max_deliveries: u32,
        dead_letter: Option<Arc<Queue>>,
    ) -> Queue {
        Queue {
            name,
            capacity,
            max_deliveries,
            dead_letter,
            state: Mutex::new(State {
                next_sequence: 1,
                ..State::default()
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn is_empty(&self) -> bool {
        let state = lock(&self.state);
        state.available.is_empty() && state.in_flight.is_empty()
    }

    fn is_full(&self) -> bool {
        let state = lock(&self.state);
        state.available.len() + state.in_flight.len() >= self.capacity
    }

    fn full_error(&self) -> Error {
        Error::transport(
            TRANSPORT,
            format!(
                "queue `{}` is full ({} messages, the capacity): consume faster or raise ?capacity=",
                self.name, self.capacity
            ),
            true,
            None,
        )
    }

    /// Adds a message. `force` skips the capacity check (used to return a message that
    /// already counted against it).
    fn enqueue(&self, message: Message, force: bool) -> Result<()> {
        let visible_at = Instant::now() + message.delay();
        let expires_at = message.time_to_live.map(|ttl| visible_at + ttl);
        self.store(message, SystemTime::now(), visible_at, expires_at, force)
    }

    /// Adds a message from a topic's log as it was published then: its enqueue time, its
    /// delay and its time to live count from its publication (an expired one is not added).
    fn replay(&self, logged: &Logged) {
        let visible_at = logged.published + logged.message.delay();
        let expires_at = logged.message.time_to_live.map(|ttl| visible_at + ttl);
        if expires_at.is_some_and(|at| at <= Instant::now()) {
            return;
        }
        // The log holds at most `capacity` messages, so a new queue takes them all.
        let _ = self.store(
            logged.message.clone(),
            logged.published_at,
            visible_at,
            expires_at,
            true,
        );
    }

    fn store(
        &self,
        message: Message,
        enqueued_at: SystemTime,
        visible_at: Instant,
        expires_at: Option<Instant>,
        force: bool,
    ) -> Result<()> {
        {
            let mut state = lock(&self.state);
            if !force && state.available.len() + state.in_flight.len() >= self.capacity {
                return Err(self.full_error());
            }
            let sequence = state.next_sequence;
            state.next_sequence += 1;
            state.available.insert(
                sequence,
                Stored {
                    message,
                    enqueued_at,
                    visible_at,
                    expires_at,
                    delivery_count: 0,
                },
            );
        }
        self.changed.notify_waiters();
        Ok(())
    }

    /// Puts a message that came back (nack or lock expiry) into the queue again, or into
    /// the dead-letter queue once it has been delivered `max_deliveries` times.
    fn requeue(&self, state: &mut State, sequence: u64, mut stored: Stored, visible_at: Instant) {
        if stored.delivery_count >= self.max_deliveries {
            if let Some(dead_letter) = &self.dead_letter {
                let message = dead_lettered(
                    stored.message.clone(),
                    MAX_DELIVERY_COUNT_EXCEEDED,
                    &format!(
                        "delivered {} times, the maximum for this queue",
                        stored.delivery_count
                    ),
                );
                match dead_letter.enqueue(message, false) {
                    Ok(()) => return,
                    Err(error) => tracing::warn!(
                        messaging.system = TRANSPORT,
                        messaging.destination.name = %self.name,
                        messaging.message.id = %stored.message.id,
                        %error,
                        "cannot dead-letter a message past its max delivery count; keeping it in the queue"
                    ),
                }
            }
        }
        stored.visible_at = visible_at;
        state.available.insert(sequence, stored);
    }

    /// Returns messages whose lock expired to the queue.
    fn expire_locks(&self, state: &mut State, now: Instant) {
        let expired: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, locked)| locked.locked_until <= now)
            .map(|(sequence, _)| *sequence)
            .collect();
        for sequence in expired {
            if let Some(locked) = state.in_flight.remove(&sequence) {
                self.requeue(state, sequence, locked.stored, now);
            }
        }
    }

    /// Takes up to `max` deliverable messages and locks them until `now + visibility`.
    /// Returns them, and the next instant at which something may become deliverable.
    pub(super) fn take(
        self: &Arc<Self>,
        max: usize,
        visibility: Duration,
    ) -> (Vec<Delivery>, Option<Instant>) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        self.expire_locks(&mut state, now);
        let mut next_event = state.in_flight.values().map(|l| l.locked_until).min();
        let mut blocked: HashSet<String> = state
            .in_flight
            .values()
            .filter_map(|l| l.stored.message.ordering_key.clone())
            .collect();
        let mut chosen = Vec::new();
        let mut expired = Vec::new();
        for (sequence, stored) in &state.available {
            if chosen.len() >= max {
                break;
            }
            if stored.expires_at.is_some_and(|at| at <= now) {
                expired.push(*sequence);
                continue;
            }
            let key = stored.message.ordering_key.as_ref();
            if key.is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            if let Some(key) = key {
                blocked.insert(key.clone());
            }
            if stored.visible_at > now {
                next_event =
                    Some(next_event.map_or(stored.visible_at, |e| e.min(stored.visible_at)));
                continue;
            }
            chosen.push(*sequence);
        }
        for sequence in expired {
            if let Some(stored) = state.available.remove(&sequence) {
                tracing::debug!(
                    messaging.system = TRANSPORT,
                    messaging.destination.name = %self.name,
                    messaging.message.id = %stored.message.id,
                    "discarding a message past its time to live"
                );
            }
        }
        let locked_until = now + visibility;
        let wall_until = SystemTime::now() + visibility;
        let mut deliveries = Vec::with_capacity(chosen.len());
        for sequence in chosen {
            let Some(mut stored) = state.available.remove(&sequence) else {
                continue;
            };
            stored.delivery_count += 1;
            let lock_id = state.next_lock;
            state.next_lock += 1;
            let info = DeliveryInfo {
                delivery_count: stored.delivery_count,
                enqueued_at: stored.enqueued_at,
                transport_id: sequence.to_string(),
                locked_until: Some(wall_until),
            };
            let settle = MemorySettle {
                queue: self.clone(),
                sequence,
                lock: lock_id,
                message_id: stored.message.id.clone(),
            };
            deliveries.push(Delivery::new(
                stored.message.clone(),
                info,
                Box::new(settle),
            ));
            state.in_flight.insert(
                sequence,
                Locked {
                    stored,
                    lock: lock_id,
                    locked_until,
                },
            );
        }
        (deliveries, next_event)
    }

    /// Up to `max` messages that wait for delivery (delayed ones included), oldest first,
    /// left as they are.
    pub(super) fn peek(&self, max: usize) -> Vec<Peeked> {
        let now = Instant::now();
        let state = lock(&self.state);
        state
            .available
            .iter()
            .filter(|(_, stored)| stored.expires_at.is_none_or(|at| at > now))
            .take(max)
            .map(|(sequence, stored)| {
                Peeked::new(
                    stored.message.clone(),
                    stored.delivery_count,
                    stored.enqueued_at,
                    sequence.to_string(),
                )
            })
            .collect()
    }

    /// Messages waiting and locked, and the age of the oldest waiting one.
    pub(super) fn counts(&self) -> (u64, u64, Option<Duration>) {
        let now = Instant::now();
        let state = lock(&self.state);
        let waiting: Vec<&Stored> = state
            .available
            .values()
            .filter(|stored| stored.expires_at.is_none_or(|at| at > now))
            .collect();
        let oldest = waiting
            .iter()
            .map(|stored| stored.enqueued_at)
            .min()
            .map(|at| SystemTime::now().duration_since(at).unwrap_or_default());
        (waiting.len() as u64, state.in_flight.len() as u64, oldest)
    }

    /// Runs `f` on the locked message if this lock still holds it.
    fn with_lock<T>(
        &self,
        sequence: u64,
        lock_id: u64,
        message_id: &str,
        f: impl FnOnce(&Queue, &mut State) -> T,
    ) -> Result<T> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        self.expire_locks(&mut state, now);
        match state.in_flight.get(&sequence) {
            Some(locked) if locked.lock == lock_id => Ok(f(self, &mut state)),
            _ => Err(Error::LockLost {
                transport: TRANSPORT,
                message_id: message_id.to_string(),
            }),
        }
    }
}

/// A copy of `message` for a dead-letter queue, carrying the reason and description.
fn dead_lettered(mut message: Message, reason: &str, description: &str) -> Message {
    message
        .attributes
        .insert(DEAD_LETTER_REASON.to_string(), reason.to_string());
    message
        .attributes
        .insert(DEAD_LETTER_DESCRIPTION.to_string(), description.to_string());
    // Whatever delay or expiry the original had is over.
    message.deliver_at = None;
    message.time_to_live = None;
    message
}

struct MemorySettle {
    queue: Arc<Queue>,
    sequence: u64,
    lock: u64,
    message_id: String,
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.queue
            .with_lock(self.sequence, self.lock, &self.message_id, |_, state| {
                state.in_flight.remove(&self.sequence);
            })?;
        self.queue.changed.notify_waiters();
        Ok(())
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        self.queue.with_lock(
            self.sequence,
            self.lock,
            &self.message_id,
            |queue, state| {
                if let Some(locked) = state.in_flight.remove(&self.sequence) {
                    queue.requeue(state, self.sequence, locked.stored, Instant::now() + delay);
                }
            },
        )?;
        self.queue.changed.notify_waiters();
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, reason: &str, description: &str) -> Result<()> {
        let dead_letter = self
            .queue
            .dead_letter
            .clone()
            .ok_or_else(|| Error::Unsupported {
                transport: TRANSPORT,
                feature: "dead-lettering a message that is already in a dead-letter queue".into(),
            })?;
        self.queue
            .with_lock(self.sequence, self.lock, &self.message_id, |_, state| {
                // Copy into the dead-letter queue first; remove the original only if that
                // worked, so a full dead-letter queue cannot lose the message.
                if let Some(locked) = state.in_flight.get(&self.sequence) {
                    let copy = dead_lettered(locked.stored.message.clone(), reason, description);
                    dead_letter.enqueue(copy, false)?;
                    state.in_flight.remove(&self.sequence);
                }
                Ok::<_, Error>(())
            })??;
        self.queue.changed.notify_waiters();
        Ok(())
    }

    async fn extend(&mut self, by: Duration) -> Result<SystemTime> {
        self.queue
            .with_lock(self.sequence, self.lock, &self.message_id, |_, state| {
                if let Some(locked) = state.in_flight.get_mut(&self.sequence) {
                    locked.locked_until = Instant::now() + by;
                }
            })?;
        Ok(SystemTime::now() + by)
    }
}
