//! A zip that holds the table as one of its files (`orders.zip` with `orders.csv`).
//!
//! A zip's directory is at its end, so it is read first, with ranged reads of the tail
//! (zip64 included); the member is then streamed from its own byte range, stored or
//! deflated, through the same text decoding as any compressed file. Nothing but the
//! directory is held in memory, and that is capped.

use tokio::io::AsyncReadExt;

use super::csv::read_error;
use super::DecodeError;
use crate::import::fetch::{Fetcher, ObjectInfo};

/// The first bytes of a zip (a local file header).
pub const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// Extensions of members that can be the table.
const TABLE_EXTENSIONS: &[&str] = &["csv", "tsv", "tab", "txt", "jsonl", "ndjson"];

/// The largest central directory read; a zip of a few tables needs a few hundred bytes.
const MAX_DIRECTORY_BYTES: u64 = 16 * 1024 * 1024;

/// The end-of-central-directory record and the longest comment after it.
const MAX_TAIL_BYTES: u64 = 22 + 65_535;

/// The member to read: where its data are and how they are compressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Whether the data are deflated (method 8) rather than stored (method 0).
    pub deflated: bool,
    /// Absolute offset of the member's data in the object.
    pub data_offset: u64,
    pub compressed_size: u64,
}

/// One entry of the central directory.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    method: u16,
    encrypted: bool,
    compressed_size: u64,
    header_offset: u64,
}

fn unreadable(file: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Archive {
        file: file.to_owned(),
        problem: reason.into(),
    }
}

/// Reads `length` bytes at `offset`.
async fn read_range(
    fetcher: &Fetcher,
    info: &ObjectInfo,
    file: &str,
    offset: u64,
    length: u64,
) -> Result<Vec<u8>, DecodeError> {
    let mut bytes = Vec::with_capacity(length as usize);
    fetcher
        .reader_from(info, offset)
        .await?
        .take(length)
        .read_to_end(&mut bytes)
        .await
        .map_err(|error| read_error(file, offset, error))?;
    if (bytes.len() as u64) < length {
        return Err(unreadable(file, "is cut short"));
    }
    Ok(bytes)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// Finds the member to import: the one `wanted` names, or the only member whose name
/// says it is a table. Several candidates without `wanted` fail, naming them.
pub async fn locate(
    fetcher: &Fetcher,
    info: &ObjectInfo,
    file: &str,
    wanted: Option<&str>,
) -> Result<Member, DecodeError> {
    let entries = directory(fetcher, info, file).await?;
    let files: Vec<&Entry> = entries
        .iter()
        .filter(|entry| {
            let base = entry.name.rsplit('/').next().unwrap_or_default();
            !entry.name.ends_with('/')
                && !entry.name.starts_with("__MACOSX/")
                && !base.starts_with("._")
                && base != ".DS_Store"
        })
        .collect();
    let list = |entries: &[&Entry]| {
        entries
            .iter()
            .map(|entry| format!("{:?}", entry.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry = match wanted {
        Some(wanted) => {
            let found: Vec<&Entry> = files
                .iter()
                .copied()
                .filter(|entry| entry.name == wanted)
                .collect();
            match found.as_slice() {
                [entry] => *entry,
                _ => {
                    return Err(unreadable(
                        file,
                        format!("has no member {wanted:?}; it holds {}", list(&files)),
                    ))
                }
            }
        }
        None => {
            let tables: Vec<&Entry> = files
                .iter()
                .copied()
                .filter(|entry| {
                    let base = entry.name.rsplit('/').next().unwrap_or_default();
                    base.rsplit_once('.').is_some_and(|(_, extension)| {
                        TABLE_EXTENSIONS
                            .iter()
                            .any(|known| extension.eq_ignore_ascii_case(known))
                    })
                })
                .collect();
            match tables.as_slice() {
                [entry] => *entry,
                [] if files.iter().any(|entry| {
                    entry.name == "[Content_Types].xml" || entry.name == "mimetype"
                }) =>
                {
                    return Err(DecodeError::NotCsv {
                        file: file.to_owned(),
                        found: "a zip archive (xlsx, xlsb or ods?)",
                    })
                }
                [] => {
                    return Err(unreadable(
                        file,
                        format!(
                            "holds no CSV, TSV or JSON Lines file (members: {})",
                            if files.is_empty() {
                                "none".to_owned()
                            } else {
                                list(&files)
                            }
                        ),
                    ))
                }
                several => {
                    return Err(unreadable(
                        file,
                        format!(
                            "holds several files that could be the table ({}); name \
                             one with --member (options.member)",
                            list(several)
                        ),
                    ))
                }
            }
        }
    };
    if entry.encrypted {
        return Err(unreadable(
            file,
            format!("holds {:?} encrypted", entry.name),
        ));
    }
    if entry.method != 0 && entry.method != 8 {
        return Err(unreadable(
            file,
            format!(
                "holds {:?} compressed with zip method {}; only stored and deflated \
                 members are read",
                entry.name, entry.method
            ),
        ));
    }
    let header = read_range(fetcher, info, file, entry.header_offset, 30).await?;
    if !header.starts_with(ZIP_MAGIC) {
        return Err(unreadable(
            file,
            format!("lacks the local header of {:?}", entry.name),
        ));
    }
    let data_offset =
        entry.header_offset + 30 + u64::from(u16_at(&header, 26)) + u64::from(u16_at(&header, 28));
    if data_offset + entry.compressed_size > info.size {
        return Err(unreadable(
            file,
            format!("holds {:?} running past its end", entry.name),
        ));
    }
    Ok(Member {
        name: entry.name.clone(),
        deflated: entry.method == 8,
        data_offset,
        compressed_size: entry.compressed_size,
    })
}

/// The central directory's entries.
async fn directory(
    fetcher: &Fetcher,
    info: &ObjectInfo,
    file: &str,
) -> Result<Vec<Entry>, DecodeError> {
    let tail_length = info.size.min(MAX_TAIL_BYTES);
    let tail_start = info.size - tail_length;
    let tail = read_range(fetcher, info, file, tail_start, tail_length).await?;
    let end = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&at| tail[at..].starts_with(b"PK\x05\x06"))
        .ok_or_else(|| unreadable(file, "has no end-of-directory record"))?;
    let mut count = u64::from(u16_at(&tail, end + 10));
    let mut size = u64::from(u32_at(&tail, end + 12));
    let mut offset = u64::from(u32_at(&tail, end + 16));
    if count == 0xFFFF || size == 0xFFFF_FFFF || offset == 0xFFFF_FFFF {
        // zip64: a locator just before the record points at the zip64 record.
        if end < 20 || !tail[end - 20..].starts_with(b"PK\x06\x07") {
            return Err(unreadable(file, "has no zip64 locator"));
        }
        let record_offset = u64_at(&tail, end - 20 + 8);
        let record = read_range(fetcher, info, file, record_offset, 56).await?;
        if !record.starts_with(b"PK\x06\x06") {
            return Err(unreadable(file, "has no zip64 directory record"));
        }
        count = u64_at(&record, 32);
        size = u64_at(&record, 40);
        offset = u64_at(&record, 48);
    }
    if size > MAX_DIRECTORY_BYTES || offset.saturating_add(size) > info.size {
        return Err(unreadable(
            file,
            format!(
                "declares a directory of {size} bytes at byte {offset}, which is not plausible"
            ),
        ));
    }
    let directory = read_range(fetcher, info, file, offset, size).await?;
    let mut entries = Vec::new();
    let mut at = 0usize;
    while entries.len() as u64 != count {
        if at + 46 > directory.len() || u32_at(&directory, at) != 0x0201_4b50 {
            return Err(unreadable(file, "has a corrupt directory"));
        }
        let flags = u16_at(&directory, at + 8);
        let method = u16_at(&directory, at + 10);
        let mut compressed_size = u64::from(u32_at(&directory, at + 20));
        let uncompressed_size = u32_at(&directory, at + 24);
        let name_length = usize::from(u16_at(&directory, at + 28));
        let extra_length = usize::from(u16_at(&directory, at + 30));
        let comment_length = usize::from(u16_at(&directory, at + 32));
        let mut header_offset = u64::from(u32_at(&directory, at + 42));
        let name_start = at + 46;
        let extra_start = name_start + name_length;
        let next = extra_start + extra_length + comment_length;
        if next > directory.len() {
            return Err(unreadable(file, "has a corrupt directory"));
        }
        let name = String::from_utf8_lossy(&directory[name_start..extra_start]).into_owned();
        // zip64 sizes and offsets, in this order, for the fields that overflowed.
        let mut extra = &directory[extra_start..extra_start + extra_length];
        while extra.len() >= 4 {
            let id = u16_at(extra, 0);
            let length = usize::from(u16_at(extra, 2));
            let data = &extra[4..(4 + length).min(extra.len())];
            if id == 0x0001 {
                let mut fields = data.chunks_exact(8).map(|field| u64_at(field, 0));
                if uncompressed_size == 0xFFFF_FFFF {
                    fields.next();
                }
                if compressed_size == 0xFFFF_FFFF {
                    compressed_size = fields.next().unwrap_or(compressed_size);
                }
                if header_offset == 0xFFFF_FFFF {
                    header_offset = fields.next().unwrap_or(header_offset);
                }
            }
            extra = &extra[(4 + length).min(extra.len())..];
        }
        entries.push(Entry {
            name,
            method,
            encrypted: flags & 1 == 1,
            compressed_size,
            header_offset,
        });
        at = next;
    }
    Ok(entries)
}
