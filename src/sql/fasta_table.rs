//! FASTA as a DataFusion table format: `CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION '…'`.
//!
//! Columns `id`, `description`, `sequence`. A location is a file (plain or gzip, detected by its
//! magic bytes, whatever its name), a directory (its `*.fasta` files) or a glob
//! (`'data/*.fa.gz'`, expanded by [`super::stores::FastaTables`] with the rules of `esmbed embed`
//! inputs), local or in an object store. DataFusion's listing table does the listing,
//! projection and LIMIT; this module only opens one file and streams its records, with the same
//! reader as `esmbed embed`. A file is never split (FASTA has no sync points), so parallelism
//! comes from having several files.
//!
//! A record with an empty header keeps the row with an empty `id`, one with no residues an empty
//! `sequence`: `esm_embed` then names the row (or gives NULL in a lenient session).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, GetExt, Result, Statistics};
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::{FileFormat, FileFormatFactory};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::physical_plan::{
    FileOpenFuture, FileOpener, FileScanConfig, FileSource,
};
use datafusion::datasource::projection::{ProjectionOpener, SplitProjection};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::datasource::TableType;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::projection::ProjectionExprs;
use datafusion::physical_plan::{apply_expression_roots, ExecutionPlan, PhysicalExpr};
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::{GetOptions, GetResultPayload, ObjectMeta, ObjectStore};

use crate::input::fasta::{schema, FastaBatches};

/// A `STORED AS FASTA` table: DataFusion's listing table over FASTA files, as its own type so
/// that a cluster's plan codec can name it (a listing table of a format DataFusion does not know
/// does not serialize): the scheduler rebuilds it from its paths ([`FastaTable::from_paths`]).
#[derive(Debug)]
pub struct FastaTable {
    /// A [`ListingTable`] (checked by [`FastaTable::new`]).
    listing: Arc<dyn TableProvider>,
}

impl FastaTable {
    /// Wrap the listing table that `STORED AS FASTA` created.
    pub fn new(listing: Arc<dyn TableProvider>) -> Result<Self> {
        if listing.downcast_ref::<ListingTable>().is_none() {
            return Err(DataFusionError::Internal(
                "STORED AS FASTA made no listing table".into(),
            ));
        }
        Ok(Self { listing })
    }

    fn listing(&self) -> &ListingTable {
        self.listing
            .downcast_ref::<ListingTable>()
            .expect("checked by FastaTable::new")
    }

    /// The table over `paths` (files or directories; a directory's files with `extension`),
    /// with the FASTA columns.
    pub fn from_paths(paths: &[String], extension: &str) -> Result<Self> {
        let urls = paths
            .iter()
            .map(ListingTableUrl::parse)
            .collect::<Result<Vec<_>>>()?;
        let options = ListingOptions::new(Arc::new(FastaFormat)).with_file_extension(extension);
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(schema());
        Ok(Self {
            listing: Arc::new(ListingTable::try_new(config)?),
        })
    }

    /// The files or directories it reads.
    pub fn paths(&self) -> Vec<String> {
        self.listing()
            .table_paths()
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    /// The extension of the files it reads from a directory.
    pub fn extension(&self) -> &str {
        &self.listing().options().file_extension
    }
}

#[async_trait]
impl TableProvider for FastaTable {
    fn schema(&self) -> SchemaRef {
        self.listing.schema()
    }

    fn table_type(&self) -> TableType {
        self.listing.table_type()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.listing.scan(state, projection, filters, limit).await
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        self.listing.supports_filters_pushdown(filters)
    }
}

/// Registers `fasta` with a session (see [`super::session`]).
#[derive(Debug, Default)]
pub struct FastaFormatFactory;

impl GetExt for FastaFormatFactory {
    fn get_ext(&self) -> String {
        "fasta".into()
    }
}

impl FileFormatFactory for FastaFormatFactory {
    fn create(
        &self,
        _state: &dyn Session,
        options: &HashMap<String, String>,
    ) -> Result<Arc<dyn FileFormat>> {
        // `format.compression` comes with `SELECT * FROM 'x.fasta.gz'`; gzip is detected per
        // file anyway.
        if let Some(key) = options.keys().find(|k| k.as_str() != "format.compression") {
            return Err(DataFusionError::Configuration(format!(
                "STORED AS FASTA takes no option {key:?} (gzip is detected from the content)"
            )));
        }
        Ok(Arc::new(FastaFormat))
    }

    fn default(&self) -> Arc<dyn FileFormat> {
        Arc::new(FastaFormat)
    }
}

/// The FASTA file format.
#[derive(Debug, Default)]
pub struct FastaFormat;

#[async_trait]
impl FileFormat for FastaFormat {
    fn get_ext(&self) -> String {
        "fasta".into()
    }

    fn get_ext_with_compression(&self, compression: &FileCompressionType) -> Result<String> {
        Ok(format!("fasta{}", compression.get_ext()))
    }

    fn compression_type(&self) -> Option<FileCompressionType> {
        None
    }

    async fn infer_schema(
        &self,
        _state: &dyn Session,
        _store: &Arc<dyn ObjectStore>,
        _objects: &[ObjectMeta],
    ) -> Result<SchemaRef> {
        Ok(schema())
    }

    async fn infer_stats(
        &self,
        _state: &dyn Session,
        _store: &Arc<dyn ObjectStore>,
        table_schema: SchemaRef,
        _object: &ObjectMeta,
    ) -> Result<Statistics> {
        Ok(Statistics::new_unknown(&table_schema))
    }

    async fn create_physical_plan(
        &self,
        _state: &dyn Session,
        config: FileScanConfig,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(DataSourceExec::from_data_source(config))
    }

    fn file_source(&self, table_schema: TableSchema) -> Arc<dyn FileSource> {
        Arc::new(FastaSource::new(table_schema))
    }
}

/// Scans FASTA files.
#[derive(Clone)]
pub struct FastaSource {
    table_schema: TableSchema,
    projection: SplitProjection,
    batch_size: Option<usize>,
    metrics: ExecutionPlanMetricsSet,
}

impl FastaSource {
    /// A source of FASTA records with the columns of `table_schema`.
    pub fn new(table_schema: TableSchema) -> Self {
        Self {
            projection: SplitProjection::unprojected(&table_schema),
            table_schema,
            batch_size: None,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl FileSource for FastaSource {
    fn create_file_opener(
        &self,
        store: Arc<dyn ObjectStore>,
        _config: &FileScanConfig,
        _partition: usize,
    ) -> Result<Arc<dyn FileOpener>> {
        let opener: Arc<dyn FileOpener> = Arc::new(FastaOpener {
            store,
            batch_size: self.batch_size.unwrap_or(8192),
            columns: self.projection.file_indices.clone(),
        });
        ProjectionOpener::try_new(
            self.projection.clone(),
            opener,
            self.table_schema.file_schema(),
        )
    }

    fn table_schema(&self) -> &TableSchema {
        &self.table_schema
    }

    fn with_batch_size(&self, batch_size: usize) -> Arc<dyn FileSource> {
        Arc::new(Self {
            batch_size: Some(batch_size),
            ..self.clone()
        })
    }

    fn try_pushdown_projection(
        &self,
        projection: &ProjectionExprs,
    ) -> Result<Option<Arc<dyn FileSource>>> {
        let merged = self.projection.source.try_merge(projection)?;
        let mut source = self.clone();
        source.projection = SplitProjection::new(self.table_schema.file_schema(), &merged);
        Ok(Some(Arc::new(source)))
    }

    fn projection(&self) -> Option<&ProjectionExprs> {
        Some(&self.projection.source)
    }

    fn metrics(&self) -> &ExecutionPlanMetricsSet {
        &self.metrics
    }

    fn file_type(&self) -> &str {
        "fasta"
    }

    fn supports_repartitioning(&self) -> bool {
        false
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        apply_expression_roots(self.projection.source.iter(), f)
    }
}

/// Opens one FASTA file: the parser runs on a blocking thread and hands batches over a small
/// channel, so a file streams (two batches in memory) and a LIMIT stops the reading.
struct FastaOpener {
    store: Arc<dyn ObjectStore>,
    batch_size: usize,
    columns: Vec<usize>,
}

impl FileOpener for FastaOpener {
    fn open(&self, file: PartitionedFile) -> Result<FileOpenFuture> {
        let store = self.store.clone();
        let batch_size = self.batch_size;
        let columns = self.columns.clone();
        Ok(Box::pin(async move {
            let location = file.object_meta.location.clone();
            let name = location.to_string();
            let got = store.get_opts(&location, GetOptions::default()).await?;
            let runtime = tokio::runtime::Handle::current();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<RecordBatch>>(2);
            tokio::task::spawn_blocking(move || {
                let reader: Box<dyn Read + Send> = match got.payload {
                    GetResultPayload::File(file, _) => Box::new(file),
                    GetResultPayload::Stream(stream) => Box::new(StreamRead {
                        stream: stream.map(|r| r.map_err(std::io::Error::other)).boxed(),
                        runtime,
                        buffer: bytes::Bytes::new(),
                    }),
                };
                let error = |e: crate::Error| DataFusionError::External(Box::new(e));
                match FastaBatches::new(reader, &name, batch_size) {
                    Err(e) => {
                        let _ = tx.blocking_send(Err(error(e)));
                    }
                    Ok(batches) => {
                        for batch in batches {
                            let batch = batch
                                .map_err(error)
                                .and_then(|b| Ok(b.batch.project(&columns)?));
                            if tx.blocking_send(batch).is_err() {
                                break; // the query stopped reading (LIMIT, cancel)
                            }
                        }
                    }
                }
            });
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            Ok(stream.boxed())
        }))
    }
}

/// An object-store byte stream read synchronously, from a blocking thread.
struct StreamRead {
    stream: BoxStream<'static, std::io::Result<bytes::Bytes>>,
    runtime: tokio::runtime::Handle,
    buffer: bytes::Bytes,
}

impl Read for StreamRead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buffer.is_empty() {
            match self.runtime.block_on(self.stream.next()) {
                Some(Ok(bytes)) => self.buffer = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buffer.len());
        out[..n].copy_from_slice(&self.buffer[..n]);
        self.buffer = self.buffer.slice(n..);
        Ok(n)
    }
}
