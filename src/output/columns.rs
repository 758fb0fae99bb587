//! The output schema and the Arrow arrays of embedding columns.
//!
//! Columns: the input's pass-through columns, `length` (residues of the input sequence),
//! `truncated`, then per requested layer `embedding[_k]` (mean over residues),
//! `bos_embedding[_k]`, `residue_embeddings[_k]`. The unsuffixed names belong to the model's last
//! layer when it is requested (the usual choice), else to the first layer listed. With `--pll`,
//! `pll` and `pseudo_perplexity` (Float64) come last, as `esmbed score` writes them.
//! Vectors are `FixedSizeList<Float32|Float16>[H]`, per-residue outputs `List<FixedSizeList>`:
//! DuckDB reads them as `FLOAT[H]`, pyarrow and Polars as fixed-size lists / arrays.

use std::sync::Arc;

use arrow::array::{ArrayRef, FixedSizeListArray, Float16Array, Float32Array, ListArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use half::f16;

use crate::pool::Pooling;

/// Element type of the embedding columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OutputDType {
    /// 32-bit floats (exact model output on the CPU).
    #[default]
    F32,
    /// 16-bit floats: half the size, ~3 significant digits.
    F16,
}

impl OutputDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutputDType::F32 => 4,
            OutputDType::F16 => 2,
        }
    }

    fn arrow(self) -> DataType {
        match self {
            OutputDType::F32 => DataType::Float32,
            OutputDType::F16 => DataType::Float16,
        }
    }
}

/// What the embedding columns hold: layers (resolved), pooling, width, element type.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingColumns {
    /// Resolved layers, in the order requested.
    pub layers: Vec<usize>,
    /// The model's last layer number.
    pub last_layer: usize,
    /// Which outputs per layer.
    pub pooling: Pooling,
    /// Vector width.
    pub hidden: usize,
    /// Element type.
    pub dtype: OutputDType,
    /// Also `pll` and `pseudo_perplexity` (`embed --pll`).
    pub pll: bool,
}

impl EmbeddingColumns {
    /// The layer whose columns get the unsuffixed names.
    pub fn primary_layer(&self) -> usize {
        if self.layers.contains(&self.last_layer) {
            self.last_layer
        } else {
            self.layers[0]
        }
    }

    fn name(&self, base: &str, layer: usize) -> String {
        if layer == self.primary_layer() {
            base.to_string()
        } else {
            format!("{base}_{layer}")
        }
    }

    fn vector_type(&self) -> DataType {
        DataType::FixedSizeList(
            Arc::new(Field::new_list_field(self.dtype.arrow(), false)),
            self.hidden as i32,
        )
    }

    /// The embedding fields, in column order.
    pub fn fields(&self) -> Vec<FieldRef> {
        let mut fields = Vec::new();
        for &layer in &self.layers {
            if self.pooling.mean {
                fields.push(Field::new(
                    self.name("embedding", layer),
                    self.vector_type(),
                    false,
                ));
            }
            if self.pooling.bos {
                fields.push(Field::new(
                    self.name("bos_embedding", layer),
                    self.vector_type(),
                    false,
                ));
            }
            if self.pooling.per_residue {
                let item = Arc::new(Field::new_list_field(self.vector_type(), false));
                fields.push(Field::new(
                    self.name("residue_embeddings", layer),
                    DataType::List(item),
                    false,
                ));
            }
        }
        if self.pll {
            fields.push(Field::new("pll", DataType::Float64, false));
            fields.push(Field::new("pseudo_perplexity", DataType::Float64, false));
        }
        fields.into_iter().map(Arc::new).collect()
    }

    /// The full output schema: pass-through columns, `length`, `truncated`, embeddings.
    pub fn schema(&self, passthrough: &Schema) -> SchemaRef {
        let mut fields: Vec<FieldRef> = passthrough.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new("length", DataType::Int32, false)));
        fields.push(Arc::new(Field::new("truncated", DataType::Boolean, false)));
        fields.extend(self.fields());
        Arc::new(Schema::new(fields))
    }

    /// A `FixedSizeList` array of `rows` vectors from row-major `values`.
    pub fn vectors(&self, values: Vec<f32>) -> ArrayRef {
        Arc::new(FixedSizeListArray::new(
            Arc::new(Field::new_list_field(self.dtype.arrow(), false)),
            self.hidden as i32,
            self.values(values),
            None,
        ))
    }

    /// A `List<FixedSizeList>` array: row i holds `counts[i]` vectors, taken in order from `values`.
    pub fn vector_lists(&self, values: Vec<f32>, counts: &[usize]) -> ArrayRef {
        let inner = self.vectors(values);
        let item = Arc::new(Field::new_list_field(self.vector_type(), false));
        Arc::new(ListArray::new(
            item,
            OffsetBuffer::from_lengths(counts.iter().copied()),
            inner,
            None,
        ))
    }

    fn values(&self, values: Vec<f32>) -> ArrayRef {
        match self.dtype {
            OutputDType::F32 => Arc::new(Float32Array::from(values)),
            OutputDType::F16 => Arc::new(Float16Array::from_iter_values(
                values.into_iter().map(f16::from_f32),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};

    fn columns(layers: Vec<usize>, dtype: OutputDType) -> EmbeddingColumns {
        EmbeddingColumns {
            layers,
            last_layer: 6,
            pooling: Pooling {
                mean: true,
                bos: true,
                per_residue: true,
            },
            hidden: 2,
            dtype,
            pll: false,
        }
    }

    #[test]
    fn names_follow_the_primary_layer() {
        let c = columns(vec![1, 6], OutputDType::F32);
        let names: Vec<String> = c.fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(
            names,
            [
                "embedding_1",
                "bos_embedding_1",
                "residue_embeddings_1",
                "embedding",
                "bos_embedding",
                "residue_embeddings"
            ]
        );
        let c = columns(vec![3], OutputDType::F32);
        assert_eq!(c.fields()[0].name(), "embedding");
    }

    #[test]
    fn arrays_have_the_declared_types() {
        for dtype in [OutputDType::F32, OutputDType::F16] {
            let c = columns(vec![6], dtype);
            let v = c.vectors(vec![1.0, 2.0, 3.0, 4.0]);
            assert_eq!(v.len(), 2);
            assert_eq!(v.data_type(), &c.vector_type());
            let l = c.vector_lists(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 2]);
            assert_eq!(l.len(), 2);
            assert_eq!(l.as_list::<i32>().value(1).len(), 2);
            assert_eq!(c.fields()[2].data_type(), l.data_type());
        }
    }
}
