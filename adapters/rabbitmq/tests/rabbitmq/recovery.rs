//! Recovery from lost connections: the broker cuts every connection twice while a consumer
//! handles 5,000 messages that several tasks publish, and neither the publisher nor the
//! consumer needs a restart, nor loses a message; and a publisher whose broker cannot be
//! reached, or goes silent, fails with a transient error within its publish timeout
//! instead of hanging. The cut test runs in a vhost of its own, so that cutting every
//! connection of it leaves the tests running beside it alone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cloudbus_core::config::Secret;
use cloudbus_core::consumer::{CancellationToken, Consumer, Context, StopReason};
use cloudbus_core::{Message, Publisher, Subscriber, message};
use cloudbus_rabbitmq::{
    DEFAULT_URI, RabbitMqConfig, RabbitMqPublisher, RabbitMqSubscriber, URI_ENV,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::harness::config;

const PATIENCE: Duration = Duration::from_secs(120);
const MESSAGES: usize = 5_000;
const PUBLISHING_TASKS: usize = 4;
/// Between two publishes of one task: publishing takes about 10 s, so it goes on while the
/// connections are cut.
const PACE: Duration = Duration::from_millis(8);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Awaits `future`, failing the test if it takes longer than [`PATIENCE`].
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?} waiting for {what}"))
}

async fn wait_for(what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `rabbitmq/ctl` (rabbitmqctl against the node of `rabbitmq/start`) and returns its
/// output, failing the test when it fails.
fn ctl(args: &[&str]) -> String {
    let ctl = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../rabbitmq/ctl");
    let output = Command::new(&ctl)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", ctl.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A virtual host of the test's own on the broker of `RABBITMQ_URL`, deleted (with its
/// queues) when dropped: the test cuts every connection of it, and only those, leaving the
/// tests that run at the same time (in this binary or another) alone.
struct Vhost {
    name: String,
    uri: url::Url,
}

impl Vhost {
    async fn create() -> Vhost {
        let name = format!("cb-{}", message::new_id());
        let mut uri = url::Url::parse(&broker()).expect("the broker's URI");
        uri.set_path(&format!("/{name}"));
        let user = uri.username().to_string();
        let vhost = name.clone();
        tokio::task::spawn_blocking(move || {
            ctl(&["add_vhost", &vhost]);
            ctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);
        })
        .await
        .expect("rabbitmqctl");
        Vhost { name, uri }
    }

    fn uri(&self) -> Secret {
        Secret::new(self.uri.as_str())
    }

    /// `rabbitmq/ctl close_all_connections --vhost <vhost> "cut by test"`: the broker
    /// closes every client connection of the vhost (CONNECTION_FORCED). Returns how many it
    /// closed.
    async fn cut_all_connections(&self) -> usize {
        let vhost = self.name.clone();
        let stdout = tokio::task::spawn_blocking(move || {
            ctl(&["close_all_connections", "--vhost", &vhost, "cut by test"])
        })
        .await
        .expect("rabbitmqctl");
        // "Closing all connections in vhost cb-…, reason: cut by test...\nClosed 2 connections"
        stdout
            .lines()
            .find_map(|line| {
                line.strip_prefix("Closed ")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no count in the output of close_all_connections: {stdout}"))
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let command =
            Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../rabbitmq/ctl"))
                .args(["delete_vhost", &self.name])
                .output();
        if !command.is_ok_and(|output| output.status.success()) {
            eprintln!("could not delete the vhost {}", self.name);
        }
    }
}

/// The broker's URI (`RABBITMQ_URL`).
fn broker() -> String {
    std::env::var(URI_ENV).unwrap_or_else(|_| DEFAULT_URI.into())
}

/// 5,000 messages from four publishing tasks (one publisher) through a consumer of
/// concurrency 16, while the broker cuts every connection (of the test's vhost) at a third
/// and at two thirds of the messages handled: every message is handled at least once, no publish fails (the
/// publisher publishes again on a new connection within its publish timeout), and the same
/// publisher and consumer carry on to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cutting_every_connection_twice_loses_nothing_and_needs_no_restart() {
    let vhost = Vhost::create().await;
    let mut queue = config(&format!("cb-{}", message::new_id()));
    queue.uri = Some(vhost.uri());
    queue.create = true;
    queue.publish_timeout = Duration::from_secs(30);
    let subscriber = within("the subscriber", RabbitMqSubscriber::connect(&queue))
        .await
        .expect("subscriber");
    let publisher = within("the publisher", RabbitMqPublisher::connect(&queue))
        .await
        .expect("publisher");
    let publisher = Arc::new(publisher);
    let consumer = Consumer::builder(subscriber)
        .concurrency(16)
        .receive_wait(Duration::from_secs(1))
        .build()
        .expect("consumer");
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let shutdown = CancellationToken::new();
    let handled = seen.clone();
    let run = tokio::spawn(consumer.run(
        move |message: Message, _context: Context| {
            let handled = handled.clone();
            async move {
                *lock(&handled).entry(message.id).or_default() += 1;
                Ok(())
            }
        },
        shutdown.clone(),
    ));

    let messages: Vec<Message> = (0..MESSAGES)
        .map(|i| Message::new(format!("m{i}")))
        .collect();
    let sent: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    let published = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let publishing: Vec<_> = messages
        .chunks(MESSAGES / PUBLISHING_TASKS)
        .map(|chunk| {
            let (publisher, chunk) = (publisher.clone(), chunk.to_vec());
            let (published, failures) = (published.clone(), failures.clone());
            tokio::spawn(async move {
                let mut pace = tokio::time::interval(PACE);
                for message in chunk {
                    pace.tick().await;
                    let id = message.id.clone();
                    match publisher.publish(message).await {
                        Ok(_) => {
                            published.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(error) => lock(&failures).push(format!("{id}: {error}")),
                    }
                }
            })
        })
        .collect();

    let handled_count = || lock(&seen).len();
    for (cut, at) in [(1, MESSAGES / 3), (2, 2 * MESSAGES / 3)] {
        wait_for(&format!("{at} handled"), PATIENCE, || handled_count() >= at).await;
        let closed = vhost.cut_all_connections().await;
        eprintln!(
            "cut {cut} after {:?}: {} handled, {} published; the broker closed {closed} \
             connections",
            started.elapsed(),
            handled_count(),
            published.load(Ordering::SeqCst)
        );
        assert!(
            closed >= 2,
            "cut {cut}: the publisher's and the subscriber's connections at least"
        );
        assert!(!run.is_finished(), "the consumer stopped at cut {cut}");
    }
    for task in publishing {
        within("a publishing task", task)
            .await
            .expect("a publishing task");
    }
    let failures = lock(&failures).clone();
    assert!(
        failures.is_empty(),
        "{} publishes failed across the cuts; the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(published.load(Ordering::SeqCst), MESSAGES);
    wait_for("every message handled", PATIENCE, || {
        handled_count() >= sent.len()
    })
    .await;
    assert!(!run.is_finished(), "the consumer ran to the end");
    shutdown.cancel();
    let summary = within("the consumer to stop when cancelled", run)
        .await
        .expect("the consumer task");
    within("the publisher to close", publisher.close())
        .await
        .expect("close the publisher");
    eprintln!(
        "{MESSAGES} messages in {:?}: {summary:?}",
        started.elapsed()
    );
    assert_eq!(summary.stopped, StopReason::Cancelled, "{summary:?}");

    let seen = lock(&seen).clone();
    let handled: HashSet<String> = seen.keys().cloned().collect();
    let lost: Vec<&String> = sent.difference(&handled).collect();
    let mut duplicates: Vec<(&String, usize)> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (id, *n))
        .collect();
    duplicates.sort();
    let extra: usize = duplicates.iter().map(|(_, n)| n - 1).sum();
    eprintln!(
        "{} sent, {} lost, {extra} duplicate deliveries of {} messages: {duplicates:?}",
        sent.len(),
        lost.len(),
        duplicates.len()
    );
    assert!(
        lost.is_empty(),
        "{} of {} messages never handled, such as {:?}",
        lost.len(),
        sent.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(handled.is_subset(&sent), "handled ids that were never sent");
}

/// A broker that does not answer (nothing listens on port 1): publishing fails with a
/// transient error once the publish timeout is spent, retrying meanwhile; it never hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_an_unreachable_broker_fails_transiently_within_the_timeout() {
    let mut unreachable = config(&format!("cb-{}", message::new_id()));
    unreachable.uri = Some(Secret::new("amqp://guest:guest@127.0.0.1:1/%2f"));
    unreachable.publish_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        let publisher = RabbitMqPublisher::connect(&unreachable).await?;
        publisher.publish(Message::new("nobody hears this")).await
    })
    .await
    .expect("publishing to an unreachable broker hung");
    let error = outcome.expect_err("publishing to an unreachable broker succeeded");
    eprintln!("failed after {:?}: {error}", started.elapsed());
    assert!(error.is_transient(), "a transient error: {error:?}");
    assert!(
        !error.to_string().contains("guest:guest"),
        "the error shows no credentials: {error}"
    );
}

/// What the proxy forwards.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// Nothing, on any connection, old or new (a network partition).
    silent: bool,
    /// Nothing on the connections numbered up to this one (half-open connections: the
    /// broker is reachable, on a new connection).
    frozen_up_to: usize,
}

impl Mode {
    fn forwards(&self, connection: usize) -> bool {
        !self.silent && connection > self.frozen_up_to
    }
}

/// A TCP proxy to the broker that can stop forwarding without closing anything: a
/// connection it holds then stays open and nothing comes through it, as in a network
/// partition (rather than a refused or reset connection).
struct Proxy {
    port: u16,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (mode, _) = watch::channel(Mode::default());
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (modes, count, stopped) = (mode.clone(), accepted.clone(), stop.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let connection = count.fetch_add(1, Ordering::SeqCst) + 1;
                let (mut mode, upstream) = (modes.subscribe(), upstream.clone());
                tokio::spawn(async move {
                    // A new connection during a partition: accepted, never answered.
                    if mode.wait_for(|m| m.forwards(connection)).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, connection, mode.clone()),
                        pump(server_read, client_write, connection, mode),
                    );
                });
            }
        });
        Proxy {
            port,
            mode,
            accepted,
            stop,
        }
    }

    /// The broker's URI through the proxy.
    fn uri(&self) -> Secret {
        let mut uri = url::Url::parse(&broker()).expect("the broker's URI");
        uri.set_port(Some(self.port)).expect("a port");
        Secret::new(uri.as_str())
    }

    /// Forwards nothing at all (`true`), or everything again.
    fn silence(&self, silent: bool) {
        self.mode.send_modify(|m| m.silent = silent);
    }

    /// Forwards nothing more on the connections it holds; new ones go through.
    fn freeze_existing(&self) {
        let up_to = self.accepted.load(Ordering::SeqCst);
        self.mode.send_modify(|m| m.frozen_up_to = up_to);
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` on proxied connection number `connection`, pausing while the
/// mode does not forward it (bytes wait in the socket buffers meanwhile).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    connection: usize,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if mode.wait_for(|m| m.forwards(connection)).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Stopped forwarding while waiting for bytes: stop reading until it resumes.
            _ = mode.wait_for(|m| !m.forwards(connection)) => continue,
        };
        if mode.wait_for(|m| m.forwards(connection)).await.is_err()
            || to.write_all(&buffer[..n]).await.is_err()
        {
            return;
        }
    }
}

/// A publisher, through a proxy, on a queue of its own with a publish timeout of 2 s.
async fn publisher_through(proxy: &Proxy) -> (RabbitMqConfig, RabbitMqPublisher) {
    let mut queue: RabbitMqConfig = config(&format!("cb-{}", message::new_id()));
    queue.create = true;
    queue.uri = Some(proxy.uri());
    queue.publish_timeout = Duration::from_secs(2);
    let publisher = within("the publisher", RabbitMqPublisher::connect(&queue))
        .await
        .expect("publisher");
    within(
        "the first publish",
        publisher.publish(Message::new("before")),
    )
    .await
    .expect("publish before the partition");
    (queue, publisher)
}

/// A publish that must fail with a transient error, and must not hang.
async fn publish_fails_transiently(publisher: &RabbitMqPublisher, what: &str) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        publisher.publish(Message::new(what.to_string())),
    )
    .await
    .unwrap_or_else(|_| panic!("publishing {what} hung"));
    let error = outcome.expect_err("publishing during a partition succeeded");
    eprintln!("{what}: failed after {:?}: {error}", started.elapsed());
    assert!(error.is_transient(), "a transient error: {error:?}");
}

/// The texts of the messages in `queue`, up to the one `last` (acking them).
async fn drain(queue: &str, last: &str) -> Vec<String> {
    let subscriber = within(
        "the subscriber",
        RabbitMqSubscriber::connect(&config(queue)),
    )
    .await
    .expect("subscriber");
    let mut texts = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while !texts.iter().any(|t| t == last) && Instant::now() < deadline {
        for delivery in subscriber
            .receive(10, Duration::from_secs(1))
            .await
            .expect("receive")
        {
            texts.push(delivery.message().text().unwrap_or_default().to_string());
            delivery.ack().await.expect("ack");
        }
    }
    subscriber.close().await.expect("close");
    texts
}

/// A publisher whose broker goes silent (a partition: the connection stays open, nothing
/// comes back, a new connection is never answered) fails with a transient error within
/// its publish timeout rather than waiting for the confirm forever; when the broker is
/// heard again, the same publisher publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_cut_off_by_a_partition_fails_transiently_then_recovers() {
    let proxy = Proxy::start(upstream()).await;
    let (queue, publisher) = publisher_through(&proxy).await;

    proxy.silence(true);
    publish_fails_transiently(&publisher, "during").await;

    proxy.silence(false);
    within(
        "a publish after the partition",
        publisher.publish(Message::new("after")),
    )
    .await
    .expect("the same publisher publishes once the broker is heard again");
    within("the publisher to close", publisher.close())
        .await
        .expect("close");

    // "before", perhaps "during" (it reached the broker when the partition ended, after
    // its publish had given up: "may or may not have been stored"), and "after".
    let texts = drain(&queue.name, "after").await;
    assert_eq!(
        texts.first().map(String::as_str),
        Some("before"),
        "{texts:?}"
    );
    assert!(texts.iter().any(|t| t == "after"), "{texts:?}");
}

/// A connection that went half-open (nothing comes back on it, while the broker answers
/// new connections): the publish on it fails within the publish timeout, and the next
/// one goes out on a new connection, instead of failing on the dead one until the
/// heartbeat notices (about 140 s with the broker's default heartbeat of 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_on_a_half_open_connection_moves_to_a_new_one() {
    let proxy = Proxy::start(upstream()).await;
    let (queue, publisher) = publisher_through(&proxy).await;
    let before = proxy.connections();

    proxy.freeze_existing();
    publish_fails_transiently(&publisher, "lost").await;
    let outcome = within(
        "a publish after the connection went half-open",
        publisher.publish(Message::new("after")),
    )
    .await;
    eprintln!(
        "after: {outcome:?}; {} connections through the proxy before, {} now",
        before,
        proxy.connections()
    );
    outcome.expect("the next publish goes out on a new connection");
    within("the publisher to close", publisher.close())
        .await
        .expect("close");
    let texts = drain(&queue.name, "after").await;
    assert!(texts.iter().any(|t| t == "after"), "{texts:?}");
}

/// A publisher whose connection went half-open after its last publish closes without
/// waiting for the broker's answer forever (lapin's close waits for `close-ok`, which a
/// half-open connection never brings), and its messages were stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_publisher_on_a_half_open_connection_does_not_hang() {
    let proxy = Proxy::start(upstream()).await;
    let (queue, publisher) = publisher_through(&proxy).await;
    proxy.freeze_existing();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), publisher.close())
        .await
        .expect("close hung on a half-open connection")
        .expect("close");
    eprintln!("closed in {:?}", started.elapsed());
    assert_eq!(drain(&queue.name, "before").await, ["before"]);
}

/// The broker's `host:port`.
fn upstream() -> String {
    let url = url::Url::parse(&broker()).expect("the broker's URI");
    format!(
        "{}:{}",
        url.host_str().expect("a host"),
        url.port().unwrap_or(5672)
    )
}
