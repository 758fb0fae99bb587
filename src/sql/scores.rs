//! SQL functions over the masked-LM head (see [`crate::score`] for the definitions):
//!
//! - `esm_pll(sequence)` → `Float64`: the pseudo-log-likelihood `Σ_k lp(x with k masked)[k, x_k]`
//!   (all masked copies of a call's sequences packed together; identical sequences once);
//! - `esm_score(wt_sequence, mutant [, strategy])` → `Float64`: the score of `mutant` (`A23G`,
//!   `A23G:K45R`, positions from 1) of `wt_sequence` by `strategy`, a constant
//!   `'wt-marginals'` (default), `'masked-marginals'` or `'pll'`; each distinct wild type of a
//!   call is run once for all its rows.
//!
//! Both are asynchronous and batched like `esm_embed`, NULL in, NULL out, and bad rows (a bad
//! sequence, a malformed mutant, a wild-type letter that does not match) fail the query naming
//! the row, or are NULL in a lenient session. The model needs its masked-LM head
//! (`EsmForMaskedLM` weights, as every published ESM-2 has).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{AsArray, Float64Array};
use arrow::buffer::NullBuffer;
use arrow::compute::cast;
use arrow::datatypes::{DataType, FieldRef};
use async_trait::async_trait;
use datafusion::common::{exec_err, DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    TypeSignature, Volatility,
};

use super::functions::{external, output_field};
use super::spec::FunctionModel;
use crate::score::Strategy;

/// Which function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Pll,
    Score,
}

/// `esm_pll` or `esm_score`; see the module docs.
#[derive(Debug)]
pub struct EsmScores {
    kind: Kind,
    signature: Signature,
    model: FunctionModel,
}

impl EsmScores {
    /// `esm_pll` over `model`.
    pub fn pll(model: FunctionModel) -> ScalarUDF {
        let signature = Signature::one_of(
            strings().map(|s| TypeSignature::Exact(vec![s])).collect(),
            Volatility::Immutable,
        );
        Self::udf(Kind::Pll, signature, model)
    }

    /// `esm_score` over `model`.
    pub fn score(model: FunctionModel) -> ScalarUDF {
        let signatures = strings()
            .flat_map(|a| strings().map(move |b| (a.clone(), b)))
            .flat_map(|(a, b)| {
                [
                    TypeSignature::Exact(vec![a.clone(), b.clone()]),
                    TypeSignature::Exact(vec![a, b, DataType::Utf8]),
                ]
            })
            .collect();
        let signature = Signature::one_of(signatures, Volatility::Immutable);
        Self::udf(Kind::Score, signature, model)
    }

    fn udf(kind: Kind, signature: Signature, model: FunctionModel) -> ScalarUDF {
        let this = Self {
            kind,
            signature,
            model,
        };
        AsyncScalarUDF::new(Arc::new(this)).into_scalar_udf()
    }
}

fn strings() -> impl Iterator<Item = DataType> + Clone {
    [DataType::Utf8, DataType::Utf8View, DataType::LargeUtf8].into_iter()
}

/// The strategy a constant names.
fn strategy(value: Option<ColumnarValue>) -> Result<Strategy> {
    match value {
        None => Ok(Strategy::WtMarginals),
        Some(ColumnarValue::Scalar(ScalarValue::Utf8(Some(s)))) => match s.as_str() {
            "wt-marginals" => Ok(Strategy::WtMarginals),
            "masked-marginals" => Ok(Strategy::MaskedMarginals),
            "pll" => Ok(Strategy::Pll),
            other => exec_err!(
                "esm_score: unknown strategy {other:?}: use 'wt-marginals', 'masked-marginals' or 'pll'"
            ),
        },
        Some(_) => exec_err!("esm_score(wt, mutant, strategy): strategy must be a constant string"),
    }
}

impl PartialEq for EsmScores {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.model.address() == other.model.address()
    }
}

impl Eq for EsmScores {}

impl Hash for EsmScores {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        self.model.address().hash(state)
    }
}

impl ScalarUDFImpl for EsmScores {
    fn name(&self) -> &str {
        match self.kind {
            Kind::Pll => "esm_pll",
            Kind::Score => "esm_score",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn return_field_from_args(&self, _args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(output_field(self.name(), DataType::Float64, &self.model))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!(
            "{} runs asynchronously; this path is not used by queries",
            self.name()
        )
    }
}

#[async_trait]
impl AsyncScalarUDFImpl for EsmScores {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let mut values = args.args.into_iter();
        let text =
            |v: ColumnarValue| -> Result<_> { Ok(cast(&v.into_array(rows)?, &DataType::Utf8)?) };
        let first = text(values.next().expect("one to three arguments"))?;
        let (second, strategy) = match self.kind {
            Kind::Pll => (None, Strategy::default()),
            Kind::Score => {
                let mutants = text(values.next().expect("two or three arguments"))?;
                (Some(mutants), strategy(values.next())?)
            }
        };
        let service = self.model.served(self.name()).map_err(external)?.clone();
        let kind = self.kind;
        let (scores, valid) = tokio::task::spawn_blocking(move || {
            let a: Vec<Option<&str>> = first.as_string::<i32>().iter().collect();
            match (kind, &second) {
                (Kind::Score, Some(b)) => {
                    let b: Vec<Option<&str>> = b.as_string::<i32>().iter().collect();
                    service.mutant_scores(&a, &b, strategy)
                }
                _ => service.pll(&a),
            }
        })
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .map_err(external)?;
        let array = Float64Array::new(scores.into(), Some(NullBuffer::from(valid)));
        debug_assert_eq!(array.len(), rows);
        Ok(ColumnarValue::Array(Arc::new(array)))
    }
}
