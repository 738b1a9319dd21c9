//! A version's worker pool: one thread per plugin instance, started and stopped by scaling, and
//! which device each instance gets.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cresset_plugin_api::{Capabilities, DeviceType, InstanceAssignment, ModelBox};
use crossbeam_channel::{Receiver, Sender};

use super::load::LoadError;
use crate::archive::{DeviceKind, ModelConfig};
use crate::metrics::Metrics;
use crate::worker::idle::IdleStack;
use crate::worker::{self, Job, StatusCell, WorkerSpec, WorkerStatus};

/// One worker thread of a version.
struct WorkerHandle {
    id: u32,
    status: StatusCell,
    started: SystemTime,
    threads: u32,
    stop: Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What describe and metrics show of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its id within the version (also its instance index).
    pub id: u32,
    /// What it is doing.
    pub status: WorkerStatus,
    /// When it started.
    pub started: SystemTime,
    /// libtorch intra-op threads it was given.
    pub threads: u32,
}

/// What every worker of a version shares.
pub struct PoolSpec {
    /// Model name, for thread names, logs and metrics.
    pub model: String,
    /// The version.
    pub version: String,
    /// The version's config (batching, devices, timeouts).
    pub config: ModelConfig,
    /// The version's queue.
    pub queue: Receiver<Job>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The plugin does continuous batching.
    pub continuous: bool,
    /// Intra-op threads per instance; 0 = cores / instances.
    pub intra_op_threads: u32,
}

/// The workers of one version.
#[derive(Default)]
pub struct WorkerPool {
    workers: Mutex<Vec<WorkerHandle>>,
    /// Its idle workers, most recently idle on top (the one that takes the next request).
    idle: Arc<IdleStack>,
}

impl WorkerPool {
    /// The workers, in start order.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers
            .iter()
            .map(|w| WorkerInfo {
                id: w.id,
                status: w.status.get(),
                started: w.started,
                threads: w.threads,
            })
            .collect()
    }

    /// Workers that have not stopped.
    pub fn live(&self) -> usize {
        self.workers()
            .iter()
            .filter(|w| w.status != WorkerStatus::Stopped)
            .count()
    }

    /// Start or stop workers until `target` are live. New workers are waited for; a worker
    /// that fails to start is an error (the others stay). Stopped workers finish their current
    /// batch and what is queued first.
    pub fn scale(
        &self,
        spec: &PoolSpec,
        model: &Arc<ModelBox>,
        target: u32,
    ) -> Result<(), LoadError> {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|w| w.status.get() != WorkerStatus::Stopped);
        let live = workers.len() as u32;
        if target < live {
            for worker in workers.drain(target as usize..) {
                let _ = worker.stop.send(());
            }
            return Ok(());
        }
        let threads = match spec.intra_op_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
                .div_euclid(target.max(1))
                .max(1),
            n => n,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for _ in live..target {
            // The lowest index no live worker has: indices pick devices, so they are reused.
            let id = (0..)
                .find(|i| workers.iter().all(|w| w.id != *i))
                .unwrap_or(0);
            let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
            let status = StatusCell::default();
            let worker_spec = WorkerSpec {
                model: spec.model.clone(),
                version: spec.version.clone(),
                plugin_model: model.clone(),
                assignment: assignment(&spec.config, id, threads),
                queue: spec.queue.clone(),
                stop: stop_rx,
                status: status.clone(),
                batch_size: spec.config.batch_size as usize,
                metrics: spec.metrics.clone(),
                reply_timeout: Duration::from_secs(spec.config.response_timeout_s),
                continuous: spec.continuous,
                idle: self.idle.clone(),
            };
            let thread = worker::spawn(worker_spec, ready_tx.clone())
                .map_err(|e| LoadError::Host(format!("cannot start a worker thread: {e}")))?;
            workers.push(WorkerHandle {
                id,
                status,
                started: SystemTime::now(),
                threads,
                stop: stop_tx,
                thread: Some(thread),
            });
        }
        drop(workers);
        drop(ready_tx);
        let mut first_error = None;
        for _ in live..target {
            let outcome = match ready_rx.recv() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(LoadError::Instance(e)),
                Err(_) => Err(LoadError::Host(
                    "a worker thread ended before it was ready".into(),
                )),
            };
            if let (Err(e), None) = (outcome, &first_error) {
                first_error = Some(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stop every worker and wait for each to exit (dropping its instance).
    pub fn stop_all(&self) {
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for mut worker in workers {
            let _ = worker.stop.send(());
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The most workers [`auto_workers`] starts.
const MAX_AUTO_WORKERS: u32 = 4;

/// The workers a model gets where its config leaves `min_workers`/`max_workers` unset: one per
/// core (at most `MAX_AUTO_WORKERS`) for a CPU model whose plugin shares one copy of the
/// weights among its instances ([`Capabilities::SHARED_WEIGHTS`]) and batches request by
/// request; one otherwise (a second copy of the weights, or a second continuous-batching
/// engine, is not free). With the server dividing the cores (`intra_op_threads = 0`), a lone
/// busy worker still runs with every core (`cresset_torch::threads`), and under load each
/// worker runs a batch on its own core, which beats one worker with an OpenMP team on small
/// models (BENCHMARKS.md, `nlp-threads`). An operator's `intra_op_threads` (`threads`, 0 when
/// unset) divides the cores instead: one worker per that many cores.
pub fn auto_workers(config: &ModelConfig, caps: Capabilities, threads: u32) -> u32 {
    let per_core = config.device_type == DeviceKind::Cpu
        && caps.contains(Capabilities::SHARED_WEIGHTS)
        && !caps.contains(Capabilities::CONTINUOUS_BATCHING);
    if !per_core {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    (cores / threads.max(1)).clamp(1, MAX_AUTO_WORKERS)
}

/// Which device instance `index` gets: GPUs round-robin over `device_ids` (all of them for
/// tensor parallelism), else the CPU.
pub fn assignment(config: &ModelConfig, index: u32, threads: u32) -> InstanceAssignment {
    let (device_type, device_ids) = match config.device_type {
        DeviceKind::Cpu => (DeviceType::CPU, Vec::new()),
        DeviceKind::Gpu if config.parallel_type.contains("tp") && !config.device_ids.is_empty() => {
            (DeviceType::GPU, config.device_ids.clone())
        }
        DeviceKind::Gpu => {
            let id = if config.device_ids.is_empty() {
                index as i32
            } else {
                config.device_ids[index as usize % config.device_ids.len()]
            };
            (DeviceType::GPU, vec![id])
        }
    };
    InstanceAssignment {
        index,
        device_type,
        device_ids: device_ids.into(),
        intra_op_threads: threads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::sabi_trait::TD_Opaque;
    use abi_stable::std_types::{RResult, RSlice, RString};
    use cresset_plugin_api::{
        InstanceBox, PluginError, PluginInstance, PluginModel, Request, Response, SinkRef,
    };

    /// A model whose instances answer "ok", and refuse to start at index `fail_at`.
    struct TestModel {
        fail_at: Option<u32>,
    }

    /// Answers with its worker index.
    struct TestInstance(u32);

    impl PluginInstance for TestInstance {
        fn execute(
            &mut self,
            requests: RSlice<'_, Request>,
            mut sink: SinkRef<'_>,
        ) -> RResult<(), PluginError> {
            for i in 0..requests.len() {
                let body = self.0.to_string();
                sink.send_final(i, RResult::ROk(Response::ok("text/plain", body)));
            }
            RResult::ROk(())
        }
        fn explain(&mut self, _: RSlice<'_, Request>, _: SinkRef<'_>) -> RResult<(), PluginError> {
            RResult::RErr(PluginError::internal("no"))
        }
    }

    impl PluginModel for TestModel {
        fn new_instance(
            &self,
            assignment: &InstanceAssignment,
        ) -> RResult<InstanceBox, PluginError> {
            if Some(assignment.index) == self.fail_at {
                return RResult::RErr(PluginError::invalid_input("instance 1 cannot start"));
            }
            RResult::ROk(InstanceBox::from_value(
                TestInstance(assignment.index),
                TD_Opaque,
            ))
        }
        fn metadata_json(&self) -> RString {
            "{}".into()
        }
    }

    fn pool_spec(queue: Receiver<Job>) -> PoolSpec {
        PoolSpec {
            model: "m".into(),
            version: "1".into(),
            config: ModelConfig::default(),
            queue,
            metrics: Arc::new(Metrics::new()),
            continuous: false,
            intra_op_threads: 1,
        }
    }

    fn model(fail_at: Option<u32>) -> Arc<ModelBox> {
        Arc::new(ModelBox::from_value(TestModel { fail_at }, TD_Opaque))
    }

    #[test]
    fn scaling_starts_and_stops_workers_and_reuses_the_lowest_free_index() {
        let (_tx, rx) = crossbeam_channel::bounded(4);
        let spec = pool_spec(rx);
        let pool = WorkerPool::default();
        let model = model(None);
        pool.scale(&spec, &model, 3).expect("three workers");
        assert_eq!(pool.live(), 3);
        let ids: Vec<u32> = pool.workers().iter().map(|w| w.id).collect();
        assert_eq!(ids, [0, 1, 2]);
        pool.scale(&spec, &model, 1).expect("down to one");
        // Stopped workers leave the list at once; their threads finish on their own.
        assert_eq!(pool.workers().len(), 1);
        pool.scale(&spec, &model, 2).expect("up to two");
        let ids: Vec<u32> = pool.workers().iter().map(|w| w.id).collect();
        assert_eq!(ids, [0, 1], "index 1 is free again and reused");
        pool.stop_all();
        assert_eq!(pool.live(), 0);
    }

    #[test]
    fn a_worker_that_cannot_start_is_an_error_that_keeps_the_plugins_kind() {
        let (_tx, rx) = crossbeam_channel::bounded(4);
        let spec = pool_spec(rx);
        let pool = WorkerPool::default();
        let err = pool
            .scale(&spec, &model(Some(1)), 2)
            .expect_err("instance 1 fails");
        assert!(matches!(err, LoadError::Instance(_)), "{err:?}");
        assert_eq!(err.kind(), super::super::state::FailureKind::BadModel);
        assert!(err.to_string().contains("instance 1 cannot start"), "{err}");
        assert_eq!(pool.live(), 1, "the worker that started is still there");
        pool.stop_all();
    }

    /// Queue one request; its reply comes on the returned receiver.
    fn ask(tx: &Sender<Job>) -> tokio::sync::mpsc::Receiver<worker::Reply> {
        let (reply_tx, reply_rx) = tokio::sync::mpsc::channel(4);
        tx.send(Job {
            request: cresset_plugin_api::Request {
                id: "r1".into(),
                content_type: "text/plain".into(),
                body: Vec::new().into(),
                headers: Vec::new().into(),
                params: Vec::new().into(),
            },
            kind: worker::JobKind::Predict,
            reply: reply_tx,
            enqueued: std::time::Instant::now(),
        })
        .expect("queued");
        reply_rx
    }

    #[test]
    fn workers_answer_from_the_queue_and_stop_when_it_closes() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let spec = pool_spec(rx);
        let pool = WorkerPool::default();
        pool.scale(&spec, &model(None), 1).expect("one worker");
        let reply = ask(&tx).blocking_recv().expect("a reply");
        assert!(matches!(reply, worker::Reply::Final(Ok(_))));
        drop(tx);
        pool.stop_all();
        assert!(pool.workers().is_empty());
    }

    #[test]
    fn one_client_after_another_is_served_by_the_worker_that_answered_it_last() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let spec = pool_spec(rx);
        let pool = WorkerPool::default();
        pool.scale(&spec, &model(None), 3).expect("three workers");
        let mut by_worker = std::collections::HashMap::<String, usize>::new();
        for _ in 0..20 {
            let reply = ask(&tx).blocking_recv().expect("a reply");
            let worker::Reply::Final(Ok(response)) = reply else {
                panic!("{reply:?}");
            };
            let index = String::from_utf8_lossy(&response.body).into_owned();
            *by_worker.entry(index).or_default() += 1;
            // A client's next request follows its reply after a round trip.
            std::thread::sleep(Duration::from_millis(2));
        }
        // Workers woken in the order they began waiting would take turns (about 7 each).
        let most = by_worker.values().max().copied().unwrap_or(0);
        assert!(most >= 15, "{by_worker:?}");
        drop(tx);
        pool.stop_all();
    }

    #[test]
    fn gpus_are_dealt_round_robin_and_tensor_parallel_instances_get_all() {
        let mut config = ModelConfig {
            device_type: DeviceKind::Gpu,
            device_ids: vec![2, 3],
            ..ModelConfig::default()
        };
        let ids = |a: InstanceAssignment| a.device_ids.to_vec();
        assert_eq!(ids(assignment(&config, 0, 1)), [2]);
        assert_eq!(ids(assignment(&config, 1, 1)), [3]);
        assert_eq!(ids(assignment(&config, 2, 1)), [2]);
        config.parallel_type = "tp".into();
        assert_eq!(ids(assignment(&config, 1, 1)), [2, 3]);
        config.device_type = DeviceKind::Cpu;
        let cpu = assignment(&config, 0, 4);
        assert_eq!(cpu.device_type, DeviceType::CPU);
        assert_eq!(cpu.intra_op_threads, 4);
    }
}
