//! The fault suite: the same fault cases for every transport, over `dyn Publisher` /
//! `dyn Subscriber`, with a [`FaultProxy`] between the clients and the broker.
//!
//! A harness implements [`FaultHarness`] on top of [`Harness`]: where its broker listens,
//! and how to make and reach a named entity through another address (the proxy's). An
//! adapter expands [`fault_tests!`](crate::fault_tests) in a test file:
//!
//! ```ignore
//! mod faults {
//!     cloudbus_testkit::fault_tests!(crate::harness::MyHarness::new());
//! }
//! ```
//!
//! The cases:
//! - [`fault_cut_connections_twice_lose_nothing`]: every connection cut twice during the
//!   stream; publishers and consumers recover by themselves.
//! - [`fault_stalled_broker_resumes_and_loses_nothing`]: the network to the broker stalls
//!   (the proxy's `pause`) for the harness's [`FaultHarness::outage`], longer than the
//!   clients' timeouts; a publish meanwhile fails transiently instead of hanging, and the
//!   consumer resumes. The shared broker itself is never stopped, so the other tests of
//!   the binary, which use it at the same time, are not disturbed.
//! - [`fault_slow_broker_renews_locks_in_time`]: latency on every chunk while handlers
//!   take twice the lock duration; the locks are renewed in time.
//! - [`fault_unreachable_broker_fails_publish_transiently`]: the proxy refuses
//!   connections; a publish fails with a transient error within the publish timeout.
//! - [`fault_killed_consumer_loses_nothing`]: the consumer runs in a child process (the
//!   test binary itself, running its ignored `fault_consumer_child` test), killed with
//!   SIGKILL at a random point of the stream and started again.
//! - Graceful shutdown with 16 handlers in flight is the consumer suite's
//!   [`consumer_shutdown_lets_in_flight_handlers_finish`](crate::consumer_shutdown_lets_in_flight_handlers_finish).
//!
//! Each case reports its figures (messages, lost, duplicates, recovery time) on stderr as a
//! row of RELIABILITY.md's table, and appends the row to the file `CLOUDBUS_FAULT_REPORT`
//! names. Only lost = 0 (and no duplicates where the transport promises none) is asserted;
//! duplicates and recovery times are reported, never asserted as timings.
//!
//! `CLOUDBUS_FAULT_FULL=1` runs the issue's sizes (10,000 messages for the cuts, 5,000 for
//! the killed consumer); without it, CI's shortened ones.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_core::consumer::{CancellationToken, Consumer, Context, Summary};
use cloudbus_core::{Message, Publisher, Result};

use super::consumer::{consumer, lock, wait_until};
use super::{Entity, FaultProxy, Harness, Spec};

/// The longest a case waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(120);

/// The environment variable that hands the child process its work:
/// `<entity name> <proxy address> <file of handled ids>`.
pub const FAULT_CHILD: &str = "CLOUDBUS_FAULT_CHILD";

/// Writes one `#[test]` per fault case for the harness that `$harness` (a
/// [`FaultHarness`]) builds, and the ignored `fault_consumer_child` test that
/// `fault_killed_consumer_loses_nothing` runs as its child process.
#[macro_export]
macro_rules! fault_tests {
    ($harness:expr) => {
        $crate::__tests!([] $harness;
            fault_cut_connections_twice_lose_nothing,
            fault_stalled_broker_resumes_and_loses_nothing,
            fault_slow_broker_renews_locks_in_time,
            fault_unreachable_broker_fails_publish_transiently,
        );

        #[test]
        fn fault_killed_consumer_loses_nothing() {
            $crate::run(async {
                let harness = $harness;
                $crate::fault_killed_consumer_loses_nothing(&harness, module_path!()).await;
            });
        }

        #[test]
        #[ignore = "the consumer process that fault_killed_consumer_loses_nothing starts and kills"]
        fn fault_consumer_child() {
            $crate::run(async {
                let harness = $harness;
                $crate::fault_consumer_child(&harness).await;
            });
        }
    };
}

/// How the fault suite reaches a transport's broker, on top of its [`Harness`].
#[async_trait]
pub trait FaultHarness: Harness {
    /// The transport's name in the figures: `sqs`, `servicebus`.
    fn transport(&self) -> &'static str;

    /// Where the broker listens; a case puts a [`FaultProxy`] in front of it. A harness
    /// may start a broker of its own here, one per call (Kafka: one that advertises
    /// `proxy_port`, so that clients come back through the proxy).
    async fn broker(&self, proxy_port: u16) -> Result<SocketAddr>;

    /// Creates entity `name` as `spec` asks and returns it, reached through `addr` (the
    /// proxy) by clients configured with [`FaultHarness::publish_timeout`].
    async fn create_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity>;

    /// Entity `name`, which `create_at` made, reached through `addr`; creates nothing. A
    /// child process opens its consumer with it.
    fn entity_at(&self, spec: &Spec, name: &str, addr: SocketAddr) -> Result<Entity>;

    /// How long the network stalls in the stall case: longer than the timeouts of the
    /// clients the harness configures.
    fn outage(&self) -> Duration;

    /// The longest a publish may take when the broker cannot be reached or does not
    /// answer, as the harness configures its publishers.
    fn publish_timeout(&self) -> Duration;
}

/// The sizes of a run: the issue's with `CLOUDBUS_FAULT_FULL=1`, CI's otherwise.
fn full() -> bool {
    std::env::var_os("CLOUDBUS_FAULT_FULL").is_some_and(|v| v == "1")
}

/// One row of figures.
struct Figures<'a> {
    transport: &'a str,
    fault: &'a str,
    messages: usize,
    lost: usize,
    duplicates: usize,
    recovery: Option<Duration>,
}

/// Prints the row, and appends it to `CLOUDBUS_FAULT_REPORT`'s file.
fn report(figures: &Figures<'_>) {
    let recovery = figures
        .recovery
        .map_or_else(|| "-".into(), |d| format!("{:.1} s", d.as_secs_f64()));
    let line = format!(
        "| {} | {} | {} | {} | {} | {} |",
        figures.transport,
        figures.fault,
        figures.messages,
        figures.lost,
        figures.duplicates,
        recovery
    );
    eprintln!("fault figures: {line}");
    if let Some(path) = std::env::var_os("CLOUDBUS_FAULT_REPORT") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{line}");
        }
    }
}

fn spec(harness: &impl Harness) -> Spec {
    Spec {
        visibility: harness.features().unit * 10,
        max_deliveries: 100,
        ordered: false,
        replay: false,
    }
}

fn name() -> String {
    format!("cbf-{}", cloudbus_core::message::new_id())
}

/// A proxy in front of the harness's broker, and entity `name` reached through it.
async fn through_proxy(
    harness: &impl FaultHarness,
    spec: &Spec,
    name: &str,
) -> (Arc<FaultProxy>, Entity, Box<dyn Publisher>) {
    let proxy = FaultProxy::reserve()
        .await
        .expect("reserve the proxy's port");
    let broker = harness.broker(proxy.port()).await.expect("the broker");
    let proxy = Arc::new(proxy.start(broker).expect("start the proxy"));
    let entity = harness
        .create_at(spec, name, proxy.addr())
        .await
        .expect("create the entity");
    let publisher = entity.publisher().await.expect("connect the publisher");
    (proxy, entity, publisher)
}

/// Handled ids, and how often each was handled, shared with the handlers.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, usize>>>);

impl Seen {
    fn add(&self, id: String) {
        *lock(&self.0).entry(id).or_default() += 1;
    }

    fn unique(&self) -> usize {
        lock(&self.0).len()
    }

    fn calls(&self) -> usize {
        lock(&self.0).values().sum()
    }

    fn has_all(&self, sent: &HashSet<String>) -> bool {
        let seen = lock(&self.0);
        sent.iter().all(|id| seen.contains_key(id))
    }

    /// (lost, duplicates) against what was reported published.
    fn tally(&self, sent: &HashSet<String>) -> (usize, usize) {
        let seen = lock(&self.0);
        let lost = sent.iter().filter(|id| !seen.contains_key(*id)).count();
        let duplicates = seen.values().map(|n| n - 1).sum();
        (lost, duplicates)
    }
}

/// A consumer over the first subscriber, concurrency 16, recording into `seen` after
/// `work` (a slow handler), in a task of its own.
async fn run_consumer(
    harness: &impl Harness,
    entity: &Entity,
    spec: &Spec,
    seen: &Seen,
    work: Duration,
) -> (CancellationToken, tokio::task::JoinHandle<Summary>) {
    let consumer = consumer(harness, entity, spec, |builder| builder.concurrency(16)).await;
    let shutdown = CancellationToken::new();
    let seen = seen.clone();
    let task = tokio::spawn(consumer.run(
        move |message: Message, _context: Context| {
            let seen = seen.clone();
            async move {
                if !work.is_zero() {
                    tokio::time::sleep(work).await;
                }
                seen.add(message.id);
                Ok(())
            }
        },
        shutdown.clone(),
    ));
    (shutdown, task)
}

async fn stop(shutdown: CancellationToken, task: tokio::task::JoinHandle<Summary>) {
    shutdown.cancel();
    let _ = tokio::time::timeout(PATIENCE, task).await;
}

fn messages(count: usize) -> Vec<Message> {
    (0..count).map(|i| Message::new(format!("m{i}"))).collect()
}

/// Publishes `messages` in batches of 100, publishing again what fails, as an application
/// would; the ids reported published, and how many publishes failed. A failure must be
/// transient.
async fn publish_all(
    publisher: &dyn Publisher,
    messages: Vec<Message>,
) -> (HashSet<String>, usize) {
    let mut sent = HashSet::new();
    let mut failed = 0;
    for chunk in messages.chunks(100) {
        let mut pending: Vec<Message> = chunk.to_vec();
        let deadline = Instant::now() + PATIENCE;
        while !pending.is_empty() {
            assert!(Instant::now() < deadline, "publishing never recovered");
            let outcomes = publisher.publish_batch(pending.clone()).await;
            let mut retry = Vec::new();
            for (message, outcome) in pending.into_iter().zip(outcomes) {
                match outcome {
                    Ok(id) => {
                        sent.insert(id);
                    }
                    Err(error) => {
                        assert!(
                            error.is_transient(),
                            "a network fault is transient: {error}"
                        );
                        failed += 1;
                        retry.push(message);
                    }
                }
            }
            pending = retry;
        }
    }
    (sent, failed)
}

/// Every connection cut twice during the stream (at a third and two thirds of it):
/// publishers and consumers recover by themselves, and every message reported published
/// is handled. Recovery: from a cut until handlers run again.
pub async fn fault_cut_connections_twice_lose_nothing(harness: &impl FaultHarness) {
    let count = if full() { 10_000 } else { 2_000 };
    let spec = spec(harness);
    let (proxy, entity, publisher) = through_proxy(harness, &spec, &name()).await;
    let seen = Seen::default();
    let (shutdown, consumer) = run_consumer(harness, &entity, &spec, &seen, Duration::ZERO).await;
    let cutter = {
        let (proxy, seen) = (proxy.clone(), seen.clone());
        tokio::spawn(async move {
            let mut recoveries = Vec::new();
            for third in 1..=2 {
                wait_until("a third of the stream handled", PATIENCE, || {
                    seen.unique() >= count * third / 3
                })
                .await;
                let before = seen.calls();
                let at = Instant::now();
                let cut = proxy.cut();
                eprintln!("cut {cut} connections");
                wait_until("handlers running again after the cut", PATIENCE, || {
                    seen.calls() > before + 16
                })
                .await;
                recoveries.push(at.elapsed());
            }
            recoveries
        })
    };
    let (sent, failed) = publish_all(publisher.as_ref(), messages(count)).await;
    wait_until("every published message handled", PATIENCE * 3, || {
        seen.has_all(&sent)
    })
    .await;
    let recoveries = cutter.await.expect("the cutter");
    stop(shutdown, consumer).await;
    let (lost, duplicates) = seen.tally(&sent);
    eprintln!("publishes that failed during the cuts and were published again: {failed}");
    report(&Figures {
        transport: harness.transport(),
        fault: "every connection cut twice",
        messages: count,
        lost,
        duplicates,
        recovery: recoveries.into_iter().max(),
    });
    assert_eq!(lost, 0, "nothing reported published may be lost");
    assert_eq!(sent.len(), count, "every message was published in the end");
}

/// The network to the broker stalls for [`FaultHarness::outage`] (longer than the
/// clients' timeouts) and flows again: a publish during the stall fails with a transient
/// error within the publish timeout instead of hanging, the consumer resumes by itself,
/// and nothing is lost. Recovery: from the end of the stall until a message published
/// then is handled.
pub async fn fault_stalled_broker_resumes_and_loses_nothing(harness: &impl FaultHarness) {
    let count = if full() { 2_000 } else { 500 };
    let spec = spec(harness);
    let (proxy, entity, publisher) = through_proxy(harness, &spec, &name()).await;
    let seen = Seen::default();
    let (shutdown, consumer) = run_consumer(harness, &entity, &spec, &seen, Duration::ZERO).await;
    let all = messages(count);
    let (first, second) = all.split_at(count / 2);
    let (mut sent, _) = publish_all(publisher.as_ref(), first.to_vec()).await;
    wait_until("the first half handled", PATIENCE, || seen.has_all(&sent)).await;

    proxy.pause(true);
    let stalled = Instant::now();
    let bound = harness.publish_timeout() + harness.features().unit * 5;
    let during = tokio::time::timeout(bound, publisher.publish(Message::new("stalled"))).await;
    match during {
        Err(_) => panic!("a publish to a stalled broker hung past {bound:?}"),
        // The broker took it before the stall reached the client: it counts as sent.
        Ok(Ok(id)) => {
            sent.insert(id);
        }
        Ok(Err(error)) => assert!(error.is_transient(), "must be transient: {error}"),
    }
    if let Some(rest) = harness.outage().checked_sub(stalled.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    proxy.pause(false);
    let resumed = Instant::now();
    let (probe, _) = publish_all(publisher.as_ref(), vec![Message::new("probe")]).await;
    wait_until(
        "a message published after the stall handled",
        PATIENCE,
        || seen.has_all(&probe),
    )
    .await;
    let recovery = resumed.elapsed();
    sent.extend(probe);
    let (more, _) = publish_all(publisher.as_ref(), second.to_vec()).await;
    sent.extend(more);
    wait_until("every published message handled", PATIENCE * 2, || {
        seen.has_all(&sent)
    })
    .await;
    stop(shutdown, consumer).await;
    let (lost, duplicates) = seen.tally(&sent);
    report(&Figures {
        transport: harness.transport(),
        fault: &format!("network stalled for {} s", harness.outage().as_secs()),
        messages: count,
        lost,
        duplicates,
        recovery: Some(recovery),
    });
    assert_eq!(lost, 0, "nothing reported published may be lost");
}

/// Every chunk of bytes to and from the broker is held for a fifth of the time unit while
/// each handler takes twice the lock duration: the consumer renews the locks in time, so
/// no message is handled twice unless the transport may redeliver spontaneously.
pub async fn fault_slow_broker_renews_locks_in_time(harness: &impl FaultHarness) {
    let count = 32;
    let unit = harness.features().unit;
    let spec = Spec {
        visibility: unit * 3,
        ..spec(harness)
    };
    let (proxy, entity, publisher) = through_proxy(harness, &spec, &name()).await;
    let (sent, _) = publish_all(publisher.as_ref(), messages(count)).await;
    proxy.latency(unit / 5);
    let seen = Seen::default();
    let started = Instant::now();
    let (shutdown, consumer) =
        run_consumer(harness, &entity, &spec, &seen, spec.visibility * 2).await;
    wait_until(
        "every message handled through the slow broker",
        PATIENCE * 2,
        || seen.has_all(&sent),
    )
    .await;
    let took = started.elapsed();
    stop(shutdown, consumer).await;
    let (lost, duplicates) = seen.tally(&sent);
    report(&Figures {
        transport: harness.transport(),
        fault: &format!(
            "latency {} ms, handlers 2x the lock",
            (unit / 5).as_millis()
        ),
        messages: count,
        lost,
        duplicates,
        recovery: Some(took),
    });
    assert_eq!(lost, 0, "nothing reported published may be lost");
    if !harness.features().spurious_redeliveries {
        assert_eq!(
            duplicates, 0,
            "the locks were renewed in time, so nothing is handled twice"
        );
    }
}

/// With the broker unreachable (the proxy refuses and cuts every connection), a publish
/// fails with a transient error within the publish timeout (never hangs), and succeeds
/// again once the broker is back. Recovery: from the broker's return until a publish
/// (published again while it fails transiently) succeeds.
pub async fn fault_unreachable_broker_fails_publish_transiently(harness: &impl FaultHarness) {
    let spec = spec(harness);
    let (proxy, _entity, publisher) = through_proxy(harness, &spec, &name()).await;
    publisher
        .publish(Message::new("before"))
        .await
        .expect("publish while the broker is up");
    proxy.refuse(true);
    let bound = harness.publish_timeout() + harness.features().unit * 5;
    let started = Instant::now();
    let outcome = tokio::time::timeout(bound, publisher.publish(Message::new("down"))).await;
    let failed_after = started.elapsed();
    match outcome {
        Err(_) => panic!("a publish to an unreachable broker hung past {bound:?}"),
        Ok(Ok(id)) => panic!("a publish to an unreachable broker reported {id} published"),
        Ok(Err(error)) => {
            assert!(error.is_transient(), "must be transient: {error}");
            eprintln!("unreachable: {error} after {failed_after:?}");
        }
    }
    proxy.refuse(false);
    let back = Instant::now();
    // As an application would: publish again what fails transiently, until it succeeds.
    publish_all(publisher.as_ref(), vec![Message::new("after")]).await;
    report(&Figures {
        transport: harness.transport(),
        fault: &format!(
            "publish while unreachable: transient error after {:.1} s",
            failed_after.as_secs_f64()
        ),
        messages: 3,
        lost: 0,
        duplicates: 0,
        recovery: Some(back.elapsed()),
    });
}

/// Appends `line` to `path` (handlers run concurrently, and a killed process leaves at
/// most its last line unfinished).
fn append(path: &Path, line: &str) {
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        // One write per line: with O_APPEND it is not interleaved with another handler's.
        let _ = file.write_all(format!("{line}\n").as_bytes());
    }
}

/// The ids in `path`: the first word of each line (the rest, the delivery count and the
/// body, is there for whoever looks into a failure).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').next().map(str::to_string))
        .collect()
}

/// The consumer process, killed (SIGKILL) when dropped, so that a failing case leaves no
/// process behind.
struct ChildProcess(std::process::Child);

impl ChildProcess {
    /// SIGKILL, and waits for the process to end.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A number below `below`, from the standard library's random hasher keys.
fn random(below: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() % below.max(1) as u64) as usize
}

/// The consumer runs in a child process (this test binary, running its ignored
/// `fault_consumer_child` test, found under `module`, the expanding module's path), which
/// is killed with SIGKILL at a random point of the stream and started again: every
/// message is handled at least once; the duplicates (what the killed process had handled
/// but not settled) are counted. Recovery: from the kill until the new process handles.
pub async fn fault_killed_consumer_loses_nothing(harness: &impl FaultHarness, module: &str) {
    let count = if full() { 5_000 } else { 1_000 };
    let spec = spec(harness);
    let name = name();
    let (proxy, _entity, publisher) = through_proxy(harness, &spec, &name).await;
    let (sent, _) = publish_all(publisher.as_ref(), messages(count)).await;
    let file: PathBuf = std::env::temp_dir().join(format!("{name}.handled"));
    let test = module.split_once("::").map_or(module, |(_, rest)| rest);
    let child_test = format!("{test}::fault_consumer_child");
    let spawn = || {
        std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([&child_test, "--exact", "--ignored", "--nocapture"])
            .env(
                FAULT_CHILD,
                format!("{name} {} {}", proxy.addr(), file.display()),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .map(ChildProcess)
            .expect("start the consumer process")
    };
    let kill_at = count / 10 + random(count * 4 / 10);
    let mut child = spawn();
    wait_until(
        "the child to handle up to the kill point",
        PATIENCE * 2,
        || lines(&file).len() >= kill_at,
    )
    .await;
    child.kill();
    let killed = Instant::now();
    let at_kill = lines(&file).len();
    eprintln!("killed the consumer process after {at_kill} handled");
    let mut child = spawn();
    wait_until("the restarted child to handle a message", PATIENCE, || {
        lines(&file).len() > at_kill
    })
    .await;
    let recovery = killed.elapsed();
    wait_until("every message handled", PATIENCE * 3, || {
        let handled: HashSet<String> = lines(&file).into_iter().collect();
        sent.iter().all(|id| handled.contains(id))
    })
    .await;
    child.kill();
    let all = lines(&file);
    let unique: HashSet<&String> = all.iter().collect();
    let lost = sent.iter().filter(|id| !unique.contains(id)).count();
    let _ = std::fs::remove_file(&file);
    report(&Figures {
        transport: harness.transport(),
        fault: "consumer process killed (SIGKILL), restarted",
        messages: count,
        lost,
        duplicates: all.len() - unique.len(),
        recovery: Some(recovery),
    });
    assert_eq!(lost, 0, "every message handled at least once");
}

/// The child process of [`fault_killed_consumer_loses_nothing`]: with
/// [`FAULT_CHILD`] set, runs a consumer that appends each handled id to the file it
/// names, until it is killed; without it, returns at once.
pub async fn fault_consumer_child(harness: &impl FaultHarness) {
    let Ok(work) = std::env::var(FAULT_CHILD) else {
        eprintln!("the child process of fault_killed_consumer_loses_nothing, which runs it");
        return;
    };
    let mut parts = work.splitn(3, ' ');
    let (Some(name), Some(addr), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("{FAULT_CHILD}: `<name> <addr> <file>`, got {work:?}");
    };
    let addr: SocketAddr = addr.parse().expect("the proxy's address");
    let file = PathBuf::from(file);
    let spec = spec(harness);
    let entity = harness.entity_at(&spec, name, addr).expect("the entity");
    let consumer: Consumer =
        consumer(harness, &entity, &spec, |builder| builder.concurrency(16)).await;
    consumer
        .run(
            move |message: Message, context: Context| {
                let file = file.clone();
                async move {
                    let body = String::from_utf8_lossy(&message.payload).into_owned();
                    let line = format!("{} {} {body}", message.id, context.delivery_count());
                    append(&file, &line);
                    Ok(())
                }
            },
            CancellationToken::new(),
        )
        .await;
}
