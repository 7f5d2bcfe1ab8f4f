//! Parquet pools, read with polars and handed on row by row as JSON values, so that they
//! are checked by exactly the same code as JSON Lines pools.

use super::Columns;
use crate::{Error, Result};
use polars::prelude::*;
use serde_json::{Map, Value};
use std::path::Path;

/// Calls `row` with each row's 1-based number and its mapped fields (`Err` for a value that
/// has no JSON equivalent).
pub(super) fn for_each_row(
    path: &Path,
    columns: &Columns,
    mut row: impl FnMut(usize, std::result::Result<Value, String>) -> Result<()>,
) -> Result<()> {
    let unreadable = |e: PolarsError| Error::format(path, format!("not a readable Parquet file: {e}"));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = ParquetReader::new(file);
    let schema = reader.schema().map_err(unreadable)?;
    let wanted = [&columns.instruction_id, &columns.prompt, &columns.response, &columns.source];
    // A missing column fails every row alike: one error for the file, not one per row.
    if let Some(absent) = wanted.iter().find(|name| !schema.contains(name.as_str())) {
        let present: Vec<&str> = schema.iter_names().map(|n| n.as_str()).collect();
        return Err(Error::format(
            path,
            format!("column `{absent}` is missing (columns present: {})", present.join(", ")),
        ));
    }
    let mut names: Vec<String> = wanted.iter().map(|n| n.to_string()).collect();
    names.dedup();
    let df = reader.with_columns(Some(names.clone())).finish().map_err(unreadable)?;
    let series: Vec<Series> = names
        .iter()
        .map(|n| df.column(n).map(|c| c.as_materialized_series().clone()))
        .collect::<PolarsResult<_>>()
        .map_err(unreadable)?;
    for i in 0..df.height() {
        let mut object = Map::new();
        let mut problem = None;
        for (name, s) in names.iter().zip(&series) {
            match to_json(s, i) {
                Ok(v) => {
                    object.insert(name.clone(), v);
                }
                Err(e) => problem = Some(format!("field `{name}`: {e}")),
            }
        }
        row(i + 1, problem.map_or(Ok(Value::Object(object)), Err))?;
    }
    Ok(())
}

/// Element `i` of `series` as JSON: strings, numbers, booleans, lists and structs (a
/// `messages` list is a list of structs).
fn to_json(series: &Series, i: usize) -> std::result::Result<Value, String> {
    if series.is_null().get(i).unwrap_or(true) {
        return Ok(Value::Null);
    }
    let e = |e: PolarsError| e.to_string();
    Ok(match series.dtype() {
        DataType::String => Value::from(series.str().map_err(e)?.get(i).unwrap_or_default()),
        DataType::Boolean => Value::from(series.bool().map_err(e)?.get(i).unwrap_or_default()),
        DataType::List(_) => {
            let items = series.list().map_err(e)?.get_as_series(i).unwrap_or_default();
            Value::Array((0..items.len()).map(|j| to_json(&items, j)).collect::<std::result::Result<_, _>>()?)
        }
        DataType::Struct(_) => {
            let fields = series.struct_().map_err(e)?.fields_as_series();
            let mut object = Map::new();
            for field in &fields {
                object.insert(field.name().to_string(), to_json(field, i)?);
            }
            Value::Object(object)
        }
        dtype if dtype.is_integer() => {
            let value = series.get(i).map_err(e)?;
            value.extract::<i64>().map(Value::from).ok_or_else(|| format!("integer {value} out of range"))?
        }
        dtype if dtype.is_float() => Value::from(series.get(i).map_err(e)?.extract::<f64>().unwrap_or(f64::NAN)),
        other => return Err(format!("values of type {other} are not supported")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Parquet pool whose prompts are `messages` lists of structs, as Hugging Face
    /// datasets store them, with one row whose response is null.
    #[test]
    fn reads_parquet_pools_with_messages_and_reports_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.parquet");
        let message = |content: &str| {
            let fields = [Series::new("role".into(), ["user"]), Series::new("content".into(), [content])];
            StructChunked::from_series("item".into(), 1, fields.iter()).unwrap().into_series()
        };
        let messages: Vec<Option<Series>> = vec![Some(message("Q1")), Some(message("Q1")), Some(message("Q2"))];
        let mut df = DataFrame::new(3, vec![
            Column::new("qid".into(), [7i64, 7, 8]),
            Column::new("messages".into(), messages),
            Column::new("answer".into(), [Some("A"), Some("B"), None]),
            Column::new("model".into(), ["x", "y", "x"]),
        ])
        .unwrap();
        ParquetWriter::new(std::fs::File::create(&path).unwrap()).finish(&mut df).unwrap();

        let columns = Columns {
            instruction_id: "qid".into(),
            prompt: "messages".into(),
            response: "answer".into(),
            source: "model".into(),
        };
        let pool = super::super::read(&path, &columns, false).unwrap();
        assert_eq!(pool.instructions.len(), 1);
        assert_eq!(pool.instructions[0].id, "7");
        assert_eq!(pool.instructions[0].prompt, "Q1");
        assert_eq!(pool.instructions[0].candidates[1].response, "B");
        assert_eq!(pool.skipped.len(), 1);
        assert_eq!(pool.skipped[0].line, 3);
        assert!(pool.skipped[0].message.contains("`answer`"), "{}", pool.skipped[0]);

        let wrong = Columns { response: "reply".into(), ..columns };
        let err = super::super::read(&path, &wrong, false).unwrap_err().to_string();
        assert!(err.contains("pool.parquet") && err.contains("column `reply` is missing") && err.contains("answer"), "{err}");
    }
}
