//! What a subscriber knows about the partitions it holds: the records fetched and not yet
//! settled, which of them are handed out (and until when), and from that the offset each
//! partition may commit — never past an unsettled record.
//!
//! Kafka has no per-record locks or redelivery: a consumer group only remembers one
//! committed offset per partition. cloudbus builds the rest here, in the subscriber that
//! holds the partition:
//!
//! - A received record is locked for `visibility`; unsettled by then, it is handed out again
//!   with its delivery count plus one (as a queue's lock expiry would).
//! - `nack(delay)` hands the record out again no sooner than `delay`, in its place: the
//!   records behind it with the same key wait (key order holds), records of other keys and
//!   other partitions go on. A record delivered `max_deliveries` times is dead-lettered
//!   instead of handed out again.
//! - The committed offset of a partition is its oldest unsettled record (or the next to
//!   fetch): acks out of order never commit past an unacked record, so whatever a crash
//!   interrupts is read again by the next owner of the partition.
//! - Each assignment of a partition gets a new epoch; settling a delivery of an earlier
//!   epoch (the partition was revoked meanwhile) is `LockLost`, never an ack against the
//!   new owner's position.
//! - Delivery counts of unsettled records travel in the commit's metadata, so the next
//!   owner of a partition goes on counting (on brokers that keep commit metadata).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use cloudbus_core::Message;

/// Delivery counts written into a commit's metadata at most (its size is limited,
/// 4 KiB by default).
const MAX_COUNTS_IN_METADATA: usize = 64;

/// A record fetched and not yet settled.
#[derive(Debug)]
struct Pending {
    message: Message,
    enqueued_at: SystemTime,
    expires_at: Option<SystemTime>,
    /// Times handed out so far (counted by earlier owners too, where known).
    deliveries: u32,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Waiting to be handed out, from this instant (a nack's delay).
    Ready(Instant),
    /// Handed out under `lock` until `until`.
    Locked { lock: u64, until: Instant },
    /// Being moved to the dead-letter topic: handed out to no one.
    DeadLettering,
}

/// A partition held by this subscriber.
#[derive(Debug)]
struct Partition {
    epoch: u64,
    pending: BTreeMap<i64, Pending>,
    /// The offset after the last record fetched.
    next: Option<i64>,
    /// The offset last committed (or found committed at assignment).
    committed: Option<i64>,
    /// Delivery counts the previous owner recorded in the commit metadata.
    restored: HashMap<i64, u32>,
}

impl Partition {
    /// The offset this partition may commit: its oldest unsettled record, else the next
    /// one to fetch.
    fn commit_point(&self) -> Option<i64> {
        self.pending.keys().next().copied().or(self.next)
    }

    /// `offset:count` pairs of the unsettled records delivered before, for the metadata.
    fn counts(&self) -> String {
        self.pending
            .iter()
            .filter(|(_, p)| p.deliveries > 0)
            .take(MAX_COUNTS_IN_METADATA)
            .map(|(offset, p)| format!("{offset}:{}", p.deliveries))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Where a delivery came from, to settle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) epoch: u64,
    pub(crate) lock: u64,
}

/// A record handed out.
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) position: Position,
    pub(crate) message: Message,
    pub(crate) delivery_count: u32,
    pub(crate) enqueued_at: SystemTime,
    pub(crate) locked_until: Instant,
}

/// A record to move to the dead-letter topic because it was delivered too often.
#[derive(Debug)]
pub(crate) struct Exhausted {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) epoch: u64,
    pub(crate) message: Message,
    pub(crate) deliveries: u32,
}

/// An offset to commit, with the delivery counts of the records above it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Commit {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) metadata: String,
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Settlement {
    /// Done with it: it no longer holds the partition's commit point back.
    Done,
    /// Hand it out again no sooner than after this delay.
    Release(Duration),
    /// Keep it locked for this long from now.
    Extend(Duration),
}

/// The delivery's lock is no longer valid (it expired, or the partition moved).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LockLost;

/// The partitions a subscriber holds.
#[derive(Debug)]
pub(crate) struct Ledger {
    partitions: HashMap<i32, Partition>,
    next_epoch: u64,
    next_lock: u64,
    visibility: Duration,
    max_deliveries: u32,
    /// Where the next `take` starts, so no partition is always served last.
    rotation: usize,
}

impl Ledger {
    pub(crate) fn new(visibility: Duration, max_deliveries: u32) -> Ledger {
        Ledger {
            partitions: HashMap::new(),
            next_epoch: 1,
            next_lock: 1,
            visibility,
            max_deliveries: max_deliveries.max(1),
            rotation: 0,
        }
    }

    /// The partition is now ours, from `committed` on, with the delivery counts its last
    /// commit recorded (`offset:count,...`).
    pub(crate) fn assign(&mut self, partition: i32, committed: Option<i64>, metadata: &str) {
        let restored = metadata
            .split(',')
            .filter_map(|pair| pair.split_once(':'))
            .filter_map(|(o, c)| Some((o.trim().parse().ok()?, c.trim().parse().ok()?)))
            .collect();
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.partitions.insert(
            partition,
            Partition {
                epoch,
                pending: BTreeMap::new(),
                next: committed,
                committed,
                restored,
            },
        );
    }

    /// The partition is no longer ours: its final commit, if it has one to make. Its
    /// deliveries can no longer be settled.
    pub(crate) fn revoke(&mut self, partition: i32) -> Option<Commit> {
        let held = self.partitions.remove(&partition)?;
        let offset = held.commit_point()?;
        Some(Commit {
            partition,
            offset,
            metadata: held.counts(),
        })
    }

    /// Records fetched and not settled, in all partitions.
    pub(crate) fn buffered(&self) -> usize {
        self.partitions.values().map(|p| p.pending.len()).sum()
    }

    /// A fetched record. Records of partitions not held, and records before the
    /// partition's position (fetched before a revocation), are dropped: the owner reads them.
    pub(crate) fn push(
        &mut self,
        partition: i32,
        offset: i64,
        message: Message,
        enqueued_at: SystemTime,
        expires_at: Option<SystemTime>,
    ) -> bool {
        let Some(held) = self.partitions.get_mut(&partition) else {
            return false;
        };
        if held.next.is_some_and(|next| offset < next) || held.pending.contains_key(&offset) {
            return false;
        }
        let deliveries = held.restored.remove(&offset).unwrap_or(0);
        held.pending.insert(
            offset,
            Pending {
                message,
                enqueued_at,
                expires_at,
                deliveries,
                state: State::Ready(Instant::now()),
            },
        );
        held.next = Some(offset + 1);
        true
    }

    /// Hands out up to `max` records: in offset order within a partition, none while an
    /// earlier record of its key is unsettled, none whose nack delay runs. Also returns
    /// the records to dead-letter (delivered `max_deliveries` times), how many expired
    /// records (time to live) were dropped, and when to look again. Once `max` records are
    /// taken it looks no further (the rest waits for the next call, or for `take(0)`, which
    /// looks at everything).
    pub(crate) fn take(&mut self, max: usize, now: Instant) -> Take {
        let wall = SystemTime::now();
        let mut take = Take::default();
        let mut order: Vec<i32> = self.partitions.keys().copied().collect();
        order.sort_unstable();
        if !order.is_empty() {
            let start = self.rotation % order.len();
            order.rotate_left(start);
            self.rotation = self.rotation.wrapping_add(1);
        }
        for partition in order {
            if max > 0 && take.taken.len() >= max {
                break;
            }
            let Some(held) = self.partitions.get_mut(&partition) else {
                continue;
            };
            let mut blocked: HashSet<String> = HashSet::new();
            let mut expired = Vec::new();
            for (&offset, pending) in held.pending.iter_mut() {
                if let State::Locked { until, .. } = pending.state {
                    if until <= now {
                        pending.state = State::Ready(now);
                    }
                }
                let key = pending.message.ordering_key.clone();
                let State::Ready(at) = pending.state else {
                    // Handed out, or being dead-lettered: its key waits.
                    take.next_event = earliest(take.next_event, lock_end(pending.state));
                    blocked.extend(key);
                    continue;
                };
                if pending.expires_at.is_some_and(|at| at <= wall) {
                    expired.push(offset);
                    continue;
                }
                if key.as_ref().is_some_and(|k| blocked.contains(k)) {
                    continue;
                }
                blocked.extend(key);
                if at > now {
                    take.next_event = earliest(take.next_event, Some(at));
                    continue;
                }
                if pending.deliveries >= self.max_deliveries {
                    pending.state = State::DeadLettering;
                    take.exhausted.push(Exhausted {
                        partition,
                        offset,
                        epoch: held.epoch,
                        message: pending.message.clone(),
                        deliveries: pending.deliveries,
                    });
                    continue;
                }
                if take.taken.len() >= max {
                    if max > 0 {
                        break;
                    }
                    continue;
                }
                let lock = self.next_lock;
                self.next_lock += 1;
                let until = now + self.visibility;
                pending.deliveries += 1;
                pending.state = State::Locked { lock, until };
                take.next_event = earliest(take.next_event, Some(until));
                take.taken.push(Taken {
                    position: Position {
                        partition,
                        offset,
                        epoch: held.epoch,
                        lock,
                    },
                    message: pending.message.clone(),
                    delivery_count: pending.deliveries,
                    enqueued_at: pending.enqueued_at,
                    locked_until: until,
                });
            }
            take.expired += expired.len();
            for offset in expired {
                held.pending.remove(&offset);
            }
        }
        take
    }

    /// Settles a delivery, if its lock still holds.
    pub(crate) fn settle(
        &mut self,
        position: Position,
        settlement: Settlement,
        now: Instant,
    ) -> Result<(), LockLost> {
        let held = self
            .partitions
            .get_mut(&position.partition)
            .filter(|p| p.epoch == position.epoch)
            .ok_or(LockLost)?;
        let pending = held.pending.get_mut(&position.offset).ok_or(LockLost)?;
        match pending.state {
            State::Locked { lock, until } if lock == position.lock && until > now => {}
            _ => return Err(LockLost),
        }
        match settlement {
            Settlement::Done => {
                held.pending.remove(&position.offset);
            }
            Settlement::Release(delay) => pending.state = State::Ready(now + delay),
            Settlement::Extend(by) => {
                pending.state = State::Locked {
                    lock: position.lock,
                    until: now + by,
                }
            }
        }
        Ok(())
    }

    /// The message of a delivery whose lock still holds.
    pub(crate) fn message(&self, position: Position) -> Option<Message> {
        let held = self
            .partitions
            .get(&position.partition)
            .filter(|p| p.epoch == position.epoch)?;
        let pending = held.pending.get(&position.offset)?;
        match pending.state {
            State::Locked { lock, .. } if lock == position.lock => Some(pending.message.clone()),
            _ => None,
        }
    }

    /// A record the subscriber dead-lettered by itself ([`Take::exhausted`]): `moved`
    /// says whether the copy reached the dead-letter topic (else it is retried later).
    pub(crate) fn dead_lettered(&mut self, record: &Exhausted, moved: bool, retry: Instant) {
        let Some(held) = self
            .partitions
            .get_mut(&record.partition)
            .filter(|p| p.epoch == record.epoch)
        else {
            return;
        };
        if moved {
            held.pending.remove(&record.offset);
        } else if let Some(pending) = held.pending.get_mut(&record.offset) {
            // Still delivered too often: the next take moves it again.
            pending.state = State::Ready(retry);
        }
    }

    /// The commits due: each partition whose commit point moved since its last commit.
    pub(crate) fn commits(&self) -> Vec<Commit> {
        self.partitions
            .iter()
            .filter_map(|(&partition, held)| {
                let offset = held.commit_point()?;
                (held.committed != Some(offset)).then(|| Commit {
                    partition,
                    offset,
                    metadata: held.counts(),
                })
            })
            .collect()
    }

    /// `commit` reached the broker.
    pub(crate) fn committed(&mut self, commit: &Commit) {
        if let Some(held) = self.partitions.get_mut(&commit.partition) {
            held.committed = Some(commit.offset);
        }
    }
}

/// What [`Ledger::take`] found.
#[derive(Debug, Default)]
pub(crate) struct Take {
    pub(crate) taken: Vec<Taken>,
    pub(crate) exhausted: Vec<Exhausted>,
    pub(crate) expired: usize,
    pub(crate) next_event: Option<Instant>,
}

fn lock_end(state: State) -> Option<Instant> {
    match state {
        State::Locked { until, .. } => Some(until),
        _ => None,
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> Ledger {
        let mut ledger = Ledger::new(Duration::from_secs(30), 3);
        ledger.assign(0, Some(10), "");
        ledger
    }

    fn push(ledger: &mut Ledger, offset: i64, key: Option<&str>) {
        let mut message = Message::new(format!("m{offset}"));
        message.ordering_key = key.map(str::to_string);
        assert!(ledger.push(0, offset, message, SystemTime::now(), None));
    }

    fn offsets(taken: &[Taken]) -> Vec<i64> {
        taken.iter().map(|t| t.position.offset).collect()
    }

    #[test]
    fn out_of_order_acks_never_commit_past_an_unacked_record() {
        let mut ledger = ledger();
        for offset in 10..15 {
            push(&mut ledger, offset, None);
        }
        let now = Instant::now();
        let taken = ledger.take(10, now).taken;
        assert_eq!(offsets(&taken), vec![10, 11, 12, 13, 14]);
        for t in taken.iter().filter(|t| t.position.offset != 11) {
            ledger.settle(t.position, Settlement::Done, now).unwrap();
        }
        assert_eq!(
            ledger.commits()[0].offset,
            11,
            "held back by the unacked 11"
        );
        ledger
            .settle(taken[1].position, Settlement::Done, now)
            .unwrap();
        assert_eq!(ledger.commits()[0].offset, 15, "then everything fetched");
        let commit = ledger.commits().remove(0);
        ledger.committed(&commit);
        assert!(ledger.commits().is_empty(), "nothing new to commit");
    }

    #[test]
    fn a_key_waits_behind_its_retried_record_and_other_keys_go_on() {
        let mut ledger = ledger();
        push(&mut ledger, 10, Some("a"));
        push(&mut ledger, 11, Some("a"));
        push(&mut ledger, 12, Some("b"));
        push(&mut ledger, 13, None);
        let now = Instant::now();
        let first = ledger.take(10, now).taken;
        assert_eq!(
            offsets(&first),
            vec![10, 12, 13],
            "11 waits behind 10 (key a)"
        );
        ledger
            .settle(
                first[0].position,
                Settlement::Release(Duration::from_secs(5)),
                now,
            )
            .unwrap();
        let during = ledger.take(10, now + Duration::from_secs(1));
        assert!(
            during.taken.is_empty(),
            "10 is not due, and 11 waits for it"
        );
        assert_eq!(during.next_event, Some(now + Duration::from_secs(5)));
        let after = ledger.take(10, now + Duration::from_secs(5)).taken;
        assert_eq!(offsets(&after), vec![10]);
        assert_eq!(after[0].delivery_count, 2);
        ledger
            .settle(
                after[0].position,
                Settlement::Done,
                now + Duration::from_secs(5),
            )
            .unwrap();
        let next = ledger.take(10, now + Duration::from_secs(5)).taken;
        assert_eq!(offsets(&next), vec![11], "then the rest of key a, in order");
    }

    #[test]
    fn an_expired_lock_hands_the_record_out_again_and_the_old_lock_is_lost() {
        let mut ledger = ledger();
        push(&mut ledger, 10, None);
        let now = Instant::now();
        let first = ledger.take(1, now).taken.remove(0);
        let later = now + Duration::from_secs(31);
        let again = ledger.take(1, later).taken.remove(0);
        assert_eq!(again.delivery_count, 2);
        assert_eq!(
            ledger.settle(first.position, Settlement::Done, later),
            Err(LockLost)
        );
        ledger
            .settle(again.position, Settlement::Done, later)
            .unwrap();
    }

    #[test]
    fn extend_keeps_the_lock() {
        let mut ledger = ledger();
        push(&mut ledger, 10, None);
        let now = Instant::now();
        let taken = ledger.take(1, now).taken.remove(0);
        ledger
            .settle(
                taken.position,
                Settlement::Extend(Duration::from_secs(60)),
                now,
            )
            .unwrap();
        assert!(
            ledger
                .take(1, now + Duration::from_secs(45))
                .taken
                .is_empty()
        );
        ledger
            .settle(
                taken.position,
                Settlement::Done,
                now + Duration::from_secs(45),
            )
            .unwrap();
    }

    #[test]
    fn the_last_delivery_dead_letters_and_holds_the_key_until_moved() {
        let mut ledger = ledger();
        push(&mut ledger, 10, Some("a"));
        push(&mut ledger, 11, Some("a"));
        let mut now = Instant::now();
        for count in 1..=3 {
            let taken = ledger.take(10, now).taken;
            assert_eq!(offsets(&taken), vec![10]);
            assert_eq!(taken[0].delivery_count, count);
            ledger
                .settle(taken[0].position, Settlement::Release(Duration::ZERO), now)
                .unwrap();
            now += Duration::from_millis(1);
        }
        let take = ledger.take(10, now);
        assert!(take.taken.is_empty(), "11 waits while 10 is being moved");
        assert_eq!(take.exhausted.len(), 1);
        assert_eq!(take.exhausted[0].deliveries, 3);
        ledger.dead_lettered(&take.exhausted[0], true, now);
        assert_eq!(offsets(&ledger.take(10, now).taken), vec![11]);
        assert_eq!(
            ledger.commits()[0].offset,
            11,
            "past the dead-lettered record"
        );
    }

    #[test]
    fn a_revoked_partition_cannot_be_settled_and_commits_its_position() {
        let mut ledger = ledger();
        push(&mut ledger, 10, None);
        push(&mut ledger, 11, None);
        let now = Instant::now();
        let taken = ledger.take(10, now).taken;
        ledger
            .settle(taken[0].position, Settlement::Done, now)
            .unwrap();
        let last = ledger.revoke(0).expect("a final commit");
        assert_eq!(last.offset, 11);
        assert_eq!(last.metadata, "11:1", "11 was delivered once");
        ledger.assign(0, Some(11), &last.metadata);
        assert_eq!(
            ledger.settle(taken[1].position, Settlement::Done, now),
            Err(LockLost),
            "the old epoch's delivery is not acked against the new assignment"
        );
        push(&mut ledger, 11, None);
        let again = ledger.take(10, Instant::now()).taken;
        assert_eq!(
            again[0].delivery_count, 2,
            "the count goes on from the metadata"
        );
    }

    #[test]
    fn records_before_the_position_or_of_other_partitions_are_dropped() {
        let mut ledger = ledger();
        assert!(!ledger.push(0, 9, Message::new("old"), SystemTime::now(), None));
        assert!(!ledger.push(1, 10, Message::new("not ours"), SystemTime::now(), None));
        assert_eq!(ledger.buffered(), 0);
    }

    #[test]
    fn expired_records_are_dropped_and_committed_past() {
        let mut ledger = ledger();
        let past = SystemTime::now() - Duration::from_secs(1);
        assert!(ledger.push(0, 10, Message::new("stale"), past, Some(past)));
        let take = ledger.take(10, Instant::now());
        assert!(take.taken.is_empty());
        assert_eq!(take.expired, 1);
        assert_eq!(ledger.commits()[0].offset, 11);
    }
}
