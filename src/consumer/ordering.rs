//! Ordering keys: messages with the same key are handled one at a time, in the order they
//! were received.
//!
//! Brokers do not hand out a key's next message while one is locked, but one receive
//! call can return several messages of a key (an SQS FIFO batch of one message group).
//! Each delivery gets its own task at once (so its lock is renewed while it waits); a
//! delivery with a key waits for the [`Turn`] of the previous delivery of that key.
//! When a delivery is not settled for good (it was nacked for a retry, released or lost
//! its lock), the ones behind it are released too, so the broker delivers them again after
//! it, in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The last delivery of each key that has one in the consumer, by key.
type Tails = HashMap<String, (u64, oneshot::Receiver<bool>)>;

/// The chains of deliveries per ordering key. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Lanes {
    tails: Arc<Mutex<Tails>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

/// One delivery's place in its key's chain.
pub(crate) struct Turn {
    key: String,
    sequence: u64,
    previous: Option<oneshot::Receiver<bool>>,
    done: Option<oneshot::Sender<bool>>,
    tails: Arc<Mutex<Tails>>,
}

fn lock(tails: &Mutex<Tails>) -> MutexGuard<'_, Tails> {
    // The map is only ever changed by single inserts and removes: a panic cannot leave it
    // half-changed.
    tails
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Lanes {
    /// Puts a delivery with `key` at the end of its key's chain. Call in receive order.
    pub(crate) fn enter(&self, key: String) -> Turn {
        let sequence = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (done, tail) = oneshot::channel();
        let previous = {
            let mut tails = lock(&self.tails);
            let previous = tails.remove(&key).map(|(_, receiver)| receiver);
            tails.insert(key.clone(), (sequence, tail));
            previous
        };
        Turn {
            key,
            sequence,
            previous,
            done: Some(done),
            tails: self.tails.clone(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.tails).len()
    }
}

impl Turn {
    /// Waits until the previous delivery of the key is settled. `true` when it was acked or
    /// dead-lettered, so this one may go; `false` when this one must be released.
    pub(crate) async fn wait(&mut self) -> bool {
        match self.previous.take() {
            None => true,
            Some(previous) => previous.await.unwrap_or(false),
        }
    }

    /// Lets the next delivery of the key go (`settled` true) or makes it release itself.
    pub(crate) fn finish(mut self, settled: bool) {
        if let Some(done) = self.done.take() {
            // The next delivery may not exist; then no one listens.
            let _ = done.send(settled);
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // A turn dropped without `finish` (its task was stopped) releases the next one.
        let mut tails = lock(&self.tails);
        if tails
            .get(&self.key)
            .is_some_and(|(sequence, _)| *sequence == self.sequence)
        {
            tails.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_goes_in_order_and_a_failure_releases_the_rest() {
        let lanes = Lanes::default();
        let mut first = lanes.enter("k".into());
        let mut second = lanes.enter("k".into());
        let mut third = lanes.enter("k".into());
        let mut other = lanes.enter("other".into());
        assert!(first.wait().await, "the first of a key goes at once");
        assert!(other.wait().await, "other keys are independent");
        first.finish(true);
        assert!(second.wait().await);
        second.finish(false);
        assert!(!third.wait().await, "behind an unsettled message: release");
        drop(third);
        drop(other);
        assert_eq!(lanes.len(), 0, "finished chains leave nothing behind");
    }

    #[tokio::test]
    async fn a_dropped_turn_releases_the_next() {
        let lanes = Lanes::default();
        let first = lanes.enter("k".into());
        let mut second = lanes.enter("k".into());
        drop(first);
        assert!(!second.wait().await);
    }
}
