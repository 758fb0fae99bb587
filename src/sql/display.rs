//! Query results for a terminal: embeddings shown as their first values and their width, not
//! as 1280 numbers per cell.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// Values shown of each vector.
const SHOWN: usize = 3;

fn is_vector(t: &DataType) -> bool {
    match t {
        DataType::FixedSizeList(f, _) | DataType::List(f) | DataType::LargeList(f) => {
            f.data_type().is_floating()
        }
        _ => false,
    }
}

/// `[0.0123, -0.4561, 0.2000, … 320 values]`, or NULL.
fn summarize(array: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    let lists: Vec<Option<ArrayRef>> = match array.data_type() {
        DataType::FixedSizeList(..) => array.as_fixed_size_list().iter().collect(),
        DataType::List(_) => array.as_list::<i32>().iter().collect(),
        DataType::LargeList(_) => array.as_list::<i64>().iter().collect(),
        _ => unreachable!("only vectors are summarized"),
    };
    let text: StringArray = lists
        .into_iter()
        .map(|row| -> Result<Option<String>, ArrowError> {
            let Some(row) = row else { return Ok(None) };
            let values = cast(&row, &DataType::Float64)?;
            let values = values.as_primitive::<arrow::datatypes::Float64Type>();
            let shown: Vec<String> = values
                .iter()
                .take(SHOWN)
                .map(|v| v.map_or("NULL".into(), |v| format!("{v:.4}")))
                .collect();
            let rest = if values.len() > SHOWN {
                format!(", … {} values", values.len())
            } else {
                String::new()
            };
            Ok(Some(format!("[{}{rest}]", shown.join(", "))))
        })
        .collect::<Result<_, _>>()?;
    Ok(Arc::new(text))
}

/// The batches with vector columns replaced by short text.
pub fn for_terminal(
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<(SchemaRef, Vec<RecordBatch>), ArrowError> {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            if is_vector(f.data_type()) {
                Field::new(f.name(), DataType::Utf8, true)
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    let shown = Arc::new(Schema::new(fields));
    let batches = batches
        .iter()
        .map(|b| {
            let columns = b
                .columns()
                .iter()
                .map(|c| {
                    if is_vector(c.data_type()) {
                        summarize(c)
                    } else {
                        Ok(c.clone())
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new(shown.clone(), columns)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((shown, batches))
}

/// A table for the terminal (header even when there are no rows).
pub fn table(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<String, ArrowError> {
    let (schema, batches) = for_terminal(schema, batches)?;
    Ok(arrow::util::pretty::pretty_format_batches_with_schema(schema, &batches)?.to_string())
}

/// Rows as lists of cell strings (NULL as `NULL`, vectors summarized), for comparisons.
pub fn cells(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<Vec<String>>, ArrowError> {
    let (_, batches) = for_terminal(schema, batches)?;
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for batch in &batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        for i in 0..batch.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .map(|f| {
                        let cell = f.value(i).to_string();
                        if cell.is_empty() {
                            "(empty)".to_string()
                        } else {
                            cell
                        }
                    })
                    .collect(),
            );
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{FixedSizeListArray, Float32Array, Int32Array};

    #[test]
    fn vectors_are_summarized() {
        let values = Float32Array::from(vec![0.5, -1.0, 0.25, 2.0, 1.0, 2.0, 3.0, 4.0]);
        let list = FixedSizeListArray::try_new(
            Arc::new(Field::new_list_field(DataType::Float32, false)),
            4,
            Arc::new(values),
            Some(vec![true, false].into()),
        )
        .unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int32, false),
            Field::new("e", list.data_type().clone(), true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int32Array::from(vec![1, 2])), Arc::new(list)],
        )
        .unwrap();
        let rows = cells(&schema, &[batch]).unwrap();
        assert_eq!(rows[0], ["1", "[0.5000, -1.0000, 0.2500, … 4 values]"]);
        assert_eq!(rows[1], ["2", "NULL"]);
    }
}
