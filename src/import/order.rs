//! Logical row order: the one order in which a commit's rows are hashed and read back
//! (finalise computes a merged or keyed version's tree hash in it; `verify`, `diff` and
//! `export` read rows in it).
//!
//! Keyed commits (their `source` has a `row_key`) follow [`sql_order_by_keyed`]: sheets
//! in the source's order (an id belongs to the longest listed sheet name it starts
//! with, followed by `:`), then the key as a number when every key of the sheet is one
//! (`source.numeric_key_sheets`), then the id's bytes (UTF-8). What follows is the
//! positional order.
//!
//! A positional logical row id is `{sheet}:{n}` (see DESIGN.md). Logical row order is:
//!
//! 1. sheets in the order the commit's `source` lists them (`source.sheets[].name` for a
//!    spreadsheet; a CSV commit has one sheet); ids of a sheet the list does not name
//!    come after, by sheet name (an id's sheet is what precedes its last colon);
//! 2. within a sheet, `n` as a number: `a:9` before `a:10`. The key that says so is the
//!    id's length, then its bytes: within one sheet the ids differ only in `n`, and
//!    decimal numbers without leading zeros (the only ones the import writes) order by
//!    their number of digits, then digit by digit. Ids of another form follow the same
//!    key, so the order is total and the same in SQL and in Rust.
//!
//! The import writes rows in file order, which is this order, and the tree hash chains
//! rows in file order; `verify`, `diff` and `export` read rows in this order through
//! [`sql_order_by`], and the Rust comparison [`compare`] states the same rule for the
//! code that compares ids itself and for the tests that pin the two together.
//!
//! The primary key `(commit_id, logical_row_id)` sorts ids as bytes (`a:10` before
//! `a:9`), so reading in logical order is a sort on the server, never in this process.
//! The key is chosen to be cheap there: a length and a byte comparison, no parsing
//! (parsing `n` with a regular expression made a 1M-row sort three times slower).

use std::cmp::Ordering;

/// A positional id split into its sheet and row number; `None` for any other id.
pub fn split_positional(logical_row_id: &str) -> Option<(&str, u64)> {
    let (sheet, n) = logical_row_id.rsplit_once(':')?;
    // At most 18 digits, as in the SQL form, so that both read the same ids as numbers.
    if n.is_empty() || n.len() > 18 || !n.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some((sheet, n.parse().ok()?))
}

/// The sheet names of a commit, in the order its `source` lists them: its explicit
/// `sheet_order` when it has one (a version merged from a parent), else its `sheets`.
pub fn sheet_order(source: &serde_json::Value) -> Vec<String> {
    if let Some(order) = source.get("sheet_order").and_then(|order| order.as_array()) {
        let names: Vec<String> = order
            .iter()
            .filter_map(|name| name.as_str().map(str::to_owned))
            .collect();
        if !names.is_empty() {
            return names;
        }
    }
    source
        .get("sheets")
        .and_then(|sheets| sheets.as_array())
        .map(|sheets| {
            sheets
                .iter()
                .filter_map(|sheet| sheet.get("name").and_then(|name| name.as_str()))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Compares two logical row ids of a commit whose sheets are `sheets`, in order.
pub fn compare(sheets: &[String], a: &str, b: &str) -> Ordering {
    key(sheets, a).cmp(&key(sheets, b))
}

/// The sort key: (sheet's place, or after all of them; sheet; length; bytes).
fn key<'a>(sheets: &[String], id: &'a str) -> (usize, &'a str, usize, &'a [u8]) {
    let sheet = sheet_part(id);
    let place = sheets
        .iter()
        .position(|name| name == sheet)
        .unwrap_or(usize::MAX);
    (place, sheet, id.len(), id.as_bytes())
}

/// What comes before the last colon, as the SQL form computes it (empty without one).
fn sheet_part(id: &str) -> &str {
    id.rsplit_once(':').map_or("", |(sheet, _)| sheet)
}

/// The `ORDER BY` list that sorts `column` (a logical row id) into logical row order,
/// given the commit's sheet names as a `text[]` expression (`$2`, or an array literal).
///
/// The SQL twin of [`compare`]: `array_position` gives the sheet's place (NULL, which
/// sorts last, for a sheet the list does not name), then the sheet, the id's length in
/// bytes and its bytes. Ids are `COLLATE "C"` in `commit_rows`, so text compares as
/// bytes, as in Rust. `split_part(id, ':', -1)` is what follows the last colon.
pub fn sql_order_by(column: &str, sheets: &str) -> String {
    let sheet = format!(
        "left({column}, greatest(length({column}) - length(split_part({column}, ':', -1)) - 1, 0))"
    );
    format!(
        "array_position({sheets}::text[], {sheet}::text) NULLS LAST, \
         {sheet} COLLATE \"C\", octet_length({column}), {column} COLLATE \"C\""
    )
}

/// A keyed commit's sheets and which of them sort their keys as numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyedOrder {
    pub sheets: Vec<String>,
    pub numeric_sheets: Vec<String>,
}

impl KeyedOrder {
    /// The keyed order a commit's `source` records, or `None` for positional ids.
    pub fn of_source(source: &serde_json::Value) -> Option<Self> {
        source.get("row_key").filter(|key| !key.is_null())?;
        let names = |field: &str| -> Vec<String> {
            source
                .get(field)
                .and_then(|names| names.as_array())
                .map(|names| {
                    names
                        .iter()
                        .filter_map(|name| name.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Some(Self {
            sheets: sheet_order(source),
            numeric_sheets: names("numeric_key_sheets"),
        })
    }

    /// The listed sheet an id belongs to, with its place: the longest name that, with
    /// a colon, starts the id.
    fn sheet_of<'a>(&'a self, id: &str) -> Option<(usize, &'a str)> {
        self.sheets
            .iter()
            .enumerate()
            .filter(|(_, sheet)| {
                id.len() > sheet.len()
                    && id.starts_with(sheet.as_str())
                    && id.as_bytes()[sheet.len()] == b':'
            })
            .max_by_key(|(_, sheet)| sheet.len())
            .map(|(place, sheet)| (place, sheet.as_str()))
    }

    /// The Rust twin of [`sql_order_by_keyed`]. Numbers compare as doubles here, which
    /// matches the server's exact decimals for every key a file is likely to hold.
    pub fn compare(&self, a: &str, b: &str) -> Ordering {
        let key = |id: &str| {
            let (place, number) = match self.sheet_of(id) {
                Some((place, sheet)) => {
                    let number = self
                        .numeric_sheets
                        .iter()
                        .any(|numeric| numeric == sheet)
                        .then(|| id[sheet.len() + 1..].parse::<f64>().ok())
                        .flatten();
                    (place, number)
                }
                None => (usize::MAX, None),
            };
            (place, number)
        };
        let ((place_a, number_a), (place_b, number_b)) = (key(a), key(b));
        place_a
            .cmp(&place_b)
            .then_with(|| match (number_a, number_b) {
                (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            })
            .then_with(|| a.as_bytes().cmp(b.as_bytes()))
    }
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The `ORDER BY` list that sorts `column` of a keyed commit into logical row order
/// (see the module docs). Sheet names are written into the statement as literals, so
/// the prefix of each id is matched against the listed names, never split at a colon
/// (keys may contain colons).
pub fn sql_order_by_keyed(column: &str, order: &KeyedOrder) -> String {
    let mut by_length: Vec<(usize, &String)> = order.sheets.iter().enumerate().collect();
    by_length.sort_by_key(|(_, sheet)| std::cmp::Reverse(sheet.len()));
    let mut place = String::from("CASE");
    let mut number = String::from("CASE");
    for (index, sheet) in by_length {
        let prefix = literal(&format!("{sheet}:"));
        place += &format!(" WHEN starts_with({column}, {prefix}) THEN {index}");
        if order.numeric_sheets.contains(sheet) {
            number += &format!(
                " WHEN starts_with({column}, {prefix}) THEN substr({column}, {})::numeric",
                sheet.chars().count() + 2
            );
        }
    }
    let place = if place == "CASE" {
        "NULL::int".to_owned()
    } else {
        place + " END"
    };
    let number = if number == "CASE" {
        "NULL::numeric".to_owned()
    } else {
        number + " END"
    };
    format!("{place} NULLS LAST, {number} NULLS LAST, {column} COLLATE \"C\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(sheets: &[&str], ids: &[&str]) -> Vec<String> {
        let sheets: Vec<String> = sheets.iter().map(|s| s.to_string()).collect();
        let mut ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        ids.sort_by(|a, b| compare(&sheets, a, b));
        ids
    }

    #[test]
    fn keyed_ids_sort_by_sheet_then_number_or_bytes() {
        let order = KeyedOrder {
            sheets: vec!["b".into(), "a".into(), "a:x".into()],
            numeric_sheets: vec!["a".into()],
        };
        let mut ids = vec![
            "a:10", "a:9", "a:-1.5", "b:zeta", "b:Alpha", "b:beta", "a:x:k", "c:1",
        ];
        ids.sort_by(|x, y| order.compare(x, y));
        assert_eq!(
            ids,
            ["b:Alpha", "b:beta", "b:zeta", "a:-1.5", "a:9", "a:10", "a:x:k", "c:1"]
        );
        let sql = sql_order_by_keyed("id", &order);
        assert!(
            sql.starts_with("CASE WHEN starts_with(id, 'a:x:') THEN 2"),
            "{sql}"
        );
        assert!(sql.contains("substr(id, 3)::numeric"), "{sql}");
    }

    #[test]
    fn row_numbers_sort_as_numbers_not_text() {
        assert_eq!(
            sorted(&[], &["a:10", "a:9", "a:1", "a:100", "a:2"]),
            ["a:1", "a:2", "a:9", "a:10", "a:100"]
        );
    }

    #[test]
    fn sheets_follow_the_source_not_their_names() {
        assert_eq!(
            sorted(
                &["Zeta", "Alpha"],
                &["Alpha:1", "Zeta:2", "Alpha:10", "Zeta:10"]
            ),
            ["Zeta:2", "Zeta:10", "Alpha:1", "Alpha:10"]
        );
    }

    #[test]
    fn sheet_names_may_contain_colons() {
        assert_eq!(split_positional("a:b:12"), Some(("a:b", 12)));
        assert_eq!(
            sorted(&["a:b", "a"], &["a:3", "a:b:2", "a:b:10"]),
            ["a:b:2", "a:b:10", "a:3"]
        );
    }

    #[test]
    fn other_ids_come_last_by_sheet_then_length_and_bytes() {
        assert_eq!(split_positional("key-17"), None);
        assert_eq!(split_positional("a:"), None);
        assert_eq!(split_positional("a:1x"), None);
        assert_eq!(
            sorted(&["s"], &["z", "s:2", "b:1", "x:k", "s:1", "b:10"]),
            ["s:1", "s:2", "z", "b:1", "b:10", "x:k"]
        );
    }

    #[test]
    fn the_sheet_order_comes_from_the_source() {
        let source = serde_json::json!({"sheets": [{"name": "B"}, {"name": "A"}]});
        assert_eq!(sheet_order(&source), ["B", "A"]);
        assert!(sheet_order(&serde_json::json!({"format": "csv"})).is_empty());
        let merged = serde_json::json!({"sheet_order": ["A", "B"], "sheets": [{"name": "B"}]});
        assert_eq!(sheet_order(&merged), ["A", "B"]);
    }
}
