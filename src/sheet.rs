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

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use calamine::{
    Data, DataRef, Dimensions, ExcelDateTime, Ods, Range, Reader, SheetType, SheetVisible, Xls,
    Xlsb, Xlsx,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ImportSettings;
use crate::decode::{CanonicalKeys, Header, HeaderChange, RowProblem};
use crate::hash::{write_json_number, write_json_string};

/// Parts over this size must not compress better than `IMPORT_MAX_COMPRESSION_RATIO`;
/// small parts (styles, relationships) legitimately compress very well.
const RATIO_CHECKED_FROM_BYTES: u64 = 16 * 1024 * 1024;

/// How much of an XML part is read to find its root element; a prolog longer than
/// this (comments, processing instructions) is refused rather than searched further.
const PROLOG_LIMIT: usize = 64 * 1024;

/// Bytes a calamine cell takes in the dense range an xls or ods sheet is parsed into.
const DENSE_CELL_BYTES: u64 = 32;

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
         {limit} (IMPORT_MAX_SHEET_COLUMNS)"
    )]
    TooWide {
        file: String,
        sheet: String,
        span: String,
        columns: u64,
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
        error: crate::fetch::FetchError,
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

/// What the commit's lineage records about one sheet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SheetLineage {
    pub name: String,
    /// `visible`, `hidden` or `very_hidden`: hidden sheets are imported too.
    pub visibility: String,
    /// Data rows in the commit from this sheet (empty rows between data included).
    pub rows: u64,
    pub columns: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_changes: Vec<HeaderChange>,
}

/// A sheet the run will read, in workbook order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedSheet {
    pub name: String,
    pub visibility: &'static str,
}

// ---------------------------------------------------------------------------------------
// Spooling
// ---------------------------------------------------------------------------------------

/// Prefix of spool file names; the pid after it tells the sweep whose file it is.
const SPOOL_PREFIX: &str = "dsa-ingest-spool-";

/// Copies `input` (the object from byte 0) into an anonymous temporary file in `dir`
/// and returns it rewound. The file is unlinked right after it is created, so the
/// space is returned however the process ends; only a process killed in between
/// leaves a file, which [`sweep_orphans`] removes.
pub async fn spool(
    mut input: std::pin::Pin<Box<dyn AsyncRead + Send>>,
    dir: &Path,
    file: &str,
    size: u64,
    limit: u64,
) -> Result<File, SheetError> {
    let spool_error = |error: std::io::Error| SheetError::Spool {
        file: file.to_owned(),
        dir: dir.display().to_string(),
        message: error.to_string(),
    };
    sweep_orphans(dir);
    let path = dir.join(format!(
        "{SPOOL_PREFIX}{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(spool_error)?;
    std::fs::remove_file(&path).map_err(spool_error)?;

    let mut writer = std::io::BufWriter::with_capacity(1024 * 1024, handle);
    let mut buffer = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    loop {
        let read = input
            .read(&mut buffer)
            .await
            .map_err(|error| SheetError::Source {
                file: file.to_owned(),
                error: crate::fetch::FetchError::Io {
                    source_location: file.to_owned(),
                    message: error.to_string(),
                },
            })?;
        if read == 0 {
            break;
        }
        written += read as u64;
        // HEAD gave the size and the limit was checked; a source that delivers more
        // than that is not the object HEAD described.
        if written > size.min(limit) {
            return Err(SheetError::Truncated {
                file: file.to_owned(),
                read: written,
                size,
            });
        }
        // Writing is a blocking call, but into the page cache; it does not wait on disk.
        writer.write_all(&buffer[..read]).map_err(spool_error)?;
    }
    if written != size {
        return Err(SheetError::Truncated {
            file: file.to_owned(),
            read: written,
            size,
        });
    }
    let mut handle = writer
        .into_inner()
        .map_err(|error| spool_error(error.into_error()))?;
    handle.seek(SeekFrom::Start(0)).map_err(spool_error)?;
    Ok(handle)
}

/// Removes spool files whose process is gone (killed between creating and unlinking
/// its file). Files of live processes, and anything not ours, are left alone.
pub fn sweep_orphans(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|name| name.strip_prefix(SPOOL_PREFIX))
        else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(path = %entry.path().display(), "removed an orphaned spool file");
            removed += 1;
        }
    }
    removed
}

// ---------------------------------------------------------------------------------------
// Recognising and checking the file
// ---------------------------------------------------------------------------------------

/// Recognises the format from the first bytes (and, for zip files, the directory),
/// checks it against the name's extension, and runs the checks that refuse hostile
/// files before any part is inflated.
pub fn inspect(
    handle: &mut File,
    file: &str,
    settings: &ImportSettings,
) -> Result<SheetFormat, SheetError> {
    let corrupt = |message: String, format: &'static str| SheetError::Corrupt {
        file: file.to_owned(),
        format,
        message,
    };
    let mut magic = [0u8; 8];
    let read = read_up_to(handle, &mut magic)
        .map_err(|error| corrupt(error.to_string(), "a spreadsheet"))?;
    let magic = &magic[..read];
    let format = if magic.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]) {
        SheetFormat::Xls
    } else if magic.starts_with(b"PK\x03\x04") || magic.starts_with(b"PK\x05\x06") {
        handle
            .seek(SeekFrom::Start(0))
            .map_err(|error| corrupt(error.to_string(), "a zip archive"))?;
        let mut archive = zip::ZipArchive::new(&mut *handle)
            .map_err(|error| corrupt(error.to_string(), "a zip archive"))?;
        let format = zip_format(&mut archive, file)?;
        check_zip(&mut archive, file, format, settings)?;
        format
    } else {
        return Err(SheetError::NotASpreadsheet {
            file: file.to_owned(),
            found: describe_magic(magic),
        });
    };
    if let Some(claimed) = SheetFormat::from_file_name(file) {
        if !claimed.same_family(format) {
            return Err(SheetError::ExtensionMismatch {
                file: file.to_owned(),
                extension: claimed.name(),
                found: format!("{} file", format.name()),
            });
        }
    }
    if format == SheetFormat::Xls {
        let size = handle
            .metadata()
            .map_err(|error| corrupt(error.to_string(), "xls"))?
            .len();
        if size > settings.max_unstreamed_size {
            return Err(SheetError::Unstreamed {
                file: file.to_owned(),
                what: "the xls file".to_owned(),
                size,
                limit: settings.max_unstreamed_size,
            });
        }
        handle
            .seek(SeekFrom::Start(0))
            .map_err(|error| corrupt(error.to_string(), "xls"))?;
        check_xls_extent(handle, file, settings)?;
    }
    handle
        .seek(SeekFrom::Start(0))
        .map_err(|error| corrupt(error.to_string(), format.name()))?;
    Ok(format)
}

fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..])? {
            0 => break,
            read => filled += read,
        }
    }
    Ok(filled)
}

/// A few words on what a file that is no spreadsheet seems to be.
fn describe_magic(magic: &[u8]) -> String {
    if magic.is_empty() {
        "the file is empty".to_owned()
    } else if magic.starts_with(b"%PDF") {
        "it looks like a PDF".to_owned()
    } else if magic.starts_with(&[0x1F, 0x8B]) {
        "it looks like gzip".to_owned()
    } else if std::str::from_utf8(magic).is_ok() {
        "it looks like text (CSV files need a .csv or other non-spreadsheet name)".to_owned()
    } else {
        format!("it starts with bytes {}", hex::encode(magic))
    }
}

type Archive<'a> = zip::ZipArchive<&'a mut File>;

fn zip_format(archive: &mut Archive<'_>, file: &str) -> Result<SheetFormat, SheetError> {
    if archive.index_for_name("mimetype").is_some() {
        let mut mimetype = String::new();
        if let Ok(entry) = archive.by_name("mimetype") {
            let _ = entry.take(256).read_to_string(&mut mimetype);
        }
        if mimetype.trim() == "application/vnd.oasis.opendocument.spreadsheet" {
            return Ok(SheetFormat::Ods);
        }
        return Err(SheetError::NotASpreadsheet {
            file: file.to_owned(),
            found: format!("an OpenDocument file of type {:?}", mimetype.trim()),
        });
    }
    if archive.index_for_name("xl/workbook.bin").is_some() {
        return Ok(SheetFormat::Xlsb);
    }
    if archive.index_for_name("xl/workbook.xml").is_some() {
        let macros = archive.index_for_name("xl/vbaProject.bin").is_some()
            || archive
                .by_name("[Content_Types].xml")
                .ok()
                .map(|entry| {
                    let mut types = String::new();
                    let _ = entry.take(1024 * 1024).read_to_string(&mut types);
                    types.contains("macroEnabled")
                })
                .unwrap_or(false);
        return Ok(if macros {
            SheetFormat::Xlsm
        } else {
            SheetFormat::Xlsx
        });
    }
    let found = if archive.index_for_name("word/document.xml").is_some() {
        "a Word document"
    } else {
        "a zip archive without a workbook"
    };
    Err(SheetError::NotASpreadsheet {
        file: file.to_owned(),
        found: found.to_owned(),
    })
}

/// The checks on the zip directory and on each XML part's prolog.
fn check_zip(
    archive: &mut Archive<'_>,
    file: &str,
    format: SheetFormat,
    settings: &ImportSettings,
) -> Result<(), SheetError> {
    let mut total = 0u64;
    let mut xml_parts = Vec::new();
    let mut xlsb_sheets = Vec::new();
    for index in 0..archive.len() {
        let entry = archive
            .by_index_raw(index)
            .map_err(|error| SheetError::Corrupt {
                file: file.to_owned(),
                format: format.name(),
                message: error.to_string(),
            })?;
        let name = entry
            .name()
            .map(|name| name.into_owned())
            .unwrap_or_default();
        let size = entry.size();
        let compressed = entry.compressed_size();
        total = total.saturating_add(size);
        if size > RATIO_CHECKED_FROM_BYTES
            && size / compressed.max(1) > settings.max_compression_ratio
        {
            return Err(SheetError::CompressionRatio {
                file: file.to_owned(),
                part: name,
                size,
                compressed,
                ratio: settings.max_compression_ratio,
            });
        }
        let lower = name.to_ascii_lowercase();
        if (lower.ends_with("sharedstrings.xml") || lower.ends_with("sharedstrings.bin"))
            && size > settings.max_shared_strings_size
        {
            return Err(SheetError::SharedStringsTooLarge {
                file: file.to_owned(),
                part: name,
                size,
                limit: settings.max_shared_strings_size,
            });
        }
        if format == SheetFormat::Ods
            && lower == "content.xml"
            && size > settings.max_unstreamed_size
        {
            return Err(SheetError::Unstreamed {
                file: file.to_owned(),
                what: "its content.xml".to_owned(),
                size,
                limit: settings.max_unstreamed_size,
            });
        }
        if lower.ends_with(".xml") || lower.ends_with(".rels") || lower.ends_with(".vml") {
            xml_parts.push((index, name, size));
        } else if format == SheetFormat::Xlsb
            && lower.starts_with("xl/worksheets/")
            && lower.ends_with(".bin")
        {
            xlsb_sheets.push((index, name));
        }
    }
    if format == SheetFormat::Ods {
        check_ods_extent(archive, file, settings)?;
    }
    if total > settings.max_uncompressed_size {
        return Err(SheetError::Uncompressed {
            file: file.to_owned(),
            size: total,
            limit: settings.max_uncompressed_size,
        });
    }
    let mut prolog = Vec::with_capacity(PROLOG_LIMIT);
    for (index, name) in xlsb_sheets {
        prolog.clear();
        let entry = archive
            .by_index(index)
            .map_err(|error| SheetError::Corrupt {
                file: file.to_owned(),
                format: format.name(),
                message: format!("{name}: {error}"),
            })?;
        // A writer uses one form throughout; its first rows show which.
        let _ = entry.take(PROLOG_LIMIT as u64).read_to_end(&mut prolog);
        if has_short_cell_records(&prolog) {
            return Err(SheetError::XlsbShortCells {
                file: file.to_owned(),
                part: name,
            });
        }
    }
    for (index, name, size) in xml_parts {
        prolog.clear();
        let entry = archive
            .by_index(index)
            .map_err(|error| SheetError::Corrupt {
                file: file.to_owned(),
                format: format.name(),
                message: format!("{name}: {error}"),
            })?;
        entry
            .take(PROLOG_LIMIT as u64)
            .read_to_end(&mut prolog)
            .map_err(|error| SheetError::Corrupt {
                file: file.to_owned(),
                format: format.name(),
                message: format!("{name}: {error}"),
            })?;
        match scan_prolog(&prolog) {
            Prolog::Root => {}
            Prolog::Doctype => {
                return Err(SheetError::XmlDoctype {
                    file: file.to_owned(),
                    part: name,
                })
            }
            Prolog::Unfinished if (prolog.len() as u64) < size.min(PROLOG_LIMIT as u64) => {
                return Err(SheetError::Corrupt {
                    file: file.to_owned(),
                    format: format.name(),
                    message: format!("{name} ends before its root element"),
                })
            }
            Prolog::Unfinished if prolog.len() >= PROLOG_LIMIT => {
                return Err(SheetError::XmlProlog {
                    file: file.to_owned(),
                    part: name,
                    limit: PROLOG_LIMIT,
                })
            }
            // An empty part; the reader reports it if it matters.
            Prolog::Unfinished => {}
        }
        if lower_is_shared_strings(&name) {
            if let Some(count) = declared_unique_count(&prolog) {
                // Each string takes at least `<si><t/></si>`, 12 bytes; the reader
                // reserves room for the declared count before reading any.
                if count > size / 12 + 1 {
                    return Err(SheetError::SharedStringsCount {
                        file: file.to_owned(),
                        count,
                        size,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Whether the records at the start of an xlsb worksheet part include the short cell
/// forms (BrtShortBlank 0x0C to BrtShortIsst 0x12), which carry no column of their own.
fn has_short_cell_records(bytes: &[u8]) -> bool {
    let mut at = 0;
    // Record type: up to two bytes, size: up to four, each 7 bits a byte (MS-XLSB 2.1.4).
    let varint = |at: &mut usize, max: usize| -> Option<u64> {
        let mut value = 0u64;
        for shift in 0..max {
            let byte = *bytes.get(*at)?;
            *at += 1;
            value |= ((byte & 0x7F) as u64) << (7 * shift);
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        Some(value)
    };
    while at < bytes.len() {
        let (Some(record), Some(size)) = (varint(&mut at, 2), varint(&mut at, 4)) else {
            return false;
        };
        if (0x0C..=0x12).contains(&record) {
            return true;
        }
        at = at.saturating_add(size as usize);
    }
    false
}

/// calamine parses every ods sheet into a dense range when it opens the file, with
/// repeated rows and columns expanded, so a small `content.xml` can ask for billions
/// of cells. This walks the XML once (it is capped by `IMPORT_MAX_UNSTREAMED_SIZE`)
/// and adds up the extent of each sheet's non-empty cells, repeats included.
fn check_ods_extent(
    archive: &mut Archive<'_>,
    file: &str,
    settings: &ImportSettings,
) -> Result<(), SheetError> {
    use quick_xml::events::Event;
    let corrupt = |message: String| SheetError::Corrupt {
        file: file.to_owned(),
        format: "ods",
        message: format!("content.xml: {message}"),
    };
    let entry = archive
        .by_name("content.xml")
        .map_err(|error| corrupt(error.to_string()))?;
    let mut reader = quick_xml::Reader::from_reader(std::io::BufReader::new(entry));
    let mut buffer = Vec::new();
    let repeats = |element: &quick_xml::events::BytesStart<'_>, name: &str| -> u64 {
        element
            .try_get_attribute(name)
            .ok()
            .flatten()
            .and_then(|attribute| attribute.value.parse().ok())
            .unwrap_or(1)
    };
    let (mut table, mut row, mut row_repeat, mut column) = (String::new(), 0u64, 1u64, 0u64);
    let (mut row_has_value, mut rows, mut columns) = (false, 0u64, 0u64);
    let mut total_cells = 0u64;
    loop {
        let event = reader
            .read_event_into(&mut buffer)
            .map_err(|error| corrupt(error.to_string()))?;
        let (element, closed) = match &event {
            Event::Start(element) => (Some(element), false),
            Event::Empty(element) => (Some(element), true),
            Event::End(end) => {
                match end.name().as_ref() {
                    "table:table-row" => {
                        if row_has_value {
                            rows = row.saturating_add(row_repeat);
                        }
                        row = row.saturating_add(row_repeat);
                    }
                    "table:table" => {
                        let cells = rows.saturating_mul(columns);
                        total_cells = total_cells.saturating_add(cells);
                        if total_cells.saturating_mul(DENSE_CELL_BYTES)
                            > settings.max_unstreamed_size
                        {
                            return Err(SheetError::TooManyCells {
                                file: file.to_owned(),
                                sheet: table.clone(),
                                span: format!(
                                    "A1:{}{}",
                                    column_letters(
                                        columns.saturating_sub(1).min(u32::MAX as u64) as u32
                                    ),
                                    rows
                                ),
                                cells,
                                bytes: total_cells.saturating_mul(DENSE_CELL_BYTES),
                            });
                        }
                    }
                    _ => {}
                }
                (None, false)
            }
            Event::Eof => return Ok(()),
            _ => (None, false),
        };
        if let Some(element) = element {
            match element.name().as_ref() {
                "table:table" => {
                    table = element
                        .try_get_attribute("table:name")
                        .ok()
                        .flatten()
                        .map(|name| name.value.into_owned())
                        .unwrap_or_default();
                    (row, rows, columns) = (0, 0, 0);
                }
                "table:table-row" => {
                    row_repeat = repeats(element, "table:number-rows-repeated");
                    column = 0;
                    row_has_value = false;
                    if closed {
                        row = row.saturating_add(row_repeat);
                    }
                }
                "table:table-cell" | "table:covered-table-cell" => {
                    let repeat = repeats(element, "table:number-columns-repeated");
                    let has_value = element
                        .try_get_attribute("office:value-type")
                        .ok()
                        .flatten()
                        .is_some()
                        || !closed;
                    if has_value {
                        columns = columns.max(column.saturating_add(repeat));
                        row_has_value = true;
                    }
                    column = column.saturating_add(repeat);
                }
                _ => {}
            }
        }
        buffer.clear();
    }
}

/// calamine parses every xls sheet when it opens the file, into a dense range over the
/// extent of its cells (after reserving room for the extent its DIMENSIONS record
/// declares). This reads the BIFF records once, without keeping them, and refuses a
/// workbook whose ranges would together take more than `IMPORT_MAX_UNSTREAMED_SIZE`:
/// two cells in opposite corners of a sheet are enough to ask for half a gigabyte.
fn check_xls_extent(
    handle: &mut File,
    file: &str,
    settings: &ImportSettings,
) -> Result<(), SheetError> {
    let corrupt = |message: String| SheetError::Corrupt {
        file: file.to_owned(),
        format: "xls",
        message,
    };
    let mut compound =
        cfb::CompoundFile::open(&mut *handle).map_err(|error| corrupt(error.to_string()))?;
    let stream_name = ["/Workbook", "/Book"]
        .into_iter()
        .find(|name| compound.is_stream(name))
        .ok_or_else(|| SheetError::NotASpreadsheet {
            file: file.to_owned(),
            found: "an OLE2 file without a workbook stream (another Office document?)".to_owned(),
        })?;
    let stream = compound
        .open_stream(stream_name)
        .map_err(|error| corrupt(error.to_string()))?;
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, stream);
    let cell_bytes = std::mem::size_of::<Data>() as u64;
    let reserved_bytes = std::mem::size_of::<calamine::Cell<Data>>() as u64;
    let mut names: Vec<String> = Vec::new();
    let mut body = vec![0u8; u16::MAX as usize];
    let (mut depth, mut in_sheet, mut sheet_number) = (0usize, false, 0usize);
    let mut extent: Option<(u64, u64, u64, u64)> = None; // first/last row, first/last column
    let mut total_bytes = 0u64;
    loop {
        let mut header = [0u8; 4];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(corrupt(error.to_string())),
        }
        let record = u16::from_le_bytes([header[0], header[1]]);
        let length = u16::from_le_bytes([header[2], header[3]]) as usize;
        let body = &mut body[..length];
        reader
            .read_exact(body)
            .map_err(|error| corrupt(format!("a record is cut short: {error}")))?;
        let u16_at = |at: usize| -> u64 {
            body.get(at..at + 2)
                .map(|bytes| u16::from_le_bytes([bytes[0], bytes[1]]) as u64)
                .unwrap_or(0)
        };
        let u32_at = |at: usize| -> u64 {
            body.get(at..at + 4)
                .map(|bytes| u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as u64)
                .unwrap_or(0)
        };
        let sheet_name = |number: usize| {
            names
                .get(number.wrapping_sub(1))
                .cloned()
                .unwrap_or_else(|| format!("number {number}"))
        };
        match record {
            // BOF: a substream begins; type 0x0010 is a worksheet.
            0x0809 => {
                depth += 1;
                if depth == 1 {
                    in_sheet = u16_at(2) == 0x0010;
                    if in_sheet || u16_at(2) == 0x0020 || u16_at(2) == 0x0040 {
                        sheet_number += 1;
                    }
                    extent = None;
                }
            }
            // EOF of a substream.
            0x000A => {
                if depth == 1 && in_sheet {
                    if let Some((first_row, last_row, first_column, last_column)) = extent {
                        let cells = (last_row - first_row + 1) * (last_column - first_column + 1);
                        total_bytes = total_bytes.saturating_add(cells * cell_bytes);
                        if total_bytes > settings.max_unstreamed_size {
                            return Err(SheetError::TooManyCells {
                                file: file.to_owned(),
                                sheet: sheet_name(sheet_number),
                                span: format!(
                                    "{}{}:{}{}",
                                    column_letters(first_column as u32),
                                    first_row + 1,
                                    column_letters(last_column as u32),
                                    last_row + 1
                                ),
                                cells,
                                bytes: total_bytes,
                            });
                        }
                    }
                }
                depth = depth.saturating_sub(1);
            }
            // BoundSheet8 in the globals: the sheets' names, in order.
            0x0085 if depth == 1 && !in_sheet => {
                let count = body.get(6).copied().unwrap_or(0) as usize;
                let wide = body.get(7).is_some_and(|flags| flags & 1 == 1);
                let name = if wide {
                    let units: Vec<u16> = body
                        .get(8..8 + 2 * count)
                        .unwrap_or_default()
                        .chunks_exact(2)
                        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
                        .collect();
                    String::from_utf16_lossy(&units)
                } else {
                    body.get(8..8 + count)
                        .unwrap_or_default()
                        .iter()
                        .map(|&byte| byte as char)
                        .collect()
                };
                names.push(name);
            }
            // DIMENSIONS: calamine reserves room for the declared extent.
            0x0200 if depth == 1 && in_sheet => {
                let rows = u32_at(4).saturating_sub(u32_at(0));
                let columns = u16_at(10).saturating_sub(u16_at(8));
                let cells = rows.saturating_mul(columns);
                if cells.saturating_mul(reserved_bytes) > settings.max_unstreamed_size {
                    return Err(SheetError::TooManyCells {
                        file: file.to_owned(),
                        sheet: sheet_name(sheet_number),
                        span: format!("{rows} rows by {columns} columns (declared)"),
                        cells,
                        bytes: cells.saturating_mul(reserved_bytes),
                    });
                }
            }
            // Cell records that become cells: row, then column, first in the body.
            0x0203 | 0x0204 | 0x00D6 | 0x0205 | 0x027E | 0x00FD | 0x0006 | 0x00BD
                if depth == 1 && in_sheet =>
            {
                let row = u16_at(0);
                let first = u16_at(2);
                // MULRK ends with the last column it covers.
                let last = if record == 0x00BD && length >= 2 {
                    u16_at(length - 2)
                } else {
                    first
                };
                extent = Some(match extent {
                    None => (row, row, first, last.max(first)),
                    Some((r0, r1, c0, c1)) => {
                        (r0.min(row), r1.max(row), c0.min(first), c1.max(last))
                    }
                });
            }
            _ => {}
        }
    }
}

fn lower_is_shared_strings(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with("sharedstrings.xml")
}

/// `uniqueCount` (or `count`) of the `<sst>` element in the part's first bytes.
fn declared_unique_count(prolog: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(prolog);
    let start = text.find("<sst")?;
    let element = &text[start..];
    let element = &element[..element.find('>').unwrap_or(element.len())];
    let value = element.split("uniqueCount=").nth(1)?;
    let value = value.trim_start_matches(['"', '\'']);
    let digits: String = value.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[derive(Debug, PartialEq, Eq)]
enum Prolog {
    Root,
    Doctype,
    Unfinished,
}

/// Walks an XML prolog (declaration, processing instructions, comments, whitespace)
/// up to the root element. UTF-16 parts are read by dropping their zero bytes, which
/// is enough to see markup made of ASCII.
fn scan_prolog(bytes: &[u8]) -> Prolog {
    let owned;
    let bytes = if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        owned = bytes[2..]
            .iter()
            .copied()
            .filter(|&b| b != 0)
            .collect::<Vec<u8>>();
        &owned[..]
    } else {
        bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
    };
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest[0].is_ascii_whitespace() {
            at += 1;
        } else if rest.starts_with(b"<?") {
            match find(rest, b"?>") {
                Some(end) => at += end + 2,
                None => return Prolog::Unfinished,
            }
        } else if rest.starts_with(b"<!--") {
            match find(&rest[4..], b"-->") {
                Some(end) => at += 4 + end + 3,
                None => return Prolog::Unfinished,
            }
        } else if rest.starts_with(b"<!") {
            // <!DOCTYPE, <!ENTITY or anything else declared before the root.
            return Prolog::Doctype;
        } else if rest.len() < 2 && rest[0] == b'<' {
            return Prolog::Unfinished;
        } else {
            return Prolog::Root;
        }
    }
    Prolog::Unfinished
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

// ---------------------------------------------------------------------------------------
// Opening and reading
// ---------------------------------------------------------------------------------------

/// An open workbook of any supported format.
pub enum Workbook {
    Xlsx(Xlsx<File>),
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
                Workbook::Xlsx(Xlsx::new(handle).map_err(|error| corrupt(error.to_string()))?)
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
            Workbook::Xlsx(book) => book.sheets_metadata(),
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
    ) -> Result<Vec<PlannedSheet>, SheetError> {
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
            Workbook::Xlsx(book) => {
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
                    Err(calamine::XlsxError::CellError(value)) => Err(read_error(format!(
                        "a cell holds the error value {value:?}, which this reader does not know"
                    ))),
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
fn read_range(
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

fn declared_height(dimensions: Dimensions) -> u64 {
    if dimensions.end.0 >= dimensions.start.0 {
        (dimensions.end.0 - dimensions.start.0) as u64 + 1
    } else {
        0
    }
}

/// Refuses a sheet whose declared extent is wider than the column limit, or (for a
/// sheet parsed whole, with `dense_limit`) larger than its parsed form may grow.
fn check_dimensions(
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

/// `A`, `B`, ..., `Z`, `AA`, ... for a 0-based column index.
pub fn column_letters(column: u32) -> String {
    let mut n = column as u64 + 1;
    let mut letters = Vec::new();
    while n > 0 {
        let rem = ((n - 1) % 26) as u8;
        letters.push(b'A' + rem);
        n = (n - 1) / 26;
    }
    letters.reverse();
    String::from_utf8(letters).expect("ASCII letters")
}

/// One cell's value with its type, as it goes into the row's JSON.
#[derive(Clone, Debug, PartialEq)]
pub enum CellValue {
    Null,
    Bool(bool),
    Number(f64),
    /// Strings, and dates, times and error values in their text form.
    Text(String),
}

impl CellValue {
    fn from_ref(value: &DataRef<'_>) -> Self {
        match value {
            DataRef::Empty => CellValue::Null,
            DataRef::Int(number) => CellValue::Number(*number as f64),
            DataRef::Float(number) => number_or_text(*number),
            DataRef::String(text) => CellValue::Text(text.clone()),
            DataRef::SharedString(text) => CellValue::Text((*text).to_owned()),
            DataRef::Bool(flag) => CellValue::Bool(*flag),
            DataRef::DateTime(datetime) => CellValue::Text(excel_datetime_iso(datetime)),
            DataRef::DateTimeIso(text) => CellValue::Text(text.clone()),
            DataRef::DurationIso(text) => CellValue::Text(ods_duration(text)),
            DataRef::Error(error) => CellValue::Text(error.to_string()),
        }
    }

    fn from_data(value: &Data) -> Self {
        match value {
            Data::Empty => CellValue::Null,
            Data::Int(number) => CellValue::Number(*number as f64),
            Data::Float(number) => number_or_text(*number),
            Data::String(text) => CellValue::Text(text.clone()),
            Data::Bool(flag) => CellValue::Bool(*flag),
            Data::DateTime(datetime) => CellValue::Text(excel_datetime_iso(datetime)),
            Data::DateTimeIso(text) => CellValue::Text(text.clone()),
            Data::DurationIso(text) => CellValue::Text(ods_duration(text)),
            Data::Error(error) => CellValue::Text(error.to_string()),
        }
    }

    /// The text a header cell gives as a column name.
    fn header_text(&self) -> String {
        match self {
            CellValue::Null => String::new(),
            CellValue::Bool(flag) => flag.to_string(),
            CellValue::Number(number) => {
                let mut out = Vec::new();
                write_json_number(*number, &mut out);
                String::from_utf8(out).expect("numbers are ASCII")
            }
            CellValue::Text(text) => text.clone(),
        }
    }
}

/// JSON has no NaN or infinity; a reader that produced one gets its text form.
fn number_or_text(number: f64) -> CellValue {
    if number.is_finite() {
        CellValue::Number(number)
    } else {
        CellValue::Text(number.to_string())
    }
}

/// ISO 8601 for a cell formatted as a date or time: `YYYY-MM-DD` for a whole day,
/// `HH:MM:SS` for a time of day alone (a value under one day), the two joined with `T`
/// otherwise; milliseconds only when present. Durations (`[h]:mm` formats) become
/// `PT…H…M…S`.
fn excel_datetime_iso(value: &ExcelDateTime) -> String {
    if value.is_duration() {
        return duration_iso(value.as_f64() * 86_400.0);
    }
    let serial = value.as_f64();
    let Some(datetime) = value.as_datetime() else {
        // Out of chrono's range; the serial number is the honest value.
        let mut out = Vec::new();
        write_json_number(serial, &mut out);
        return String::from_utf8(out).expect("numbers are ASCII");
    };
    let millis = datetime.and_utc().timestamp_subsec_millis();
    let time = if millis == 0 {
        datetime.format("%H:%M:%S").to_string()
    } else {
        format!("{}.{millis:03}", datetime.format("%H:%M:%S"))
    };
    if (0.0..1.0).contains(&serial) {
        time
    } else if serial.fract() == 0.0 {
        datetime.format("%Y-%m-%d").to_string()
    } else {
        format!("{}T{time}", datetime.format("%Y-%m-%d"))
    }
}

/// `PT{h}H{m}M{s}S` from seconds, rounded to the millisecond.
fn duration_iso(seconds: f64) -> String {
    let negative = seconds < 0.0;
    let millis = (seconds.abs() * 1000.0).round() as u64;
    let (hours, rest) = (millis / 3_600_000, millis % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (whole, fraction) = (rest / 1000, rest % 1000);
    let sign = if negative { "-" } else { "" };
    if fraction == 0 {
        format!("{sign}PT{hours}H{minutes}M{whole}S")
    } else {
        format!("{sign}PT{hours}H{minutes}M{whole}.{fraction:03}S")
    }
}

/// ods keeps times of day as durations (`PT08H30M00S`); one under a day is given as
/// the time of day `08:30:00`, so the same cell reads alike from ods and from Excel's
/// formats. Longer durations are normalised like Excel's.
fn ods_duration(text: &str) -> String {
    let Some(seconds) = parse_iso_duration(text) else {
        return text.to_owned();
    };
    if (0.0..86_400.0).contains(&seconds) {
        let millis = (seconds * 1000.0).round() as u64;
        let (h, m, s, ms) = (
            millis / 3_600_000,
            millis / 60_000 % 60,
            millis / 1000 % 60,
            millis % 1000,
        );
        if ms == 0 {
            format!("{h:02}:{m:02}:{s:02}")
        } else {
            format!("{h:02}:{m:02}:{s:02}.{ms:03}")
        }
    } else {
        duration_iso(seconds)
    }
}

/// Seconds in an ISO 8601 duration of hours, minutes and seconds (`PT1H2M3.5S`).
fn parse_iso_duration(text: &str) -> Option<f64> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let mut rest = text.strip_prefix("PT")?;
    let mut seconds = 0.0;
    while !rest.is_empty() {
        let end = rest.find(|c: char| c.is_ascii_alphabetic())?;
        let value: f64 = rest[..end].parse().ok()?;
        seconds += value
            * match &rest[end..end + 1] {
                "H" => 3600.0,
                "M" => 60.0,
                "S" => 1.0,
                _ => return None,
            };
        rest = &rest[end + 1..];
    }
    Some(if negative { -seconds } else { seconds })
}

// ---------------------------------------------------------------------------------------
// From cells to rows
// ---------------------------------------------------------------------------------------

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

type CellSource<'s> = dyn FnMut() -> Result<Option<(u32, u32, CellValue)>, SheetError> + 's;

/// Turns a stream of cells (sparse, in row order) into the header and data rows.
///
/// The header row decides the columns: from its first to its last non-empty cell,
/// empty cells between named `column_N` as in CSV. A data row with a value outside
/// those columns is refused (a problem of that row) rather than losing the value.
fn assemble_rows(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
