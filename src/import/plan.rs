//! What a run will make of its file, decided once when it starts and kept in its
//! checkpoint, so a resumed run builds the same version: the parent commit it builds
//! on, how rows are identified (position or key), the `{sheet}` of a single-table
//! file, and where positional ids continue in `append` mode.
//!
//! The identity rules (the README's "Identities" section):
//! - positional: `{sheet}:{n}`, `n` counting data rows from 1;
//! - one key column: `{sheet}:{value}`, the cell's text (a spreadsheet number in its
//!   JSON form, `7` not `7.0`);
//! - several key columns: `{sheet}:` followed by the RFC 8785 text of the JSON array of
//!   the key values.

use std::collections::BTreeMap;

use sqlx::PgConnection;
use thiserror::Error;

use super::decode::{self, Header};
use super::run::{ImportMode, ImportParameters, ImportPlan, Lineage};

#[derive(Debug, Error)]
pub enum PlanError {
    #[error(
        "dataset {dataset} is keyed by {remembered:?}, but this import asks for {asked:?}; \
         import with its key, or use --mode replace --rekey to change it"
    )]
    KeyMismatch {
        dataset: String,
        remembered: Vec<String>,
        asked: Vec<String>,
    },
    #[error("mode {mode} needs a key: give --key (options.key) or key the dataset first")]
    KeyNeeded { mode: &'static str },
    #[error("key column {column:?} is not in the header of {file}{sheet} (columns: {columns})")]
    MissingKeyColumn {
        file: String,
        sheet: String,
        column: String,
        columns: String,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl ImportPlan {
    /// Reads the dataset's key and `main`, and decides.
    pub async fn decide(
        conn: &mut PgConnection,
        dataset_id: i64,
        parameters: &ImportParameters,
    ) -> Result<Self, PlanError> {
        let (name, remembered): (String, Option<Vec<String>>) =
            sqlx::query_as("SELECT name, key_columns FROM dsa_core.datasets WHERE id = $1")
                .bind(dataset_id)
                .fetch_one(&mut *conn)
                .await?;
        let main: Option<(String, Option<sqlx::types::Json<Lineage>>)> = sqlx::query_as(
            "SELECT c.commit_id, c.source
               FROM dsa_core.refs r JOIN dsa_core.commits c ON c.commit_id = r.commit_id
              WHERE r.dataset_id = $1 AND r.name = 'main'",
        )
        .bind(dataset_id)
        .fetch_optional(&mut *conn)
        .await?;
        let options = &parameters.options;
        let (key, set_key) = match (&options.key, remembered) {
            (Some(asked), Some(remembered)) if *asked != remembered => {
                if options.rekey {
                    (Some(asked.clone()), true)
                } else {
                    return Err(PlanError::KeyMismatch {
                        dataset: name,
                        remembered,
                        asked: asked.clone(),
                    });
                }
            }
            (Some(asked), Some(_)) => (Some(asked.clone()), false),
            (Some(asked), None) => (Some(asked.clone()), true),
            // A replace with rekey and no key makes the dataset positional again.
            (None, Some(_)) if options.rekey => (None, true),
            (None, remembered) => (remembered, false),
        };
        if key.is_none() && matches!(options.mode, ImportMode::Upsert | ImportMode::Delete) {
            return Err(PlanError::KeyNeeded {
                mode: options.mode.as_str(),
            });
        }
        let (parent, parent_sheets, parent_numeric_key_sheets) = match main {
            Some((commit_id, source)) => match source {
                Some(source) => (
                    Some(commit_id),
                    source.0.sheet_names(),
                    Some(source.0.numeric_key_sheets.clone()),
                ),
                None => (Some(commit_id), Vec::new(), None),
            },
            None => (None, Vec::new(), Some(Vec::new())),
        };
        let mut plan = Self {
            parent,
            key,
            set_key,
            parent_sheets,
            append_after: BTreeMap::new(),
            parent_numeric_key_sheets,
        };
        if options.mode == ImportMode::Append && plan.key.is_none() {
            if let Some(parent) = &plan.parent {
                for sheet in &plan.parent_sheets {
                    let highest: Option<i64> = sqlx::query_scalar(
                        "SELECT max(substr(logical_row_id, length($2) + 2)::bigint)
                           FROM dsa_core.commit_rows
                          WHERE commit_id = $1 AND starts_with(logical_row_id, $2 || ':')
                            AND substr(logical_row_id, length($2) + 2) ~ '^[0-9]{1,18}$'",
                    )
                    .bind(parent)
                    .bind(sheet)
                    .fetch_one(&mut *conn)
                    .await?;
                    plan.append_after
                        .insert(sheet.clone(), highest.unwrap_or(0).max(0) as u64);
                }
            }
        }
        Ok(plan)
    }

    /// The `{sheet}` of a single-table file (CSV): the name asked for; else the parent's
    /// one sheet, so daily files keep their ids whatever they are called; else the
    /// file's base name.
    pub fn single_sheet_name(&self, parameters: &ImportParameters) -> String {
        if let Some(name) = &parameters.options.sheet_name {
            return name.clone();
        }
        match self.parent_sheets.as_slice() {
            [only] => only.clone(),
            _ => decode::sheet_name(parameters.source.file_name()),
        }
    }

    /// Whether rows are identified by key.
    pub fn keyed(&self) -> bool {
        self.key.is_some()
    }

    /// Where a positional sheet's numbering continues (0 unless appending).
    pub fn row_offset(&self, sheet: &str) -> u64 {
        self.append_after.get(sheet).copied().unwrap_or(0)
    }

    /// The key's columns in `header`, by index; an unknown column fails the import
    /// before any row is loaded.
    pub fn key_columns(
        &self,
        header: &Header,
        file: &str,
        sheet: Option<&str>,
    ) -> Result<Option<Vec<usize>>, PlanError> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        key.iter()
            .map(|column| {
                header
                    .columns
                    .iter()
                    .position(|name| name == column)
                    .ok_or_else(|| PlanError::MissingKeyColumn {
                        file: file.to_owned(),
                        sheet: sheet
                            .map(|sheet| format!(", sheet {sheet:?}"))
                            .unwrap_or_default(),
                        column: column.clone(),
                        columns: header.columns.join(", "),
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// Writes the key part of a row's logical id (after `{sheet}:`) from its key values,
/// each given as its JSON value when `typed` and as text otherwise: one value is written
/// as its text, several as the RFC 8785 form of their JSON array. A value that is
/// empty or null has no identity; its position among `columns` is returned.
pub fn write_key<'v>(
    values: impl ExactSizeIterator<Item = KeyValue<'v>>,
    out: &mut String,
) -> Result<(), usize> {
    let composite = values.len() > 1;
    if composite {
        out.push('[');
    }
    for (index, value) in values.enumerate() {
        if value.is_empty() {
            return Err(index);
        }
        if composite {
            if index > 0 {
                out.push(',');
            }
            value.write_json(out);
        } else {
            value.write_text(out);
        }
    }
    if composite {
        out.push(']');
    }
    Ok(())
}

/// One key value as a file gives it.
#[derive(Clone, Copy, Debug)]
pub enum KeyValue<'v> {
    /// A CSV field: always a JSON string.
    Text(&'v str),
    /// A spreadsheet number.
    Number(f64),
    Bool(bool),
    Null,
    /// A JSON Lines array or object (named so): no key.
    Nested(&'static str),
}

impl KeyValue<'_> {
    /// Whether the value cannot be a key (`write_key` refuses it).
    fn is_empty(&self) -> bool {
        matches!(
            self,
            KeyValue::Null | KeyValue::Text("") | KeyValue::Nested(_)
        )
    }

    fn write_text(&self, out: &mut String) {
        match self {
            KeyValue::Text(text) => out.push_str(text),
            KeyValue::Number(number) => push_number(*number, out),
            KeyValue::Bool(flag) => out.push_str(if *flag { "true" } else { "false" }),
            KeyValue::Null | KeyValue::Nested(_) => out.push_str("null"),
        }
    }

    fn write_json(&self, out: &mut String) {
        match self {
            KeyValue::Text(text) => {
                let mut bytes = Vec::with_capacity(text.len() + 2);
                super::hash::write_json_string(text, &mut bytes);
                out.push_str(std::str::from_utf8(&bytes).expect("JSON text is UTF-8"));
            }
            other => other.write_text(out),
        }
    }
}

fn push_number(number: f64, out: &mut String) {
    let mut bytes = Vec::with_capacity(24);
    super::hash::write_json_number(number, &mut bytes);
    out.push_str(std::str::from_utf8(&bytes).expect("numbers are ASCII"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(values: &[KeyValue<'_>]) -> Result<String, usize> {
        let mut out = String::new();
        write_key(values.iter().copied(), &mut out).map(|()| out)
    }

    #[test]
    fn one_key_is_its_text_and_several_are_a_canonical_array() {
        assert_eq!(key(&[KeyValue::Text("A-17")]).unwrap(), "A-17");
        assert_eq!(key(&[KeyValue::Number(7.0)]).unwrap(), "7");
        assert_eq!(key(&[KeyValue::Number(0.5)]).unwrap(), "0.5");
        assert_eq!(
            key(&[
                KeyValue::Text("a\"b"),
                KeyValue::Number(7.0),
                KeyValue::Bool(true)
            ])
            .unwrap(),
            r#"["a\"b",7,true]"#
        );
    }

    #[test]
    fn an_empty_or_null_key_value_has_no_identity() {
        assert_eq!(key(&[KeyValue::Text("")]), Err(0));
        assert_eq!(key(&[KeyValue::Text("x"), KeyValue::Null]), Err(1));
    }
}
