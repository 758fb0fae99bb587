//! Bytes in and out of an object: sequential and Parquet range readers, and the upload of a local
//! file through object_store's `BufWriter`.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use object_store::buffered::BufWriter;
use object_store::path::Path as Key;
use object_store::ObjectStore;

use super::{ObjectUrl, CHUNK};

/// Copy `source` to `key` (one PUT up to [`CHUNK`] bytes, else a multipart upload of [`CHUNK`]
/// parts). The outer result is the store's, the inner one reading `source`'s. A failure before
/// the upload completes aborts it.
pub(super) async fn upload(
    source: &mut impl Read,
    store: Arc<dyn ObjectStore>,
    key: Key,
) -> object_store::Result<std::io::Result<()>> {
    let mut writer = BufWriter::with_capacity(store, key, CHUNK);
    let copied = async {
        loop {
            let mut buffer = vec![0u8; CHUNK];
            let n = match read_full(source, &mut buffer) {
                Ok(0) => return Ok(Ok(())),
                Ok(n) => n,
                Err(e) => return Ok(Err(e)),
            };
            buffer.truncate(n);
            writer.put(Bytes::from(buffer)).await?;
        }
    }
    .await;
    match copied {
        Ok(Ok(())) => {
            // After a failed shutdown the writer cannot abort: object_store's `finish` aborts
            // when completing fails, a part that fails leaves the upload incomplete (invisible).
            use tokio::io::AsyncWriteExt;
            writer.shutdown().await.map_err(store_error)?;
            Ok(Ok(()))
        }
        failed => {
            let _ = writer.abort().await;
            failed
        }
    }
}

/// The store's error inside the `std::io::Error` that `AsyncWrite` returns.
fn store_error(error: std::io::Error) -> object_store::Error {
    match error
        .into_inner()
        .map(|e| e.downcast::<object_store::Error>())
    {
        Some(Ok(error)) => *error,
        Some(Err(other)) => object_store::Error::Generic {
            store: "BufWriter",
            source: other,
        },
        None => object_store::Error::Generic {
            store: "BufWriter",
            source: "the upload failed".into(),
        },
    }
}

fn read_full(source: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match source.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Reads an object front to back, [`CHUNK`] bytes per request.
pub struct ObjectReader {
    object: ObjectUrl,
    size: u64,
    offset: u64,
    buffer: Bytes,
}

impl ObjectReader {
    /// The object of `size` bytes from `offset`.
    pub(super) fn new(object: ObjectUrl, size: u64, offset: u64) -> Self {
        Self {
            object,
            size,
            offset,
            buffer: Bytes::new(),
        }
    }
}

impl Read for ObjectReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buffer.is_empty() {
            if self.offset >= self.size {
                return Ok(0);
            }
            let end = (self.offset + CHUNK as u64).min(self.size);
            self.buffer = self
                .object
                .get_range(self.offset..end)
                .map_err(std::io::Error::other)?;
            self.offset = end;
        }
        let n = out.len().min(self.buffer.len());
        out[..n].copy_from_slice(&self.buffer[..n]);
        self.buffer = self.buffer.slice(n..);
        Ok(n)
    }
}

/// A Parquet file in an object store, read by ranges (the footer first, then column chunks).
pub struct ObjectChunks {
    object: ObjectUrl,
    size: u64,
}

impl ObjectChunks {
    /// The object of `size` bytes.
    pub fn new(object: ObjectUrl, size: u64) -> Self {
        Self { object, size }
    }
}

impl parquet::file::reader::Length for ObjectChunks {
    fn len(&self) -> u64 {
        self.size
    }
}

impl parquet::file::reader::ChunkReader for ObjectChunks {
    type T = ObjectReader;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(ObjectReader::new(self.object.clone(), self.size, start))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.object
            .get_range(start..start + length as u64)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }
}
