//! `esmbed scheduler`: Ballista's scheduler with esmbed's tables, functions and codecs.
//!
//! The scheduler plans every query it is sent (it reads table listings, so it reaches the same
//! object stores as the executors) and hands the stages' tasks to the executors. A task lost
//! with its executor (no heartbeat for `executor_timeout_seconds`) runs again elsewhere; its
//! stage's finished outputs on that executor are recomputed when a later stage cannot fetch
//! them. esmbed's defaults detect a lost executor in seconds rather than Ballista's minutes:
//! a GPU left idle for three minutes is expensive.

use std::net::ToSocketAddrs;
use std::sync::Arc;

use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::{SchedulerConfig, TaskDistributionPolicy};
use ballista_scheduler::scheduler_process::start_server;
use datafusion::execution::{FunctionRegistry, SessionState, SessionStateBuilder};
use datafusion::prelude::SessionConfig;

use super::codec::{FunctionHost, LogicalCodec, PhysicalCodec};
use super::parallel_write::ParallelParquetWrites;
use super::plan_fix::AsyncAggregateSchema;
use crate::error::{Error, Result};
use crate::storage::StoreOptions;

/// Settings of a scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Address to listen on (gRPC for clients and executors, and the REST API).
    pub bind: String,
    /// Name under which clients and executors reach this scheduler (default: the bind host).
    pub external_host: Option<String>,
    /// An executor without a heartbeat for this long is lost: its tasks run elsewhere.
    pub executor_timeout_seconds: u64,
    /// Times a task may fail before its job fails.
    pub task_max_failures: usize,
    /// How the object stores that tables name are reached (to list their files).
    pub store: StoreOptions,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:50050".into(),
            external_host: None,
            executor_timeout_seconds: 20,
            task_max_failures: 4,
            store: StoreOptions::default(),
        }
    }
}

/// The session a scheduler plans a job in: esmbed's tables and stores, [`AsyncAggregateSchema`]
/// and [`ParallelParquetWrites`]; the model functions come with the plan, `cosine_similarity` is
/// registered by name.
fn session(
    config: SessionConfig,
    store: &StoreOptions,
) -> datafusion::common::Result<SessionState> {
    let state = crate::sql::session_state_with(config, store);
    let mut state = SessionStateBuilder::new_from_existing(state)
        .with_physical_optimizer_rule(Arc::new(AsyncAggregateSchema))
        .with_physical_optimizer_rule(Arc::new(ParallelParquetWrites))
        .build();
    for udf in crate::sql::functions(None) {
        state.register_udf(Arc::new(udf))?;
    }
    Ok(state)
}

/// Run a scheduler until the process is stopped.
pub async fn run(options: SchedulerOptions) -> Result<()> {
    let (host, port) = super::parse_address(&options.bind)?;
    let address = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| Error::InvalidOption(format!("--bind {}: {e}", options.bind)))?
        .next()
        .ok_or_else(|| Error::InvalidOption(format!("--bind {}: no address", options.bind)))?;
    let store = options.store.clone();
    let config = SchedulerConfig {
        bind_host: host.clone(),
        bind_port: port,
        external_host: options.external_host.clone().unwrap_or(host),
        executor_timeout_seconds: options.executor_timeout_seconds,
        expire_dead_executor_interval_seconds: 1,
        no_executors_grace_period_seconds: options.executor_timeout_seconds,
        task_max_failures: options.task_max_failures,
        // Spread a stage's tasks over the executors (GPUs) instead of filling one first.
        task_distribution: TaskDistributionPolicy::RoundRobin,
        override_session_builder: Some(Arc::new(move |config| session(config, &store))),
        override_logical_codec: Some(Arc::new(LogicalCodec::new(FunctionHost::Planner))),
        override_physical_codec: Some(Arc::new(PhysicalCodec::new(FunctionHost::Planner))),
        ..SchedulerConfig::default()
    };
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| super::ballista(&options.bind, e))?;
    tracing::info!("esmbed scheduler: listening on {address}");
    start_server(cluster, address, Arc::new(config))
        .await
        .map_err(|e| super::ballista(&options.bind, e))
}
