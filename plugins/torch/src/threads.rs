//! libtorch threads per batch.
//!
//! libtorch's OpenMP team size is a property of the calling thread (libgomp keeps it per thread),
//! so each worker thread can run a batch with its own count. A worker's static share of the cores
//! (`cores / workers`) wastes cores whenever its siblings are idle: with two workers on two cores,
//! one client gets one thread. When the server divides the cores itself (`intra_op_threads = 0`,
//! its default: it then sets `CRESSET_DYNAMIC_THREADS=1`), a batch runs instead with the cores the
//! process's busy workers leave it: `free / busy` (at least one), counted across every torch
//! plugin in the process, since they share the cores. `free` is the process's cores less what
//! other processes have kept busy over the last second (read from `/proc/stat` and
//! `/proc/self/stat` twice a second: user, system and steal time, interrupts left out): an OpenMP team wider than the cores it really has waits
//! at every barrier for a thread the kernel has descheduled (measured: 4× slower beside one busy
//! core; BENCHMARKS.md, `nlp-threads`). An operator's explicit `intra_op_threads` is kept as it
//! is.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Workers of this process inside a batch now.
static BUSY: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The team size last set on this thread (0: never).
    static SET: Cell<i32> = const { Cell::new(0) };
}

/// Whether the server asked for threads per batch (`CRESSET_DYNAMIC_THREADS=1`).
pub fn dynamic() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| std::env::var("CRESSET_DYNAMIC_THREADS").is_ok_and(|v| v == "1"))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Cores other processes keep busy, in hundredths, as the sampler last measured them.
static OTHERS: AtomicUsize = AtomicUsize::new(0);

/// Jiffies: (all CPUs busy in user, system or steal time, all CPUs total) from `/proc/stat`'s first line, and this process's
/// (user + system) from `/proc/self/stat`.
fn sample() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user, nice, system, idle, iowait, irq, softirq, steal: busy is what processes (and the
    // hypervisor, as steal) ran, not interrupts (loopback traffic lands there).
    let total: u64 = cpu.iter().take(8).sum();
    let busy = cpu.first()? + cpu.get(1)? + cpu.get(2)? + cpu.get(7).unwrap_or(&0);
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start past its closing parenthesis.
    let after = own.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    Some((busy, total, utime + stime))
}

/// Cores other processes kept busy between two samples: all busy jiffies less this process's,
/// over the elapsed jiffies of one CPU (the total over all CPUs divided by `cpus`).
pub fn others_busy(before: (u64, u64, u64), after: (u64, u64, u64), cpus: usize) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let own = after.2.saturating_sub(before.2) as f64;
    let elapsed = after.1.saturating_sub(before.1) as f64 / cpus.max(1) as f64;
    if elapsed <= 0.0 {
        return 0.0;
    }
    ((busy - own) / elapsed).max(0.0)
}

/// The cores this process has: its cores less those other processes keep busy (a core counts
/// as taken from 0.6 of it on: a busy co-tenant gets about that much of a core from the
/// scheduler while our threads compete with it; a client or two on loopback stay below), at
/// least one.
pub fn free_cores(cores: usize, others: f64) -> usize {
    let taken = (others + 0.4).floor() as usize;
    cores.saturating_sub(taken).max(1)
}

/// Start the sampler once (dynamic threads only).
fn start_sampler() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let cpus = std::fs::read_to_string("/proc/stat")
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
                    .count()
            })
            .unwrap_or(1);
        let spawned = std::thread::Builder::new()
            .name("cresset-cpu-sampler".into())
            .spawn(move || {
                let mut last = sample();
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    let now = sample();
                    if let (Some(a), Some(b)) = (last, now) {
                        let others = others_busy(a, b, cpus);
                        OTHERS.store((others * 100.0) as usize, Ordering::Relaxed);
                    }
                    last = now;
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(
                "cannot start the CPU sampler ({e}): threads per batch ignore other processes"
            );
        }
    });
}

/// One batch's hold on the cores: made by [`Batch::enter`], given back when dropped.
pub struct Batch {
    threads: i32,
}

impl Batch {
    /// Enter a batch on this thread, which was assigned `assigned` threads: with dynamic threads,
    /// set this thread's team to the cores the busy workers leave it; else to `assigned`.
    pub fn enter(assigned: u32) -> Self {
        let busy = BUSY.fetch_add(1, Ordering::SeqCst) + 1;
        let threads = if dynamic() {
            start_sampler();
            let others = OTHERS.load(Ordering::Relaxed) as f64 / 100.0;
            (free_cores(cores(), others) / busy).max(1) as i32
        } else {
            assigned.max(1) as i32
        };
        SET.with(|set| {
            if set.get() != threads {
                tch::set_num_threads(threads);
                set.set(threads);
            }
        });
        Self { threads }
    }

    /// The threads this batch runs with.
    pub fn threads(&self) -> i32 {
        self.threads
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_processes_busy_cores_are_taken_from_the_free_ones() {
        // Two CPUs, 100 jiffies each elapsed (200 in all): 150 busy, 40 of them ours, so others
        // kept 1.1 cores busy.
        let others = others_busy((1000, 10_000, 500), (1150, 10_200, 540), 2);
        assert!((others - 1.1).abs() < 1e-9, "{others}");
        assert_eq!(free_cores(2, others), 1);
        assert_eq!(free_cores(2, 0.5), 2, "half a core is not taken");
        assert_eq!(free_cores(2, 0.6), 1);
        assert_eq!(free_cores(2, 5.0), 1, "never below one");
        assert_eq!(others_busy((0, 0, 0), (0, 0, 0), 2), 0.0);
        // This process's own reading parses.
        assert!(sample().is_some());
    }

    #[test]
    fn a_batch_keeps_its_assigned_threads_unless_the_server_divides_the_cores() {
        // Without CRESSET_DYNAMIC_THREADS the assignment stands, and the busy count goes back.
        if dynamic() {
            return;
        }
        let before = BUSY.load(Ordering::SeqCst);
        {
            let batch = Batch::enter(1);
            assert_eq!(batch.threads(), 1);
            assert_eq!(tch::get_num_threads(), 1);
        }
        assert_eq!(BUSY.load(Ordering::SeqCst), before);
    }
}
