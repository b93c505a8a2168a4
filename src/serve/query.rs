//! The query string of an upload: the file name and the import options, mapped onto
//! the one [`ImportOptions`] every entry point shares and checked by it.

use percent_encoding::percent_decode_str;

use crate::import::run::ImportOptions;

/// Query strings longer than this are refused: no option needs more, and a limit
/// keeps a request's cost bounded before anything is looked up.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;

/// What `POST /v1/datasets/{name}/imports?...` asks for.
#[derive(Debug, PartialEq)]
pub struct UploadQuery {
    /// The file's name: its extension decides how it is read, its base name becomes the
    /// `{sheet}` of a CSV's row ids on a dataset's first import.
    pub filename: String,
    pub options: ImportOptions,
}

/// The `name=value` pairs of a query string, decoded (`+` is a space).
pub fn pairs(query: &str) -> Result<Vec<(String, String)>, String> {
    let decode = |text: &str| {
        percent_decode_str(&text.replace('+', " "))
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|_| format!("the query parameter {text:?} is not valid UTF-8"))
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// A flag's value: present without one, or one of the usual spellings of yes and no.
pub fn boolean(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "" | "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("{name}={value:?}: expected true or false")),
    }
}

impl UploadQuery {
    /// Parses and checks the query; every message names the parameter at fault.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let query = query.unwrap_or("");
        if query.len() > MAX_QUERY_BYTES {
            return Err(format!(
                "the query string has {} bytes, more than the limit of {MAX_QUERY_BYTES}",
                query.len()
            ));
        }
        let mut filename = None;
        // The options as the JSON object an import request carries, so they are read
        // by the same `ImportOptions` and its checks, whatever options it gains.
        let mut fields = serde_json::Map::new();
        let mut sheets = Vec::new();
        for (name, value) in pairs(query)? {
            match name.as_str() {
                "filename" => {
                    if filename.is_some() {
                        return Err("filename is given twice".to_owned());
                    }
                    filename = Some(value);
                    continue;
                }
                "sheet" => {
                    sheets.push(serde_json::Value::String(value));
                    continue;
                }
                _ => {}
            }
            if name == "sheets" || !ImportOptions::FIELDS.contains(&name.as_str()) {
                return Err(format!(
                    "unknown query parameter {name:?}; the parameters are filename, sheet \
                     (repeatable) and the import options {}",
                    ImportOptions::FIELDS
                        .iter()
                        .filter(|field| **field != "sheets")
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            let json = match name.as_str() {
                "skip_bad_rows" | "rekey" | "no_header" => {
                    serde_json::Value::Bool(boolean(&name, &value)?)
                }
                // COL or COL,COL,... as on the command line.
                "key" => value
                    .split(',')
                    .map(|column| serde_json::Value::String(column.to_owned()))
                    .collect(),
                _ => serde_json::Value::String(value.clone()),
            };
            if fields.insert(name.clone(), json).is_some() {
                return Err(format!("{name} is given twice"));
            }
        }
        if !sheets.is_empty() {
            fields.insert("sheets".to_owned(), serde_json::Value::Array(sheets));
        }
        // A value the options cannot take is named with its parameter: each field is
        // tried alone to find it.
        for (name, value) in &fields {
            let alone = serde_json::Map::from_iter([(name.clone(), value.clone())]);
            if let Err(error) =
                serde_json::from_value::<ImportOptions>(serde_json::Value::Object(alone))
            {
                let shown = match value {
                    serde_json::Value::String(text) => format!("{text:?}"),
                    other => other.to_string(),
                };
                let name = if name == "sheets" { "sheet" } else { name };
                return Err(format!("{name}={shown}: {error}"));
            }
        }
        let options: ImportOptions = serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|error| format!("the import options: {error}"))?;
        let filename = filename.ok_or_else(|| {
            "filename is missing: give the file's name as ?filename=NAME.csv (its \
             extension decides how it is read)"
                .to_owned()
        })?;
        if filename.is_empty()
            || filename.len() > 255
            || filename.contains(['/', '\\'])
            || filename.chars().any(char::is_control)
            || filename == "."
            || filename == ".."
        {
            return Err(format!(
                "filename={filename:?}: give a plain file name of 1 to 255 bytes, \
                 without folders or control characters"
            ));
        }
        options.check()?;
        Ok(Self { filename, options })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::run::{ImportMode, OnConflict};

    #[test]
    fn options_map_onto_import_options() {
        let query = UploadQuery::parse(Some(
            "filename=q%201.xlsx&sheet=A&sheet=B+2&skip_bad_rows=true&message=hi&key=id,region&mode=append&on_conflict=update",
        ))
        .unwrap();
        assert_eq!(query.filename, "q 1.xlsx");
        assert_eq!(
            query.options,
            ImportOptions {
                skip_bad_rows: true,
                message: Some("hi".into()),
                sheets: Some(vec!["A".into(), "B 2".into()]),
                key: Some(vec!["id".into(), "region".into()]),
                mode: ImportMode::Append,
                on_conflict: OnConflict::Update,
                ..ImportOptions::default()
            }
        );
    }

    #[test]
    fn reading_options_come_through_as_in_an_import_request() {
        let query = UploadQuery::parse(Some(
            "filename=a.txt&delimiter=%3B&encoding=windows-1252&no_header",
        ))
        .unwrap();
        assert_eq!(query.options.delimiter.as_deref(), Some(";"));
        assert_eq!(query.options.encoding.as_deref(), Some("windows-1252"));
        assert!(query.options.no_header);
    }

    #[test]
    fn mistakes_name_the_parameter() {
        let error = |query| UploadQuery::parse(Some(query)).unwrap_err();
        assert!(error("").starts_with("filename is missing"));
        assert!(error("filename=a.csv&colour=red").contains("\"colour\""));
        assert!(error("filename=a/b.csv").starts_with("filename=\"a/b.csv\""));
        let mode = error("filename=a.csv&mode=merge");
        assert!(
            mode.starts_with("mode=\"merge\": ") && mode.contains("upsert"),
            "{mode}"
        );
        assert!(error("filename=a.csv&key=id&key=x").contains("key is given twice"));
        assert_eq!(
            error("filename=a.csv&on_conflict=ignore"),
            "on_conflict is for mode append only, not replace"
        );
    }
}
