//! A correction the scheduler applies to plans with asynchronous functions under an aggregate
//! (`SELECT count(esm_embed(s)) …`) before they are sent to executors.
//!
//! DataFusion 55's planner puts an `AsyncFuncExec` (which appends the function's results as
//! columns) between an aggregate and its input, but leaves the aggregate's recorded input schema
//! without those columns. A local query never reads that field; a plan decoded on an executor
//! checks the aggregate's expressions against it and fails ("column '__async_fn_0' at index 1
//! but input schema only has 1 columns"). [`AsyncAggregateSchema`] rebuilds such aggregates
//! (and the final aggregates above them, which record the same schema) with the schema their
//! input really has.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::async_func::AsyncFuncExec;
use datafusion::physical_plan::ExecutionPlan;

/// See the module docs.
#[derive(Debug, Default)]
pub struct AsyncAggregateSchema;

impl PhysicalOptimizerRule for AsyncAggregateSchema {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // (the schema an aggregate recorded, the schema it should have recorded)
        let mut replaced: Vec<(SchemaRef, SchemaRef)> = Vec::new();
        plan.transform_up(|node| {
            let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(node));
            };
            let recorded = aggregate.input_schema();
            let actual = if aggregate.input().downcast_ref::<AsyncFuncExec>().is_some()
                && recorded != aggregate.input().schema()
            {
                let actual = aggregate.input().schema();
                replaced.push((recorded.clone(), actual.clone()));
                actual
            } else if let Some((_, actual)) = replaced.iter().find(|(old, _)| *old == recorded) {
                actual.clone()
            } else {
                return Ok(Transformed::no(node));
            };
            let rebuilt = AggregateExec::try_new(
                *aggregate.mode(),
                aggregate.group_expr().clone(),
                aggregate.aggr_expr().to_vec(),
                aggregate.filter_expr().to_vec(),
                aggregate.input().clone(),
                actual,
            )?
            .with_limit_options(aggregate.limit_options());
            Ok(Transformed::yes(Arc::new(rebuilt) as Arc<dyn ExecutionPlan>))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "esmbed_async_aggregate_schema"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
