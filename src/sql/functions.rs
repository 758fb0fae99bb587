//! SQL functions over sequences and embeddings.
//!
//! - `esm_embed(sequence [, layer])` → `FixedSizeList<Float32>[H]`: the mean embedding (BOS/EOS
//!   excluded) of the last layer (normalized), or of fair-esm layer `layer` (a constant; negative
//!   counts from the end). Asynchronous and batched: DataFusion hands it a batch of rows
//!   (`datafusion.execution.batch_size`), which is packed and run like `esmbed embed`'s.
//!   NULL in, NULL out. A sequence that cannot be embedded (a character outside the alphabet, an
//!   empty sequence) fails the query with the row's value and the reason, or, in a lenient
//!   session (`esmbed sql --lenient`), is NULL. Longer sequences keep their first 1022 residues.
//! - `esm_tokens(sequence)` → `Int64`: the tokens the model sees for it (residues + `<cls>` and
//!   `<eos>`, after truncation); NULL where `esm_embed` would be NULL.
//! - `cosine_similarity(a, b)` → `Float64` over two vectors (`FixedSizeList` or `List` of
//!   floats), e.g. `ORDER BY cosine_similarity(embedding, (SELECT embedding FROM q)) DESC LIMIT 10`
//!   for a nearest-neighbour search.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Float64Array, Int64Array,
};
use arrow::buffer::NullBuffer;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef};
use async_trait::async_trait;
use datafusion::common::{exec_err, plan_err, DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    TypeSignature, Volatility,
};

use super::spec::FunctionModel;

/// A model function's failure as DataFusion's error. A call whose devices have all failed is an
/// I/O error: the only kind a Ballista scheduler retries, so on a cluster the task moves to
/// another executor (locally the query fails with the same message either way).
pub(super) fn external(e: crate::Error) -> DataFusionError {
    match e {
        crate::Error::NoDevice(_) => DataFusionError::IoError(std::io::Error::other(e)),
        e => DataFusionError::External(Box::new(e)),
    }
}

/// A model function's output field, carrying its spec as metadata (see [`super::spec`]).
pub(super) fn output_field(name: &str, data_type: DataType, model: &FunctionModel) -> FieldRef {
    Arc::new(Field::new(name, data_type, true).with_metadata(model.spec().metadata()))
}

/// The sequences of a call as `Utf8`, whatever string type the column has.
fn sequences(arg: ColumnarValue, rows: usize) -> Result<ArrayRef> {
    Ok(cast(&arg.into_array(rows)?, &DataType::Utf8)?)
}

/// `esm_embed`; see the module docs.
#[derive(Debug)]
pub struct EsmEmbed {
    signature: Signature,
    model: FunctionModel,
}

impl EsmEmbed {
    /// The function over `model`.
    pub fn new(model: FunctionModel) -> Self {
        // Explicit signatures: DataFusion's async wrapper does not forward `coerce_types`.
        let strings = [DataType::Utf8, DataType::Utf8View, DataType::LargeUtf8];
        let signatures = strings
            .iter()
            .flat_map(|s| {
                [
                    TypeSignature::Exact(vec![s.clone()]),
                    TypeSignature::Exact(vec![s.clone(), DataType::Int64]),
                ]
            })
            .collect();
        Self {
            signature: Signature::one_of(signatures, Volatility::Immutable),
            model,
        }
    }

    /// As a DataFusion UDF.
    pub fn udf(model: FunctionModel) -> ScalarUDF {
        AsyncScalarUDF::new(Arc::new(Self::new(model))).into_scalar_udf()
    }

    fn data_type(&self) -> DataType {
        DataType::FixedSizeList(Self::item(), self.model.hidden() as i32)
    }

    fn item() -> Arc<Field> {
        Arc::new(Field::new_list_field(DataType::Float32, false))
    }
}

impl PartialEq for EsmEmbed {
    fn eq(&self, other: &Self) -> bool {
        self.model.address() == other.model.address()
    }
}

impl Eq for EsmEmbed {}

impl Hash for EsmEmbed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.model.address().hash(state)
    }
}

impl ScalarUDFImpl for EsmEmbed {
    fn name(&self) -> &str {
        "esm_embed"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.data_type())
    }

    fn return_field_from_args(&self, _args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(output_field(self.name(), self.data_type(), &self.model))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!("esm_embed runs asynchronously; this path is not used by queries")
    }
}

#[async_trait]
impl AsyncScalarUDFImpl for EsmEmbed {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let mut values = args.args.into_iter();
        let sequences = sequences(values.next().expect("coerced to one or two"), rows)?;
        let service = self.model.served(self.name()).map_err(external)?.clone();
        let layer = match values.next() {
            None => service.num_layers(),
            Some(ColumnarValue::Scalar(ScalarValue::Int64(Some(l)))) => {
                service.resolve_layer(l).map_err(external)?
            }
            Some(_) => {
                return exec_err!("esm_embed(sequence, layer): layer must be a constant integer")
            }
        };
        let hidden = service.hidden() as i32;
        let (flat, valid) = tokio::task::spawn_blocking(move || {
            let text = sequences.as_string::<i32>();
            let rows: Vec<Option<&str>> = text.iter().collect();
            service.embed(&rows, layer)
        })
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .map_err(external)?;
        let list = FixedSizeListArray::try_new(
            Self::item(),
            hidden,
            Arc::new(Float32Array::from(flat)),
            Some(NullBuffer::from(valid)),
        )?;
        Ok(ColumnarValue::Array(Arc::new(list)))
    }
}

/// `esm_tokens`; see the module docs.
#[derive(Debug)]
pub struct EsmTokens {
    signature: Signature,
    model: FunctionModel,
}

impl EsmTokens {
    /// As a DataFusion UDF.
    pub fn udf(model: FunctionModel) -> ScalarUDF {
        ScalarUDF::new_from_impl(Self {
            signature: Signature::string(1, Volatility::Immutable),
            model,
        })
    }
}

impl PartialEq for EsmTokens {
    fn eq(&self, other: &Self) -> bool {
        self.model.address() == other.model.address()
    }
}

impl Eq for EsmTokens {}

impl Hash for EsmTokens {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.model.address().hash(state)
    }
}

impl ScalarUDFImpl for EsmTokens {
    fn name(&self) -> &str {
        "esm_tokens"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn return_field_from_args(&self, _args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(output_field(self.name(), DataType::Int64, &self.model))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let service = self.model.served(self.name()).map_err(external)?;
        let text = sequences(args.args.into_iter().next().expect("one argument"), rows)?;
        let counts = text
            .as_string::<i32>()
            .iter()
            .enumerate()
            .map(|(row, s)| match s {
                None => Ok(None),
                Some(s) => match service.tokens(row, s) {
                    Ok(tokens) => Ok(tokens.map(|t| t as i64)),
                    Err(e) => Err(external(e)),
                },
            })
            .collect::<Result<Int64Array>>()?;
        Ok(ColumnarValue::Array(Arc::new(counts)))
    }
}

/// `cosine_similarity`; see the module docs.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CosineSimilarity {
    signature: Signature,
}

impl CosineSimilarity {
    /// As a DataFusion UDF.
    pub fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(Self {
            signature: Signature::user_defined(Volatility::Immutable),
        })
    }
}

/// The float element type of a vector type, if it is one.
fn vector_item(t: &DataType) -> Option<&DataType> {
    match t {
        DataType::FixedSizeList(f, _) | DataType::List(f) | DataType::LargeList(f) => {
            let item = f.data_type();
            (item.is_floating() || item.is_integer()).then_some(item)
        }
        _ => None,
    }
}

/// Where each row's vector lies in the values (`None` for a NULL row): `(start, len)`.
type Spans = Vec<Option<(usize, usize)>>;

/// Rows of a vector column as `(values, spans)` over one `Float32Array`.
fn vector_rows(array: &ArrayRef) -> Result<(Float32Array, Spans)> {
    let rows = |valid: &dyn Fn(usize) -> bool, span: &dyn Fn(usize) -> (usize, usize)| {
        (0..array.len())
            .map(|i| valid(i).then(|| span(i)))
            .collect::<Vec<_>>()
    };
    let (values, spans) = match array.data_type() {
        DataType::FixedSizeList(_, n) => {
            let list = array.as_fixed_size_list();
            let n = *n as usize;
            (
                list.values().clone(),
                rows(&|i| list.is_valid(i), &|i| {
                    (list.value_offset(i) as usize, n)
                }),
            )
        }
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            let offsets = list.value_offsets();
            (
                list.values().clone(),
                rows(&|i| list.is_valid(i), &|i| {
                    (offsets[i] as usize, (offsets[i + 1] - offsets[i]) as usize)
                }),
            )
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>();
            let offsets = list.value_offsets();
            (
                list.values().clone(),
                rows(&|i| list.is_valid(i), &|i| {
                    (offsets[i] as usize, (offsets[i + 1] - offsets[i]) as usize)
                }),
            )
        }
        other => return exec_err!("cosine_similarity: not a vector: {other}"),
    };
    let values = cast(&values, &DataType::Float32)?;
    Ok((values.as_primitive().clone(), spans))
}

impl ScalarUDFImpl for CosineSimilarity {
    fn name(&self) -> &str {
        "cosine_similarity"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [a, b] if vector_item(a).is_some() && vector_item(b).is_some() => Ok(arg_types.to_vec()),
            _ => plan_err!(
                "cosine_similarity(a, b) takes two vectors (FixedSizeList or List of floats, e.g. two \
                 embedding columns), got {arg_types:?}"
            ),
        }
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let mut values = args.args.into_iter();
        let a = values.next().expect("two arguments").into_array(rows)?;
        let b = values.next().expect("two arguments").into_array(rows)?;
        let (av, a_rows) = vector_rows(&a)?;
        let (bv, b_rows) = vector_rows(&b)?;
        let (av, bv) = (av.values(), bv.values());
        let out = a_rows
            .iter()
            .zip(&b_rows)
            .map(|(x, y)| match (x, y) {
                (Some((xs, xn)), Some((ys, yn))) => {
                    if xn != yn {
                        return exec_err!(
                            "cosine_similarity: vectors of different lengths ({xn} and {yn}): compare \
                             embeddings of the same model and layer"
                        );
                    }
                    Ok(cosine(&av[*xs..xs + xn], &bv[*ys..ys + yn]))
                }
                _ => Ok(None),
            })
            .collect::<Result<Float64Array>>()?;
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// Cosine similarity in f64; `None` when a vector is zero.
fn cosine(x: &[f32], y: &[f32]) -> Option<f64> {
    let (mut dot, mut xx, mut yy) = (0f64, 0f64, 0f64);
    for (&p, &q) in x.iter().zip(y) {
        let (p, q) = (p as f64, q as f64);
        dot += p * q;
        xx += p * p;
        yy += q * q;
    }
    (xx > 0.0 && yy > 0.0).then(|| dot / (xx.sqrt() * yy.sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_known_vectors() {
        assert_eq!(cosine(&[1.0, 0.0], &[1.0, 0.0]), Some(1.0));
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 2.0]), Some(0.0));
        assert!((cosine(&[1.0, 1.0], &[-1.0, -1.0]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), None);
    }
}
