//! Ordering keys: messages with the same key are handled one at a time, in the order they
//! were received.
//!
//! Brokers do not hand out a key's next message while one is locked, but one receive
//! call can return several messages of a key (an SQS FIFO batch of one message group).
//! Each delivery gets its own task at once (so its lock is renewed while it waits); a
//! delivery with a key waits for the [`Turn`] of the previous delivery of that key.
//! When a delivery is not settled for good (it was nacked for a retry, released or lost
//! its lock), the ones behind it are released too, hidden for as long as it is (the retry's
//! delay), so the broker delivers them again after it, in order. (Releasing them at once
//! would be enough on SQS, which keeps a message group locked while any of its messages is
//! hidden, but LocalStack hands out the rest of a group as soon as one of them is visible.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

/// The last delivery of each key that has one in the consumer, by key.
type Tails = HashMap<String, (u64, oneshot::Receiver<Next>)>;

/// What a delivery of a key lets the next one of the key do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// It was settled for good (acked or dead-lettered): go.
    Go,
    /// It comes back after this delay (zero: at once): release the next one hidden for
    /// as long, so that it cannot come back first.
    Release(Duration),
}

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
    previous: Option<oneshot::Receiver<Next>>,
    done: Option<oneshot::Sender<Next>>,
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
    /// Waits until the previous delivery of the key is settled, and says whether this one
    /// may go or must be released (a previous turn dropped unfinished: at once).
    pub(crate) async fn wait(&mut self) -> Next {
        match self.previous.take() {
            None => Next::Go,
            Some(previous) => previous.await.unwrap_or(Next::Release(Duration::ZERO)),
        }
    }

    /// Lets the next delivery of the key go, or makes it release itself.
    pub(crate) fn finish(mut self, next: Next) {
        if let Some(done) = self.done.take() {
            // The next delivery may not exist; then no one listens.
            let _ = done.send(next);
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
        assert_eq!(
            first.wait().await,
            Next::Go,
            "the first of a key goes at once"
        );
        assert_eq!(other.wait().await, Next::Go, "other keys are independent");
        first.finish(Next::Go);
        assert_eq!(second.wait().await, Next::Go);
        let retry = Next::Release(Duration::from_secs(3));
        second.finish(retry);
        assert_eq!(
            third.wait().await,
            retry,
            "behind a retried message: release, hidden as long"
        );
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
        assert_eq!(second.wait().await, Next::Release(Duration::ZERO));
    }
}
