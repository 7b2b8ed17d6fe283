//! Idempotent handling: skip a message id that was already processed successfully.
//!
//! Delivery is at-least-once, so a handler sees duplicates: a redelivery after a lost ack,
//! or a message that a publisher retried. [`Idempotent`] wraps a handler and asks an
//! [`IdempotencyStore`] before each call, with a claim/complete protocol:
//!
//! 1. [`claim`](IdempotencyStore::claim) the message id for a lease (how long processing
//!    may take). [`Claim::Done`]: already processed, ack without calling the handler.
//!    [`Claim::InProgress`]: a duplicate is being processed elsewhere right now, retry
//!    later (a transient error). [`Claim::Acquired`]: go on.
//! 2. After the handler succeeds, [`complete`](IdempotencyStore::complete) the id; after it
//!    fails, [`release`](IdempotencyStore::release) it so a retry can claim it again.
//!
//! [`MemoryIdempotencyStore`] keeps the ids in the process (bounded by age and count): it
//! catches duplicates within one instance. For several instances, implement the trait
//! over a shared store (for example Redis `SET id NX PX lease` to claim, `SET id done EX
//! ttl` to complete, `DEL` to release).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::handler::{Context, Handler, HandlerError};
use crate::{Message, Result};

/// What [`IdempotencyStore::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The id is now claimed by the caller, for the lease.
    Acquired,
    /// Another claim on the id holds an unexpired lease.
    InProgress,
    /// The id was processed successfully.
    Done,
}

/// Where [`Idempotent`] records which message ids were processed.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims `id` for `lease`, unless it is done or claimed by someone else.
    async fn claim(&self, id: &str, lease: Duration) -> Result<Claim>;
    /// Records `id` as processed successfully.
    async fn complete(&self, id: &str) -> Result<()>;
    /// Gives up a claim on `id` (processing failed), so it can be claimed again.
    async fn release(&self, id: &str) -> Result<()>;
}

/// An in-process [`IdempotencyStore`], bounded: an id is remembered for `ttl` after it was
/// completed, and at most `max_entries` ids are kept (the oldest are forgotten first).
///
/// ```
/// # async fn run() -> cloudbus_core::Result<()> {
/// use std::time::Duration;
/// use cloudbus_core::consumer::{Claim, IdempotencyStore, MemoryIdempotencyStore};
///
/// let store = MemoryIdempotencyStore::new(Duration::from_secs(3600), 100_000);
/// assert_eq!(store.claim("id-1", Duration::from_secs(60)).await?, Claim::Acquired);
/// assert_eq!(store.claim("id-1", Duration::from_secs(60)).await?, Claim::InProgress);
/// store.complete("id-1").await?;
/// assert_eq!(store.claim("id-1", Duration::from_secs(60)).await?, Claim::Done);
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Debug)]
pub struct MemoryIdempotencyStore {
    ttl: Duration,
    max_entries: usize,
    state: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    next: u64,
    by_id: HashMap<String, Entry>,
    /// Ids in the order their entries were written, with the write's number; stale rows
    /// (the id was written again since) are skipped when popped.
    order: VecDeque<(u64, String)>,
}

#[derive(Debug)]
struct Entry {
    number: u64,
    state: State,
    until: Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Claimed,
    Done,
}

impl MemoryIdempotencyStore {
    /// A store that remembers completed ids for `ttl`, and at most `max_entries` ids.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        MemoryIdempotencyStore {
            ttl,
            max_entries: max_entries.max(1),
            state: Mutex::new(Entries::default()),
        }
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
        // Every change is a single insert or remove: a panic cannot leave it half-changed.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many ids the store holds now.
    pub fn len(&self) -> usize {
        self.entries().by_id.len()
    }

    /// Whether the store holds no ids.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Entries {
    fn write(&mut self, id: &str, state: State, until: Instant, max_entries: usize) {
        let number = self.next;
        self.next += 1;
        self.by_id.insert(
            id.to_string(),
            Entry {
                number,
                state,
                until,
            },
        );
        self.order.push_back((number, id.to_string()));
        self.evict(Instant::now(), max_entries);
        // Rows of rewritten or released ids pile up behind a live front row: drop them once
        // they outnumber the entries, so memory stays bounded by `max_entries`.
        if self.order.len() > 2 * self.by_id.len() + 16 {
            let by_id = &self.by_id;
            self.order
                .retain(|(number, id)| by_id.get(id).is_some_and(|e| e.number == *number));
        }
    }

    /// Forgets expired entries at the front, and the oldest ones beyond `max_entries`.
    fn evict(&mut self, now: Instant, max_entries: usize) {
        while let Some((number, id)) = self.order.front() {
            let current = self.by_id.get(id).filter(|e| e.number == *number);
            let drop_it = match current {
                None => true, // stale row
                Some(entry) => entry.until <= now || self.by_id.len() > max_entries,
            };
            if !drop_it {
                break;
            }
            if current.is_some() {
                self.by_id.remove(id);
            }
            self.order.pop_front();
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn claim(&self, id: &str, lease: Duration) -> Result<Claim> {
        let now = Instant::now();
        let mut entries = self.entries();
        entries.evict(now, self.max_entries);
        match entries.by_id.get(id) {
            Some(entry) if entry.until > now && entry.state == State::Done => Ok(Claim::Done),
            Some(entry) if entry.until > now => Ok(Claim::InProgress),
            _ => {
                entries.write(id, State::Claimed, now + lease, self.max_entries);
                Ok(Claim::Acquired)
            }
        }
    }

    async fn complete(&self, id: &str) -> Result<()> {
        let until = Instant::now() + self.ttl;
        self.entries()
            .write(id, State::Done, until, self.max_entries);
        Ok(())
    }

    async fn release(&self, id: &str) -> Result<()> {
        let mut entries = self.entries();
        if entries
            .by_id
            .get(id)
            .is_some_and(|entry| entry.state == State::Claimed)
        {
            entries.by_id.remove(id);
        }
        Ok(())
    }
}

/// A handler that runs `inner` at most once per message id that succeeded, as recorded
/// in an [`IdempotencyStore`]. A duplicate of a processed message is acked without
/// calling `inner`; a duplicate of one being processed right now is retried later.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use cloudbus_core::Message;
/// use cloudbus_core::consumer::{Context, HandlerError, Idempotent, MemoryIdempotencyStore};
///
/// let store = Arc::new(MemoryIdempotencyStore::new(Duration::from_secs(3600), 100_000));
/// let handler = Idempotent::new(
///     |message: Message, _context: Context| async move {
///         println!("charging for {}", message.id);
///         Ok::<_, HandlerError>(())
///     },
///     store,
/// );
/// # let _ = handler;
/// ```
pub struct Idempotent<H> {
    inner: H,
    store: Arc<dyn IdempotencyStore>,
    lease: Duration,
}

impl<H: Handler> Idempotent<H> {
    /// Wraps `inner`. The lease of a claim defaults to 5 minutes (the default maximum lock
    /// renewal): set it to the longest time the handler may take.
    pub fn new(inner: H, store: Arc<dyn IdempotencyStore>) -> Self {
        Idempotent {
            inner,
            store,
            lease: Duration::from_secs(300),
        }
    }

    /// How long a claim holds before another delivery of the same id may take over.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
}

#[async_trait]
impl<H: Handler> Handler for Idempotent<H> {
    async fn handle(&self, message: Message, context: Context) -> Result<(), HandlerError> {
        let id = message.id.clone();
        match self.store.claim(&id, self.lease).await? {
            Claim::Done => {
                tracing::debug!(messaging.message.id = %id, "already processed: skipping");
                return Ok(());
            }
            Claim::InProgress => {
                return Err(HandlerError::transient(format!(
                    "message `{id}` is being processed by another delivery"
                )));
            }
            Claim::Acquired => {}
        }
        let outcome = self.inner.handle(message, context).await;
        let recorded = match &outcome {
            Ok(()) => self.store.complete(&id).await,
            Err(_) => self.store.release(&id).await,
        };
        if let Err(error) = recorded {
            // The handler's outcome stands; at worst a duplicate is processed again.
            tracing::warn!(messaging.message.id = %id, %error, "cannot record in the idempotency store");
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn claim_complete_release() {
        let store = MemoryIdempotencyStore::new(Duration::from_secs(60), 10);
        assert_eq!(store.claim("a", LEASE).await.ok(), Some(Claim::Acquired));
        assert_eq!(store.claim("a", LEASE).await.ok(), Some(Claim::InProgress));
        store.release("a").await.expect("release");
        assert_eq!(store.claim("a", LEASE).await.ok(), Some(Claim::Acquired));
        store.complete("a").await.expect("complete");
        assert_eq!(store.claim("a", LEASE).await.ok(), Some(Claim::Done));
        store
            .release("a")
            .await
            .expect("release of a done id does nothing");
        assert_eq!(store.claim("a", LEASE).await.ok(), Some(Claim::Done));
    }

    #[tokio::test]
    async fn expired_claims_and_entries_are_forgotten() {
        let store = MemoryIdempotencyStore::new(Duration::ZERO, 10);
        assert_eq!(
            store.claim("a", Duration::ZERO).await.ok(),
            Some(Claim::Acquired)
        );
        assert_eq!(
            store.claim("a", LEASE).await.ok(),
            Some(Claim::Acquired),
            "an expired lease can be taken over"
        );
        store.complete("a").await.expect("complete");
        assert_eq!(store.claim("b", LEASE).await.ok(), Some(Claim::Acquired));
        assert_eq!(store.len(), 1, "the expired done entry was dropped");
    }

    #[tokio::test]
    async fn holds_at_most_max_entries() {
        let store = MemoryIdempotencyStore::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            let id = format!("id-{i}");
            store.claim(&id, LEASE).await.expect("claim");
            store.complete(&id).await.expect("complete");
            assert!(store.len() <= 3, "{} entries", store.len());
        }
        assert_eq!(store.claim("id-9", LEASE).await.ok(), Some(Claim::Done));
        assert_eq!(
            store.claim("id-0", LEASE).await.ok(),
            Some(Claim::Acquired),
            "the oldest ids are forgotten first"
        );
    }
}
