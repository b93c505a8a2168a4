//! Error cells calamine does not know.
//!
//! Excel 365 writes error values that calamine 0.38 has no name for (`#SPILL!`,
//! `#CALC!`, `#FIELD!`, `#BLOCKED!`, `#GETTING_DATA`, ...). Its xlsx cell reader stops
//! on such a cell with the value's text but without the cell's place, and can then be
//! asked for the next cell. One pass over the sheet's XML (only in a sheet that has
//! such a cell) finds their places in document order, so the n-th cell calamine
//! stops on is the n-th one found, and each is read as its text like the errors
//! calamine knows.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};

use calamine::CellErrorType;
use quick_xml::events::Event;

/// Places kept at most per sheet: a sheet of more unknown error cells than this fails
/// rather than hold them all.
pub(super) const MAX_UNKNOWN_ERRORS: usize = 65_536;

/// The unknown error cells of one sheet, in document order: (row, column, text),
/// zero-based like calamine's positions.
pub(super) type ErrorPlaces = VecDeque<(u32, u32, String)>;

/// Finds where the sheet `sheet` of the xlsx in `handle` holds error values calamine
/// does not know. `handle` may share its offset with calamine's: it is read with
/// positioned reads only.
pub(super) fn unknown_error_cells(handle: &File, sheet: &str) -> Result<ErrorPlaces, String> {
    let mut archive = zip::ZipArchive::new(PositionedReader {
        file: handle,
        position: 0,
    })
    .map_err(|error| error.to_string())?;
    let relation = sheet_relation(&mut archive, sheet)?;
    let part = sheet_part(&mut archive, &relation)?;
    let name = archive
        .file_names_raw()
        .find(|name| name.eq_ignore_ascii_case(part.as_bytes()))
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .ok_or_else(|| format!("the workbook names the part {part}, which the file lacks"))?;
    let entry = archive
        .by_name(&name)
        .map_err(|error| format!("{name}: {error}"))?;
    scan_sheet(BufReader::new(entry)).map_err(|error| format!("{name}: {error}"))
}

/// The relationship id `xl/workbook.xml` gives the sheet of this name.
fn sheet_relation<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    sheet: &str,
) -> Result<String, String> {
    let entry = archive
        .by_name("xl/workbook.xml")
        .map_err(|error| format!("xl/workbook.xml: {error}"))?;
    let mut reader = quick_xml::Reader::from_reader(BufReader::new(entry));
    let mut buffer = Vec::new();
    loop {
        let event = reader
            .read_event_into(&mut buffer)
            .map_err(|error| format!("xl/workbook.xml: {error}"))?;
        match &event {
            Event::Start(element) | Event::Empty(element)
                if element.local_name().as_ref() == "sheet" =>
            {
                let (mut name, mut id) = (None, None);
                for attribute in element.attributes().flatten() {
                    let key = attribute.key;
                    if key.as_ref() == "name" {
                        name = attribute
                            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .ok()
                            .map(|value| value.into_owned());
                    } else if key.local_name().as_ref() == "id" && key.prefix().is_some() {
                        id = Some(attribute.value.into_owned());
                    }
                }
                if name.as_deref() == Some(sheet) {
                    return id.ok_or_else(|| {
                        format!("xl/workbook.xml: the sheet {sheet:?} has no relationship id")
                    });
                }
            }
            Event::Eof => return Err(format!("xl/workbook.xml does not list the sheet {sheet:?}")),
            _ => {}
        }
        buffer.clear();
    }
}

/// The zip part the workbook's relationship `relation` points at.
fn sheet_part<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    relation: &str,
) -> Result<String, String> {
    const RELS: &str = "xl/_rels/workbook.xml.rels";
    let entry = archive
        .by_name(RELS)
        .map_err(|error| format!("{RELS}: {error}"))?;
    let mut reader = quick_xml::Reader::from_reader(BufReader::new(entry));
    let mut buffer = Vec::new();
    loop {
        let event = reader
            .read_event_into(&mut buffer)
            .map_err(|error| format!("{RELS}: {error}"))?;
        match &event {
            Event::Start(element) | Event::Empty(element)
                if element.local_name().as_ref() == "Relationship" =>
            {
                let (mut id, mut target) = (None, None);
                for attribute in element.attributes().flatten() {
                    match attribute.key.as_ref() {
                        "Id" => id = Some(attribute.value.into_owned()),
                        "Target" => {
                            target = attribute
                                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .ok()
                                .map(|value| value.into_owned())
                        }
                        _ => {}
                    }
                }
                if id.as_deref() == Some(relation) {
                    let target = target.ok_or_else(|| {
                        format!("{RELS}: the relationship {relation} has no target")
                    })?;
                    // Targets are relative to `xl/`, or absolute in the package.
                    return Ok(match target.strip_prefix('/') {
                        Some(absolute) => absolute.to_owned(),
                        None => format!("xl/{target}"),
                    });
                }
            }
            Event::Eof => return Err(format!("{RELS} has no relationship {relation}")),
            _ => {}
        }
        buffer.clear();
    }
}

/// The error cells of a worksheet part whose value calamine cannot name.
fn scan_sheet(input: impl std::io::BufRead) -> Result<ErrorPlaces, String> {
    let mut reader = quick_xml::Reader::from_reader(input);
    let mut buffer = Vec::new();
    let mut places = ErrorPlaces::new();
    // Inside an error cell: its place (if it has one) and the text of its `<v>`.
    let mut cell: Option<ErrorCell> = None;
    let mut in_value = false;
    loop {
        let event = reader
            .read_event_into(&mut buffer)
            .map_err(|error| error.to_string())?;
        match &event {
            Event::Start(element) if element.local_name().as_ref() == "c" => {
                let mut is_error = false;
                let mut place = None;
                for attribute in element.attributes().flatten() {
                    match attribute.key.as_ref() {
                        "t" => is_error = attribute.value.as_ref() == "e",
                        "r" => place = cell_place(&attribute.value),
                        _ => {}
                    }
                }
                cell = is_error.then_some((place, None));
            }
            Event::Start(element) if element.local_name().as_ref() == "v" => {
                in_value = cell.is_some();
            }
            Event::Text(text) if in_value => {
                if let Some((_, value)) = &mut cell {
                    value
                        .get_or_insert_with(String::new)
                        .push_str(&text.xml10_content());
                }
            }
            Event::End(element) if element.local_name().as_ref() == "v" => in_value = false,
            Event::End(element) if element.local_name().as_ref() == "c" => {
                if let Some((place, Some(value))) = cell.take() {
                    if value.parse::<CellErrorType>().is_err() {
                        let Some((row, column)) = place else {
                            return Err(format!(
                                "a cell holding the error value {value:?} has no reference"
                            ));
                        };
                        if places.len() == MAX_UNKNOWN_ERRORS {
                            return Err(format!(
                                "more than {MAX_UNKNOWN_ERRORS} cells hold error values \
                                 this reader does not know"
                            ));
                        }
                        places.push_back((row, column, value));
                    }
                }
            }
            Event::End(element) if element.local_name().as_ref() == "sheetData" => break,
            Event::Eof => break,
            _ => {}
        }
        buffer.clear();
    }
    Ok(places)
}

/// An error cell being read: its place, when it has a reference, and its value's text.
type ErrorCell = (Option<(u32, u32)>, Option<String>);

/// `AB12` as (row 11, column 27), zero-based.
fn cell_place(reference: &str) -> Option<(u32, u32)> {
    let split = reference.find(|c: char| c.is_ascii_digit())?;
    let (letters, digits) = reference.split_at(split);
    if letters.is_empty() || letters.len() > 3 {
        return None;
    }
    let mut column = 0u32;
    for letter in letters.bytes() {
        if !letter.is_ascii_alphabetic() {
            return None;
        }
        column = column * 26 + u32::from(letter.to_ascii_uppercase() - b'A' + 1);
    }
    let row: u32 = digits.parse().ok()?;
    Some((row.checked_sub(1)?, column - 1))
}

/// Reads a file by positioned reads, leaving the descriptor's shared offset alone.
struct PositionedReader<'f> {
    file: &'f File,
    position: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let read = self.file.read_at(buffer, self.position)?;
        self.position += read as u64;
        Ok(read)
    }
}

impl Seek for PositionedReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range");
        self.position = match to {
            SeekFrom::Start(at) => at,
            SeekFrom::End(by) => self
                .file
                .metadata()?
                .len()
                .checked_add_signed(by)
                .ok_or_else(invalid)?,
            SeekFrom::Current(by) => self.position.checked_add_signed(by).ok_or_else(invalid)?,
        };
        Ok(self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_zero_based_places() {
        assert_eq!(cell_place("A1"), Some((0, 0)));
        assert_eq!(cell_place("AB12"), Some((11, 27)));
        assert_eq!(cell_place("XFD1048576"), Some((1_048_575, 16_383)));
        assert_eq!(cell_place("A0"), None);
        assert_eq!(cell_place("12"), None);
    }

    #[test]
    fn only_error_values_calamine_cannot_name_are_found() {
        let xml = r#"<worksheet><sheetData><row r="2">
            <c r="A2" t="e"><f>1/0</f><v>#DIV/0!</v></c>
            <c r="B2" t="e"><f>SEQUENCE(3)</f><v>#SPILL!</v></c>
            <c r="C2" t="str"><v>#CALC!</v></c>
            <c r="D2" t="e"><v>#CALC!</v></c></row></sheetData></worksheet>"#;
        let places = scan_sheet(xml.as_bytes()).unwrap();
        assert_eq!(
            Vec::from(places),
            vec![(1, 1, "#SPILL!".to_owned()), (1, 3, "#CALC!".to_owned())]
        );
    }
}
