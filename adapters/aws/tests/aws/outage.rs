//! Broker outage on SQS (LocalStack): a consumer runs over a queue; midway through a
//! stream of messages LocalStack stops answering for a few seconds, then answers again.
//! The consumer must resume by itself, and every published message must be handled.
//!
//! The outage is a `SIGSTOP` of LocalStack's process group followed by `SIGCONT`: its
//! port stays open and its queues survive (a restart of host-mode LocalStack would lose
//! them, it keeps no state), and calls simply get no answer, like a hung broker or a
//! black-holed network path. That is the harder case for a client: only its timeouts
//! end such calls (see `adapters/aws/src/client.rs`).
//!
//! Needs the host-mode LocalStack of `localstack/start` (its pid is in
//! `target/localstack.pid`); with LocalStack elsewhere (Docker, another endpoint) the test
//! prints why and does nothing. LocalStack is always resumed: by a guard when the test
//! ends or fails, and by a watchdog process should the test process be killed.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cloudbus_core::consumer::{CancellationToken, Consumer, Context, LockRenewal};
use cloudbus_core::{Message, Publisher};
use cloudbus_testkit::{Harness, Spec};

use crate::harness::{SqsHarness, endpoint};

/// How long LocalStack does not answer. Longer than a long poll's timeout (the consumer's
/// 1 s wait plus 5 s), so receive calls fail during it.
const OUTAGE: Duration = Duration::from_secs(8);
/// Messages in the stream, published one per [`PACE`].
const COUNT: usize = 60;
const PACE: Duration = Duration::from_millis(100);
/// Handled messages before the outage starts.
const BEFORE_OUTAGE: usize = COUNT / 3;
/// The longest the test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(120);
/// The longest the whole test may take.
const BOUND: Duration = Duration::from_secs(300);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("a handler panicked while holding a lock")
}

/// The process group of the running host-mode LocalStack that serves the test endpoint,
/// or why there is none.
fn localstack_group() -> Result<u32, String> {
    let endpoint = endpoint();
    let url = url::Url::parse(&endpoint).map_err(|e| format!("endpoint {endpoint}: {e}"))?;
    if !matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")) {
        return Err(format!(
            "the endpoint {endpoint} is not a LocalStack on this host"
        ));
    }
    let pid_file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/localstack.pid");
    let pid: u32 = std::fs::read_to_string(pid_file)
        .map_err(|e| {
            format!("no LocalStack pid in {pid_file} ({e}): LocalStack runs elsewhere (Docker?)")
        })?
        .trim()
        .parse()
        .map_err(|e| format!("{pid_file} holds no pid: {e}"))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| format!("pid {pid} from {pid_file} is not running ({e})"))?;
    if !String::from_utf8_lossy(&cmdline).contains("localstack.runtime.main") {
        return Err(format!("pid {pid} from {pid_file} is not LocalStack"));
    }
    // `localstack/start` makes LocalStack the leader of its own process group, so the
    // group holds LocalStack and its children and nothing else.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    let group: u32 = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2))
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| format!("cannot read the process group of pid {pid}"))?;
    if group != pid {
        return Err(format!(
            "LocalStack (pid {pid}) does not lead its own process group (group {group}); \
             not pausing a group that may hold other processes"
        ));
    }
    Ok(group)
}

fn signal(group: u32, name: &str) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), "--", &format!("-{group}")])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "kill -{name} -- -{group}: {status}"
        )))
    }
}

/// LocalStack paused: resumed when dropped, whatever happens to the test.
struct Paused {
    group: u32,
    watchdog: Option<Child>,
}

impl Paused {
    fn start(group: u32) -> Paused {
        // Should this process die without unwinding (SIGKILL, abort), the watchdog
        // resumes LocalStack a little after the outage would have ended.
        let watchdog = Command::new("sh")
            .args([
                "-c",
                &format!("sleep {}; kill -CONT -- -{group}", OUTAGE.as_secs() + 30),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the watchdog that resumes LocalStack");
        // The guard exists before the pause, so even a failed `kill` is followed by CONT.
        let paused = Paused {
            group,
            watchdog: Some(watchdog),
        };
        signal(group, "STOP").expect("pause LocalStack");
        paused
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Err(error) = signal(self.group, "CONT") {
            eprintln!(
                "could not resume LocalStack (kill -CONT -- -{}): {error}",
                self.group
            );
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_resumes_after_a_broker_outage() {
    let group = match localstack_group() {
        Ok(group) => group,
        Err(reason) => {
            eprintln!("SKIPPED consumer_resumes_after_a_broker_outage: {reason}");
            return;
        }
    };
    tokio::time::timeout(BOUND, outage_case(group))
        .await
        .expect("the outage test is bounded in time");
}

async fn outage_case(group: u32) {
    let started = Instant::now();
    let harness = SqsHarness::standard();
    let spec = Spec {
        visibility: Duration::from_secs(10),
        max_deliveries: 10,
        ordered: false,
        replay: false,
    };
    let entity = harness.create(&spec).await.expect("create the queue");
    let publisher = entity.publisher().await.expect("connect publisher");

    let subscriber = entity.subscriber(0).await.expect("connect consumer");
    let consumer = Consumer::builder(subscriber)
        .concurrency(8)
        .receive_wait(Duration::from_secs(1))
        .receive_backoff(Duration::from_millis(200), Duration::from_secs(2))
        .lock_renewal(LockRenewal::default().lock_duration(spec.visibility))
        .build()
        .expect("consumer");
    let handled = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let seen = handled.clone();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(
        move |message: Message, _context: Context| {
            let seen = seen.clone();
            async move {
                *lock(&seen).entry(message.id).or_default() += 1;
                Ok(())
            }
        },
        shutdown.clone(),
    ));

    // The stream: one message per PACE, each retried until it is accepted (a publish
    // during the outage fails or waits; its id stays the same).
    let messages: Vec<Message> = (0..COUNT).map(|i| Message::new(format!("m{i}"))).collect();
    let sent: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    let stream = tokio::spawn(async move {
        let mut failed_publishes = 0;
        for message in messages {
            while let Err(error) = publisher.publish(message.clone()).await {
                failed_publishes += 1;
                eprintln!("publish failed (retrying): {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(PACE).await;
        }
        failed_publishes
    });

    wait_until("messages handled before the outage", || {
        lock(&handled).len() >= BEFORE_OUTAGE
    })
    .await;
    let outage_at = Instant::now();
    {
        let _paused = Paused::start(group);
        eprintln!(
            "LocalStack paused after {} messages handled",
            lock(&handled).len()
        );
        // The outage itself: this is the time LocalStack does not answer, not a wait for
        // something to settle.
        tokio::time::sleep(OUTAGE).await;
    }
    let during = lock(&handled).len();
    eprintln!("LocalStack resumed after {:?}", outage_at.elapsed());

    wait_until("every message handled after the outage", || {
        sent.iter().all(|id| lock(&handled).contains_key(id))
    })
    .await;
    assert!(
        !run.is_finished(),
        "the consumer run ended by itself during or after the outage"
    );
    let failed_publishes = stream.await.expect("the publishing task");
    shutdown.cancel();
    let summary = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the consumer returns after shutdown")
        .expect("the consumer task");

    let handled = lock(&handled).clone();
    let ids: HashSet<String> = handled.keys().cloned().collect();
    let duplicates: usize = handled.values().map(|n| n - 1).sum();
    eprintln!(
        "outage of {OUTAGE:?}: {COUNT} messages, {during} handled by its end, duplicates \
         {duplicates}, failed publishes {failed_publishes}, took {:?}; {summary:?}",
        started.elapsed()
    );
    assert_eq!(ids, sent, "every published message handled, and only those");
    assert!(
        summary.receive_errors > 0,
        "receive calls must have failed during the outage: {summary:?}"
    );
    assert_eq!(
        summary.handled,
        (COUNT + duplicates) as u64,
        "the consumer counted every handler call: {summary:?}"
    );
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
