//! From cells to rows: a sheet's cells assembled into header and data rows, and each
//! row written as canonical JSON.

use crate::config::ImportSettings;
use crate::import::decode::{CanonicalKeys, Header, RowProblem};
use crate::import::hash::{write_json_number, write_json_string};

use super::cells::{column_letters, CellValue};
use super::SheetError;

/// What [`Workbook::read_sheet`] hands out, in order.
pub enum SheetEvent<'a> {
    /// The sheet's header, once, from its first row that has a value.
    Header(&'a Header),
    /// Data row `n` (1-based, counted from the row under the header), one value per
    /// column, or the problem that keeps it out. Empty rows between data rows come as
    /// rows of nulls; empty rows at the end do not come at all.
    Row {
        n: u64,
        /// 1-based row number in the sheet, as a person sees it.
        sheet_row: u64,
        values: Result<&'a [CellValue], RowProblem>,
    },
    /// Rows read so far and the sheet's declared height, for progress.
    Progress { rows: u64, height: u64 },
}

/// Whether the reader should go on.
pub enum Flow {
    Continue,
    Stop,
}

pub(super) type CellSource<'s> =
    dyn FnMut() -> Result<Option<(u32, u32, CellValue)>, SheetError> + 's;

/// Turns a stream of cells (sparse, in row order) into the header and data rows.
///
/// The header row decides the columns: from its first to its last non-empty cell,
/// empty cells between named `column_N` as in CSV. A data row with a value outside
/// those columns is refused (a problem of that row) rather than losing the value.
pub(super) fn assemble_rows(
    next_cell: &mut CellSource<'_>,
    height: u64,
    file: &str,
    sheet: &str,
    settings: &ImportSettings,
    visit: &mut dyn FnMut(SheetEvent<'_>) -> Result<Flow, SheetError>,
) -> Result<(), SheetError> {
    let mut pending: Option<(u32, u32, CellValue)> = None;
    let mut row_cells: Vec<(u32, CellValue)> = Vec::new();
    let mut header: Option<(u32, u32, Header)> = None; // (header row, first column, names)
    let mut values: Vec<CellValue> = Vec::new();
    let mut last_emitted: u64 = 0; // the last data row n handed out
    let mut last_row: Option<u32> = None;
    // Readers must not be asked again once they said the sheet ended.
    let mut ended = false;
    loop {
        // Gather the next row's non-empty cells.
        row_cells.clear();
        let mut row_index = None;
        loop {
            let cell = match pending.take() {
                Some(cell) => Some(cell),
                None if ended => None,
                None => next_cell().map_err(|error| match error {
                    // The readers do not say where they failed; the last cell read does.
                    SheetError::Read {
                        file,
                        sheet,
                        message,
                    } => SheetError::Read {
                        file,
                        sheet,
                        message: match last_row {
                            Some(row) => format!("{message} (at or after row {})", row + 1),
                            None => message,
                        },
                    },
                    other => other,
                })?,
            };
            let Some((row, column, value)) = cell else {
                ended = true;
                break;
            };
            if let Some(previous) = last_row {
                if row < previous {
                    return Err(SheetError::Read {
                        file: file.to_owned(),
                        sheet: sheet.to_owned(),
                        message: format!(
                            "cells are out of order (row {} after row {})",
                            row + 1,
                            previous + 1
                        ),
                    });
                }
            }
            match row_index {
                None => row_index = Some(row),
                Some(current) if current != row => {
                    pending = Some((row, column, value));
                    break;
                }
                Some(_) => {}
            }
            last_row = Some(row);
            if let CellValue::Text(text) = &value {
                if text.len() as u64 > settings.max_cell_bytes {
                    return Err(SheetError::CellTooLarge {
                        file: file.to_owned(),
                        sheet: sheet.to_owned(),
                        cell: format!("{}{}", column_letters(column), row + 1),
                        bytes: text.len() as u64,
                        limit: settings.max_cell_bytes,
                    });
                }
            }
            if value != CellValue::Null {
                row_cells.push((column, value));
            }
        }
        let Some(row) = row_index else {
            return Ok(());
        };
        if row_cells.is_empty() {
            // Fully empty: a row only if data follows, handed out then.
            continue;
        }
        let Some((header_row, first_column, names)) = &header else {
            let first = row_cells
                .iter()
                .map(|(column, _)| *column)
                .min()
                .unwrap_or(0);
            let last = row_cells
                .iter()
                .map(|(column, _)| *column)
                .max()
                .unwrap_or(0);
            let width = (last - first) as u64 + 1;
            if width > settings.max_sheet_columns {
                return Err(SheetError::TooWide {
                    file: file.to_owned(),
                    sheet: sheet.to_owned(),
                    span: format!(
                        "{}{}:{}{}",
                        column_letters(first),
                        row + 1,
                        column_letters(last),
                        row + 1
                    ),
                    columns: width,
                    limit: settings.max_sheet_columns,
                });
            }
            let mut raw = vec![String::new(); width as usize];
            for (column, value) in &row_cells {
                raw[(column - first) as usize] = value.header_text();
            }
            let resolved = Header::resolve(&raw);
            if let Flow::Stop = visit(SheetEvent::Header(&resolved))? {
                return Ok(());
            }
            header = Some((row, first, resolved));
            continue;
        };
        let width = names.columns.len();
        let n = (row - header_row) as u64;
        // Checked before the empty rows in between are handed out: two cells in A1 and
        // A1048576 are a small file that would become a million rows of nulls.
        if n > settings.max_sheet_rows {
            return Err(SheetError::TooManyRows {
                file: file.to_owned(),
                sheet: sheet.to_owned(),
                sheet_row: row as u64 + 1,
                limit: settings.max_sheet_rows,
            });
        }
        let empty = n - last_emitted - 1;
        if empty > settings.max_empty_rows {
            return Err(SheetError::SparseSheet {
                file: file.to_owned(),
                sheet: sheet.to_owned(),
                sheet_row: row as u64 + 1,
                empty,
                limit: settings.max_empty_rows,
            });
        }
        // Empty rows between the last data row and this one.
        while last_emitted + 1 < n {
            last_emitted += 1;
            values.clear();
            values.resize(width, CellValue::Null);
            let event = SheetEvent::Row {
                n: last_emitted,
                sheet_row: *header_row as u64 + 1 + last_emitted,
                values: Ok(&values),
            };
            if let Flow::Stop = visit(event)? {
                return Ok(());
            }
        }
        values.clear();
        values.resize(width, CellValue::Null);
        let mut problem = None;
        for (column, value) in row_cells.drain(..) {
            let offset = column
                .checked_sub(*first_column)
                .map(|offset| offset as usize);
            match offset {
                Some(offset) if offset < width => {
                    if let CellValue::Text(text) = &value {
                        if text.contains('\0') {
                            problem.get_or_insert(RowProblem::NulCharacter { column: offset + 1 });
                        }
                    }
                    values[offset] = value;
                }
                _ => {
                    problem.get_or_insert(RowProblem::OutsideHeader {
                        cell: format!("{}{}", column_letters(column), row + 1),
                        columns: format!(
                            "{}:{}",
                            column_letters(*first_column),
                            column_letters(*first_column + width as u32 - 1)
                        ),
                    });
                }
            }
        }
        last_emitted = n;
        let event = SheetEvent::Row {
            n,
            sheet_row: row as u64 + 1,
            values: match problem {
                Some(problem) => Err(problem),
                None => Ok(&values),
            },
        };
        if let Flow::Stop = visit(event)? {
            return Ok(());
        }
        if n.is_multiple_of(1024) {
            if let Flow::Stop = visit(SheetEvent::Progress { rows: n, height })? {
                return Ok(());
            }
        }
    }
}

/// Writes rows of typed values as canonical JSON objects (RFC 8785), keys sorted once.
#[derive(Clone, Debug)]
pub struct TypedRowEncoder {
    keys: CanonicalKeys,
}

impl TypedRowEncoder {
    pub fn new(header: &Header) -> Self {
        Self {
            keys: CanonicalKeys::new(header),
        }
    }

    pub fn encode(&self, values: &[CellValue], out: &mut Vec<u8>) {
        if self.keys.is_empty() {
            out.extend_from_slice(b"{}");
            return;
        }
        for (prefix, column) in self.keys.fields() {
            out.extend_from_slice(prefix);
            match values.get(column).unwrap_or(&CellValue::Null) {
                CellValue::Null => out.extend_from_slice(b"null"),
                CellValue::Bool(true) => out.extend_from_slice(b"true"),
                CellValue::Bool(false) => out.extend_from_slice(b"false"),
                CellValue::Number(number) => write_json_number(*number, out),
                CellValue::Text(text) => write_json_string(text, out),
            }
        }
        out.push(b'}');
    }
}

/// A row's values as a person reads them, for the rejected-rows table.
pub fn raw_values(values: &[CellValue]) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, value) in values.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(value.header_text().as_bytes());
    }
    out
}
