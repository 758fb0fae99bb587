//! The same SQL on many machines: DataFusion Ballista's scheduler, executors and client, with
//! esmbed's tables, functions and object stores registered in each.
//!
//! ```text
//!  esmbed sql --cluster ── logical plan ──> esmbed scheduler ── tasks ──> esmbed executor (GPU host)
//!   (plans esm_embed:      (LogicalCodec)   (plans stages;     (PhysicalCodec) (its model, its device
//!    FunctionHost::Planner)                  Planner)                          pool: FunctionHost::Executor)
//! ```
//! Ballista does the distribution (stages, shuffles, retries of lost tasks); esmbed adds what
//! its plans need to cross the wire ([`codec`]): `STORED AS FASTA` tables and scans, and the
//! model functions with their [`crate::sql::spec::FunctionSpec`], so that every executor embeds
//! with the weights and row policy the client named, or refuses the task. The scheduler also
//! rewrites a `COPY … TO 'dir/'` so that every partition's task writes its own file
//! ([`parallel_write`]).

pub mod client;
pub mod codec;
pub mod executor;
pub mod parallel_write;
pub mod plan_fix;
pub mod scheduler;

use crate::error::{Error, Result};

/// `HOST:PORT` as host and port.
pub fn parse_address(address: &str) -> Result<(String, u16)> {
    let bad = || {
        Error::InvalidOption(format!(
            "{address:?} is not HOST:PORT (e.g. 0.0.0.0:50050 or sched-host:50050)"
        ))
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// A Ballista error of the process at `address` as esmbed's (a DataFusion error inside keeps
/// its kind).
fn ballista(address: &str, e: ballista_core::error::BallistaError) -> Error {
    match e {
        ballista_core::error::BallistaError::DataFusionError(e) => Error::Sql(*e),
        other => Error::Remote {
            url: address.to_string(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_names_and_brackets() {
        assert_eq!(
            parse_address("0.0.0.0:50050").unwrap(),
            ("0.0.0.0".into(), 50050)
        );
        assert_eq!(parse_address("sched:1").unwrap(), ("sched".into(), 1));
        assert_eq!(parse_address("[::1]:7").unwrap(), ("::1".into(), 7));
        for bad in ["50050", "host:", ":50050", "host:99999"] {
            let err = parse_address(bad).unwrap_err();
            assert!(err.to_string().contains("HOST:PORT"), "{bad}: {err}");
        }
    }
}
