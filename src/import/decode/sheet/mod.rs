//! Stage `decode`, for spreadsheets: xlsx, xlsm, xlsb, xls and ods through calamine.
//!
//! A spreadsheet's readers need to seek, so the object is first spooled to a temporary
//! file (unlinked as soon as it is created, so no path out of the process, not even a
//! kill, leaves it behind). The file is then recognised by its content, checked
//! against hostile constructions while that is still cheap (declared sizes in the zip
//! directory, the shared-strings part, XML prologs, declared dimensions), opened, and
//! each worksheet is read cell by cell into rows of typed values.
//!
//! xlsx, xlsm and xlsb sheets stream: only one row is held at a time. calamine parses
//! xls and ods whole when it opens them, so those are capped by size instead
//! (`IMPORT_MAX_UNSTREAMED_SIZE`).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::import::decode::RowProblem;

/// Parts over this size must not compress better than `IMPORT_MAX_COMPRESSION_RATIO`;
/// small parts (styles, relationships) legitimately compress very well.
pub(super) const RATIO_CHECKED_FROM_BYTES: u64 = 16 * 1024 * 1024;

/// How much of an XML part is read to find its root element; a prolog longer than
/// this (comments, processing instructions) is refused rather than searched further.
pub(super) const PROLOG_LIMIT: usize = 64 * 1024;

/// Bytes a calamine cell takes in the dense range an xls or ods sheet is parsed into.
pub(super) const DENSE_CELL_BYTES: u64 = 32;

/// The spreadsheet formats, as recognised from a file's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SheetFormat {
    Xlsx,
    Xlsm,
    Xlsb,
    Xls,
    Ods,
}

impl SheetFormat {
    /// The format a file name claims, for the spreadsheet extensions only.
    pub fn from_file_name(file_name: &str) -> Option<Self> {
        let extension = file_name.rsplit_once('.')?.1.to_ascii_lowercase();
        Some(match extension.as_str() {
            "xlsx" => SheetFormat::Xlsx,
            "xlsm" => SheetFormat::Xlsm,
            "xlsb" => SheetFormat::Xlsb,
            "xls" => SheetFormat::Xls,
            "ods" => SheetFormat::Ods,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SheetFormat::Xlsx => "xlsx",
            SheetFormat::Xlsm => "xlsm",
            SheetFormat::Xlsb => "xlsb",
            SheetFormat::Xls => "xls",
            SheetFormat::Ods => "ods",
        }
    }

    /// xlsx and xlsm differ only in whether macros may be inside; a file renamed from
    /// one to the other is read the same way.
    fn same_family(self, other: SheetFormat) -> bool {
        let family = |format| match format {
            SheetFormat::Xlsx | SheetFormat::Xlsm => SheetFormat::Xlsx,
            other => other,
        };
        family(self) == family(other)
    }
}

#[derive(Debug, Error)]
pub enum SheetError {
    #[error("{file}: the name says {extension} but the content is {found}")]
    ExtensionMismatch {
        file: String,
        extension: &'static str,
        found: String,
    },
    #[error("{file}: not a spreadsheet this service reads (xlsx, xlsm, xlsb, xls, ods): {found}")]
    NotASpreadsheet { file: String, found: String },
    #[error(
        "{file}: part {part} would expand from {compressed} to {size} bytes, more than \
         {ratio} times its compressed size (IMPORT_MAX_COMPRESSION_RATIO); refusing a likely zip bomb"
    )]
    CompressionRatio {
        file: String,
        part: String,
        size: u64,
        compressed: u64,
        ratio: u64,
    },
    #[error(
        "{file}: its parts would expand to {size} bytes, more than the limit of {limit} \
         (IMPORT_MAX_UNCOMPRESSED_SIZE)"
    )]
    Uncompressed { file: String, size: u64, limit: u64 },
    #[error(
        "{file}: the shared-strings part {part} is {size} bytes uncompressed, more than the \
         limit of {limit} (IMPORT_MAX_SHARED_STRINGS_SIZE); it would be held in memory whole"
    )]
    SharedStringsTooLarge {
        file: String,
        part: String,
        size: u64,
        limit: u64,
    },
    #[error("{file}: the shared-strings part declares {count} strings in only {size} bytes")]
    SharedStringsCount { file: String, count: u64, size: u64 },
    #[error(
        "{file}: part {part} has a document type declaration (<!DOCTYPE or <!ENTITY); \
         entity declarations are refused"
    )]
    XmlDoctype { file: String, part: String },
    #[error("{file}: part {part} has no root element in its first {limit} bytes")]
    XmlProlog {
        file: String,
        part: String,
        limit: usize,
    },
    #[error(
        "{file}: {what} is {size} bytes, more than the limit of {limit} for formats that \
         are parsed whole (IMPORT_MAX_UNSTREAMED_SIZE)"
    )]
    Unstreamed {
        file: String,
        what: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "{file}: sheet {sheet:?} spans {span}, {columns} columns, more than the limit of \
         {limit} (IMPORT_MAX_COLUMNS)"
    )]
    TooWide {
        file: String,
        sheet: String,
        span: String,
        columns: u64,
        limit: u64,
    },
    #[error(
        "{file}: sheet {sheet:?} has data at row {sheet_row}, more than the limit of {limit} \
         data rows per sheet (IMPORT_MAX_SHEET_ROWS)"
    )]
    TooManyRows {
        file: String,
        sheet: String,
        sheet_row: u64,
        limit: u64,
    },
    #[error("{file}: has {sheets} worksheets, more than the limit of {limit} (IMPORT_MAX_SHEETS)")]
    TooManySheets {
        file: String,
        sheets: u64,
        limit: u64,
    },
    #[error(
        "{file}: sheet {sheet:?} has {empty} empty rows before row {sheet_row}, more than the \
         limit of {limit} (IMPORT_MAX_EMPTY_ROWS); refusing a sparse sheet that would \
         become rows of nulls"
    )]
    SparseSheet {
        file: String,
        sheet: String,
        sheet_row: u64,
        empty: u64,
        limit: u64,
    },
    #[error(
        "{file}: sheet {sheet:?}, cell {cell} holds {bytes} bytes of text, more than the \
         limit of {limit} (IMPORT_MAX_CELL_BYTES)"
    )]
    CellTooLarge {
        file: String,
        sheet: String,
        cell: String,
        bytes: u64,
        limit: u64,
    },
    #[error(
        "{file}: sheet {sheet:?} spans {span}, {cells} cells, which would take {bytes} bytes \
         parsed whole (more than IMPORT_MAX_UNSTREAMED_SIZE)"
    )]
    TooManyCells {
        file: String,
        sheet: String,
        span: String,
        cells: u64,
        bytes: u64,
    },
    #[error(
        "{file}: part {part} stores cells in the short record form (BrtShort*, as SheetJS \
         writes xlsb), which the xlsb reader (calamine 0.38) would silently drop; save the \
         file from Excel or as xlsx instead"
    )]
    XlsbShortCells { file: String, part: String },
    #[error(
        "{file}: has two worksheets named {name:?}; a worksheet's name begins its rows' ids \
         ({name}:1, {name}:2, ...), so each must be unique (rename one and upload again)"
    )]
    DuplicateSheetName { file: String, name: String },
    #[error("{file}: has no worksheet {name:?}; its worksheets are {available:?}")]
    SheetNotFound {
        file: String,
        name: String,
        available: Vec<String>,
    },
    #[error("{file}: cannot be read as {format}: {message} (is the file truncated or corrupt?)")]
    Corrupt {
        file: String,
        format: &'static str,
        message: String,
    },
    #[error("{file}: sheet {sheet:?}: {message}")]
    Read {
        file: String,
        sheet: String,
        message: String,
    },
    #[error("{file}: sheet {sheet:?}, row {row}: {problem}")]
    BadRow {
        file: String,
        sheet: String,
        row: u64,
        problem: RowProblem,
    },
    #[error(
        "{file}: the data ended at byte {read} of {size}; was the file changed while it was read?"
    )]
    Truncated { file: String, read: u64, size: u64 },
    #[error("spooling {file} to {dir}: {message}")]
    Spool {
        file: String,
        dir: String,
        message: String,
    },
    #[error("reading {file}: {error}")]
    Source {
        file: String,
        #[source]
        error: crate::import::fetch::FetchError,
    },
}

impl SheetError {
    /// Only a source that went away mid-download may heal on a retry.
    pub fn is_transient(&self) -> bool {
        match self {
            SheetError::Source { error, .. } => error.is_transient(),
            SheetError::Spool { .. } => true,
            _ => false,
        }
    }
}

/// A sheet the run will read, in workbook order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedSheet {
    pub name: String,
    pub visibility: &'static str,
}

pub mod cells;
mod errors;
pub mod inspect;
pub mod rows;
pub mod spool;
pub mod workbook;

#[cfg(test)]
mod tests {
    use super::cells::{column_letters, duration_iso, ods_duration, CellValue};
    use super::inspect::{declared_unique_count, scan_prolog, Prolog};
    use super::rows::TypedRowEncoder;
    use super::{SheetError, SheetFormat};
    use crate::import::decode::Header;

    #[test]
    fn error_cells_read_as_excel_shows_them() {
        use calamine::{CellErrorType, Data};
        let text = |error| match CellValue::from_data(&Data::Error(error)) {
            CellValue::Text(text) => text,
            other => panic!("{other:?}"),
        };
        assert_eq!(text(CellErrorType::NA), "#N/A");
        assert_eq!(text(CellErrorType::Div0), "#DIV/0!");
        assert_eq!(text(CellErrorType::GettingData), "#GETTING_DATA");
    }

    #[test]
    fn prologs_with_declarations_are_refused() {
        assert_eq!(
            scan_prolog(b"<?xml version=\"1.0\"?>\n<worksheet>"),
            Prolog::Root
        );
        assert_eq!(
            scan_prolog(b"\xEF\xBB\xBF<?xml version=\"1.0\"?><!-- c --><sst>"),
            Prolog::Root
        );
        assert_eq!(
            scan_prolog(b"<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"b\">]><x/>"),
            Prolog::Doctype
        );
        assert_eq!(scan_prolog(b"<?xml version=\"1.0\""), Prolog::Unfinished);
    }

    #[test]
    fn column_letters_follow_excel() {
        assert_eq!(column_letters(0), "A");
        assert_eq!(column_letters(25), "Z");
        assert_eq!(column_letters(26), "AA");
        assert_eq!(column_letters(16383), "XFD");
    }

    #[test]
    fn ods_times_read_as_times_of_day() {
        assert_eq!(ods_duration("PT08H30M00S"), "08:30:00");
        assert_eq!(ods_duration("PT26H03M00S"), "PT26H3M0S");
        assert_eq!(duration_iso(1.5), "PT0H0M1.500S");
    }

    #[test]
    fn dates_are_written_as_chrono_formats_them() {
        use calamine::{ExcelDateTime, ExcelDateTimeType};
        let by_chrono = |serial: f64| {
            let value = ExcelDateTime::new(serial, ExcelDateTimeType::DateTime, false);
            let datetime = value.as_datetime()?;
            let millis = chrono::Timelike::nanosecond(&datetime) / 1_000_000;
            let time = match millis {
                0 => datetime.format("%H:%M:%S").to_string(),
                _ => format!("{}.{millis:03}", datetime.format("%H:%M:%S")),
            };
            Some(if (0.0..1.0).contains(&serial) {
                time
            } else if serial.fract() == 0.0 {
                datetime.format("%Y-%m-%d").to_string()
            } else {
                format!("{}T{time}", datetime.format("%Y-%m-%d"))
            })
        };
        let serials = [
            0.0,
            0.5,
            0.999_988_4,
            1.0,
            1.25,
            59.0,
            60.0,
            61.0,
            43_831.0,
            43_831.000_011_574,
            43_831.5,
            2_958_465.0,
            2_958_465.999,
            3_000_000.25,
            -1.0,
            -700_000.5,
        ];
        for serial in serials {
            let value = ExcelDateTime::new(serial, ExcelDateTimeType::DateTime, false);
            if let Some(expected) = by_chrono(serial) {
                assert_eq!(
                    super::cells::excel_datetime_iso(&value),
                    expected,
                    "{serial}"
                );
            }
        }
        assert_eq!(
            super::cells::excel_datetime_iso(&ExcelDateTime::new(
                43_831.5,
                ExcelDateTimeType::DateTime,
                false
            )),
            "2020-01-01T12:00:00"
        );
    }

    #[test]
    fn unique_count_is_read_from_the_sst_element() {
        let prolog = br#"<?xml version="1.0"?><sst xmlns="x" count="5" uniqueCount="4000000000">"#;
        assert_eq!(declared_unique_count(prolog), Some(4_000_000_000));
    }

    #[test]
    fn typed_rows_are_canonical_json() {
        let header = Header::resolve(&["b".into(), "a".into(), "c".into(), "d".into()]);
        let encoder = TypedRowEncoder::new(&header);
        let mut out = Vec::new();
        encoder.encode(
            &[
                CellValue::Number(1.0),
                CellValue::Text("x\"y".into()),
                CellValue::Null,
                CellValue::Bool(true),
            ],
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":"x\"y","b":1,"c":null,"d":true}"#
        );
    }

    // The hostile-file checks as pure functions over bytes: `inspect` reads any
    // `Read + Seek`, so these run without a store, a spool file or a child process
    // (tests/it/sheets.rs keeps a few end-to-end cases that also measure memory).

    fn small_xlsx() -> Vec<u8> {
        let mut workbook = rust_xlsxwriter::Workbook::new();
        let sheet = workbook.add_worksheet();
        for row in 0..50u32 {
            sheet.write_string(row, 0, format!("text {row}")).unwrap();
            sheet.write_number(row, 1, row as f64).unwrap();
        }
        workbook.save_to_buffer().unwrap()
    }

    fn inspect_bytes(
        bytes: Vec<u8>,
        name: &str,
        settings: &crate::config::ImportSettings,
    ) -> Result<SheetFormat, SheetError> {
        super::inspect::inspect(&mut std::io::Cursor::new(bytes), name, settings)
    }

    #[test]
    fn a_plain_workbook_passes_every_check() {
        let settings = crate::config::ImportSettings::default();
        assert_eq!(
            inspect_bytes(small_xlsx(), "book.xlsx", &settings).unwrap(),
            SheetFormat::Xlsx
        );
    }

    #[test]
    fn declared_sizes_past_the_limits_are_refused_before_anything_is_inflated() {
        let settings = crate::config::ImportSettings {
            max_uncompressed_size: 1_000,
            ..Default::default()
        };
        let error = inspect_bytes(small_xlsx(), "book.xlsx", &settings).unwrap_err();
        assert!(
            matches!(error, SheetError::Uncompressed { limit: 1_000, .. }),
            "{error}"
        );

        let settings = crate::config::ImportSettings {
            max_shared_strings_size: 10,
            ..Default::default()
        };
        let error = inspect_bytes(small_xlsx(), "book.xlsx", &settings).unwrap_err();
        assert!(
            matches!(error, SheetError::SharedStringsTooLarge { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_part_that_compresses_too_well_is_refused() {
        use std::io::Write as _;
        // A real workbook's parts, plus a sheet of 17 MiB of spaces: a few kilobytes
        // once deflated, far past any ratio a real sheet reaches.
        let mut original = zip::ZipArchive::new(std::io::Cursor::new(small_xlsx())).unwrap();
        let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for index in 0..original.len() {
            let mut part = original.by_index(index).unwrap();
            let name = part.name().unwrap().to_string();
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut part, &mut content).unwrap();
            if name == "xl/worksheets/sheet1.xml" {
                content = vec![b' '; 17 << 20];
            }
            writer.start_file(name, options).unwrap();
            writer.write_all(&content).unwrap();
        }
        let bomb = writer.finish().unwrap().into_inner();
        assert!(bomb.len() < 1 << 20);
        let settings = crate::config::ImportSettings::default();
        let error = inspect_bytes(bomb, "bomb.xlsx", &settings).unwrap_err();
        assert!(
            matches!(error, SheetError::CompressionRatio { .. }),
            "{error}"
        );
    }

    #[test]
    fn content_that_is_no_spreadsheet_is_named() {
        let settings = crate::config::ImportSettings::default();
        let error = inspect_bytes(b"%PDF-1.7 ...".to_vec(), "report.xlsx", &settings).unwrap_err();
        assert!(error.to_string().contains("PDF"), "{error}");
        let error = inspect_bytes(b"a,b\n1,2\n".to_vec(), "data.xlsx", &settings).unwrap_err();
        assert!(error.to_string().contains("text"), "{error}");
    }
}
