//! The timing harness every scenario shares: N messages spread over concurrent tasks
//! (publishing), progress towards N (consuming), and the report a scenario's process prints.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::plan::{LATENCY_CALLS, LATENCY_WARMUP};

/// Concurrent tasks of the publish scenarios.
pub const PUBLISH_TASKS: usize = 16;
/// Concurrent tasks of the raw consume scenarios.
pub const CONSUME_TASKS: usize = 8;
/// Messages per batch call (the SQS and SNS limit).
pub const BATCH: usize = 10;
/// A consumer that makes no progress for this long fails its scenario.
const STALL_LIMIT: Duration = Duration::from_secs(60);

const BODY_BYTES: [u8; 256] = {
    let mut bytes = [0u8; 256];
    let mut i = 0;
    while i < bytes.len() {
        bytes[i] = b'a' + (i % 26) as u8;
        i += 1;
    }
    bytes
};

/// The body of every message: 256 bytes of ASCII, which every transport carries as is.
pub const BODY: &str = match std::str::from_utf8(&BODY_BYTES) {
    Ok(body) => body,
    Err(_) => panic!("the body is ASCII"),
};

/// One task's way to send: `send(n)` sends `n` messages in one call, or `n` calls of the
/// single-message API for a single-message sink.
pub trait Sink: Send + 'static {
    fn send(&mut self, n: usize) -> impl Future<Output = Result<()>> + Send;
}

/// One task's way to consume: receives up to [`BATCH`] messages, settles them, and returns
/// how many it settled.
pub trait Source: Send + 'static {
    fn take(&mut self) -> impl Future<Output = Result<usize>> + Send;
}

/// Sends `total` messages, `per_call` at a time, from one task per sink; returns the time
/// until the last call returned.
pub async fn publish<S: Sink>(sinks: Vec<S>, total: usize, per_call: usize) -> Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for mut sink in sinks {
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let from = next.fetch_add(per_call, Ordering::Relaxed);
                if from >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                sink.send(per_call.min(total - from)).await?;
            }
        });
    }
    join_all(&mut tasks, "publisher").await?;
    Ok(start.elapsed())
}

/// Consumes `total` messages with one task per source; returns the time until the
/// `total`-th was settled.
pub async fn consume<S: Source>(sources: Vec<S>, total: usize) -> Result<Duration> {
    consume_counting(sources, total).await?.elapsed()
}

/// As [`consume`], with the whole [`Progress`] (when the first message came, too).
pub async fn consume_counting<S: Source>(sources: Vec<S>, total: usize) -> Result<Progress> {
    let progress = Progress::start(total);
    let mut tasks = JoinSet::new();
    for mut source in sources {
        let progress = progress.clone();
        tasks.spawn(async move {
            while !progress.is_done() {
                let n = source.take().await?;
                progress.add(n);
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    tokio::select! {
        joined = join_all(&mut tasks, "consumer") => joined?,
        stalled = progress.stalled() => return Err(stalled),
    }
    Ok(progress)
}

async fn join_all(tasks: &mut JoinSet<Result<()>>, what: &str) -> Result<()> {
    while let Some(joined) = tasks.join_next().await {
        joined.with_context(|| format!("a {what} task panicked"))??;
    }
    Ok(())
}

/// Messages consumed so far against a target, and the time the target was reached.
#[derive(Clone)]
pub struct Progress(Arc<ProgressState>);

struct ProgressState {
    target: u64,
    done: AtomicU64,
    start: Instant,
    first: OnceLock<Duration>,
    reached: OnceLock<Duration>,
}

impl Progress {
    /// Starts the clock.
    pub fn start(target: usize) -> Self {
        Progress(Arc::new(ProgressState {
            target: target as u64,
            done: AtomicU64::new(0),
            start: Instant::now(),
            first: OnceLock::new(),
            reached: OnceLock::new(),
        }))
    }

    /// Counts `n` more; true for the call that reaches the target.
    pub fn add(&self, n: usize) -> bool {
        let state = &self.0;
        let before = state.done.fetch_add(n as u64, Ordering::AcqRel);
        if before == 0 && n > 0 {
            let _ = state.first.set(state.start.elapsed());
        }
        let reached = before < state.target && before + n as u64 >= state.target;
        if reached {
            let _ = state.reached.set(state.start.elapsed());
        }
        reached
    }

    pub fn is_done(&self) -> bool {
        self.0.done.load(Ordering::Acquire) >= self.0.target
    }

    /// The time from [`Progress::start`] to the target.
    pub fn elapsed(&self) -> Result<Duration> {
        self.0.reached.get().copied().ok_or_else(|| {
            anyhow!(
                "stopped after {} of {} messages",
                self.0.done.load(Ordering::Acquire),
                self.0.target
            )
        })
    }

    /// The time from the first message counted to the target (for consumers whose start,
    /// such as joining a consumer group, takes a while), and the time to that first one.
    pub fn elapsed_after_first(&self) -> Result<(Duration, Duration)> {
        let first = self.0.first.get().copied().unwrap_or_default();
        Ok((self.elapsed()?.saturating_sub(first), first))
    }

    /// Resolves (to the error to report) once nothing has been counted for [`STALL_LIMIT`]
    /// while the target is not reached; never resolves otherwise.
    pub async fn stalled(&self) -> anyhow::Error {
        let mut last = 0;
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let done = self.0.done.load(Ordering::Acquire);
            if done != last || self.is_done() {
                last = done;
                since = Instant::now();
            } else if since.elapsed() >= STALL_LIMIT {
                return anyhow!(
                    "no message consumed for {} s: stuck at {done} of {}",
                    STALL_LIMIT.as_secs(),
                    self.0.target
                );
            }
        }
    }
}

/// What a scenario's process prints: one JSON line.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Messages the timed part handled (calls per side for the latency scenario).
    pub messages: u64,
    /// Duration of the timed part.
    pub seconds: f64,
    /// VmHWM of the process, KiB.
    pub peak_rss_kib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    pub fn timed(messages: usize, elapsed: Duration) -> Self {
        Report {
            messages: messages as u64,
            seconds: elapsed.as_secs_f64(),
            ..Report::default()
        }
    }

    pub fn with_note(mut self, note: Option<String>) -> Self {
        self.note = note;
        self
    }

    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.messages as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Sequential call latencies of the raw SDK and of cloudbus.
#[derive(Debug, Serialize, Deserialize)]
pub struct Latency {
    pub raw: Percentiles,
    pub cloudbus: Percentiles,
}

impl Latency {
    /// Alternates `raw` and `cloudbus` calls, warm-up first, and reports both latencies
    /// (the report's time is the sum of the measured calls).
    pub async fn measure(
        mut raw: impl AsyncFnMut() -> Result<()>,
        mut cloudbus: impl AsyncFnMut() -> Result<()>,
    ) -> Result<Report> {
        let mut raw_took = Vec::with_capacity(LATENCY_CALLS);
        let mut library_took = Vec::with_capacity(LATENCY_CALLS);
        for call in 0..LATENCY_WARMUP + LATENCY_CALLS {
            let start = Instant::now();
            raw().await?;
            let raw_call = start.elapsed();
            let start = Instant::now();
            cloudbus().await?;
            let library_call = start.elapsed();
            if call >= LATENCY_WARMUP {
                raw_took.push(raw_call);
                library_took.push(library_call);
            }
        }
        let total = raw_took.iter().chain(&library_took).sum();
        Ok(Report {
            latency: Some(Latency {
                raw: Percentiles::of(&mut raw_took),
                cloudbus: Percentiles::of(&mut library_took),
            }),
            ..Report::timed(LATENCY_CALLS, total)
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_us: u64,
    pub p90_us: u64,
}

impl Percentiles {
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples.get(index).map_or(0, |d| d.as_micros() as u64)
        };
        Percentiles {
            p50_us: at(0.5),
            p90_us: at(0.9),
        }
    }
}

/// The peak resident set size of this process (VmHWM), KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}
