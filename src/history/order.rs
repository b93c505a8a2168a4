//! Logical row order: the one order in which a commit's rows are read back.
//!
//! A positional logical row id is `{sheet}:{n}` (see DESIGN.md). Logical row order is:
//!
//! 1. sheets in the order the commit's `source` lists them (`source.sheets[].name` for a
//!    spreadsheet; a CSV commit has one sheet, so its order needs no list);
//! 2. within a sheet, `n` as a number: `a:9` before `a:10`;
//! 3. ids that are not of that form, or whose sheet the list does not name, after all
//!    others, by sheet name, then `n`, then their bytes (so the order is total).
//!
//! The import writes rows in file order, which is this order, and the tree hash chains
//! rows in file order; `verify`, `diff` and `export` read rows in this order through
//! [`sql_order_by`], and the Rust comparison [`compare`] states the same rule for the
//! code that compares ids itself and for the tests that pin the two together.
//!
//! The primary key `(commit_id, logical_row_id)` sorts ids as bytes (`a:10` before
//! `a:9`), so reading in logical order is a sort on the server, never in this process.

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

/// The sheet names of a commit, in the order its `source` lists them.
pub fn sheet_order(source: &serde_json::Value) -> Vec<String> {
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

/// The sort key: (sheet's place, or after all of them; sheet; n; the id's bytes).
/// The sheet's name counts only among sheets the list does not name: a named sheet's
/// place already orders it, as `array_position` does in SQL.
/// Within a sheet, positional ids come first by `n`, then the others.
fn key<'a>(sheets: &[String], id: &'a str) -> (usize, &'a str, (bool, u64), &'a [u8]) {
    let (sheet, n) = match split_positional(id) {
        Some((sheet, n)) => (sheet, (false, n)),
        None => (sheet_part(id), (true, 0)),
    };
    match sheets.iter().position(|name| name == sheet) {
        Some(place) => (place, "", n, id.as_bytes()),
        None => (usize::MAX, sheet, n, id.as_bytes()),
    }
}

/// What comes before the last colon, as the SQL form computes it (empty without one).
fn sheet_part(id: &str) -> &str {
    id.rsplit_once(':').map_or("", |(sheet, _)| sheet)
}

/// The `ORDER BY` list that sorts `column` (a logical row id) into logical row order,
/// given the commit's sheet names as the `text[]` parameter `sheets_parameter` (`$2`).
///
/// The SQL twin of [`compare`]: `array_position` gives the sheet's place (NULL, which
/// sorts last, for a sheet the list does not name), then the sheet name, then `n` as a
/// `bigint` (NULL for ids that are not positional), then the id's bytes. Ids are
/// `COLLATE "C"` in `commit_rows`, so the last key compares bytes as in Rust.
pub fn sql_order_by(column: &str, sheets_parameter: &str) -> String {
    let sheet = format!("left({column}, -strpos(reverse({column}), ':'))");
    format!(
        "array_position({sheets_parameter}::text[], {sheet}::text) NULLS LAST, \
         CASE WHEN array_position({sheets_parameter}::text[], {sheet}::text) IS NULL \
              THEN {sheet} COLLATE \"C\" END NULLS FIRST, \
         CASE WHEN {column} ~ ':[0-9]{{1,18}}$' \
              THEN right({column}, strpos(reverse({column}), ':') - 1)::bigint END NULLS LAST, \
         {column} COLLATE \"C\""
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
    fn other_ids_come_last_by_sheet_then_bytes() {
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
    }
}
