//! `COPY … TO 'dir/'` written by every partition's task, on the executor that computed the rows,
//! instead of by one task that receives every row of the query.
//!
//! DataFusion plans a Parquet `COPY` as one `DataSinkExec` over a single input partition, which a
//! Ballista scheduler turns into a last stage of one task: every executor's vectors travel to one
//! writer. [`ParallelParquetWrites`] (a rule the scheduler applies after DataFusion's own) rewrites
//! such a sink into [`CopyWrites`] nodes: `PartitionWrites` ([`Step::Write`]), each input partition
//! written by its own task to a file of its own, under `CommitWrites` ([`Step::Commit`]), one task
//! that gathers which files the partitions wrote and how many rows, and answers the one row a
//! `COPY` answers, the number of rows written.
//!
//! Nothing lost, nothing duplicated, when an executor is lost: Ballista reruns its tasks (and
//! those whose outputs it held) elsewhere, so a partition can be written twice, by an attempt
//! whose report never arrived and by the rerun. Every file is named `<write id>-<attempt>.parquet`
//! (the write id fixed when the query is planned, the attempt unique), each appears whole or not
//! at all (object_store's multipart upload, or a staged local file renamed at the end), and the
//! commit deletes every file of the write id that no reported attempt wrote. (A partition's
//! number is no name: a Ballista task runs a slice of a stage's partitions, renumbered from 0.)
//! What this does not fence, as Ballista does not: an executor declared lost that is in fact
//! still running and finishes its file after the commit (its rows would then be there twice), and
//! a stale commit attempt still deleting while a rerun writes.
//!
//! Every executor writes into the same directory, so it must be one place for all of them: an
//! object store, or a file system they share (as the tables they read).
//!
//! Left as DataFusion plans them: single-file outputs, hive-partitioned outputs, sinks that require
//! an order, overwrites, other formats, and inputs of one partition. Each partition is one file,
//! whatever its size, and an empty partition an empty file. `INSERT INTO` a Parquet table
//! (appending to its directory) is written the same way as a `COPY`.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{Array, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::config::{ConfigOptions, TableParquetOptions};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::parquet::ParquetSink;
use datafusion::datasource::physical_plan::{FileOutputMode, FileSink, FileSinkConfig};
use datafusion::datasource::sink::DataSinkExec;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::execute_input_stream;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    Partitioning, PlanProperties, SendableRecordBatchStream,
};
use futures::StreamExt;
use object_store::ObjectStoreExt;

/// See the module docs.
#[derive(Debug, Default)]
pub struct ParallelParquetWrites;

impl PhysicalOptimizerRule for ParallelParquetWrites {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| match rewrite(&node) {
            Some(parallel) => Ok(Transformed::yes(parallel)),
            None => Ok(Transformed::no(node)),
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "esmbed_parallel_parquet_writes"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The parallel form of `node`, if it is a Parquet sink into a directory over several partitions.
fn rewrite(node: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    let exec = node.downcast_ref::<DataSinkExec>()?;
    let sink = exec.sink().downcast_ref::<ParquetSink>()?;
    let config = sink.config();
    let into_directory = config.table_paths.len() == 1
        && !config
            .file_output_mode
            .single_file_output(&config.table_paths[0]);
    let appends = config.insert_op == InsertOp::Append;
    if !into_directory
        || !appends
        || !config.table_partition_cols.is_empty()
        || exec.sort_order().is_some()
    {
        return None;
    }
    let input = match exec.input().downcast_ref::<CoalescePartitionsExec>() {
        Some(merge) if merge.fetch().is_none() => merge.input().clone(),
        _ => exec.input().clone(),
    };
    if input.output_partitioning().partition_count() < 2 {
        return None;
    }
    let target = WriteTarget {
        config: config.clone(),
        options: sink.parquet_options().clone(),
        write_id: unique_name(),
    };
    let writes = Arc::new(CopyWrites::new(Step::Write, input, target.clone()));
    let reports = Arc::new(CoalescePartitionsExec::new(writes));
    Some(Arc::new(CopyWrites::new(Step::Commit, reports, target)))
}

/// A name no other query or attempt takes: time, process and a counter.
fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:x}{:x}{n:x}", std::process::id())
}

/// Where and how a `COPY`'s files are written: its sink's configuration (directory, schema,
/// object store) and Parquet options, and the write id its file names start with.
#[derive(Debug, Clone)]
pub struct WriteTarget {
    /// The `COPY`'s sink configuration.
    pub config: FileSinkConfig,
    /// Its Parquet writer options.
    pub options: TableParquetOptions,
    /// The prefix of this query's file names.
    pub write_id: String,
}

impl WriteTarget {
    /// The `COPY`'s own sink (the codec's encoding of the target).
    pub fn sink(&self) -> ParquetSink {
        ParquetSink::new(self.config.clone(), self.options.clone())
    }

    fn dir(&self) -> &ListingTableUrl {
        &self.config.table_paths[0]
    }

    /// A new attempt's file name and its sink.
    fn attempt(&self) -> Result<(String, ParquetSink)> {
        let name = format!(
            "{}-{}.{}",
            self.write_id,
            unique_name(),
            self.config.file_extension
        );
        let dir = self.dir().as_str();
        let slash = if dir.ends_with('/') { "" } else { "/" };
        let url = format!("{dir}{slash}{name}");
        let mut config = self.config.clone();
        config.table_paths = vec![ListingTableUrl::parse(&url)?];
        config.original_url = url;
        config.file_output_mode = FileOutputMode::SingleFile;
        Ok((name, ParquetSink::new(config, self.options.clone())))
    }
}

fn count_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "count",
        DataType::UInt64,
        false,
    )]))
}

/// What a partition's write reports: its rows and its file's name.
fn report_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("count", DataType::UInt64, false),
        Field::new("file", DataType::Utf8, false),
    ]))
}

/// Which part of a `COPY`'s writes a [`CopyWrites`] node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Write each input partition to a file of its own; report its rows and file name.
    Write,
    /// Gather the reports (one partition), delete the files of attempts nobody reported, and
    /// answer the rows written.
    Commit,
}

/// A step of a parallel `COPY` (see the module docs): `Commit` over one partition of `Write`
/// reports.
#[derive(Debug)]
pub struct CopyWrites {
    step: Step,
    input: Arc<dyn ExecutionPlan>,
    target: WriteTarget,
    properties: Arc<PlanProperties>,
}

impl CopyWrites {
    /// The `step` of the writes of `input` to `target`.
    pub fn new(step: Step, input: Arc<dyn ExecutionPlan>, target: WriteTarget) -> Self {
        let (schema, partitions) = match step {
            Step::Write => (
                report_schema(),
                input.output_partitioning().partition_count(),
            ),
            Step::Commit => (count_schema(), 1),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Self {
            step,
            input,
            target,
            properties: Arc::new(properties),
        }
    }

    /// Which step.
    pub fn step(&self) -> Step {
        self.step
    }

    /// Where the files go.
    pub fn target(&self) -> &WriteTarget {
        &self.target
    }

    /// Partition `partition`'s file, written: its report.
    fn write(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let (name, sink) = self.target.attempt()?;
        // As DataSinkExec: the sink's NOT NULL columns checked on the way.
        let schema = self.target.config.output_schema.clone();
        let data = execute_input_stream(self.input.clone(), schema, partition, context.clone())?;
        let stream = futures::stream::once(async move {
            let rows = FileSink::write_all(&sink, data, &context).await?;
            let columns: Vec<Arc<dyn Array>> = vec![
                Arc::new(UInt64Array::from(vec![rows])),
                Arc::new(StringArray::from(vec![name])),
            ];
            Ok(RecordBatch::try_new(report_schema(), columns)?)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            report_schema(),
            stream.boxed(),
        )))
    }

    /// The reports gathered and the lost attempts' files deleted: the rows written.
    fn commit(&self, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let reports = self.input.execute(0, context.clone())?;
        let target = self.target.clone();
        let stream = futures::stream::once(async move {
            let rows = commit(reports, &target, &context).await?;
            let counts: Arc<dyn Array> = Arc::new(UInt64Array::from(vec![rows]));
            Ok(RecordBatch::try_new(count_schema(), vec![counts])?)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            count_schema(),
            stream.boxed(),
        )))
    }
}

impl DisplayAs for CopyWrites {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let dir = self.target.dir().as_str();
        let id = &self.target.write_id;
        write!(f, "{}: {dir}{id}-*.parquet", self.name())
    }
}

impl ExecutionPlan for CopyWrites {
    fn name(&self) -> &'static str {
        match self.step {
            Step::Write => "PartitionWrites",
            Step::Commit => "CommitWrites",
        }
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        match self.step {
            Step::Write => vec![Distribution::UnspecifiedDistribution],
            Step::Commit => vec![Distribution::SinglePartition],
        }
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children)
            .map_err(|_| DataFusionError::Internal(format!("{} takes one input", self.name())))?;
        Ok(Arc::new(Self::new(self.step, input, self.target.clone())))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        match self.step {
            Step::Write => self.write(partition, context),
            Step::Commit if partition == 0 => self.commit(context),
            Step::Commit => Err(DataFusionError::Internal(format!(
                "CommitWrites has one partition, not {partition}"
            ))),
        }
    }
}

/// Sum the reports' rows, then delete the write id's files that no report names.
async fn commit(
    mut reports: SendableRecordBatchStream,
    target: &WriteTarget,
    context: &TaskContext,
) -> Result<u64> {
    let (mut rows, mut kept) = (0u64, HashSet::new());
    while let Some(batch) = reports.next().await.transpose()? {
        let counts = batch.column(0).as_any().downcast_ref::<UInt64Array>();
        let files = batch.column(1).as_any().downcast_ref::<StringArray>();
        let (Some(counts), Some(files)) = (counts, files) else {
            return Err(DataFusionError::Internal(
                "CommitWrites: reports of another shape".into(),
            ));
        };
        rows += counts.values().iter().sum::<u64>();
        kept.extend(files.iter().flatten().map(str::to_string));
    }
    let store = context
        .runtime_env()
        .object_store(&target.config.object_store_url)?;
    let prefix = format!("{}-", target.write_id);
    // The directory itself, not the tree below it: that is where every attempt writes.
    let listed = store
        .list_with_delimiter(Some(target.dir().prefix()))
        .await?;
    for object in listed.objects {
        let name = object.location.filename().unwrap_or_default();
        if name.starts_with(&prefix) && !kept.contains(name) {
            tracing::warn!("COPY: removing {name}, written by a lost attempt");
            match store.delete(&object.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// A local session with four partitions, with the rule (`parallel`) or without.
    pub(crate) fn context(parallel: bool) -> SessionContext {
        let config = SessionConfig::new().with_target_partitions(4);
        let mut state = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features();
        if parallel {
            state = state.with_physical_optimizer_rule(Arc::new(ParallelParquetWrites));
        }
        SessionContext::new_with_state(state.build())
    }

    async fn rows(ctx: &SessionContext, sql: &str) -> Vec<RecordBatch> {
        ctx.sql(sql).await.unwrap().collect().await.unwrap()
    }

    /// The physical plan `ctx` makes of `sql`.
    pub(crate) async fn physical_plan(ctx: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
        ctx.sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap()
    }

    fn parquet_files(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Three Parquet files of 50 rows (ids 1-50, 101-150, 201-250) as table `t`.
    async fn three_files(ctx: &SessionContext, dir: &std::path::Path) {
        let input = dir.join("in");
        for i in 0..3 {
            let sql = format!(
                "COPY (SELECT {i} * 100 + value AS id FROM generate_series(1, 50)) TO '{}/{i}.parquet'",
                input.display()
            );
            rows(ctx, &sql).await;
        }
        let table = format!(
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'",
            input.display()
        );
        rows(ctx, &table).await;
    }

    fn shown(plan: &Arc<dyn ExecutionPlan>) -> String {
        datafusion::physical_plan::displayable(plan.as_ref())
            .indent(false)
            .to_string()
    }

    /// The count, distinct ids and id sum of the Parquet files in `dir`.
    async fn summary(dir: &std::path::Path) -> (i64, i64, i64) {
        let ctx = context(false);
        let back = format!(
            "CREATE EXTERNAL TABLE o STORED AS PARQUET LOCATION '{}/'",
            dir.display()
        );
        rows(&ctx, &back).await;
        let check = rows(&ctx, "SELECT count(*), count(DISTINCT id), sum(id) FROM o").await;
        let col = |i: usize| {
            let values = check[0].column(i).as_any();
            values
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .unwrap()
                .value(0)
        };
        (col(0), col(1), col(2))
    }

    /// Table `t` of three files, and the plan of `COPY (SELECT id FROM t) TO 'out/'`.
    async fn planned_copy() -> (
        tempfile::TempDir,
        SessionContext,
        String,
        Arc<dyn ExecutionPlan>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(true);
        three_files(&ctx, dir.path()).await;
        let out = dir.path().join("out");
        let copy = format!(
            "COPY (SELECT id FROM t) TO '{}/' STORED AS PARQUET",
            out.display()
        );
        let plan = physical_plan(&ctx, &copy).await;
        (dir, ctx, copy, plan)
    }

    #[tokio::test]
    async fn a_copy_into_a_directory_writes_a_file_per_partition_with_every_row_once() {
        let (dir, ctx, copy, plan) = planned_copy().await;
        let out = dir.path().join("out");
        assert!(shown(&plan).contains("PartitionWrites"), "{}", shown(&plan));
        let answer = rows(&ctx, &copy).await;
        let count = answer[0]
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap();
        assert_eq!(count.value(0), 150, "the COPY answers the rows written");
        let files = parquet_files(&out);
        assert_eq!(files.len(), 3, "one file per input partition: {files:?}");
        assert!(files.iter().all(|f| f.ends_with(".parquet")), "{files:?}");
        let sum = (0..3).map(|i| 50 * 100 * i + 1275).sum::<i64>();
        assert_eq!(summary(&out).await, (150, 150, sum));
    }

    #[tokio::test]
    async fn the_commit_removes_files_of_attempts_nobody_reported() {
        let (dir, ctx, _, plan) = planned_copy().await;
        let out = dir.path().join("out");
        let commit = plan.downcast_ref::<CopyWrites>().expect("the plan's root");
        assert_eq!(commit.step(), Step::Commit);
        // A lost attempt's complete file of this write, and another query's file.
        std::fs::create_dir_all(&out).unwrap();
        let lost = out.join(format!("{}-lost.parquet", commit.target().write_id));
        std::fs::copy(dir.path().join("in/0.parquet"), &lost).unwrap();
        std::fs::copy(dir.path().join("in/1.parquet"), out.join("other.parquet")).unwrap();
        datafusion::physical_plan::collect(plan.clone(), ctx.task_ctx())
            .await
            .unwrap();
        assert!(!lost.exists(), "the unreported attempt's file is gone");
        assert!(out.join("other.parquet").exists(), "other files stay");
        assert_eq!(parquet_files(&out).len(), 4);
        let (count, distinct, _) = summary(&out).await;
        assert_eq!(
            (count, distinct),
            (200, 150),
            "each row once, plus other.parquet's 50"
        );
    }

    #[tokio::test]
    async fn an_insert_is_written_in_parallel_and_keeps_not_null_columns_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(true);
        three_files(&ctx, dir.path()).await;
        let table = format!(
            "CREATE EXTERNAL TABLE n (id BIGINT NOT NULL) STORED AS PARQUET LOCATION '{}/n/'",
            dir.path().display()
        );
        rows(&ctx, &table).await;
        let insert = "INSERT INTO n SELECT id FROM t";
        let plan = physical_plan(&ctx, insert).await;
        assert!(shown(&plan).contains("PartitionWrites"), "{}", shown(&plan));
        rows(&ctx, insert).await;
        assert_eq!(parquet_files(&dir.path().join("n")).len(), 3);
        let nulls = "INSERT INTO n SELECT CASE WHEN id = 7 THEN NULL ELSE id END FROM t";
        let err = ctx.sql(nulls).await.unwrap().collect().await.unwrap_err();
        assert!(err.to_string().contains("null"), "{err}");
    }

    #[tokio::test]
    async fn single_files_and_single_partitions_stay_as_datafusion_plans_them() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(true);
        for target in ["one.parquet'", "d/' STORED AS PARQUET"] {
            let sql = format!(
                "COPY (SELECT value FROM generate_series(1, 10)) TO '{}/{target}",
                dir.path().display()
            );
            let plan = physical_plan(&ctx, &sql).await;
            assert!(
                !shown(&plan).contains("PartitionWrites"),
                "{}",
                shown(&plan)
            );
        }
    }
}
