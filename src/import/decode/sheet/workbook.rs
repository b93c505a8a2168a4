//! Opening and reading: a checked file opened with calamine, its plan of sheets, and
//! each sheet read cell by cell into typed values.

use std::fs::File;

use calamine::{Data, Dimensions, Ods, Range, Reader, SheetType, SheetVisible, Xls, Xlsb, Xlsx};

use crate::config::ImportSettings;

use super::cells::{column_letters, CellValue};
use super::errors::{unknown_error_cells, ErrorPlaces};
use super::rows::{assemble_rows, Flow, SheetEvent};
use super::{PlannedSheet, SheetError, SheetFormat, DENSE_CELL_BYTES};

/// An open workbook of any supported format.
pub enum Workbook {
    /// With a second handle on the same file, for [`unknown_error_cells`].
    Xlsx(Xlsx<File>, File),
    Xlsb(Xlsb<File>),
    Xls(Xls<File>),
    Ods(Ods<File>),
}

impl Workbook {
    pub fn open(format: SheetFormat, handle: File, file: &str) -> Result<Self, SheetError> {
        let corrupt = |message: String| SheetError::Corrupt {
            file: file.to_owned(),
            format: format.name(),
            message,
        };
        Ok(match format {
            SheetFormat::Xlsx | SheetFormat::Xlsm => {
                let second = handle
                    .try_clone()
                    .map_err(|error| corrupt(error.to_string()))?;
                Workbook::Xlsx(
                    Xlsx::new(handle).map_err(|error| corrupt(error.to_string()))?,
                    second,
                )
            }
            SheetFormat::Xlsb => {
                Workbook::Xlsb(Xlsb::new(handle).map_err(|error| corrupt(error.to_string()))?)
            }
            SheetFormat::Xls => {
                Workbook::Xls(Xls::new(handle).map_err(|error| corrupt(error.to_string()))?)
            }
            SheetFormat::Ods => {
                Workbook::Ods(Ods::new(handle).map_err(|error| corrupt(error.to_string()))?)
            }
        })
    }

    fn metadata(&self) -> &[calamine::Sheet] {
        match self {
            Workbook::Xlsx(book, _) => book.sheets_metadata(),
            Workbook::Xlsb(book) => book.sheets_metadata(),
            Workbook::Xls(book) => book.sheets_metadata(),
            Workbook::Ods(book) => book.sheets_metadata(),
        }
    }

    /// The worksheets to read, in workbook order: all of them, or those named in
    /// `wanted` (each of which must exist). Chart and macro sheets hold no rows.
    pub fn plan(
        &self,
        wanted: Option<&[String]>,
        file: &str,
        max_sheets: u64,
    ) -> Result<Vec<PlannedSheet>, SheetError> {
        // Every sheet costs a header, a lineage entry and a checkpoint; a workbook of
        // thousands of tiny sheets is refused before any is read.
        let sheets = self.metadata().len() as u64;
        if sheets > max_sheets {
            return Err(SheetError::TooManySheets {
                file: file.to_owned(),
                sheets,
                limit: max_sheets,
            });
        }
        let worksheets: Vec<PlannedSheet> = self
            .metadata()
            .iter()
            .filter(|sheet| sheet.typ == SheetType::WorkSheet)
            .map(|sheet| PlannedSheet {
                name: sheet.name.clone(),
                visibility: match sheet.visible {
                    SheetVisible::Visible => "visible",
                    SheetVisible::Hidden => "hidden",
                    SheetVisible::VeryHidden => "very_hidden",
                },
            })
            .collect();
        // Excel refuses two sheets of one name, but a file written by other tools may
        // have them; their rows would share ids, which a commit holds once each.
        for (at, sheet) in worksheets.iter().enumerate() {
            if worksheets[..at]
                .iter()
                .any(|earlier| earlier.name == sheet.name)
            {
                return Err(SheetError::DuplicateSheetName {
                    file: file.to_owned(),
                    name: sheet.name.clone(),
                });
            }
        }
        let Some(wanted) = wanted else {
            return Ok(worksheets);
        };
        for name in wanted {
            if !worksheets.iter().any(|sheet| &sheet.name == name) {
                return Err(SheetError::SheetNotFound {
                    file: file.to_owned(),
                    name: name.clone(),
                    available: worksheets.iter().map(|sheet| sheet.name.clone()).collect(),
                });
            }
        }
        Ok(worksheets
            .into_iter()
            .filter(|sheet| wanted.contains(&sheet.name))
            .collect())
    }

    /// Reads one sheet, handing each row (from the header on) to `visit`.
    pub fn read_sheet(
        &mut self,
        sheet: &str,
        file: &str,
        settings: &ImportSettings,
        visit: &mut dyn FnMut(SheetEvent<'_>) -> Result<Flow, SheetError>,
    ) -> Result<(), SheetError> {
        let read_error = |message: String| SheetError::Read {
            file: file.to_owned(),
            sheet: sheet.to_owned(),
            message,
        };
        match self {
            Workbook::Xlsx(book, handle) => {
                let mut cells = book
                    .worksheet_cells_reader(sheet)
                    .map_err(|error| read_error(error.to_string()))?;
                check_dimensions(cells.dimensions(), file, sheet, settings, None)?;
                let height = declared_height(cells.dimensions());
                // Found on the first such cell of the sheet, then taken one by one.
                let mut unknown_errors: Option<ErrorPlaces> = None;
                let mut next = || match cells.next_cell() {
                    Ok(Some(cell)) => {
                        let (row, column) = cell.get_position();
                        Ok(Some((row, column, CellValue::from_ref(cell.get_value()))))
                    }
                    Ok(None) => Ok(None),
                    // calamine stopped on the cell without placing it; the cell after it
                    // is read by the next call.
                    Err(calamine::XlsxError::CellError(value)) => {
                        let not_placed = |why: String| {
                            read_error(format!(
                                "a cell holds the error value {value:?}, which this reader \
                                 does not know, and it could not be placed: {why}"
                            ))
                        };
                        let places = match &mut unknown_errors {
                            Some(places) => places,
                            None => unknown_errors
                                .insert(unknown_error_cells(handle, sheet).map_err(not_placed)?),
                        };
                        match places.pop_front() {
                            Some((row, column, text)) if text == value => {
                                Ok(Some((row, column, CellValue::Text(text))))
                            }
                            _ => Err(not_placed(
                                "the sheet's XML does not hold it where the reader met it"
                                    .to_owned(),
                            )),
                        }
                    }
                    Err(error) => Err(read_error(error.to_string())),
                };
                assemble_rows(&mut next, height, file, sheet, settings, visit)
            }
            Workbook::Xlsb(book) => {
                let mut cells = book
                    .worksheet_cells_reader(sheet)
                    .map_err(|error| read_error(error.to_string()))?;
                check_dimensions(cells.dimensions(), file, sheet, settings, None)?;
                let height = declared_height(cells.dimensions());
                let mut next = || match cells.next_cell() {
                    Ok(Some(cell)) => {
                        let (row, column) = cell.get_position();
                        Ok(Some((row, column, CellValue::from_ref(cell.get_value()))))
                    }
                    Ok(None) => Ok(None),
                    Err(error) => Err(read_error(error.to_string())),
                };
                assemble_rows(&mut next, height, file, sheet, settings, visit)
            }
            Workbook::Xls(book) => {
                let range = book
                    .worksheet_range(sheet)
                    .map_err(|error| read_error(error.to_string()))?;
                read_range(range, file, sheet, settings, visit)
            }
            Workbook::Ods(book) => {
                let range = book
                    .worksheet_range(sheet)
                    .map_err(|error| read_error(error.to_string()))?;
                read_range(range, file, sheet, settings, visit)
            }
        }
    }
}

/// xls and ods sheets arrive parsed whole; their used cells are walked in row order.
pub(super) fn read_range(
    range: Range<Data>,
    file: &str,
    sheet: &str,
    settings: &ImportSettings,
    visit: &mut dyn FnMut(SheetEvent<'_>) -> Result<Flow, SheetError>,
) -> Result<(), SheetError> {
    let (Some(start), Some(end)) = (range.start(), range.end()) else {
        return Ok(());
    };
    let dimensions = Dimensions::new(start, end);
    check_dimensions(
        dimensions,
        file,
        sheet,
        settings,
        Some(settings.max_unstreamed_size),
    )?;
    let mut cells = range.used_cells();
    let mut next = || {
        Ok(cells.next().map(|(row, column, value)| {
            (
                start.0 + row as u32,
                start.1 + column as u32,
                CellValue::from_data(value),
            )
        }))
    };
    assemble_rows(
        &mut next,
        declared_height(dimensions),
        file,
        sheet,
        settings,
        visit,
    )
}

pub(super) fn declared_height(dimensions: Dimensions) -> u64 {
    if dimensions.end.0 >= dimensions.start.0 {
        (dimensions.end.0 - dimensions.start.0) as u64 + 1
    } else {
        0
    }
}

/// Refuses a sheet whose declared extent is wider than the column limit, or (for a
/// sheet parsed whole, with `dense_limit`) larger than its parsed form may grow.
pub(super) fn check_dimensions(
    dimensions: Dimensions,
    file: &str,
    sheet: &str,
    settings: &ImportSettings,
    dense_limit: Option<u64>,
) -> Result<(), SheetError> {
    if dimensions.end.1 < dimensions.start.1 || dimensions.end.0 < dimensions.start.0 {
        return Ok(());
    }
    let columns = (dimensions.end.1 - dimensions.start.1) as u64 + 1;
    let rows = (dimensions.end.0 - dimensions.start.0) as u64 + 1;
    let span = format!(
        "{}{}:{}{}",
        column_letters(dimensions.start.1),
        dimensions.start.0 + 1,
        column_letters(dimensions.end.1),
        dimensions.end.0 + 1
    );
    if columns > settings.max_sheet_columns {
        return Err(SheetError::TooWide {
            file: file.to_owned(),
            sheet: sheet.to_owned(),
            span,
            columns,
            limit: settings.max_sheet_columns,
        });
    }
    if let Some(limit) = dense_limit {
        let cells = rows * columns;
        if cells.saturating_mul(DENSE_CELL_BYTES) > limit {
            return Err(SheetError::TooManyCells {
                file: file.to_owned(),
                sheet: sheet.to_owned(),
                span,
                cells,
                bytes: cells.saturating_mul(DENSE_CELL_BYTES),
            });
        }
    }
    Ok(())
}
