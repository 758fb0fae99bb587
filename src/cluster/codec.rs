//! How esmbed's parts of a plan cross the wire between client, scheduler and executors: Ballista's
//! codecs, plus
//!
//! - `STORED AS FASTA` tables (logical: their paths; the scheduler rebuilds the listing table) and
//!   FASTA scans (physical: DataFusion's file-scan configuration, with a FASTA source on the
//!   executor), which DataFusion's own codecs refuse as an unknown format;
//! - the model functions, by name with their [`FunctionSpec`]. The client and scheduler decode a
//!   spec into a function that only plans ([`FunctionHost::Planner`]); an executor decodes it over
//!   its own model, after checking that the weights are the ones the client named, with the
//!   client's row policy ([`FunctionHost::Executor`]);
//! - the per-partition Parquet writes of a `COPY` and their commit ([`CopyWrites`]: the step, the
//!   write id and DataFusion's encoding of the Parquet sink).
//!
//! Every encoding of ours starts with a tag of its own, so that the bytes Ballista's codecs write
//! are passed back to them untouched.

use std::sync::Arc;

use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::{DataFusionError, Result, TableReference};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Extension, LogicalPlan, ReturnFieldArgs, ScalarUDF};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::from_proto::parse_protobuf_file_scan_config;
use datafusion_proto::physical_plan::to_proto::serialize_file_scan_config;
use datafusion_proto::physical_plan::{
    PhysicalExtensionCodec, PhysicalPlanDecodeContext, PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf::FileScanExecConf;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::parallel_write::{CopyWrites, Step, WriteTarget};
use crate::error::Error;
use crate::sql::fasta_table::{FastaSource, FastaTable};
use crate::sql::service::EmbedService;
use crate::sql::spec::{FunctionModel, FunctionSpec};

/// The functions whose spec travels with the plan.
pub const MODEL_FUNCTIONS: [&str; 4] = ["esm_embed", "esm_tokens", "esm_pll", "esm_score"];

const FASTA_TABLE_TAG: &[u8] = b"\xe5esmbed-fasta-table\0";
const FASTA_SCAN_TAG: &[u8] = b"\xe5esmbed-fasta-scan\0";
const PARTITION_WRITES_TAG: &[u8] = b"\xe5esmbed-partition-writes\0";
const COMMIT_WRITES_TAG: &[u8] = b"\xe5esmbed-commit-writes\0";

/// What a decoded model function becomes in this process.
#[derive(Debug, Clone)]
pub enum FunctionHost {
    /// A function that only plans (client, scheduler).
    Planner,
    /// The function over this executor's model (one that fails naming both models when the
    /// plan was made for other weights).
    Executor(Arc<EmbedService>),
}

impl FunctionHost {
    /// The function `name` of `spec`, as this process hosts it.
    pub fn resolve(&self, name: &str, spec: FunctionSpec) -> Result<Arc<ScalarUDF>> {
        let model = match self {
            FunctionHost::Planner => FunctionModel::Planned(Arc::new(spec)),
            FunctionHost::Executor(service) => {
                let served = service.identity();
                if service.serves(&spec.model) {
                    FunctionModel::Served(Arc::new(service.with_policy(&spec.policy)))
                } else {
                    FunctionModel::Mismatched {
                        planned: Arc::new(spec),
                        served,
                    }
                }
            }
        };
        crate::sql::functions(Some(model))
            .into_iter()
            .find(|f| f.name() == name)
            .map(Arc::new)
            .ok_or_else(|| DataFusionError::Internal(format!("{name} is not a model function")))
    }
}

fn external(e: Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// The spec a model function carries on its output field.
fn encode_function(udf: &ScalarUDF, buf: &mut Vec<u8>) -> Result<bool> {
    if !MODEL_FUNCTIONS.contains(&udf.name()) {
        return Ok(false);
    }
    let field = udf.return_field_from_args(ReturnFieldArgs {
        arg_fields: &[],
        scalar_arguments: &[],
    })?;
    let spec = FunctionSpec::from_metadata(field.metadata())
        .ok_or_else(|| {
            DataFusionError::Internal(format!("{} carries no model description", udf.name()))
        })?
        .map_err(external)?;
    buf.extend(spec.encode());
    Ok(true)
}

fn decode_function(host: &FunctionHost, name: &str, buf: &[u8]) -> Option<Result<Arc<ScalarUDF>>> {
    if buf.is_empty() || !MODEL_FUNCTIONS.contains(&name) {
        return None;
    }
    Some(
        FunctionSpec::decode(buf)
            .map_err(external)
            .and_then(|spec| host.resolve(name, spec)),
    )
}

/// A FASTA table's description.
#[derive(Serialize, Deserialize)]
struct FastaTableNode {
    paths: Vec<String>,
    extension: String,
}

/// Ballista's logical codec, plus FASTA tables and model functions.
#[derive(Debug)]
pub struct LogicalCodec {
    inner: BallistaLogicalExtensionCodec,
    host: FunctionHost,
}

impl LogicalCodec {
    /// The codec of a process hosting functions as `host` says.
    pub fn new(host: FunctionHost) -> Self {
        Self {
            inner: BallistaLogicalExtensionCodec::default(),
            host,
        }
    }
}

impl LogicalExtensionCodec for LogicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        self.inner.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        match buf.strip_prefix(FASTA_TABLE_TAG) {
            Some(json) => {
                let node: FastaTableNode = serde_json::from_slice(json)
                    .map_err(|e| DataFusionError::Internal(format!("FASTA table: {e}")))?;
                Ok(Arc::new(FastaTable::from_paths(
                    &node.paths,
                    &node.extension,
                )?))
            }
            None => self
                .inner
                .try_decode_table_provider(buf, table_ref, schema, ctx),
        }
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        match node.downcast_ref::<FastaTable>() {
            Some(table) => {
                let node = FastaTableNode {
                    paths: table.paths(),
                    extension: table.extension().to_string(),
                };
                buf.extend(FASTA_TABLE_TAG);
                buf.extend(serde_json::to_vec(&node).expect("paths serialize"));
                Ok(())
            }
            None => self.inner.try_encode_table_provider(table_ref, node, buf),
        }
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn datafusion::datasource::file_format::FileFormatFactory>> {
        self.inner.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn datafusion::datasource::file_format::FileFormatFactory>,
    ) -> Result<()> {
        self.inner.try_encode_file_format(buf, node)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        decode_function(&self.host, name, buf)
            .unwrap_or_else(|| self.inner.try_decode_udf(name, buf))
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        match encode_function(node, buf)? {
            true => Ok(()),
            false => self.inner.try_encode_udf(node, buf),
        }
    }
}

/// Ballista's physical codec, plus FASTA scans and model functions.
#[derive(Debug)]
pub struct PhysicalCodec {
    inner: BallistaPhysicalExtensionCodec,
    host: FunctionHost,
}

impl PhysicalCodec {
    /// The codec of a process hosting functions as `host` says.
    pub fn new(host: FunctionHost) -> Self {
        Self {
            inner: BallistaPhysicalExtensionCodec::default(),
            host,
        }
    }
}

/// The file-scan configuration of a FASTA scan, if `node` is one.
fn fasta_scan(node: &dyn ExecutionPlan) -> Option<&FileScanConfig> {
    let exec = node.downcast_ref::<DataSourceExec>()?;
    let config = exec.data_source().downcast_ref::<FileScanConfig>()?;
    config.file_source().is::<FastaSource>().then_some(config)
}

impl PhysicalExtensionCodec for PhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        for (tag, step) in [
            (PARTITION_WRITES_TAG, Step::Write),
            (COMMIT_WRITES_TAG, Step::Commit),
        ] {
            if let Some(encoded) = buf.strip_prefix(tag) {
                let target = decode_target(encoded)?;
                return Ok(Arc::new(CopyWrites::new(step, only_input(inputs)?, target)));
            }
        }
        let Some(proto) = buf.strip_prefix(FASTA_SCAN_TAG) else {
            return self.inner.try_decode(buf, inputs, ctx, proto_converter);
        };
        let proto = FileScanExecConf::decode(proto)
            .map_err(|e| DataFusionError::Internal(format!("FASTA scan: {e}")))?;
        let source = FastaSource::new(FileScanConfig::parse_table_schema_from_proto(&proto)?);
        let decode = PhysicalPlanDecodeContext::new(ctx, self);
        let config =
            parse_protobuf_file_scan_config(&proto, &decode, proto_converter, Arc::new(source))?;
        Ok(DataSourceExec::from_data_source(config))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        if let Some(writes) = node.downcast_ref::<CopyWrites>() {
            buf.extend(match writes.step() {
                Step::Write => PARTITION_WRITES_TAG,
                Step::Commit => COMMIT_WRITES_TAG,
            });
            return encode_target(writes.target(), buf);
        }
        match fasta_scan(node.as_ref()) {
            Some(config) => {
                let proto = serialize_file_scan_config(config, self, proto_converter)?;
                buf.extend(FASTA_SCAN_TAG);
                proto
                    .encode(buf)
                    .map_err(|e| DataFusionError::Internal(format!("FASTA scan: {e}")))
            }
            None => self.inner.try_encode(node, buf, proto_converter),
        }
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        decode_function(&self.host, name, buf)
            .unwrap_or_else(|| self.inner.try_decode_udf(name, buf))
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        match encode_function(node, buf)? {
            true => Ok(()),
            false => self.inner.try_encode_udf(node, buf),
        }
    }
}

/// A [`WriteTarget`]: its write id's length (u32, little-endian) and bytes, then DataFusion's
/// protobuf of its Parquet sink.
fn encode_target(target: &WriteTarget, buf: &mut Vec<u8>) -> Result<()> {
    let id = target.write_id.as_bytes();
    buf.extend((id.len() as u32).to_le_bytes());
    buf.extend(id);
    datafusion_proto::protobuf::ParquetSink::try_from(&target.sink())?
        .encode(buf)
        .map_err(|e| DataFusionError::Internal(format!("COPY writes: {e}")))
}

fn decode_target(buf: &[u8]) -> Result<WriteTarget> {
    let bad = |why: &str| DataFusionError::Internal(format!("COPY writes: {why}"));
    let (len, rest) = buf
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("truncated"))?;
    let (id, proto) = rest
        .split_at_checked(u32::from_le_bytes(*len) as usize)
        .ok_or_else(|| bad("truncated"))?;
    let write_id = std::str::from_utf8(id)
        .map_err(|_| bad("write id"))?
        .to_string();
    let proto =
        datafusion_proto::protobuf::ParquetSink::decode(proto).map_err(|e| bad(&e.to_string()))?;
    let sink = datafusion::datasource::physical_plan::parquet::ParquetSink::try_from(&proto)?;
    Ok(WriteTarget {
        config: datafusion::datasource::physical_plan::FileSink::config(&sink).clone(),
        options: sink.parquet_options().clone(),
        write_id,
    })
}

/// The one input of a decoded node.
fn only_input(inputs: &[Arc<dyn ExecutionPlan>]) -> Result<Arc<dyn ExecutionPlan>> {
    match inputs {
        [input] => Ok(input.clone()),
        _ => Err(DataFusionError::Internal(
            "COPY writes: one input expected".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FunctionSpec {
        crate::sql::spec::example()
    }

    #[test]
    fn model_functions_cross_with_their_spec_and_others_by_name() {
        let codec = LogicalCodec::new(FunctionHost::Planner);
        let planned = FunctionModel::Planned(Arc::new(spec()));
        for udf in crate::sql::functions(Some(planned)) {
            let mut buf = Vec::new();
            codec.try_encode_udf(&udf, &mut buf).unwrap();
            if udf.name() == "cosine_similarity" {
                assert!(buf.is_empty(), "a plain function travels by name");
                continue;
            }
            assert_eq!(
                FunctionSpec::decode(&buf).unwrap(),
                spec(),
                "{}",
                udf.name()
            );
            let back = codec.try_decode_udf(udf.name(), &buf).unwrap();
            assert_eq!(back.name(), udf.name());
            let field = back
                .return_field_from_args(ReturnFieldArgs {
                    arg_fields: &[],
                    scalar_arguments: &[],
                })
                .unwrap();
            let spec_back = FunctionSpec::from_metadata(field.metadata())
                .unwrap()
                .unwrap();
            assert_eq!(spec_back, spec());
        }
    }

    #[tokio::test]
    async fn copy_writes_cross_with_their_write_id_and_sink() {
        use super::super::parallel_write::tests::{context, physical_plan};
        let dir = tempfile::tempdir().unwrap();
        let sql = format!(
            "COPY (SELECT * FROM (VALUES (1), (2)) UNION ALL SELECT * FROM (VALUES (3))) TO '{}/' STORED AS PARQUET",
            dir.path().display()
        );
        let commit = physical_plan(&context(true), &sql).await;
        assert!(commit.downcast_ref::<CopyWrites>().is_some());
        let codec = PhysicalCodec::new(FunctionHost::Planner);
        let converter = datafusion_proto::physical_plan::DefaultPhysicalProtoConverter {};
        let merge = commit.children()[0].clone();
        let writes = merge.children()[0].clone();
        for (node, input) in [
            (commit.clone(), merge.clone()),
            (writes.clone(), writes.children()[0].clone()),
        ] {
            let mut buf = Vec::new();
            codec
                .try_encode(node.clone(), &mut buf, &converter)
                .unwrap();
            let back = codec
                .try_decode(&buf, &[input], &TaskContext::default(), &converter)
                .unwrap();
            let shown = |p: &Arc<dyn ExecutionPlan>| {
                datafusion::physical_plan::displayable(p.as_ref())
                    .one_line()
                    .to_string()
            };
            assert_eq!(shown(&back), shown(&node));
            assert_eq!(back.schema(), node.schema());
        }
    }

    #[test]
    fn fasta_tables_cross_as_their_paths() {
        let codec = LogicalCodec::new(FunctionHost::Planner);
        let paths = vec!["/data/a.fasta".to_string(), "/data/more/".to_string()];
        let table: Arc<dyn TableProvider> =
            Arc::new(FastaTable::from_paths(&paths, ".fa.gz").unwrap());
        let name = TableReference::bare("p");
        let mut buf = Vec::new();
        codec
            .try_encode_table_provider(&name, table.clone(), &mut buf)
            .unwrap();
        assert!(buf.starts_with(FASTA_TABLE_TAG));
        let ctx = TaskContext::default();
        let back = codec
            .try_decode_table_provider(&buf, &name, table.schema(), &ctx)
            .unwrap();
        let back = back.downcast_ref::<FastaTable>().expect("a FASTA table");
        assert_eq!(back.extension(), ".fa.gz");
        assert_eq!(back.paths().len(), 2);
        assert!(
            back.paths()[0].ends_with("/data/a.fasta"),
            "{:?}",
            back.paths()
        );
        assert_eq!(back.schema(), table.schema());
    }
}
