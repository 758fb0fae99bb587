//! `esmbed executor`: Ballista's executor serving esmbed's functions on one model.
//!
//! The model is loaded once, onto every device the executor was given, behind one device pool
//! ([`EmbedService`]): each task's `esm_embed` calls submit packs to the same pool, so a GPU is
//! never oversubscribed however many tasks run, and task slots beyond the devices only overlap
//! one task's reading and writing with another's compute. Each task's functions are decoded
//! from its plan with the client's row policy; a plan made for other weights is refused.

use std::sync::Arc;

use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{start_executor_process, ExecutorProcessConfig};

use super::codec::{FunctionHost, LogicalCodec, PhysicalCodec};
use crate::error::{Error, Result};
use crate::sql::service::EmbedService;
use crate::sql::spec::FunctionModel;
use crate::storage::StoreOptions;

/// Settings of an executor.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler's `HOST:PORT`.
    pub scheduler: String,
    /// This executor's `HOST:PORT` (Arrow Flight, for results and shuffles); its task service
    /// takes the next port.
    pub bind: String,
    /// Name under which the scheduler, the other executors and clients reach this one (default:
    /// the bind host).
    pub external_host: Option<String>,
    /// Tasks run at once.
    pub task_slots: usize,
    /// Seconds between heartbeats to the scheduler.
    pub heartbeat_seconds: u64,
    /// Shuffle files (default: a directory under the system's temporary directory).
    pub work_dir: Option<String>,
    /// How the object stores that tables and `COPY … TO` name are reached.
    pub store: StoreOptions,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        Self {
            scheduler: "localhost:50050".into(),
            bind: "0.0.0.0:50051".into(),
            external_host: None,
            task_slots: 2,
            heartbeat_seconds: 5,
            work_dir: None,
            store: StoreOptions::default(),
        }
    }
}

/// The functions an executor resolves by name (plans name the model functions with their spec,
/// which [`FunctionHost::Executor`] decodes; these are the by-name fallback).
fn registry(service: &Arc<EmbedService>) -> BallistaFunctionRegistry {
    let mut registry = BallistaFunctionRegistry::default();
    for udf in crate::sql::functions(Some(FunctionModel::Served(service.clone()))) {
        registry
            .scalar_functions
            .insert(udf.name().to_string(), Arc::new(udf));
    }
    registry
}

/// Run an executor over `service` until the process is stopped.
pub async fn run(options: ExecutorOptions, service: Arc<EmbedService>) -> Result<()> {
    let (bind_host, port) = super::parse_address(&options.bind)?;
    let (scheduler_host, scheduler_port) = super::parse_address(&options.scheduler)?;
    let grpc_port = port.checked_add(1).ok_or_else(|| {
        Error::InvalidOption(format!(
            "--bind {}: the task service takes the next port; choose a lower one",
            options.bind
        ))
    })?;
    let runtime = crate::sql::runtime_env(&options.store);
    let host = FunctionHost::Executor(service.clone());
    let config = ExecutorProcessConfig {
        bind_host,
        external_host: options.external_host.clone(),
        port,
        grpc_port,
        scheduler_host,
        scheduler_port,
        scheduler_connect_timeout_seconds: 30,
        vcores: options.task_slots.max(1),
        work_dir: options.work_dir.clone(),
        executor_heartbeat_interval_seconds: options.heartbeat_seconds.max(1),
        override_function_registry: Some(Arc::new(registry(&service))),
        override_runtime_producer: Some(Arc::new(move |_| Ok(runtime.clone()))),
        override_logical_codec: Some(Arc::new(LogicalCodec::new(host.clone()))),
        override_physical_codec: Some(Arc::new(PhysicalCodec::new(host))),
        ..ExecutorProcessConfig::default()
    };
    tracing::info!(
        "esmbed executor: {} on port {port} (tasks on {grpc_port}), scheduler {}, {} task slots",
        service.identity(),
        options.scheduler,
        config.vcores
    );
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| super::ballista(&options.bind, e))
}
