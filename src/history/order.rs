//! Logical row order: the one order in which a commit's rows are read back.
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
