//! Recognising what a file is from its first bytes, before it is stored: the checks the
//! decoders make when they open a file, made early so an upload that no import could
//! read is refused before a byte of it is kept.

use super::sheet::SheetFormat;

/// How many leading bytes [`refuse_content`] wants (fewer only for shorter files).
pub const HEAD_BYTES: usize = 8;

const ZIP: &[u8] = b"PK\x03\x04";
const EMPTY_ZIP: &[u8] = b"PK\x05\x06";
const OLE2: &[u8] = &[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];

/// Why a file named `file_name` whose content starts with `head` cannot be imported,
/// or `None` when the first bytes fit the name: a spreadsheet name needs a zip or OLE2
/// file (its full check runs in the import); any other name is read as text (CSV, TSV
/// or JSON Lines), which may come compressed (gzip, zstd, bzip2) or as the one member
/// of a zip archive (the import reads its directory), but must not be an OLE2 file or
/// another recognisable binary format.
pub fn refuse_content(file_name: &str, head: &[u8]) -> Option<String> {
    let found = binary_kind(head);
    match SheetFormat::from_file_name(file_name) {
        Some(claimed) => {
            let fits = match claimed {
                SheetFormat::Xls => head.starts_with(OLE2),
                _ => head.starts_with(ZIP) || head.starts_with(EMPTY_ZIP),
            };
            if fits {
                return None;
            }
            let found = match found {
                Some(kind) => kind.to_owned(),
                None if head.is_empty() => "empty".to_owned(),
                None => super::sheet::inspect::describe_magic(head),
            };
            Some(format!(
                "{file_name}: the name says {} but the content is {found}",
                claimed.name()
            ))
        }
        None if is_text_container(head) => None,
        None => found.map(|kind| {
            format!(
                "{file_name}: the content is {kind}, not CSV; name it with its format's \
                 extension (.xlsx, .xlsb, .xls, .ods) to import it as a spreadsheet"
            )
        }),
    }
}

/// Whether `head` starts a container the text reader opens: gzip, zstd, bzip2, or a
/// zip archive (one member is read; the import names the members when it cannot
/// choose, and refuses a workbook's zip under a text name).
fn is_text_container(head: &[u8]) -> bool {
    [
        &[0x1F, 0x8B][..],
        &[0x28, 0xB5, 0x2F, 0xFD][..],
        b"BZh",
        ZIP,
    ]
    .iter()
    .any(|magic| head.starts_with(magic))
}

/// What a binary file seems to be, from its magic number (and, given 262 bytes or
/// more, a tar archive's signature after its NUL-padded header); `None` for anything else (text, or bytes no format
/// claims).
pub fn binary_kind(head: &[u8]) -> Option<&'static str> {
    // The signature follows a NUL-padded header, which no text has.
    if head.get(257..262) == Some(b"ustar") && head[..257].contains(&0) {
        return Some("a tar archive");
    }
    const KINDS: &[(&[u8], &str)] = &[
        (ZIP, "a zip archive (xlsx, xlsb or ods?)"),
        (EMPTY_ZIP, "a zip archive (empty)"),
        (OLE2, "an OLE2 compound file (xls?)"),
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (&[0xFF, 0xD8, 0xFF], "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (b"%PDF", "a PDF document"),
        (&[0x1F, 0x8B], "gzip-compressed data"),
        (b"7z\xBC\xAF\x27\x1C", "a 7-Zip archive"),
        (b"Rar!", "a RAR archive"),
        (b"\x7FELF", "an ELF executable"),
        (b"MZ", "a Windows executable"),
        (b"SQLite format 3", "an SQLite database"),
        (b"PAR1", "a Parquet file"),
        (b"\xFD7zXZ\x00", "xz-compressed data"),
        (&[0x04, 0x22, 0x4D, 0x18], "LZ4-compressed data"),
    ];
    KINDS
        .iter()
        .find(|(magic, _)| head.starts_with(magic))
        .map(|(_, kind)| *kind)
}

/// What the top of a text read as CSV or JSON Lines is, when it is binary: a
/// [`binary_kind`] with a NUL in the first 512 bytes, or, for a magic number that is
/// not plain ASCII (and `%PDF`, whose second line is binary by custom), a byte sequence
/// there that is not UTF-8. A header may start `MZ`, `PAR1` or `GIF8` in a Latin-1 file.
pub fn binary_kind_of_text(top: &[u8]) -> Option<&'static str> {
    let kind = binary_kind(top)?;
    let head = &top[..top.len().min(512)];
    if head.contains(&0) {
        return Some(kind);
    }
    let text_like = head.iter().take(4).all(u8::is_ascii_graphic) && !head.starts_with(b"%PDF");
    let not_utf8 = std::str::from_utf8(head).is_err_and(|error| error.error_len().is_some());
    (not_utf8 && !text_like).then_some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_names_take_text_and_refuse_known_binaries() {
        assert_eq!(refuse_content("a.csv", b"id,name\n1,"), None);
        assert_eq!(refuse_content("a.txt", b""), None);
        let png = refuse_content("a.csv", b"\x89PNG\r\n\x1a\n").unwrap();
        assert!(png.contains("a PNG image"), "{png}");
        let empty = refuse_content("a.csv", b"PK\x05\x06\0\0\0\0").unwrap();
        assert!(empty.contains("a zip archive (empty)"), "{empty}");
        let xls = refuse_content("a.csv", &[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]);
        assert!(xls.unwrap().contains("OLE2"));
        let xz = refuse_content("a.csv.xz", b"\xFD7zXZ\x00\x00\x04").unwrap();
        assert!(xz.contains("xz-compressed data"), "{xz}");
        let mut tar = b"data.csv".to_vec();
        tar.resize(257, 0);
        tar.extend_from_slice(b"ustar\x0000");
        assert_eq!(binary_kind(&tar), Some("a tar archive"));
        assert_eq!(binary_kind(&tar[..HEAD_BYTES]), None);
    }

    #[test]
    fn text_names_take_compressed_text_and_zip_archives() {
        assert_eq!(refuse_content("a.csv.gz", &[0x1F, 0x8B, 8, 0]), None);
        assert_eq!(refuse_content("a.csv", &[0x1F, 0x8B, 8, 0]), None);
        assert_eq!(
            refuse_content("a.jsonl.zst", &[0x28, 0xB5, 0x2F, 0xFD]),
            None
        );
        assert_eq!(refuse_content("a.tsv.bz2", b"BZh91AY&"), None);
        assert_eq!(refuse_content("a.zip", b"PK\x03\x04\x14\0\0\0"), None);
    }

    #[test]
    fn spreadsheet_names_need_their_container() {
        assert_eq!(refuse_content("a.xlsx", b"PK\x03\x04\x14\0\0\0"), None);
        assert_eq!(
            refuse_content("a.xls", &[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]),
            None
        );
        let text = refuse_content("a.xlsx", b"id,name\n").unwrap();
        assert!(text.starts_with("a.xlsx: the name says xlsx"), "{text}");
        let pdf = refuse_content("a.ods", b"%PDF-1.7").unwrap();
        assert!(pdf.contains("a PDF document"), "{pdf}");
        let xls = refuse_content("a.xls", b"PK\x03\x04\x14\0\0\0").unwrap();
        assert!(xls.contains("zip archive"), "{xls}");
    }
}
