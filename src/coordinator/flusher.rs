//! Background delivery of outcomes and releases to the shared store.
//!
//! The caller of [`crate::Permit::record`] never waits for Redis: its settle goes into a
//! bounded queue. One task drains whatever has queued up and sends it as one batch (one
//! round trip). A small batch (fewer than [`SMALL`] items) first waits up to
//! `redis.settle_delay` after its first item for more to come, so that a lone caller's
//! settles are batched as well as a busy replica's; a batch that has grown to [`SMALL`] goes
//! at once (under load the queue batches by itself, and holding a batch back then only makes
//! the script call that carries it longer, in front of the admissions Redis runs next:
//! measured, a 2 ms wait for every batch cost 10–14% of throughput at concurrency 64). A
//! batch also goes at once when a flush is asked for, or when an item is urgent (a release
//! of a feature that has callers waiting on this replica). When the
//! queue is full the caller's settle is sent by a spawned task instead, so nothing blocks and
//! nothing is silently lost; on [`crate::Coordinator::shutdown`] the queue is flushed.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Sink;
use crate::store::{Settle, Store};

/// A batch this large is sent without waiting for more.
pub(crate) const SMALL: usize = 16;

pub(crate) enum Msg {
    /// A settle; `urgent`: send it without waiting for more.
    Settle {
        settle: Settle,
        urgent: bool,
    },
    Flush(oneshot::Sender<()>),
}

/// How the flusher batches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batching {
    /// Most settles in one delivery.
    pub(crate) max: usize,
    /// Longest wait for more after the first settle of a batch.
    pub(crate) delay: Duration,
}

pub(crate) async fn run(sink: Sink, mut rx: mpsc::Receiver<Msg>, batching: Batching) {
    let batch_max = batching.max.max(1);
    let mut batch: Vec<Settle> = Vec::with_capacity(batch_max);
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut send_now = take(first, &mut batch, &mut acks);
        let mut deadline: Option<Instant> = None;
        loop {
            // Whatever is queued already.
            while !send_now && batch.len() < batch_max {
                match rx.try_recv() {
                    Ok(msg) => send_now = take(msg, &mut batch, &mut acks),
                    Err(_) => break,
                }
            }
            if send_now || batch.len() >= batch_max.min(SMALL) || batching.delay.is_zero() {
                break;
            }
            // Wait a little for more (at most `delay` after the first).
            let until = *deadline.get_or_insert_with(|| Instant::now() + batching.delay);
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => send_now = take(msg, &mut batch, &mut acks),
                    None => break,
                },
                () = tokio::time::sleep_until(until) => break,
            }
        }
        if !batch.is_empty() {
            deliver(&sink, &batch).await;
            batch.clear();
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

/// Adds `msg` to the batch (or its flush request to `acks`); true when the batch must go now.
fn take(msg: Msg, batch: &mut Vec<Settle>, acks: &mut Vec<oneshot::Sender<()>>) -> bool {
    match msg {
        Msg::Settle { settle, urgent } => {
            batch.push(settle);
            urgent
        }
        Msg::Flush(ack) => {
            acks.push(ack);
            true
        }
    }
}

/// Sends one batch to the shared store and reports what it caused.
pub(crate) async fn deliver(sink: &Sink, batch: &[Settle]) {
    match sink.store.settle(batch).await {
        Ok(transitions) => {
            sink.reporter.store_ok();
            for t in transitions {
                sink.reporter.emit(crate::Event::Transition(t));
            }
            for s in batch.iter().filter(|s| s.permit) {
                if let Some(f) = sink.features.get(&s.feature.name) {
                    f.released.notify_one();
                }
            }
        }
        Err(error) => {
            sink.reporter.store_failed(&error);
            sink.reporter.emit(crate::Event::SettleDropped {
                count: batch.len(),
                error,
            });
        }
    }
}
