//! Connections bound to a thread: for thread-per-core servers (`fusebox serve`), whose every
//! serving thread runs a single-threaded runtime of its own.
//!
//! A store's connection is driven by a task on the runtime that first used it (redis-rs's
//! multiplexed connection): on the thread that built the coordinator. A call made on another
//! thread's runtime then costs two wake-ups across threads, one to hand the command to that
//! task and one to hand the reply back (measured in `fusebox serve` at concurrency 1 on a
//! 2-core machine: 30–60 µs of CPU per request, and a p50 about 20 µs longer). A thread that
//! binds the store ([`RedisStore::bind_thread`]) gets a second connection to the same node,
//! driven by its own runtime; the store's script calls made on that thread use it.
//!
//! Nothing about the decisions changes: which connection carries a call never mattered to
//! its order (an admission waits for the flusher's calls in flight on its keys by their
//! replies, and one admission script call is in flight at a time, whatever the connection),
//! and the binding is the store's own (the same timeout, health and error mapping). Calls
//! made elsewhere (the batcher, the flusher, compensations: tasks of the store's runtime)
//! keep the store's connection. On Redis Cluster there is no binding (its connection is one
//! per node already, and admissions there always go through the batcher).

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use super::conn::Conn;

/// Identifies a store ([`super::Core`]) and a binding, for the thread-local table.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(super) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

struct Entry {
    store: u64,
    binding: u64,
    conn: Conn,
}

thread_local! {
    /// This thread's bound connections, by store.
    static BOUND: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

/// The connection this thread bound for `store`, if any (the newest binding).
pub(super) fn conn_for(store: u64) -> Option<Conn> {
    BOUND
        .try_with(|b| {
            b.borrow()
                .iter()
                .rev()
                .find(|e| e.store == store)
                .map(|e| e.conn.clone())
        })
        .ok()
        .flatten()
}

/// Binds `conn` to this thread for `store`.
pub(super) fn bind(store: u64, conn: Conn) -> ThreadBinding {
    let binding = next_id();
    BOUND.with(|b| {
        b.borrow_mut().push(Entry {
            store,
            binding,
            conn,
        });
    });
    ThreadBinding {
        binding,
        _not_send: PhantomData,
    }
}

/// A store's connection bound to the current thread
/// ([`Coordinator::bind_thread`](crate::Coordinator::bind_thread)); dropping it unbinds
/// (calls on this thread go back to the store's shared connection). Keep it for as long as
/// the thread's runtime runs: the bound connection is driven by that runtime. It cannot leave
/// its thread.
#[must_use = "the binding ends when this is dropped"]
pub struct ThreadBinding {
    binding: u64,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for ThreadBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadBinding").finish_non_exhaustive()
    }
}

impl Drop for ThreadBinding {
    fn drop(&mut self) {
        let binding = self.binding;
        let _ = BOUND.try_with(|b| b.borrow_mut().retain(|e| e.binding != binding));
    }
}
