//! `esmbed sql --cluster`: a session whose queries run on a cluster.
//!
//! The session is the local one ([`crate::sql::session_state`]: settings, `STORED AS FASTA`,
//! object stores) with Ballista's planner, which sends each query's plan to the scheduler and
//! reads the results from the executors. DDL (`CREATE EXTERNAL TABLE`) stays in this session;
//! the model functions are registered over the client's model description
//! ([`FunctionModel::Planned`]), so they plan here and run on the executors.

use std::sync::Arc;

use ballista::extension::SessionContextExt;
use ballista_core::extension::SessionConfigExt;
use datafusion::prelude::SessionContext;

use super::codec::{FunctionHost, LogicalCodec, PhysicalCodec};
use crate::error::{Error, Result};
use crate::sql::spec::{FunctionModel, FunctionSpec};
use crate::sql::SessionOptions;

/// Settings of a cluster session.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Run stages adaptively (Ballista's `ballista.planner.adaptive.enabled`).
    pub adaptive: bool,
}

/// A session on the cluster whose scheduler is at `scheduler` (`HOST:PORT`), with the model
/// functions of `spec` (none without one).
pub async fn session(
    scheduler: &str,
    spec: Option<FunctionSpec>,
    options: &SessionOptions,
    cluster: &ClusterOptions,
) -> Result<SessionContext> {
    let (host, port) = super::parse_address(scheduler)?;
    let config = crate::sql::session_config(options)
        .with_ballista_logical_extension_codec(Arc::new(LogicalCodec::new(FunctionHost::Planner)))
        .with_ballista_physical_extension_codec(Arc::new(PhysicalCodec::new(FunctionHost::Planner)))
        .with_ballista_adaptive_query_planner(cluster.adaptive);
    let state = crate::sql::session_state_with(config, &options.store);
    let url = format!("df://{host}:{port}");
    let ctx = SessionContext::remote_with_state(&url, state)
        .await
        .map_err(|e| Error::Remote {
            url: url.clone(),
            reason: format!(
                "cannot reach the scheduler ({e}); is `esmbed scheduler` running there?"
            ),
        })?;
    // After `remote_with_state`: Ballista replaces the state's function list.
    crate::sql::register_functions(&ctx, spec.map(|s| FunctionModel::Planned(Arc::new(s))));
    Ok(ctx)
}
