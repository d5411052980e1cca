//! Background delivery of outcomes and releases to the shared store.
//!
//! The caller of [`crate::Permit::record`] never waits for Redis: its settle goes into a
//! bounded queue. One task drains whatever has queued up (natural batching: one item when
//! idle, up to `settle_batch` under load) and sends the batch as one round trip. When the
//! queue is full the caller's settle is sent by a spawned task instead, so nothing blocks
//! and nothing is silently lost; on [`crate::Coordinator::shutdown`] the queue is flushed.

use tokio::sync::{mpsc, oneshot};

use super::Sink;
use crate::store::{Settle, Store};

pub(crate) enum Msg {
    Settle(Settle),
    Flush(oneshot::Sender<()>),
}

pub(crate) async fn run(sink: Sink, mut rx: mpsc::Receiver<Msg>, batch_max: usize) {
    let mut batch: Vec<Settle> = Vec::with_capacity(batch_max);
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Settle(s) => batch.push(s),
                Msg::Flush(ack) => acks.push(ack),
            }
            if batch.len() >= batch_max || !acks.is_empty() {
                break;
            }
            next = rx.try_recv().ok();
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
