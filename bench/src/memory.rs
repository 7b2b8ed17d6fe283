//! The baseline of memory://: a plain bounded `tokio::sync::mpsc` channel doing the same
//! work (16 producers; one consumer loop), so the cost of the library layer shows.

use anyhow::{Result, bail};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::harness::{self, BATCH, BODY, PUBLISH_TASKS, Report, Sink, Source};
use crate::plan::Job;

fn body() -> Bytes {
    Bytes::from_static(BODY.as_bytes())
}

pub async fn run(job: &Job) -> Result<Report> {
    let n = job.messages;
    let elapsed = match job.scenario {
        "raw-single" => {
            // Room for every message, as the broker has: nothing reads while publishing.
            let (tx, _rx) = mpsc::channel(n);
            let sinks = (0..PUBLISH_TASKS)
                .map(|_| ChannelSink(tx.clone()))
                .collect();
            harness::publish::<ChannelSink>(sinks, n, 1).await?
        }
        "raw-batch" => {
            let (tx, _rx) = mpsc::channel(n.div_ceil(BATCH));
            let sinks = (0..PUBLISH_TASKS)
                .map(|_| BatchChannelSink(tx.clone()))
                .collect();
            harness::publish::<BatchChannelSink>(sinks, n, BATCH).await?
        }
        "raw-consume" => {
            let (tx, rx) = mpsc::channel(n);
            for _ in 0..n {
                tx.send(body()).await?;
            }
            let source = ChannelSource {
                rx,
                buffer: Vec::with_capacity(BATCH),
            };
            harness::consume(vec![source], n).await?
        }
        other => bail!("no memory baseline `{other}`"),
    };
    Ok(Report::timed(n, elapsed))
}

struct ChannelSink(mpsc::Sender<Bytes>);

impl Sink for ChannelSink {
    async fn send(&mut self, n: usize) -> Result<()> {
        for _ in 0..n {
            self.0.send(body()).await?;
        }
        Ok(())
    }
}

/// Sends up to 10 bodies as one channel item.
struct BatchChannelSink(mpsc::Sender<Vec<Bytes>>);

impl Sink for BatchChannelSink {
    async fn send(&mut self, n: usize) -> Result<()> {
        self.0.send(vec![body(); n]).await?;
        Ok(())
    }
}

struct ChannelSource {
    rx: mpsc::Receiver<Bytes>,
    buffer: Vec<Bytes>,
}

impl Source for ChannelSource {
    async fn take(&mut self) -> Result<usize> {
        let n = self.rx.recv_many(&mut self.buffer, BATCH).await;
        if n == 0 {
            bail!("the channel closed");
        }
        self.buffer.clear();
        Ok(n)
    }
}
