//! Before the CSV parser: the object's bytes become UTF-8 text.
//!
//! Compression is recognised from the content's first bytes (gzip, including files of
//! several members; zstd, including several frames; bzip2), never from the name alone.
//! The encoding is UTF-16 when the text starts with its byte order mark, else the one
//! the run asked for, else UTF-8. UTF-8 text passes through unchanged (the parser drops
//! its byte order mark and checks it); other encodings are decoded by `encoding_rs`.
//!
//! Decompressing and decoding are CPU work, so they run on a blocking thread that hands
//! chunks to the parser through a bounded channel: memory stays flat whatever the size,
//! and the thread stops as soon as the parser goes away. A byte sequence that is not
//! valid in the declared encoding becomes one `0xFF` byte, which is never valid UTF-8:
//! the row encoder then fails that row, naming its line and byte, as it does for
//! invalid UTF-8.

use std::io::{self, BufRead, Read};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use encoding_rs::{DecoderResult, Encoding, UTF_16BE, UTF_16LE, UTF_8};
use thiserror::Error;
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, oneshot};
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::import::fetch::FetchError;

/// The byte that stands for a sequence invalid in the declared encoding.
pub const INVALID_MARK: u8 = 0xFF;

/// Size of the chunks handed to the parser.
const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks in flight between the decoding thread and the parser.
const CHUNKS_IN_FLIGHT: usize = 4;

/// A compression recognised from the content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    Bzip2,
    /// A zip member's data (see `archive.rs`), deflated or stored.
    Zip {
        deflated: bool,
    },
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Zip { .. } => "zip",
        }
    }

    /// Recognises compressed content from its first bytes (ten are enough).
    pub fn sniff(prefix: &[u8]) -> Option<Self> {
        const BZIP2_BLOCK: [u8; 6] = [0x31, 0x41, 0x59, 0x26, 0x53, 0x59];
        const BZIP2_END: [u8; 6] = [0x17, 0x72, 0x45, 0x38, 0x50, 0x90];
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else if prefix.len() >= 10
            && prefix.starts_with(b"BZh")
            && (b'1'..=b'9').contains(&prefix[3])
            // "BZh" could start a CSV header; the block magic after it cannot.
            && (prefix[4..10] == BZIP2_BLOCK || prefix[4..10] == BZIP2_END)
        {
            Some(Compression::Bzip2)
        } else {
            None
        }
    }
}

/// Problems met while turning the object into text. They travel through the parser as
/// I/O errors and come out as decode errors naming the file.
#[derive(Debug, Error)]
pub enum TextError {
    #[error(
        "the {compression} content decompresses to more than {limit} bytes \
         (IMPORT_MAX_DECOMPRESSED_SIZE); is it a decompression bomb?"
    )]
    TooLarge {
        compression: &'static str,
        limit: u64,
    },
    #[error("the {compression} content is corrupt or cut short: {message}")]
    Corrupt {
        compression: &'static str,
        message: String,
    },
}

/// How the object's bytes became the text the parser reads.
pub struct Text {
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
    pub compression: Option<Compression>,
    pub encoding: &'static Encoding,
    /// Bytes of the object consumed so far: progress, and the check that the whole
    /// object was read.
    pub object_bytes: Arc<AtomicU64>,
}

impl Text {
    /// Whether the text differs from the object's bytes (positions then count the text).
    pub fn transformed(&self) -> bool {
        self.compression.is_some() || self.encoding != UTF_8
    }
}

/// Whether an object that starts with `magic` (its first ten bytes, or all of a shorter
/// one) needs this module, or is UTF-8 text the parser can read as it is.
pub fn needs_decoding(magic: &[u8], declared: Option<&str>) -> bool {
    let declared = declared
        .and_then(|label| Encoding::for_label(label.trim().as_bytes()))
        .unwrap_or(UTF_8);
    Compression::sniff(magic).is_some()
        || magic.starts_with(&[0xFF, 0xFE])
        || magic.starts_with(&[0xFE, 0xFF])
        || (declared != UTF_8 && !magic.starts_with(b"\xEF\xBB\xBF"))
}

/// The encoding's name as the commit's lineage records it (`utf-8`, `windows-1252`).
pub fn encoding_name(encoding: &'static Encoding) -> String {
    encoding.name().to_ascii_lowercase()
}

/// Starts the decoding thread over `input` and waits until it has decided the
/// compression and the encoding. `input` is the object from its first byte, or a zip
/// member's data from `object_start` with `compression` saying how they are stored.
/// `declared` is the encoding the run asked for (a WHATWG label, checked before the run
/// was created).
pub async fn open(
    input: Pin<Box<dyn AsyncRead + Send>>,
    declared: Option<&str>,
    max_decompressed: u64,
    compression: Option<Compression>,
    object_start: u64,
) -> io::Result<Text> {
    let declared = declared
        .and_then(|label| Encoding::for_label(label.trim().as_bytes()))
        .unwrap_or(UTF_8);
    let object_bytes = Arc::new(AtomicU64::new(object_start));
    let (sender, mut receiver) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    let (decided_sender, decided) = oneshot::channel();
    let raw = Counted {
        inner: SyncIoBridge::new(input),
        count: Arc::clone(&object_bytes),
    };
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        if let Err(error) = pump(
            raw,
            declared,
            max_decompressed,
            compression,
            &sender,
            decided_sender,
        ) {
            let _ = sender.blocking_send(Err(error));
        }
    });
    let stream = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
    let reader: Pin<Box<dyn AsyncRead + Send>> = Box::pin(StreamReader::new(stream));
    match decided.await {
        Ok((compression, encoding)) => Ok(Text {
            reader,
            compression,
            encoding,
            object_bytes,
        }),
        // The thread failed before deciding; its error is the first thing it sent.
        Err(_) => {
            let mut reader = reader;
            let mut byte = [0u8; 1];
            match tokio::io::AsyncReadExt::read(&mut reader, &mut byte).await {
                Err(error) => Err(error),
                Ok(_) => Err(io::Error::other("the decoding thread stopped")),
            }
        }
    }
}

type Decided = oneshot::Sender<(Option<Compression>, &'static Encoding)>;

/// The decoding thread: recognise, decompress, decode, send. Returns an error to be
/// passed on to the parser; a parser that went away ends it quietly.
fn pump(
    mut raw: impl Read + Send + 'static,
    declared: &'static Encoding,
    max_decompressed: u64,
    forced: Option<Compression>,
    sender: &mpsc::Sender<io::Result<Bytes>>,
    decided: Decided,
) -> io::Result<()> {
    let magic = read_up_to(&mut raw, 10)?;
    let compression = forced.or_else(|| Compression::sniff(&magic));
    let raw = io::BufReader::with_capacity(CHUNK_BYTES, io::Cursor::new(magic).chain(raw));
    let inflated: Box<dyn Read + Send> = match compression {
        None => Box::new(raw),
        Some(Compression::Gzip) => Box::new(GzMembers {
            member: Some(flate2::bufread::GzDecoder::new(raw)),
            source: None,
        }),
        Some(Compression::Zstd) => Box::new(ZstdFrames {
            source: raw,
            decoder: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }),
        Some(Compression::Bzip2) => Box::new(bzip2::bufread::MultiBzDecoder::new(raw)),
        Some(Compression::Zip { deflated: true }) => {
            Box::new(flate2::bufread::DeflateDecoder::new(raw))
        }
        Some(Compression::Zip { deflated: false }) => Box::new(raw),
    };
    let mut text = Inflated {
        inner: inflated,
        compression,
        produced: 0,
        limit: max_decompressed,
    };
    let head = read_up_to(&mut text, 3)?;
    let (encoding, bom) = if head.starts_with(&[0xFF, 0xFE]) {
        (UTF_16LE, 2)
    } else if head.starts_with(&[0xFE, 0xFF]) {
        (UTF_16BE, 2)
    } else if head.starts_with(b"\xEF\xBB\xBF") {
        // Passed through: the parser drops it, as for any UTF-8 file.
        (UTF_8, 0)
    } else {
        (declared, 0)
    };
    let _ = decided.send((compression, encoding));
    let mut text = io::Cursor::new(head[bom..].to_vec()).chain(text);
    let mut input = vec![0u8; CHUNK_BYTES];
    if encoding == UTF_8 {
        loop {
            let read = read_some(&mut text, &mut input)?;
            if read == 0 {
                return Ok(());
            }
            if sender
                .blocking_send(Ok(Bytes::copy_from_slice(&input[..read])))
                .is_err()
            {
                return Ok(());
            }
        }
    }
    let mut decoder = encoding.new_decoder_without_bom_handling();
    let mut output = vec![0u8; CHUNK_BYTES];
    let mut filled = 0;
    let send = |output: &[u8]| {
        sender
            .blocking_send(Ok(Bytes::copy_from_slice(output)))
            .is_ok()
    };
    loop {
        let read = read_some(&mut text, &mut input)?;
        let last = read == 0;
        let mut source = &input[..read];
        loop {
            if output.len() - filled < 8 {
                if !send(&output[..filled]) {
                    return Ok(());
                }
                filled = 0;
            }
            let (result, consumed, written) =
                decoder.decode_to_utf8_without_replacement(source, &mut output[filled..], last);
            filled += written;
            source = &source[consumed..];
            match result {
                DecoderResult::InputEmpty => break,
                DecoderResult::OutputFull => {
                    if !send(&output[..filled]) {
                        return Ok(());
                    }
                    filled = 0;
                }
                DecoderResult::Malformed(_, _) => {
                    if filled == output.len() {
                        if !send(&output[..filled]) {
                            return Ok(());
                        }
                        filled = 0;
                    }
                    output[filled] = INVALID_MARK;
                    filled += 1;
                }
            }
        }
        if filled > 0 && (last || filled >= CHUNK_BYTES / 2) {
            if !send(&output[..filled]) {
                return Ok(());
            }
            filled = 0;
        }
        if last {
            return Ok(());
        }
    }
}

/// Reads until `wanted` bytes or the end, whichever comes first.
fn read_up_to(reader: &mut impl Read, wanted: usize) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(wanted);
    reader.take(wanted as u64).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// One read, retried when interrupted.
fn read_some(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buffer) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Counts the object's bytes as they are read.
struct Counted<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.count.fetch_add(read as u64, Ordering::Relaxed);
        Ok(read)
    }
}

/// The decompressed stream, stopped past the size limit, with the decompressor's own
/// errors named as corrupt content (errors of the fetch below pass through as they are).
struct Inflated {
    inner: Box<dyn Read + Send>,
    compression: Option<Compression>,
    produced: u64,
    limit: u64,
}

impl Read for Inflated {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let Some(compression) = self.compression else {
            return self.inner.read(buffer);
        };
        let read = self.inner.read(buffer).map_err(|error| {
            let from_below = error
                .get_ref()
                .is_some_and(|inner| inner.is::<FetchError>() || inner.is::<TextError>());
            if from_below || error.kind() == io::ErrorKind::Interrupted {
                error
            } else {
                io::Error::other(TextError::Corrupt {
                    compression: compression.name(),
                    message: error.to_string(),
                })
            }
        })?;
        self.produced += read as u64;
        if self.produced > self.limit {
            return Err(io::Error::other(TextError::TooLarge {
                compression: compression.name(),
                limit: self.limit,
            }));
        }
        Ok(read)
    }
}

/// gzip content of one or more members, as one stream. Zero bytes after the last
/// member (padding to a block size, which `gzip -d` ignores too) end it; anything else
/// after a member must be another member.
struct GzMembers<R: BufRead> {
    member: Option<flate2::bufread::GzDecoder<R>>,
    /// The bytes after a finished member, looked at before the next one starts.
    source: Option<R>,
}

impl<R: BufRead> Read for GzMembers<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(member) = &mut self.member {
                let read = member.read(buffer)?;
                if read > 0 || buffer.is_empty() {
                    return Ok(read);
                }
                let finished = self.member.take().expect("a member is being read");
                self.source = Some(finished.into_inner());
            }
            let Some(mut source) = self.source.take() else {
                return Ok(0);
            };
            let rest = source.fill_buf()?;
            if rest.is_empty() {
                return Ok(0);
            }
            if rest[0] == 0 {
                // Padding: all zeros to the end, or it is not padding.
                loop {
                    let rest = source.fill_buf()?;
                    if rest.is_empty() {
                        return Ok(0);
                    }
                    let zeros = rest.iter().take_while(|&&byte| byte == 0).count();
                    if zeros < rest.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "bytes other than zeros after zero padding that follows the gzip data",
                        ));
                    }
                    source.consume(zeros);
                }
            }
            self.member = Some(flate2::bufread::GzDecoder::new(source));
        }
    }
}

/// zstd content of one or more frames (skippable frames are skipped), as one stream.
struct ZstdFrames<R> {
    source: R,
    decoder: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        use ruzstd::decoding::BlockDecodingStrategy;
        loop {
            if self.in_frame {
                if self.decoder.can_collect() > 0 {
                    return self.decoder.read(buffer);
                }
                if self.decoder.is_finished() {
                    self.in_frame = false;
                    continue;
                }
                self.decoder
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBlocks(1))
                    .map_err(io::Error::other)?;
                continue;
            }
            if self.source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.decoder.init(&mut self.source) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped =
                        io::copy(&mut (&mut self.source).take(length as u64), &mut io::sink())?;
                    if skipped < length as u64 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "a skippable frame is cut short",
                        ));
                    }
                }
                Err(error) => return Err(io::Error::other(error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::AsyncReadExt;

    async fn decode(bytes: Vec<u8>, declared: Option<&str>, limit: u64) -> io::Result<Text> {
        open(Box::pin(io::Cursor::new(bytes)), declared, limit, None, 0).await
    }

    async fn text_of(bytes: Vec<u8>, declared: Option<&str>) -> (Vec<u8>, Text) {
        let mut text = decode(bytes, declared, u64::MAX).await.unwrap();
        let mut out = Vec::new();
        text.reader.read_to_end(&mut out).await.unwrap();
        (out, text)
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[tokio::test]
    async fn plain_utf8_passes_through_byte_for_byte() {
        let data = b"\xEF\xBB\xBFa,b\n1,\xff\n".to_vec();
        let (out, text) = text_of(data.clone(), None).await;
        assert_eq!(out, data);
        assert!(!text.transformed());
        assert_eq!(text.object_bytes.load(Ordering::Relaxed), data.len() as u64);
    }

    #[tokio::test]
    async fn gzip_members_are_read_one_after_the_other() {
        let mut data = gzip(b"a,b\n1,2\n");
        data.extend(gzip(b"3,4\n"));
        let (out, text) = text_of(data, None).await;
        assert_eq!(out, b"a,b\n1,2\n3,4\n");
        assert_eq!(text.compression, Some(Compression::Gzip));
    }

    #[tokio::test]
    async fn zero_padding_after_the_gzip_data_ends_it_and_other_bytes_do_not() {
        let mut data = gzip(b"a,b\n1,2\n");
        data.extend(gzip(b"3,4\n"));
        data.extend(vec![0u8; 70_000]);
        let (out, _) = text_of(data.clone(), None).await;
        assert_eq!(out, b"a,b\n1,2\n3,4\n");

        data.push(b'x');
        let mut text = decode(data, None, u64::MAX).await.unwrap();
        let mut out = Vec::new();
        let error = text.reader.read_to_end(&mut out).await.unwrap_err();
        let inner = error.into_inner().unwrap().downcast::<TextError>().unwrap();
        assert!(
            inner
                .to_string()
                .contains("bytes other than zeros after zero padding"),
            "{inner}"
        );
    }

    #[tokio::test]
    async fn utf16_is_found_by_its_byte_order_mark_and_decoded() {
        let mut data = vec![0xFF, 0xFE];
        for unit in "é,€\n".encode_utf16() {
            data.extend(unit.to_le_bytes());
        }
        let (out, text) = text_of(data, Some("windows-1252")).await;
        assert_eq!(String::from_utf8(out).unwrap(), "é,€\n");
        assert_eq!(encoding_name(text.encoding), "utf-16le");
    }

    #[tokio::test]
    async fn a_sequence_invalid_in_the_encoding_becomes_the_invalid_mark() {
        // Shift_JIS: 0x82 0xA0 is あ; 0x82 followed by 0x20 is not a character.
        let (out, _) = text_of(b"\x82\xa0,\x82 x\n".to_vec(), Some("shift_jis")).await;
        let mut expected = "あ,".as_bytes().to_vec();
        expected.push(INVALID_MARK);
        expected.extend_from_slice(b" x\n");
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn a_bomb_stops_at_the_limit() {
        let data = gzip(&vec![b'a'; 1 << 20]);
        let mut text = decode(data, None, 1000).await.unwrap();
        let mut out = Vec::new();
        let error = text.reader.read_to_end(&mut out).await.unwrap_err();
        let inner = error.into_inner().unwrap().downcast::<TextError>().unwrap();
        assert!(
            matches!(*inner, TextError::TooLarge { limit: 1000, .. }),
            "{inner}"
        );
    }

    #[tokio::test]
    async fn corrupt_gzip_is_named() {
        let mut data = gzip(b"a,b\n1,2\n");
        let cut = data.len() - 6;
        data.truncate(cut);
        let mut text = decode(data, None, u64::MAX).await.unwrap();
        let mut out = Vec::new();
        let error = text.reader.read_to_end(&mut out).await.unwrap_err();
        let inner = error.into_inner().unwrap().downcast::<TextError>().unwrap();
        assert!(
            matches!(
                *inner,
                TextError::Corrupt {
                    compression: "gzip",
                    ..
                }
            ),
            "{inner}"
        );
    }

    #[test]
    fn bzip2_needs_its_block_magic_not_just_bzh() {
        assert_eq!(Compression::sniff(b"BZh9,other,columns\n"), None);
        let mut encoder = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        encoder.write_all(b"a,b\n").unwrap();
        assert_eq!(
            Compression::sniff(&encoder.finish().unwrap()),
            Some(Compression::Bzip2)
        );
    }
}
