//! The cases every transport runs, over a URL and the environment that reaches it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use base64::Engine;
use cloudbus::subscriber::DEAD_LETTER_REASON;

use crate::common::{Run, cloudbus};

/// Where a case works.
pub struct Place<'a> {
    /// Where to publish (a queue or topic).
    pub publish: &'a str,
    /// Where to receive (the queue, or a subscription of the topic).
    pub receive: &'a str,
    /// The environment the binary needs.
    pub env: &'a [(&'a str, &'a str)],
    /// How long a receive waits for a first message: on Kafka a new group member waits
    /// for its partitions first.
    pub idle: &'a str,
}

impl Place<'_> {
    /// Runs the binary. Inside a multi-threaded runtime (an emulator in this process
    /// serves the child) the wait moves off the runtime's workers.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_threaded {
            tokio::task::block_in_place(|| cloudbus(args, self.env, stdin))
        } else {
            cloudbus(args, self.env, stdin)
        }
    }
}

/// `send` then `receive --json` round-trips text and binary bodies and attributes; the
/// printed ids are those sent; `send --from-json` re-sends a received record as it was.
pub fn round_trip(place: &Place<'_>) {
    let binary: Vec<u8> = (0u8..=255).rev().collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&binary);
    let sent = place
        .run(
            &[
                "send",
                place.publish,
                "--attr",
                "tenant=acme",
                "--json",
                "hello",
                "wörld",
            ],
            None,
        )
        .expect(0)
        .json();
    let binary_sent = place
        .run(
            &["send", place.publish, "--base64", "--json"],
            Some(&format!("{b64}\n")),
        )
        .expect(0)
        .json();
    let mut ids: Vec<String> = sent
        .iter()
        .chain(&binary_sent)
        .map(|v| v["id"].as_str().expect("an id").to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let received = receive_all(place, place.receive, 3);
    let by_id: BTreeMap<String, &serde_json::Value> = received
        .iter()
        .map(|r| (r["id"].as_str().unwrap_or_default().to_string(), r))
        .collect();
    let mut got: Vec<String> = by_id.keys().cloned().collect();
    ids.sort();
    got.sort();
    assert_eq!(got, ids, "the ids received are the ids sent: {received:#?}");
    let texts: Vec<&str> = received.iter().filter_map(|r| r["body"].as_str()).collect();
    assert!(
        texts.contains(&"hello") && texts.contains(&"wörld"),
        "{received:#?}"
    );
    for record in &received {
        if record["body"].is_string() {
            assert_eq!(record["attributes"]["tenant"], "acme", "{record:#}");
        } else {
            assert_eq!(
                record["body_base64"].as_str(),
                Some(b64.as_str()),
                "{record:#}"
            );
        }
        assert!(
            record["delivery_count"].as_u64().is_some_and(|n| n >= 1),
            "{record:#}"
        );
        assert!(record["enqueued_at"].is_string(), "{record:#}");
    }

    // A record read back re-sends as the same message (id, body, attributes).
    let hello = received
        .iter()
        .find(|r| r["body"] == "hello")
        .expect("hello");
    place
        .run(
            &["send", place.publish, "--from-json"],
            Some(&format!("{hello}\n")),
        )
        .expect(0);
    let again = receive_all(place, place.receive, 1);
    assert_eq!(again[0]["id"], hello["id"]);
    assert_eq!(again[0]["body"], "hello");
    assert_eq!(again[0]["attributes"]["tenant"], "acme");
}

/// Receives (and acks) until `count` messages came, failing after two minutes.
pub fn receive_all(place: &Place<'_>, url: &str, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut all = Vec::new();
    let mut last = None;
    while all.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} messages came: {all:#?}; the last receive: {last:#?}",
            all.len()
        );
        let left = (count - all.len()).to_string();
        let args = [
            "receive",
            url,
            "--json",
            "--max",
            &left,
            "--idle-timeout",
            place.idle,
        ];
        let run = place.run(&args, None).expect(0);
        all.extend(run.json());
        last = Some(run);
    }
    all
}

/// Dead letters made by a consumer (`consumer`, on `place.receive`) are listed with their
/// reasons, counted by reason, and redriven back to where they came from (or `--to` where
/// the origin cannot be published to alone): with `by_reason` only the Poison ones, and
/// the other stays; without, all of them.
pub async fn dead_letters_list_and_redrive(
    place: &Place<'_>,
    to: Option<&str>,
    consumer: Box<dyn cloudbus::Subscriber>,
    by_reason: bool,
) {
    let sent = place
        .run(
            &["send", place.publish, "--json", "bad-1", "bad-2", "other"],
            None,
        )
        .expect(0)
        .json();
    assert_eq!(sent.len(), 3);
    // A consumer dead-letters them: two as Poison, one as Other.
    let subscriber = consumer;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done = 0;
    while done < 3 {
        assert!(Instant::now() < deadline, "the consumer got {done} of 3");
        for delivery in subscriber
            .receive(10, Duration::from_secs(2))
            .await
            .expect("receive")
        {
            let reason = if delivery.message().text() == Some("other") {
                "Other"
            } else {
                "Poison"
            };
            delivery
                .dead_letter(reason, "rejected by the test")
                .await
                .expect("dead-letter");
            done += 1;
        }
    }
    subscriber.close().await.expect("close");

    let listed = wait_for_dead_letters(place, 3);
    let reasons: Vec<&str> = listed
        .iter()
        .filter_map(|r| r["attributes"][DEAD_LETTER_REASON].as_str())
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "Poison").count(),
        2,
        "{listed:#?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "Other").count(),
        1,
        "{listed:#?}"
    );
    // The table groups them by reason.
    let table = place.run(&["dlq", place.receive], None).expect(0);
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("Poison") && l.trim_end().ends_with('2')),
        "{table:#?}"
    );

    // A dry run moves nothing.
    let dry = place.run(
        &[
            "dlq",
            "redrive",
            place.receive,
            "--reason",
            "Poison",
            "--dry-run",
        ],
        None,
    );
    if to.is_some() {
        assert_eq!(
            dry.code, 7,
            "without --to the origin cannot take them alone: {dry:#?}"
        );
        assert!(dry.stderr.contains("redrive"), "{dry:#?}");
    } else {
        dry.expect(0);
    }
    assert_eq!(wait_for_dead_letters(place, 3).len(), 3);

    let mut redrive = vec![
        "dlq",
        "redrive",
        place.receive,
        "--idle-timeout",
        place.idle,
    ];
    if by_reason {
        redrive.extend(["--reason", "Poison"]);
    }
    if let Some(to) = to {
        redrive.extend(["--to", to]);
    }
    let moved = if by_reason { 2 } else { 3 };
    let run = place.run(&redrive, None).expect(0);
    assert!(
        run.stderr.contains(&format!("moved {moved} dead letters")),
        "{run:#?}"
    );
    let back = receive_all(place, place.receive, moved);
    let mut texts: Vec<&str> = back.iter().filter_map(|r| r["body"].as_str()).collect();
    texts.sort();
    let expected: &[&str] = if by_reason {
        &["bad-1", "bad-2"]
    } else {
        &["bad-1", "bad-2", "other"]
    };
    assert_eq!(texts, expected, "{back:#?}");
    for record in &back {
        let attributes = &record["attributes"];
        assert!(attributes.get(DEAD_LETTER_REASON).is_none(), "{record:#}");
        let expected = if record["body"] == "other" {
            "Other"
        } else {
            "Poison"
        };
        assert_eq!(
            attributes["RedrivenReason"], expected,
            "the history stays: {record:#}"
        );
        assert_eq!(
            attributes["RedrivenDescription"], "rejected by the test",
            "{record:#}"
        );
        assert!(attributes["OriginalEnqueuedAt"].is_string(), "{record:#}");
        assert!(
            sent.iter().any(|s| s["id"] == record["id"]),
            "the same ids: {record:#}"
        );
    }
    if by_reason {
        let left = wait_for_dead_letters(place, 1);
        assert_eq!(left[0]["body"], "other", "{left:#?}");
    } else {
        wait_for_dead_letters(place, 0);
    }
}

/// Lists the dead letters (`dlq --json`) until there are `count`, for two minutes.
fn wait_for_dead_letters(place: &Place<'_>, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = place
            .run(&["dlq", place.receive, "--json"], None)
            .expect(0)
            .json();
        if listed.len() == count || Instant::now() > deadline {
            assert_eq!(listed.len(), count, "{listed:#?}");
            return listed;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `peek` shows messages and leaves them: a receive afterwards still gets every one.
pub fn peek_leaves_messages(place: &Place<'_>, can_peek: bool) {
    place
        .run(&["send", place.publish, "one", "two"], None)
        .expect(0);
    let peeked = place
        .run(&["peek", place.receive, "--json", "--max", "5"], None)
        .expect(0);
    let records = peeked.json();
    assert_eq!(records.len(), 2, "{peeked:#?}");
    if can_peek {
        assert!(!peeked.stderr.contains("cannot show"), "{peeked:#?}");
    } else {
        assert!(
            peeked
                .stderr
                .contains("cannot show messages without taking them"),
            "{peeked:#?}"
        );
    }
    let received = receive_all(place, place.receive, 2);
    let mut texts: Vec<&str> = received.iter().filter_map(|r| r["body"].as_str()).collect();
    texts.sort();
    assert_eq!(texts, ["one", "two"]);
}

/// What `stats` should say about `waiting` after three sends.
pub enum Waiting {
    /// Exactly 3.
    Exact,
    /// A number, not checked: the broker's figure is known to be wrong here (tansu reports
    /// high watermarks late after batches of several records: ../shared/notes/kafka-here.md).
    Unchecked,
    /// Not reported, with the reason.
    NotReported,
}

/// `stats` reports what the transport can, and for every figure it cannot, says so.
pub fn stats_report(place: &Place<'_>, waiting: Waiting) {
    place
        .run(&["send", place.publish, "a", "b", "c"], None)
        .expect(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = place
            .run(&["stats", place.receive, "--json"], None)
            .expect(0)
            .json();
        let stats = &stats[0];
        for field in [
            "waiting",
            "in_flight",
            "dead_lettered",
            "oldest_age_seconds",
        ] {
            let key = field.trim_end_matches("_seconds");
            assert!(
                !stats[field].is_null() || stats["not_reported"][key].is_string(),
                "{field} is neither reported nor explained: {stats:#}"
            );
        }
        match waiting {
            Waiting::NotReported => {
                assert!(stats["waiting"].is_null(), "{stats:#}");
                break;
            }
            Waiting::Unchecked => {
                assert!(stats["waiting"].is_u64(), "{stats:#}");
                break;
            }
            Waiting::Exact if stats["waiting"] == 3 || Instant::now() > deadline => {
                assert_eq!(stats["waiting"], 3, "{stats:#}");
                break;
            }
            Waiting::Exact => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    let table = place.run(&["stats", place.receive], None).expect(0);
    assert!(table.stdout.contains("waiting"), "{table:#?}");
    receive_all(place, place.receive, 3);
}

/// A redrive killed with SIGKILL a third of the way and run again ends with every message
/// in the entity at least once and none in the dead-letter queue. `consumer` (on
/// `place.receive`) dead-letters the `count` messages first.
pub async fn redrive_killed_halfway(
    place: &Place<'_>,
    consumer: Box<dyn cloudbus::Subscriber>,
    count: usize,
) {
    let sent = place
        .run(
            &["send", place.publish, "--count", &count.to_string()],
            None,
        )
        .expect(0);
    assert!(
        sent.stderr.contains(&format!("sent {count} messages")),
        "{sent:#?}"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ids = BTreeSet::new();
    while ids.len() < count {
        assert!(
            Instant::now() < deadline,
            "the consumer got {} of {count}",
            ids.len()
        );
        for delivery in consumer
            .receive(10, Duration::from_secs(2))
            .await
            .expect("receive")
        {
            ids.insert(delivery.message().id.clone());
            delivery
                .dead_letter("Poison", "rejected by the test")
                .await
                .expect("dead-letter");
        }
    }
    consumer.close().await.expect("close");

    // The first redrive is killed once it has moved a third of them (a line each).
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cloudbus"))
        .args([
            "dlq",
            "redrive",
            place.receive,
            "--json",
            "--idle-timeout",
            place.idle,
        ])
        .envs(place.env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redrive runs");
    let stdout = child.stdout.take().expect("stdout");
    let moved_before_kill = tokio::task::block_in_place(|| {
        use std::io::BufRead;
        let mut moved = 0;
        for line in std::io::BufReader::new(stdout).lines() {
            if line.is_err() {
                break;
            }
            moved += 1;
            if moved >= count / 3 {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        moved
    });
    assert!(
        moved_before_kill >= count / 3,
        "the redrive moved {moved_before_kill} before the kill"
    );

    // Run again: it takes the rest, and what the killed run held once its locks run out.
    let again = place
        .run(
            &["dlq", "redrive", place.receive, "--idle-timeout", "12s"],
            None,
        )
        .expect(0);
    assert!(again.stderr.contains("moved"), "{again:#?}");
    let back = receive_at_least(place, &ids);
    let missing: Vec<&String> = ids.iter().filter(|id| !back.contains(*id)).collect();
    assert!(missing.is_empty(), "not back in the entity: {missing:?}");
    wait_for_dead_letters(place, 0);
}

/// Receives (and acks) until every id of `ids` came at least once; the ids received.
fn receive_at_least(place: &Place<'_>, ids: &BTreeSet<String>) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut got = BTreeSet::new();
    while !ids.iter().all(|id| got.contains(id)) {
        assert!(
            Instant::now() < deadline,
            "{} of {} came back",
            got.len(),
            ids.len()
        );
        let args = [
            "receive",
            place.receive,
            "--json",
            "--idle-timeout",
            place.idle,
        ];
        for record in place.run(&args, None).expect(0).json() {
            got.insert(record["id"].as_str().unwrap_or_default().to_string());
        }
    }
    got
}
