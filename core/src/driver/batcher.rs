//! Automatic batching: concurrent calls coalesced into the transport's batch calls —
//! [`crate::Publisher::publish`] into SendMessageBatch, PublishBatch or one Service Bus
//! transfer, SQS acks into DeleteMessageBatch.
//!
//! Each call still gets its own outcome: an item is reported done only once the batch call
//! that carried it has succeeded for it. A lone call goes out at once; while other batch calls
//! are in flight, a batch waits up to the linger (counted from its first item's arrival) to
//! fill, so batching grows with load. Past the linger, a batch that is still not full waits
//! on while more than one other call is in flight (until one ends or the batch fills): with
//! a slow broker, small batches would only add calls and slow it down further. Closing
//! sends everything already queued and waits for the calls in flight.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// Sends one batch and reports one outcome per item, in order.
pub type SendBatch<T> = Arc<dyn Fn(Vec<T>) -> BoxFuture<'static, Vec<Result<()>>> + Send + Sync>;

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Items per batch call at most.
    pub max_items: usize,
    /// Bytes per batch call at most (as the items' sizes count them).
    pub max_bytes: usize,
    /// How long a batch may wait to fill while other calls are in flight.
    pub linger: Duration,
    /// Batch calls in flight at most.
    pub max_calls: usize,
}

/// The handle a publisher (or an SQS subscriber, for its deletes) holds; its task does
/// the batching.
pub struct Batcher<T> {
    transport: &'static str,
    /// What the batcher serves (`publisher`, `subscriber`), for the closed error.
    owner: &'static str,
    items: mpsc::UnboundedSender<Item<T>>,
    close: CancellationToken,
    finished: CancellationToken,
}

struct Item<T> {
    value: T,
    bytes: usize,
    group: Option<String>,
    arrived: Instant,
    done: oneshot::Sender<Result<()>>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the batching task. Items wait in memory only while their callers wait for
    /// them, so memory is bounded by the number of concurrent callers.
    pub fn start(
        transport: &'static str,
        owner: &'static str,
        limits: Limits,
        send: SendBatch<T>,
    ) -> Self {
        let (items, incoming) = mpsc::unbounded_channel();
        let close = CancellationToken::new();
        let finished = CancellationToken::new();
        tokio::spawn(run(
            transport,
            incoming,
            limits,
            send,
            close.clone(),
            finished.clone(),
        ));
        Batcher {
            transport,
            owner,
            items,
            close,
            finished,
        }
    }

    /// Queues `value` (of `bytes` bytes) for the next batch and waits for its outcome.
    /// Items of different `group`s never share a batch (Service Bus wants one partition
    /// key per batch).
    pub async fn send(&self, value: T, bytes: usize, group: Option<String>) -> Result<()> {
        let (done, outcome) = oneshot::channel();
        let item = Item {
            value,
            bytes,
            group,
            arrived: Instant::now(),
            done,
        };
        self.items
            .send(item)
            .map_err(|_| Error::closed(self.transport, self.owner))?;
        outcome.await.unwrap_or_else(|_| {
            Err(Error::transport(
                self.transport,
                "the batching task stopped; the message may or may not have been sent",
                true,
                None,
            ))
        })
    }

    /// Sends what is queued, waits for the calls in flight, and refuses further items.
    pub async fn close(&self) {
        self.close.cancel();
        self.finished.cancelled().await;
    }
}

/// How a wait for a fuller batch ended.
enum Wait<T> {
    /// Send the batch now.
    Go,
    /// An item, or `None` once the channel is closed and empty.
    Item(Option<Item<T>>),
    /// Time to look again at the linger and the calls in flight.
    Recheck,
}

/// Past its linger, a partial batch goes out only while at most this many other calls are
/// in flight (full batches go whenever a call slot is free).
const PARTIAL_CALLS: usize = 1;

async fn run<T: Send + 'static>(
    transport: &'static str,
    mut incoming: mpsc::UnboundedReceiver<Item<T>>,
    limits: Limits,
    send: SendBatch<T>,
    close: CancellationToken,
    finished: CancellationToken,
) {
    let max_calls = limits.max_calls.max(1);
    let calls = Arc::new(Semaphore::new(max_calls));
    // Signalled whenever a call ends (a stored permit if nobody waits).
    let call_done = Arc::new(Notify::new());
    let mut carried: Option<Item<T>> = None;
    let mut closing = false;
    loop {
        let first = match carried.take() {
            Some(item) => item,
            None if closing => match incoming.recv().await {
                Some(item) => item,
                None => break,
            },
            None => tokio::select! {
                biased;
                item = incoming.recv() => match item {
                    Some(item) => item,
                    None => break,
                },
                () = close.cancelled() => {
                    // Refuse new items; the ones already queued are still received.
                    closing = true;
                    incoming.close();
                    continue;
                }
            },
        };
        let Ok(permit) = calls.clone().acquire_owned().await else {
            break;
        };
        // Calls in flight besides the one this batch will make.
        let others = || max_calls - calls.available_permits() - 1;
        // Another call in flight means load: wait (up to the linger) for a fuller batch.
        let deadline = if others() > 0 && !closing {
            first.arrived + limits.linger
        } else {
            first.arrived
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < limits.max_items {
            let next = match incoming.try_recv() {
                Ok(item) => Some(item),
                Err(TryRecvError::Disconnected) => None,
                Err(TryRecvError::Empty) => {
                    let lingering = Instant::now() < deadline;
                    // Past the linger, a partial batch still waits while more than
                    // PARTIAL_CALLS other calls are in flight: with a slow broker, small
                    // batches would only add calls and slow it down further.
                    let crowded = others() > PARTIAL_CALLS;
                    if closing || !(lingering || crowded) {
                        None
                    } else {
                        let wait = tokio::select! {
                            // A close ends the wait: the batch goes out now.
                            () = close.cancelled(), if !closing => Wait::Go,
                            item = incoming.recv() => Wait::Item(item),
                            () = tokio::time::sleep_until(deadline), if lingering => Wait::Recheck,
                            () = call_done.notified(), if !lingering => Wait::Recheck,
                        };
                        match wait {
                            Wait::Go => None,
                            Wait::Item(item) => item,
                            Wait::Recheck => continue,
                        }
                    }
                }
            };
            let Some(item) = next else {
                break;
            };
            if bytes + item.bytes > limits.max_bytes || item.group != batch[0].group {
                carried = Some(item);
                break;
            }
            bytes += item.bytes;
            batch.push(item);
        }
        let (send, call_done) = (send.clone(), call_done.clone());
        tokio::spawn(async move {
            let (values, dones): (Vec<T>, Vec<_>) = batch
                .into_iter()
                .map(|item| (item.value, item.done))
                .unzip();
            let mut outcomes = send(values).await.into_iter();
            for done in dones {
                let outcome = outcomes
                    .next()
                    .unwrap_or_else(|| Err(Error::unreported(transport)));
                let _ = done.send(outcome);
            }
            drop(permit);
            call_done.notify_one();
        });
    }
    // Wait for the calls in flight.
    let _ = calls.acquire_many(max_calls as u32).await;
    finished.cancel();
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn recording(calls: Calls, delay: Duration, fail: Option<u32>) -> SendBatch<u32> {
        Arc::new(move |batch: Vec<u32>| {
            let calls = calls.clone();
            Box::pin(async move {
                calls.lock().map(|mut c| c.push(batch.clone())).ok();
                tokio::time::sleep(delay).await;
                batch
                    .iter()
                    .map(|v| {
                        if Some(*v) == fail {
                            Err(Error::transport("test", "refused", false, None))
                        } else {
                            Ok(())
                        }
                    })
                    .collect()
            })
        })
    }

    /// Sends `count` values concurrently, each of `bytes` bytes and in the group `group`
    /// gives it; every outcome, in order.
    async fn send_all(
        batcher: &Arc<Batcher<u32>>,
        count: u32,
        bytes: usize,
        group: impl Fn(u32) -> Option<String>,
    ) -> Vec<Result<()>> {
        let sends = (0..count).map(|v| {
            let (batcher, group) = (batcher.clone(), group(v));
            async move { batcher.send(v, bytes, group).await }
        });
        futures::future::join_all(sends).await
    }

    /// The batches sent, in the order their calls started.
    type Calls = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A batcher whose calls take `delay`, fail for the value `fail`, and are recorded.
    fn started(limits: Limits, delay: Duration, fail: Option<u32>) -> (Arc<Batcher<u32>>, Calls) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let send = recording(calls.clone(), delay, fail);
        let batcher = Arc::new(Batcher::start("test", "publisher", limits, send));
        (batcher, calls)
    }

    fn limits(linger: Duration) -> Limits {
        Limits {
            max_items: 10,
            max_bytes: 1000,
            linger,
            max_calls: 2,
        }
    }

    #[tokio::test]
    async fn concurrent_sends_are_coalesced_and_each_gets_its_outcome() {
        let (batcher, calls) = started(
            limits(Duration::from_millis(20)),
            Duration::from_millis(20),
            Some(7),
        );
        for (v, outcome) in send_all(&batcher, 40, 10, |_| None)
            .await
            .iter()
            .enumerate()
        {
            assert_eq!(outcome.is_err(), v == 7, "{v}: {outcome:?}");
        }
        let calls = calls.lock().unwrap().clone();
        let mut sent: Vec<u32> = calls.iter().flatten().copied().collect();
        sent.sort_unstable();
        assert_eq!(sent, (0..40).collect::<Vec<_>>());
        assert!(calls.iter().all(|c| c.len() <= 10), "{calls:?}");
        assert!(calls.len() < 40, "not coalesced: {calls:?}");
    }

    #[tokio::test]
    async fn byte_limit_splits_batches() {
        let (batcher, calls) = started(
            limits(Duration::from_millis(20)),
            Duration::from_millis(5),
            None,
        );
        let outcomes = send_all(&batcher, 6, 400, |_| None).await;
        assert!(outcomes.iter().all(Result::is_ok));
        let calls = calls.lock().unwrap().clone();
        assert!(calls.iter().all(|c| c.len() <= 2), "{calls:?}");
    }

    #[tokio::test]
    async fn groups_never_share_a_batch() {
        let (batcher, calls) = started(
            limits(Duration::from_millis(20)),
            Duration::from_millis(5),
            None,
        );
        let outcomes = send_all(&batcher, 30, 1, |v| Some((v % 3).to_string())).await;
        assert!(outcomes.iter().all(Result::is_ok));
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 30);
        assert!(
            calls.iter().all(|c| c.iter().all(|v| v % 3 == c[0] % 3)),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn past_the_linger_a_partial_batch_waits_while_calls_crowd() {
        let limits = Limits {
            max_calls: 4,
            ..limits(Duration::from_millis(1))
        };
        let (batcher, calls) = started(limits, Duration::from_millis(300), None);
        let calls_started = |n: usize| {
            let calls = calls.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while calls.lock().unwrap().len() < n {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
                .await
                .expect("calls started");
            }
        };
        let send = |v: u32| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.send(v, 1, None).await })
        };
        // Alone: at once. With one other call in flight: after the linger.
        let mut sends = vec![send(0)];
        calls_started(1).await;
        sends.push(send(1));
        calls_started(2).await;
        // With two in flight, what comes later, one by one, waits and goes together.
        for v in 2..5 {
            sends.push(send(v));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for task in sends {
            task.await.unwrap().unwrap();
        }
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls, vec![vec![0], vec![1], vec![2, 3, 4]]);
    }

    #[tokio::test]
    async fn close_sends_what_is_queued_and_then_refuses() {
        let (batcher, calls) = started(
            limits(Duration::from_secs(60)),
            Duration::from_millis(50),
            None,
        );
        let pending: Vec<_> = (0..25u32)
            .map(|v| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.send(v, 1, None).await })
            })
            .collect();
        tokio::task::yield_now().await;
        batcher.close().await;
        let mut succeeded = 0;
        for task in pending {
            // Every send queued before the close was sent; later ones are refused.
            match task.await.unwrap() {
                Ok(()) => succeeded += 1,
                Err(Error::Closed { .. }) => {}
                Err(other) => panic!("{other}"),
            }
        }
        let sent: usize = calls.lock().unwrap().iter().map(Vec::len).sum();
        assert!(sent > 0);
        assert_eq!(sent, succeeded);
        assert!(matches!(
            batcher.send(99, 1, None).await,
            Err(Error::Closed { .. })
        ));
    }
}
