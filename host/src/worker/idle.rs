//! Which idle worker takes the next request: the one that went idle last.
//!
//! Workers of a version share one queue. Left to the channel, blocked receivers are woken in
//! the order they started waiting, so at one client two workers take turns, and each request
//! runs on the worker whose OpenMP team has gone cold while the other's team still spins on a
//! core it needs (MiniLM, two cores, one client: 101 requests/s with two workers, 134 with
//! one). Here only the most recently idle worker (the top of a stack) waits on the queue; the
//! others wait for a baton. A worker that goes idle takes the top and tells the previous top to
//! step down; the top that takes a job hands the queue to the worker below it. A job never
//! waits for a baton: whoever is on top is on the queue, or about to be, and a job found there
//! is taken at once.
//!
//! The client's next request follows its reply within a loopback round trip, often before the
//! worker that answered is back in the stack, so the worker holds the reply that completes its
//! batch until it is (`JobSink::hold_last`). With both, two workers serve one client at 130
//! requests/s (BENCHMARKS.md, `nlp-threads`); the stack alone gave 108.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{Receiver, Sender};

/// The idle workers of one version, most recently idle last.
#[derive(Default)]
pub struct IdleStack {
    waiting: Mutex<Vec<(u64, Sender<()>)>>,
}

/// One worker's place in an [`IdleStack`]: its token and its baton.
pub struct Seat {
    token: u64,
    baton_tx: Sender<()>,
    /// A message here: look again at whether this worker is on top.
    pub baton: Receiver<()>,
}

impl Seat {
    /// A new seat; tokens are unique within the process (worker indices are reused).
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let (baton_tx, baton) = crossbeam_channel::bounded(1);
        Self {
            token: NEXT.fetch_add(1, Ordering::Relaxed),
            baton_tx,
            baton,
        }
    }
}

impl Default for Seat {
    fn default() -> Self {
        Self::new()
    }
}

impl IdleStack {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Sender<()>)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `seat`'s worker is idle: it goes on top (it is the one to wait on the queue) and the
    /// previous top is told to step down. Leaves the stack when the guard drops.
    pub fn enter<'a>(&'a self, seat: &'a Seat) -> Idle<'a> {
        let mut waiting = self.waiting();
        if let Some((_, previous)) = waiting.last() {
            // A full baton already says "look again".
            let _ = previous.try_send(());
        }
        waiting.push((seat.token, seat.baton_tx.clone()));
        Idle { stack: self, seat }
    }

    /// Whether `seat`'s worker is on top.
    fn on_top(&self, seat: &Seat) -> bool {
        self.waiting().last().is_some_and(|(t, _)| *t == seat.token)
    }

    fn leave(&self, seat: &Seat) {
        let mut waiting = self.waiting();
        let Some(at) = waiting.iter().position(|(t, _)| *t == seat.token) else {
            return;
        };
        waiting.remove(at);
        // The top left: the worker below takes the queue.
        if at == waiting.len() {
            if let Some((_, next)) = waiting.last() {
                let _ = next.try_send(());
            }
        }
    }
}

/// A worker's time in the idle stack.
pub struct Idle<'a> {
    stack: &'a IdleStack,
    seat: &'a Seat,
}

impl Idle<'_> {
    /// Whether this worker is the one to wait on the queue now.
    pub fn on_top(&self) -> bool {
        self.stack.on_top(self.seat)
    }
}

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.stack.leave(self.seat);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_worker_to_go_idle_is_on_top_and_the_one_below_takes_over_when_it_leaves() {
        let stack = IdleStack::default();
        let (a, b, c) = (Seat::new(), Seat::new(), Seat::new());
        let idle_a = stack.enter(&a);
        assert!(idle_a.on_top());
        assert!(a.baton.try_recv().is_err(), "nobody told a anything yet");
        let idle_b = stack.enter(&b);
        assert!(idle_b.on_top() && !idle_a.on_top());
        assert!(a.baton.try_recv().is_ok(), "a was told to step down");
        let idle_c = stack.enter(&c);
        assert!(b.baton.try_recv().is_ok());
        // A worker below the top leaves (told to stop): nobody needs waking.
        drop(idle_b);
        assert!(idle_c.on_top());
        assert!(a.baton.try_recv().is_err());
        // The top takes a job: the worker below it is woken to wait on the queue.
        drop(idle_c);
        assert!(idle_a.on_top());
        assert!(a.baton.try_recv().is_ok(), "a was handed the queue");
        drop(idle_a);
        assert!(stack.waiting().is_empty());
    }
}
