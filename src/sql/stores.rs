//! Where a session's tables live: object stores resolved on first use, and glob locations of
//! `STORED AS FASTA` tables expanded with the same rules as `esmbed embed` inputs.
//!
//! ```text
//!   LOCATION 's3://b/in/*.fa.gz' ─ FastaTables: KeyPattern over the store's listing ─> the files
//!                                                  └─ store: Stores::get_store(s3://b) ─ built once
//! ```

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::listing_table_factory::ListingTableFactory;
use datafusion::execution::object_store::{
    DefaultObjectStoreRegistry, ObjectStoreRegistry, ObjectStoreUrl,
};
use datafusion::logical_expr::CreateExternalTable;
use object_store::ObjectStore;
use url::Url;

use super::fasta_table::FastaTable;
use crate::storage::{self, KeyPattern, StoreOptions};

/// The object stores of a session: `file://`, and any other store built on first use from its
/// URL (`s3://bucket`) with one set of [`StoreOptions`], so tables and `COPY … TO` may name any
/// bucket without registering it first.
#[derive(Debug)]
pub struct Stores {
    options: StoreOptions,
    known: DefaultObjectStoreRegistry,
    /// Held while a store is built, so that a bucket gets one client.
    building: Mutex<()>,
}

impl Stores {
    /// Stores reached with `options`.
    pub fn new(options: StoreOptions) -> Self {
        Self {
            options,
            known: DefaultObjectStoreRegistry::new(),
            building: Mutex::new(()),
        }
    }
}

impl ObjectStoreRegistry for Stores {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.known.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        self.known.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.known.get_store(url) {
            return Ok(store);
        }
        let _one = self.building.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(store) = self.known.get_store(url) {
            return Ok(store);
        }
        let store = storage::connect(url, &self.options)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        self.known.register_store(url, store.clone());
        Ok(store)
    }
}

/// `STORED AS FASTA` tables: DataFusion's listing tables, with every location that holds a glob
/// replaced by the files it matches (local or in a store, [`KeyPattern`]'s rules). A glob that
/// matches nothing is passed on as written.
#[derive(Debug, Default)]
pub struct FastaTables {
    listing: ListingTableFactory,
}

#[async_trait]
impl TableProviderFactory for FastaTables {
    async fn create(
        &self,
        state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> Result<Arc<dyn TableProvider>> {
        let mut locations = Vec::with_capacity(cmd.locations.len());
        for location in &cmd.locations {
            for file in expand(state, location).await? {
                if !locations.contains(&file) {
                    locations.push(file);
                }
            }
        }
        let cmd = CreateExternalTable {
            locations,
            ..cmd.clone()
        };
        let listing = self.listing.create(state, &cmd).await?;
        Ok(Arc::new(FastaTable::new(listing)?))
    }
}

/// The files a location names: itself without wildcards, else those that match.
async fn expand(state: &dyn Session, location: &str) -> Result<Vec<String>> {
    if !storage::glob::has_wildcards(location) {
        return Ok(vec![location.to_string()]);
    }
    let external = |e: crate::Error| DataFusionError::External(Box::new(e));
    // A URL names its store; anything else is a local path, absolute from here.
    let (root, key, local) = if location.contains("://") {
        let (url, _, key) = storage::split(location).map_err(external)?;
        (
            url[..url::Position::BeforePath].to_string(),
            key.to_string(),
            false,
        )
    } else {
        let path =
            std::path::absolute(location).map_err(|e| external(crate::Error::io(location, e)))?;
        let path = path.to_string_lossy().trim_start_matches('/').to_string();
        ("file://".to_string(), path, true)
    };
    let pattern = KeyPattern::new(&key)
        .map_err(|e| DataFusionError::Plan(format!("{location}: not a valid glob ({e})")))?;
    let store = state
        .runtime_env()
        .object_store(ObjectStoreUrl::parse(&root)?)?;
    let found = storage::glob::matching(store.as_ref(), &pattern).await?;
    if found.is_empty() {
        return Ok(vec![location.to_string()]);
    }
    Ok(found
        .into_iter()
        .map(|meta| match local {
            true => format!("/{}", meta.location),
            false => format!("{root}/{}", meta.location),
        })
        .collect())
}
