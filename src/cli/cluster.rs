//! `esmbed scheduler` and `esmbed executor`: the processes of a cluster ([`crate::cluster`]).

use std::sync::Arc;

use clap::Args;

use crate::cluster::executor::ExecutorOptions;
use crate::cluster::scheduler::SchedulerOptions;
use crate::sql::service::BadRows;

use super::sql::{runtime, start_service, RowOptions};
use super::{ModelArgs, StoreArgs};

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Address to listen on for clients and executors (and the REST API: /api/executors,
    /// /api/jobs).
    #[arg(long, default_value = "0.0.0.0:50050", value_name = "HOST:PORT")]
    pub bind: String,

    /// Host name that clients and executors use to reach this scheduler (default: the --bind
    /// host).
    #[arg(long)]
    pub external_host: Option<String>,

    /// Seconds without a heartbeat after which an executor is lost and its tasks run elsewhere.
    #[arg(long, default_value_t = SchedulerOptions::default().executor_timeout_seconds)]
    pub executor_timeout: u64,

    /// Times a task may fail (its executor lost, a retryable error) before the query fails.
    #[arg(long, default_value_t = SchedulerOptions::default().task_max_failures)]
    pub task_max_failures: usize,

    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct ExecutorArgs {
    /// The scheduler's address.
    #[arg(long, value_name = "HOST:PORT")]
    pub scheduler: String,

    /// Address to listen on (Arrow Flight: results and shuffles); the task service takes the
    /// next port, so executors on one host need ports two apart.
    #[arg(long, default_value = "0.0.0.0:50051", value_name = "HOST:PORT")]
    pub bind: String,

    /// Host name that the scheduler, other executors and clients use to reach this executor
    /// (default: the --bind host; give one when binding 0.0.0.0).
    #[arg(long)]
    pub external_host: Option<String>,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Tokens per pack. Default: 4096 on the CPU; on a GPU, what fits in its free memory.
    #[arg(long)]
    pub tokens_per_batch: Option<usize>,

    /// Tasks run at once (default: two per device: one embeds while the other reads or writes;
    /// every task's packs share the devices' queue).
    #[arg(long)]
    pub task_slots: Option<usize>,

    /// Seconds between heartbeats to the scheduler (below the scheduler's --executor-timeout).
    #[arg(long, default_value_t = ExecutorOptions::default().heartbeat_seconds)]
    pub heartbeat: u64,

    /// Directory for shuffle files (default: under the system's temporary directory).
    #[arg(long)]
    pub work_dir: Option<String>,

    #[command(flatten)]
    pub store: StoreArgs,
}

pub fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let options = SchedulerOptions {
        bind: args.bind,
        external_host: args.external_host,
        executor_timeout_seconds: args.executor_timeout.max(1),
        task_max_failures: args.task_max_failures.max(1),
        store: args.store.options(),
    };
    Ok(runtime()?.block_on(crate::cluster::scheduler::run(options))?)
}

pub fn executor(args: ExecutorArgs) -> anyhow::Result<()> {
    // The executor's own row policy only serves plans that name a function without its
    // description; every esmbed client sends its own.
    let rows = RowOptions {
        unknown: crate::UnknownResidue::Error,
        max_length: None,
        long: crate::prepare::LongPolicy::Truncate,
        bad_rows: BadRows::Error,
        reuse: true,
    };
    let service = Arc::new(start_service(&args.model, args.tokens_per_batch, rows)?);
    let devices = service.device_stats().len();
    let options = ExecutorOptions {
        scheduler: args.scheduler,
        bind: args.bind,
        external_host: args.external_host,
        task_slots: args.task_slots.unwrap_or(2 * devices).max(1),
        heartbeat_seconds: args.heartbeat.max(1),
        work_dir: args.work_dir,
        store: args.store.options(),
    };
    Ok(runtime()?.block_on(crate::cluster::executor::run(options, service))?)
}
