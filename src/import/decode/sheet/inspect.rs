//! Recognising and checking the file: the format from its content, and every size a
//! hostile file could declare (zip directory, shared strings, XML prologs, xlsb record
//! forms, ods repeats, xls extents) checked before anything is inflated or parsed.

use std::io::{Read, Seek, SeekFrom};

use calamine::Data;

use crate::config::ImportSettings;

use super::cells::column_letters;
use super::{SheetError, SheetFormat, DENSE_CELL_BYTES, PROLOG_LIMIT, RATIO_CHECKED_FROM_BYTES};

/// Recognises the format from the first bytes (and, for zip files, the directory),
/// checks it against the name's extension, and runs the checks that refuse hostile
/// files before any part is inflated.
pub fn inspect<R: Read + Seek>(
    handle: &mut R,
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
            .seek(SeekFrom::End(0))
            .map_err(|error| corrupt(error.to_string(), "xls"))?;
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

pub(super) fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
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
pub(crate) fn describe_magic(magic: &[u8]) -> String {
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

pub(super) type Archive<'a, R> = zip::ZipArchive<&'a mut R>;

pub(super) fn zip_format<R: Read + Seek>(
    archive: &mut Archive<'_, R>,
    file: &str,
) -> Result<SheetFormat, SheetError> {
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
pub(super) fn check_zip<R: Read + Seek>(
    archive: &mut Archive<'_, R>,
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
pub(super) fn has_short_cell_records(bytes: &[u8]) -> bool {
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
pub(super) fn check_ods_extent<R: Read + Seek>(
    archive: &mut Archive<'_, R>,
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
pub(super) fn check_xls_extent<R: Read + Seek>(
    handle: &mut R,
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

pub(super) fn lower_is_shared_strings(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with("sharedstrings.xml")
}

/// `uniqueCount` (or `count`) of the `<sst>` element in the part's first bytes.
pub(super) fn declared_unique_count(prolog: &[u8]) -> Option<u64> {
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
pub(super) enum Prolog {
    Root,
    Doctype,
    Unfinished,
}

/// Walks an XML prolog (declaration, processing instructions, comments, whitespace)
/// up to the root element. UTF-16 parts are read by dropping their zero bytes, which
/// is enough to see markup made of ASCII.
pub(super) fn scan_prolog(bytes: &[u8]) -> Prolog {
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

pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
