//! [`KafkaSubscriber`]: a member of the subscription's consumer group. A task of its own
//! fetches records of the partitions the group assigns it into the [`Ledger`], commits
//! each partition's settled prefix every `commit_interval`, and commits a partition's
//! position synchronously when the group revokes it; `receive` hands out what the ledger
//! allows. See [`crate::ledger`] for what settling means without broker-side locks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use cloudbus_core::driver::{DeliveryInfo, Settle, check_receive_max};
use cloudbus_core::subscriber::{
    DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON, MAX_DELIVERY_COUNT_EXCEEDED,
};
use cloudbus_core::{Delivery, Destination, Error, Message, Result, Subscriber};
use futures::FutureExt;
use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::TRANSPORT;
use crate::admin::{REQUEST_TIMEOUT, create_subscription};
use crate::client::{self, settings};
use crate::config::KafkaConfig;
use crate::error::map_error;
use crate::ledger::{Commit, Exhausted, Ledger, Position, Settlement};
use crate::mapping::{DEAD_LETTER_SOURCE, decode, encode};
use crate::publisher::Sender;

/// While the ledger is full, librdkafka is still polled this often (one record at a time),
/// so that the group's rebalances are served and `max.poll.interval.ms` never runs out.
const POLL_AT_LEAST_EVERY: Duration = Duration::from_secs(5);
/// Records taken from librdkafka's queue into the ledger at once, at most.
const FETCH_BATCH: usize = 256;
/// How long such a poll waits for a record.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// After a failed fetch, the pause before the next.
const FETCH_BACKOFF: Duration = Duration::from_millis(200);
/// A failed automatic dead-lettering is tried again after this long.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// Receives from a Kafka topic through a consumer group.
pub struct KafkaSubscriber {
    shared: Arc<Shared>,
    destination: Destination,
}

impl std::fmt::Debug for KafkaSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSubscriber")
            .field("topic", &self.shared.topic)
            .field("group", &self.shared.group)
            .finish_non_exhaustive()
    }
}

/// What the subscriber, its fetch task, its deliveries and the rebalance callbacks share.
struct Shared {
    topic: String,
    group: String,
    ledger: Arc<Mutex<Ledger>>,
    /// Wakes receive calls: records arrived, or the assignment changed.
    changed: Arc<Notify>,
    /// The ledger was full: the fetch task waits until half of it is settled.
    full: AtomicBool,
    /// Records the ledger holds at most before the fetch task waits.
    max_buffered: usize,
    /// Wakes the fetch task, waiting for room in a full ledger: records were settled.
    drained: Notify,
    /// Where dead-lettered records go, unless this subscriber reads a dead-letter topic.
    dead_letters: Option<Sender>,
    closed: AtomicBool,
    /// Stops the fetch task (on close, or when the subscriber is dropped).
    stop: CancellationToken,
    /// Cancelled by the fetch task once it has made its last commit and left the group.
    stopped: CancellationToken,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change to the ledger is one call that leaves it consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The consumer's context: MSK IAM tokens, and the ledger's side of rebalances.
struct Rebalancer {
    client: client::Context,
    topic: String,
    ledger: Arc<Mutex<Ledger>>,
    changed: Arc<Notify>,
}

impl ClientContext for Rebalancer {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        client::log(level, facility, message);
    }

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> std::result::Result<OAuthToken, Box<dyn std::error::Error>> {
        self.client.generate_oauth_token(config)
    }
}

impl ConsumerContext for Rebalancer {
    /// Before partitions go: commit each one's position (its oldest unsettled record), so
    /// the next owner starts there; their deliveries can no longer be settled here.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let revoked = match rebalance {
            Rebalance::Revoke(revoked) => revoked,
            Rebalance::Assign(_) => return,
            Rebalance::Error(error) => {
                tracing::warn!(
                    messaging.system = "kafka",
                    messaging.destination.name = %self.topic,
                    %error,
                    "the group's rebalance failed"
                );
                return;
            }
        };
        tracing::debug!(
            messaging.system = "kafka",
            messaging.destination.name = %self.topic,
            partitions = ?revoked.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(),
            "partitions revoked"
        );
        let commits: Vec<Commit> = {
            let mut ledger = lock(&self.ledger);
            revoked
                .elements()
                .iter()
                .filter(|e| e.topic() == self.topic)
                .filter_map(|e| ledger.revoke(e.partition()))
                .collect()
        };
        if commits.is_empty() {
            return;
        }
        match offsets(&self.topic, &commits) {
            Ok(list) => {
                if let Err(error) = consumer.commit(&list, CommitMode::Sync) {
                    tracing::warn!(
                        messaging.system = "kafka",
                        messaging.destination.name = %self.topic,
                        %error,
                        "cannot commit the positions of revoked partitions; their next owner \
                         reads again from the last commit"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "cannot build the revocation commit"),
        }
    }

    /// After partitions come: take them on from their committed positions (and the
    /// delivery counts recorded with them).
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else {
            return;
        };
        let ours: Vec<i32> = assigned
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        if ours.is_empty() {
            tracing::debug!(
                messaging.system = "kafka",
                messaging.destination.name = %self.topic,
                "assigned no new partition"
            );
            return;
        }
        let committed = consumer.committed_offsets((*assigned).clone(), REQUEST_TIMEOUT);
        let mut ledger = lock(&self.ledger);
        for partition in ours {
            let found = committed
                .as_ref()
                .ok()
                .and_then(|list| list.find_partition(&self.topic, partition));
            let (offset, metadata) = match &found {
                Some(element) => (
                    match element.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    },
                    element.metadata().to_string(),
                ),
                None => (None, String::new()),
            };
            ledger.assign(partition, offset, &metadata);
        }
        drop(ledger);
        self.changed.notify_waiters();
        tracing::debug!(
            messaging.system = "kafka",
            messaging.destination.name = %self.topic,
            partitions = ?assigned.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(),
            "partitions assigned"
        );
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(
                messaging.system = "kafka",
                messaging.destination.name = %self.topic,
                %error,
                "a commit failed; the next one carries the same positions"
            );
        }
    }
}

/// The offsets (and metadata) of `commits` as a partition list.
fn offsets(topic: &str, commits: &[Commit]) -> KafkaResult<TopicPartitionList> {
    let mut list = TopicPartitionList::new();
    for commit in commits {
        list.add_partition_offset(topic, commit.partition, Offset::Offset(commit.offset))?;
        if let Some(mut element) = list.find_partition(topic, commit.partition) {
            element.set_metadata(commit.metadata.clone());
        }
    }
    Ok(list)
}

impl KafkaSubscriber {
    /// Joins the consumer group of `config`'s subscription (creating the topic and its
    /// dead-letter topic with `create`, and pinning a new subscription's start).
    pub async fn connect(config: &KafkaConfig) -> Result<Self> {
        create_subscription(config).await?;
        let (topic, group) = config.source()?;
        let (mut settings, context) = settings(config).await?;
        let dead_letters = if config.dead_letter {
            None
        } else {
            let dlq = KafkaConfig::dead_letter_topic(&topic, &group);
            Some(Sender::connect(config, &dlq).await?)
        };
        let ledger = Arc::new(Mutex::new(Ledger::new(
            config.visibility,
            config.max_deliveries,
        )));
        let changed = Arc::new(Notify::new());
        let rebalancer = Rebalancer {
            client: context,
            topic: topic.clone(),
            ledger: ledger.clone(),
            changed: changed.clone(),
        };
        settings
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            // Partitions the pinning did not cover (added later) start at their beginning:
            // never skip a record.
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set(
                "session.timeout.ms",
                config.session_timeout.as_millis().max(1).to_string(),
            )
            // A third of the session timeout, as Kafka advises: a heartbeat late under
            // load does not cost the partitions (librdkafka's 3 s default would leave one
            // missed heartbeat of margin at a 6 s session timeout).
            .set(
                "heartbeat.interval.ms",
                (config.session_timeout.as_millis() / 3).max(1).to_string(),
            )
            .set("enable.partition.eof", "false");
        let consumer: StreamConsumer<Rebalancer> = settings
            .create_with_context(rebalancer)
            .map_err(|e| map_error("connect", &topic, e))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| map_error("subscribe", &topic, e))?;
        let shared = Arc::new(Shared {
            topic: topic.clone(),
            group: group.clone(),
            ledger,
            changed,
            full: AtomicBool::new(false),
            max_buffered: config.max_buffered.max(1),
            drained: Notify::new(),
            dead_letters,
            closed: AtomicBool::new(false),
            stop: CancellationToken::new(),
            stopped: CancellationToken::new(),
        });
        tokio::spawn(fetch(
            consumer,
            Arc::downgrade(&shared),
            shared.stop.clone(),
            shared.stopped.clone(),
            config.commit_interval,
        ));
        Ok(KafkaSubscriber {
            destination: Destination::new(TRANSPORT, topic).with_subscription(group),
            shared,
        })
    }
}

/// The fetch task: records into the ledger, and commits. It takes records from librdkafka
/// only while the ledger holds fewer than `max_buffered` (librdkafka then stops fetching on
/// its own once its queue is full: `queued.max.messages.kbytes`); pausing partitions would
/// make librdkafka throw away what it prefetched. While the ledger is full it still polls
/// once every [`POLL_AT_LEAST_EVERY`], so the group's rebalances are served.
async fn fetch(
    consumer: StreamConsumer<Rebalancer>,
    shared: std::sync::Weak<Shared>,
    stop: CancellationToken,
    stopped: CancellationToken,
    commit_interval: Duration,
) {
    let mut tick = tokio::time::interval(commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_poll = tokio::time::Instant::now();
    while let Some(room) = shared.upgrade().map(|shared| shared.room()) {
        let overdue = tokio::time::sleep_until(last_poll + POLL_AT_LEAST_EVERY);
        tokio::select! {
            () = stop.cancelled() => break,
            received = consumer.recv(), if room => {
                last_poll = tokio::time::Instant::now();
                let Some(shared) = shared.upgrade() else { break };
                match received {
                    Ok(first) => {
                        // What else librdkafka already holds, into the ledger at once.
                        let mut batch = vec![first];
                        while batch.len() < FETCH_BATCH {
                            match consumer.recv().now_or_never() {
                                Some(Ok(record)) => batch.push(record),
                                _ => break,
                            }
                        }
                        shared.push(&batch);
                    }
                    Err(error) => fetch_failed(&shared, error).await,
                }
            }
            () = overdue, if !room => {
                // Serves pending events, and takes one record if one is there.
                last_poll = tokio::time::Instant::now();
                let polled = tokio::time::timeout(POLL_WAIT, consumer.recv()).await;
                let Some(shared) = shared.upgrade() else { break };
                match polled {
                    Ok(Ok(record)) => shared.push(&[record]),
                    Ok(Err(error)) => fetch_failed(&shared, error).await,
                    Err(_) => {}
                }
            }
            () = drained(&shared), if !room => {}
            _ = tick.tick() => {
                let Some(shared) = shared.upgrade() else { break };
                shared.maintain();
                commit(&consumer, &shared, CommitMode::Async);
            }
        }
    }
    // Last commit, then leave the group (dropping the consumer closes it, and the
    // revocation callback commits each partition's position once more).
    if let Some(shared) = shared.upgrade() {
        commit(&consumer, &shared, CommitMode::Sync);
    }
    // On a thread of its own, not the runtime's blocking pool: librdkafka's close can wait
    // for a broker that is gone for good, and a runtime waits for its blocking tasks when
    // it shuts down, so the application's shutdown would hang with it.
    let (done, closed) = tokio::sync::oneshot::channel();
    let close = std::thread::Builder::new()
        .name("cloudbus-kafka-close".into())
        .spawn(move || {
            drop(consumer);
            let _ = done.send(());
        });
    if close.is_ok() && tokio::time::timeout(CLOSE_TIMEOUT, closed).await.is_err() {
        tracing::warn!(messaging.system = "kafka", timeout = ?CLOSE_TIMEOUT, "leaving the group did not finish in time (is the broker reachable?); the group takes the partitions back after the session timeout");
    }
    stopped.cancel();
}

/// How long closing a subscriber waits for the consumer to leave its group.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn fetch_failed(shared: &Shared, error: rdkafka::error::KafkaError) {
    tracing::warn!(
        messaging.system = "kafka",
        messaging.destination.name = %shared.topic,
        %error,
        "fetch failed; retrying"
    );
    tokio::time::sleep(FETCH_BACKOFF).await;
}

/// Resolves when records were settled while the ledger was full.
async fn drained(shared: &std::sync::Weak<Shared>) {
    match shared.upgrade() {
        Some(shared) => shared.drained.notified().await,
        None => std::future::pending().await,
    }
}

/// Commits every partition whose settled prefix moved.
fn commit(consumer: &StreamConsumer<Rebalancer>, shared: &Shared, mode: CommitMode) {
    let commits = lock(&shared.ledger).commits();
    if commits.is_empty() {
        return;
    }
    let outcome = offsets(&shared.topic, &commits).and_then(|list| consumer.commit(&list, mode));
    match outcome {
        Ok(()) => {
            let mut ledger = lock(&shared.ledger);
            for commit in &commits {
                ledger.committed(commit);
            }
        }
        Err(error) => tracing::warn!(
            messaging.system = "kafka",
            messaging.destination.name = %shared.topic,
            %error,
            "cannot commit; trying again at the next interval"
        ),
    }
}

impl Shared {
    /// Whether the fetch task may take more records: until the ledger holds
    /// `max_buffered`, then again once half of those are settled.
    fn room(&self) -> bool {
        let buffered = lock(&self.ledger).buffered();
        let full = if self.full.load(Ordering::Acquire) {
            buffered * 2 > self.max_buffered
        } else {
            buffered >= self.max_buffered
        };
        self.full.store(full, Ordering::Release);
        !full
    }

    /// Records left the ledger, which now holds `buffered`: wakes the fetch task if it
    /// waits for room and there is.
    fn settled(&self, buffered: usize) {
        self.changed.notify_waiters();
        if self.full.load(Ordering::Acquire) && buffered * 2 <= self.max_buffered {
            self.drained.notify_one();
        }
    }

    /// Fetched records into the ledger (decoded first, then added under one lock).
    fn push(&self, records: &[BorrowedMessage<'_>]) {
        let decoded: Vec<_> = records
            .iter()
            .map(|record| {
                let (partition, offset) = (record.partition(), record.offset());
                let decoded = decode(record.key(), record.payload(), record.headers(), || {
                    format!("{}/{partition}/{offset}", self.topic)
                });
                let enqueued_at = record
                    .timestamp()
                    .to_millis()
                    .filter(|ms| *ms >= 0)
                    .map_or_else(SystemTime::now, |ms| {
                        UNIX_EPOCH + Duration::from_millis(ms as u64)
                    });
                (partition, offset, decoded, enqueued_at)
            })
            .collect();
        let mut added = false;
        {
            let mut ledger = lock(&self.ledger);
            for (partition, offset, decoded, enqueued_at) in decoded {
                added |= ledger.push(
                    partition,
                    offset,
                    decoded.message,
                    enqueued_at,
                    decoded.expires_at,
                );
            }
        }
        if added {
            self.changed.notify_waiters();
        }
    }

    /// Moves records delivered too often to the dead-letter topic, and drops expired ones.
    fn maintain(self: &Arc<Self>) {
        let take = lock(&self.ledger).take(0, Instant::now());
        self.dead_letter_exhausted(take.exhausted);
    }

    fn dead_letter_exhausted(self: &Arc<Self>, exhausted: Vec<Exhausted>) {
        for record in exhausted {
            let shared = self.clone();
            tokio::spawn(async move {
                let description = format!(
                    "delivered {} times, the maximum for this subscription",
                    record.deliveries
                );
                let source = format!("{}/{}/{}", shared.topic, record.partition, record.offset);
                let moved = shared
                    .send_dead_letter(
                        &record.message,
                        MAX_DELIVERY_COUNT_EXCEEDED,
                        &description,
                        &source,
                    )
                    .await;
                if let Err(error) = &moved {
                    tracing::warn!(
                        messaging.system = "kafka",
                        messaging.destination.name = %shared.topic,
                        messaging.message.id = %record.message.id,
                        %error,
                        "cannot dead-letter a record past its max delivery count; trying again"
                    );
                }
                let buffered = {
                    let mut ledger = lock(&shared.ledger);
                    ledger.dead_lettered(
                        &record,
                        moved.is_ok(),
                        Instant::now() + DEAD_LETTER_RETRY,
                    );
                    ledger.buffered()
                };
                shared.settled(buffered);
            });
        }
    }

    /// Writes a copy of `message` with the reason to the dead-letter topic.
    async fn send_dead_letter(
        &self,
        message: &Message,
        reason: &str,
        description: &str,
        source: &str,
    ) -> Result<()> {
        let Some(sender) = &self.dead_letters else {
            return Err(Error::Unsupported {
                transport: TRANSPORT,
                feature: "dead-lettering a record of a dead-letter topic".into(),
            });
        };
        let mut copy = message.clone();
        copy.time_to_live = None;
        // Headers of another producer under cloudbus's prefix are not cloudbus's fields.
        copy.attributes.retain(|key, _| {
            !key.starts_with(crate::mapping::RESERVED_PREFIX)
                && key != cloudbus_core::subscriber::DEAD_LETTER_SOURCE
        });
        copy.attributes
            .insert(DEAD_LETTER_REASON.to_string(), reason.to_string());
        copy.attributes
            .insert(DEAD_LETTER_DESCRIPTION.to_string(), description.to_string());
        let mut record = encode(&copy, usize::MAX)?;
        record
            .headers
            .push((DEAD_LETTER_SOURCE.to_string(), source.to_string()));
        sender.send(&record).await
    }
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        check_receive_max(TRANSPORT, max)?;
        let shared = &self.shared;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if shared.closed.load(Ordering::Acquire) {
                return Err(Error::closed(TRANSPORT, "subscriber"));
            }
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let take = lock(&shared.ledger).take(max, now);
            shared.dead_letter_exhausted(take.exhausted);
            if !take.taken.is_empty() {
                let wall = SystemTime::now();
                return Ok(take
                    .taken
                    .into_iter()
                    .map(|taken| {
                        let info = DeliveryInfo {
                            delivery_count: taken.delivery_count,
                            enqueued_at: taken.enqueued_at,
                            transport_id: format!(
                                "{}/{}/{}",
                                shared.topic, taken.position.partition, taken.position.offset
                            ),
                            locked_until: Some(
                                wall + taken.locked_until.saturating_duration_since(now),
                            ),
                        };
                        let settle = KafkaSettle {
                            shared: shared.clone(),
                            position: taken.position,
                            message_id: taken.message.id.clone(),
                        };
                        Delivery::new(taken.message, info, Box::new(settle))
                    })
                    .collect());
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            let until = take
                .next_event
                .map(|at| tokio::time::Instant::from_std(at).min(deadline))
                .unwrap_or(deadline);
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Commits what is settled and leaves the group; the partitions go to the group's
    /// other members with their positions.
    async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.stop.cancel();
        self.shared.changed.notify_waiters();
        self.shared.stopped.cancelled().await;
        if let Some(sender) = &self.shared.dead_letters {
            sender.flush().await?;
        }
        Ok(())
    }

    /// A receive takes records from the subscriber's buffer only in the step that returns
    /// them: dropping it takes nothing.
    fn receive_is_cancel_safe(&self) -> bool {
        true
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}

impl Drop for KafkaSubscriber {
    fn drop(&mut self) {
        // The fetch task makes its last commit and leaves the group.
        self.shared.stop.cancel();
    }
}

/// A delivery's settlement: a change in the ledger of the subscriber that handed it out.
struct KafkaSettle {
    shared: Arc<Shared>,
    position: Position,
    message_id: String,
}

impl KafkaSettle {
    fn settle(&self, settlement: Settlement) -> Result<()> {
        let (outcome, buffered) = {
            let mut ledger = lock(&self.shared.ledger);
            let outcome = ledger.settle(self.position, settlement, Instant::now());
            (outcome, ledger.buffered())
        };
        if outcome.is_ok() {
            self.shared.settled(buffered);
        }
        outcome.map_err(|_| self.lock_lost())
    }

    fn lock_lost(&self) -> Error {
        Error::LockLost {
            transport: TRANSPORT,
            message_id: self.message_id.clone(),
        }
    }
}

#[async_trait]
impl Settle for KafkaSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settle(Settlement::Done)
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<()> {
        self.settle(Settlement::Release(delay))
    }

    /// Writes the copy to the dead-letter topic, then settles: a crash in between can
    /// duplicate the record there, never lose it.
    async fn dead_letter(self: Box<Self>, reason: &str, description: &str) -> Result<()> {
        // Still ours? (Keeps the lock while the copy is written.)
        self.settle(Settlement::Extend(Duration::from_secs(60)))?;
        let message = lock(&self.shared.ledger)
            .message(self.position)
            .ok_or_else(|| self.lock_lost())?;
        let source = format!(
            "{}/{}/{}",
            self.shared.topic, self.position.partition, self.position.offset
        );
        self.shared
            .send_dead_letter(&message, reason, description, &source)
            .await?;
        self.settle(Settlement::Done)
    }

    async fn extend(&mut self, by: Duration) -> Result<SystemTime> {
        self.settle(Settlement::Extend(by))?;
        Ok(SystemTime::now() + by)
    }
}
