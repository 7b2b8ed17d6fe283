//! The markdown table, and the section `--write` puts between the markers of a file.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

use crate::harness::Report;
use crate::plan::Job;

const START: &str = "<!-- bench:start -->";
const END: &str = "<!-- bench:end -->";

/// One scenario's outcomes, one per round.
pub struct Row {
    pub job: Job,
    pub rounds: Vec<Result<Report, String>>,
}

impl Row {
    /// The reports of the rounds that succeeded.
    fn reports(&self) -> impl Iterator<Item = (usize, &Report)> {
        self.rounds
            .iter()
            .enumerate()
            .filter_map(|(round, result)| Some((round, result.as_ref().ok()?)))
    }

    /// The first failure, if every round failed.
    fn failure(&self) -> Option<&str> {
        match self.reports().next() {
            Some(_) => None,
            None => self
                .rounds
                .iter()
                .find_map(|r| r.as_ref().err().map(String::as_str)),
        }
    }

    /// The succeeded round with the median value of `key`.
    fn median_by(&self, key: impl Fn(&Report) -> f64) -> Option<&Report> {
        let mut reports: Vec<&Report> = self.reports().map(|(_, r)| r).collect();
        reports.sort_by(|a, b| key(a).total_cmp(&key(b)));
        reports.get(reports.len().saturating_sub(1) / 2).copied()
    }
}

/// The median of `values` (the lower middle one for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len().saturating_sub(1) / 2).copied()
}

/// The baselines a scenario's throughput is compared with (same transport).
fn baselines(scenario: &str) -> &'static [&'static str] {
    match scenario {
        "cloudbus-publish" => &[
            "raw-batch",
            "raw-batch-envelope",
            "raw-batch-envelope-serial",
            "raw-single",
        ],
        "omniqueue" => &["raw-batch", "raw-single"],
        "cloudbus-publish-batch" => &["raw-batch", "raw-batch-envelope"],
        "cloudbus-publish-batch-16" => &["raw-batch"],
        "cloudbus-consume" => &["raw-consume-tasks", "raw-consume"],
        "omniqueue-consume" | "cloudbus-drain-100k" => &["raw-consume"],
        "cloudbus-receive" => &["raw-consume"],
        _ => &[],
    }
}

fn latency_ratio(report: &Report) -> f64 {
    report.latency.as_ref().map_or(0.0, |latency| {
        latency.cloudbus.p50_us as f64 / latency.raw.p50_us.max(1) as f64
    })
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| transport | scenario | messages | msg/s | vs baseline | peak RSS | notes |\n\
         |---|---|---:|---:|---|---:|---|\n",
    );
    for row in rows {
        let job = &row.job;
        if let Some(error) = row.failure() {
            out.push_str(&format!(
                "| {} | {} | {} | – | – | – | failed: {} |\n",
                job.transport.name(),
                job.scenario,
                thousands(job.messages as f64),
                error.replace('|', "/").replace('\n', " ")
            ));
            continue;
        }
        let is_latency = row.reports().any(|(_, r)| r.latency.is_some());
        let Some(report) = (if is_latency {
            row.median_by(latency_ratio)
        } else {
            row.median_by(Report::rate)
        }) else {
            continue;
        };
        let mut notes = Vec::new();
        let (rate, ratio_text) = match &report.latency {
            Some(latency) => {
                notes.push(format!(
                    "{} calls each; p50 / p90: raw SendMessage {} / {} µs, cloudbus publish() {} / {} µs",
                    report.messages,
                    thousands(latency.raw.p50_us as f64),
                    thousands(latency.raw.p90_us as f64),
                    thousands(latency.cloudbus.p50_us as f64),
                    thousands(latency.cloudbus.p90_us as f64),
                ));
                (
                    "–".to_string(),
                    format!("p50 {}× raw", ratio(latency_ratio(report))),
                )
            }
            None => (thousands(report.rate()), ratios(rows, row)),
        };
        let rates: Vec<f64> = row.reports().map(|(_, r)| r.rate()).collect();
        if rates.len() > 1 && !is_latency {
            let (low, high) = rates
                .iter()
                .fold((f64::MAX, 0.0_f64), |(l, h), r| (l.min(*r), h.max(*r)));
            notes.push(format!(
                "{} rounds: {}–{} msg/s",
                rates.len(),
                thousands(low),
                thousands(high)
            ));
        }
        let failed = row.rounds.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            notes.push(format!("{failed} round(s) failed"));
        }
        notes.extend(report.note.clone());
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} MiB | {} |\n",
            job.transport.name(),
            job.scenario,
            thousands(report.messages as f64),
            rate,
            ratio_text,
            report.peak_rss_kib as f64 / 1024.0,
            notes.join("; ")
        ));
    }
    out
}

/// "0.93× raw-batch, 6.50× raw-single": for each baseline, the median over the rounds of
/// this row's msg/s over the baseline's msg/s in the same round.
fn ratios(rows: &[Row], row: &Row) -> String {
    baselines(row.job.scenario)
        .iter()
        .filter_map(|baseline| {
            let base = rows
                .iter()
                .find(|r| r.job.transport == row.job.transport && r.job.scenario == *baseline)?;
            let per_round = row
                .reports()
                .filter_map(|(round, report)| {
                    let base = base.rounds.get(round)?.as_ref().ok()?.rate();
                    (base > 0.0).then(|| report.rate() / base)
                })
                .collect();
            median(per_round).map(|value| format!("{}× {baseline}", ratio(value)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Two decimals, three below 0.1 (the memory transport's ratios are small).
fn ratio(value: f64) -> String {
    if value < 0.1 {
        format!("{value:.3}")
    } else {
        format!("{value:.2}")
    }
}

/// What the scenarios are, under the table.
const LEGEND: &str = "\
- **raw-single / raw-batch**: the SDK directly, 16 tasks: SQS SendMessage / SendMessageBatch(10), \
SNS Publish / PublishBatch(10), azservicebus `send_message` / a 10-message `ServiceBusMessageBatch` \
(each task with a client of its own, on a current-thread runtime as cloudbus runs it: fe2o3-amqp \
loses settlements on a multi-threaded one); \
memory: a bounded `tokio::sync::mpsc` channel of the bodies (raw-batch: of 10-body vectors); \
Kafka: an idempotent rdkafka `FutureProducer` (`acks=all`, `linger.ms=1`, as cloudbus's), each task \
sending one record (or 10) and awaiting its acknowledgement; \
RabbitMQ: lapin on one confirm-mode channel shared by the 16 tasks, each publishing one persistent, \
mandatory message (or 10 at once) to the queue and awaiting its confirm (or the 10 together), the work of cloudbus's \
`publish()` (`publish_batch()`). \
Single-message runs on SQS, SNS and Service Bus send N/4; every Kafka scenario moves 10 N \
(N would take a fraction of a second), and the parent deletes its topics after it; every RabbitMQ \
scenario moves 2 N (N takes about a second for the batched and 80-task ones), on a durable quorum queue declared \
as cloudbus declares it (`create=true`: its delivery limit and `<queue>.dlq`) for raw and cloudbus scenarios alike, \
that the parent deletes after it; cloudbus's subscribers run with the raw consumer's window as `prefetch` (80; 10 for cloudbus-receive) (with the \
default 0 the window grows with what receive calls ask for, in several consumers, which costs the broker more: \
0.66x raw-consume-tasks in one run). **raw-batch-envelope** (SQS): raw-batch with one \
string attribute per message the size of cloudbus's envelope (`cloudbus` = `{\"id\":\"<uuid>\"}`), so the \
broker does the same work per message as for cloudbus: the ratio to it isolates the batching. \
**raw-batch-envelope-serial** (SQS): the same from one task, one call at a time: the calls 16 \
`publish()` callers allow, since 16 waiting messages fill one batch of 10 and the rest waits for the next.
- **cloudbus-publish**: `Publisher::publish()` of one message per call from 16 tasks; \
**cloudbus-publish-batch**: `publish_batch()` of 10; \
**cloudbus-publish-batch-16** (Service Bus): the same from 16 publishers, a connection each, as the raw loop's 16 clients.
- **omniqueue**: omniqueue `SqsProducer::send_raw`, 16 tasks, one message per call (N/4).
- **latency**: sequential calls alternating raw SendMessage and cloudbus `publish()` \
(`batching=false`), after 20 warm-up calls each.
- **raw-consume**: N pre-filled (untimed), 8 tasks each ReceiveMessage(10, wait 1 s) + DeleteMessageBatch \
(Service Bus: peek-lock `receive_messages` of 10 with 1 s wait, `complete_message` each; memory: one loop on the channel; \
Kafka: one rdkafka `StreamConsumer` loop reading each record and storing its offset for the next auto-commit, every second; \
RabbitMQ: one lapin consumer with prefetch 10 taking up to 10 deliveries and acking each, the window of cloudbus's `receive(10)`); \
SNS: the queue subscribed to the topic (raw delivery). Time until the N-th is settled. \
**raw-consume-tasks** (Kafka, RabbitMQ): the same consumer, each record handled in a task of its own, 80 at a time \
(what the `Consumer` does), storing its offset (RabbitMQ: acking the delivery, prefetch 80) when done. Kafka consume scenarios are timed from their first record: \
a new group's first assignment takes about half its session timeout on the test broker (the note gives it).
- **cloudbus-receive** (Kafka, RabbitMQ): the subscriber alone in the raw loop's shape: one task receiving 10 and acking each.
- **cloudbus-consume**: `Consumer` with concurrency 80, receive wait 1 s, a handler that acks \
(Service Bus: a subscriber with `receivers=8`, as many connections as the raw loop's clients); \
time until the N-th is handled. **cloudbus-drain-100k**: the same on a 100,000-message backlog.
- **omniqueue-consume**: 8 tasks each `receive_all(10, 1 s)` then `ack` of each.
- **peak RSS**: VmHWM of the scenario's own process. The parent creates entities and pre-fills \
backlogs before starting it (memory:// excepted: its broker lives in the process).
- **rounds**: the scenarios of a transport run in turn, round after round; **msg/s** and \
**peak RSS** are those of the median round, **vs baseline** is the median over the rounds of \
msg/s divided by the baseline's msg/s in the same round (above 1: faster). LocalStack's own \
speed drifts by tens of percent between runs, so ratios within a round are the figure to read.";

/// The section between the markers.
pub fn section(table: &str, command: &str) -> String {
    format!(
        "Run on {}: {}. Bodies of 256 bytes; LocalStack (host mode) for SQS and SNS, the \
         project's emulator for Service Bus, each in its own process.\n\n```sh\n{command}\n```\n\n{table}\n{LEGEND}\n",
        today(),
        machine()
    )
}

/// Replaces the text between the markers in `path`, adding the markers at the end if absent.
pub fn write(path: &Path, section: &str) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let block = format!("{START}\n{section}{END}");
    let updated = match text
        .find(START)
        .and_then(|s| Some((s, s + text[s..].find(END)?)))
    {
        Some((start, end)) => format!("{}{block}{}", &text[..start], &text[end + END.len()..]),
        None if text.trim().is_empty() => format!("{block}\n"),
        None => format!("{}\n\n{block}\n", text.trim_end()),
    };
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

/// "2 cores (nproc), AMD EPYC, 23.5 GiB memory".
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find(|line| line.starts_with("MemTotal:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0.0);
    format!(
        "{cores} cores (`nproc`), {model}, {:.1} GiB memory",
        memory_kib / (1024.0 * 1024.0)
    )
}

/// Today's date (UTC), YYYY-MM-DD.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// 12345.6 -> "12,346".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
