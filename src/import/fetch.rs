//! Stage `fetch`: find out what the object is (HEAD), then stream its bytes from a given
//! offset with ranged GETs that are pinned to the ETag seen by HEAD.
//!
//! Several ranges are in flight at once so that the network hides behind decoding and
//! loading; each range is retried from the last byte it delivered when its body breaks,
//! so a flaky connection costs only the bytes lost, never a restart of the import.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, ReadBuf};

use crate::config::ImportSettings;
use crate::import::run::SourceLocation;
use crate::metrics::{metrics, S3Operation};

/// How many attempts in a row may deliver no byte before the import gives up on the
/// store; an attempt that delivered something resets the count.
const RANGE_ATTEMPTS: u32 = 5;

/// What HEAD tells about the object; recorded in the commit's lineage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    pub size: u64,
    /// Every ranged GET carries `If-Match` with this value, so a replaced object fails
    /// the import instead of mixing two files into one commit.
    pub etag: Option<String>,
    pub version_id: Option<String>,
}

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("{source_location} not found")]
    NotFound { source_location: String },
    #[error(
        "{source_location} is {size} bytes, larger than the limit of {limit} bytes \
         (IMPORT_MAX_FILE_SIZE)"
    )]
    TooLarge {
        source_location: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "{source_location} changed while it was being imported (expected ETag {expected}); \
         import the new object with a new run"
    )]
    ObjectChanged {
        source_location: String,
        expected: String,
    },
    #[error("the object store refused {source_location}: {message}")]
    Refused {
        source_location: String,
        message: String,
    },
    #[error("reading {source_location} failed: {message}")]
    Io {
        source_location: String,
        message: String,
    },
    /// A local file this process may not read, or a directory: it stays so on a retry.
    #[error("cannot read {source_location}: {message}")]
    Unreadable {
        source_location: String,
        message: String,
    },
    #[error("an s3:// source needs S3 settings (S3_ENDPOINT, S3_REGION, credentials)")]
    NoS3Client,
}

impl FetchError {
    /// Transport failures may heal on a retry; everything else is a property of the object.
    pub fn is_transient(&self) -> bool {
        matches!(self, FetchError::Io { .. })
    }
}

/// Reads one source; cheap to clone into the ranged-GET tasks.
#[derive(Clone)]
pub struct Fetcher {
    location: SourceLocation,
    s3: Option<aws_sdk_s3::Client>,
    chunk_size: u64,
    concurrency: usize,
    /// Bytes delivered by the source in this attempt, for the summary and metrics.
    bytes_read: Arc<AtomicU64>,
}

impl Fetcher {
    pub fn new(
        location: SourceLocation,
        s3: Option<aws_sdk_s3::Client>,
        settings: &ImportSettings,
    ) -> Self {
        Self {
            location,
            s3,
            chunk_size: settings.chunk_size,
            concurrency: settings.fetch_concurrency,
            bytes_read: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// HEAD (or `stat`) the source and refuse it when it is over `max_file_size`.
    pub async fn head(&self, max_file_size: u64) -> Result<ObjectInfo, FetchError> {
        let info = match &self.location {
            SourceLocation::Local { path } => {
                let metadata = tokio::fs::metadata(path)
                    .await
                    .map_err(|error| self.local_error(error))?;
                if metadata.is_dir() {
                    return Err(FetchError::Unreadable {
                        source_location: self.location.to_string(),
                        message: "it is a directory".to_owned(),
                    });
                }
                if !metadata.is_file() {
                    // A pipe, socket or device has no size to report progress against
                    // and cannot be read again from a checkpoint.
                    return Err(FetchError::Unreadable {
                        source_location: self.location.to_string(),
                        message: format!(
                            "it is {}, not a regular file; an import reads a file it can \
                             measure and read again from a checkpoint, so write the data to \
                             a file (or upload it) and import that",
                            special_file_kind(&metadata)
                        ),
                    });
                }
                // A local file has no ETag; its size and modification time stand in for
                // one, so a resume notices a file that was replaced meanwhile.
                let modified = metadata
                    .modified()
                    .ok()
                    .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|since| since.as_nanos())
                    .unwrap_or(0);
                ObjectInfo {
                    size: metadata.len(),
                    etag: Some(format!("local:{}:{modified}", metadata.len())),
                    version_id: None,
                }
            }
            SourceLocation::S3 { bucket, key } => {
                let client = self.s3.as_ref().ok_or(FetchError::NoS3Client)?;
                metrics().s3_request(S3Operation::Head);
                let head = client
                    .head_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|error| {
                        let not_found = error
                            .as_service_error()
                            .map(|service| service.is_not_found())
                            .unwrap_or(false);
                        if not_found {
                            FetchError::NotFound {
                                source_location: self.location.to_string(),
                            }
                        } else {
                            self.classify(&error)
                        }
                    })?;
                ObjectInfo {
                    size: head.content_length().unwrap_or(0).max(0) as u64,
                    etag: head.e_tag().map(str::to_owned),
                    version_id: head.version_id().map(str::to_owned),
                }
            }
        };
        if info.size > max_file_size {
            return Err(FetchError::TooLarge {
                source_location: self.location.to_string(),
                size: info.size,
                limit: max_file_size,
            });
        }
        Ok(info)
    }

    /// A reader over the object's bytes from `offset` to its end as HEAD saw it.
    pub async fn reader_from(
        &self,
        info: &ObjectInfo,
        offset: u64,
    ) -> Result<Pin<Box<dyn AsyncRead + Send>>, FetchError> {
        match &self.location {
            SourceLocation::Local { path } => {
                let mut file = tokio::fs::File::open(path)
                    .await
                    .map_err(|error| self.local_error(error))?;
                file.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(|error| self.io_error(error))?;
                // Read only as far as the size taken at the start, like the S3 ranges.
                let file = file.take(info.size.saturating_sub(offset));
                Ok(Box::pin(CountingReader {
                    inner: tokio::io::BufReader::with_capacity(256 * 1024, file),
                    counter: self.bytes_read.clone(),
                }))
            }
            SourceLocation::S3 { .. } => {
                let fetcher = self.clone();
                let etag = info.etag.clone();
                let ranges = chunk_ranges(offset, info.size, self.chunk_size);
                let chunks = futures::stream::iter(ranges)
                    .map(move |(start, end)| {
                        let fetcher = fetcher.clone();
                        let etag = etag.clone();
                        async move { fetcher.fetch_range(start, end, etag.as_deref()).await }
                    })
                    .buffered(self.concurrency.max(1))
                    .map_err(std::io::Error::other);
                // Nothing may be read past a failed range: the stream ends with its error.
                let mut failed = false;
                let chunks = chunks.take_while(move |chunk| {
                    let go_on = !failed;
                    failed = chunk.is_err();
                    futures::future::ready(go_on)
                });
                Ok(Box::pin(tokio_util::io::StreamReader::new(chunks)))
            }
        }
    }

    /// Fetches bytes `start..end` whole, resuming a broken body from the last byte it
    /// delivered. `If-Match` turns a replaced object into a 412, which we report as
    /// [`FetchError::ObjectChanged`] rather than retry.
    async fn fetch_range(
        &self,
        start: u64,
        end: u64,
        etag: Option<&str>,
    ) -> Result<Bytes, FetchError> {
        let (bucket, key) = match &self.location {
            SourceLocation::S3 { bucket, key } => (bucket, key),
            SourceLocation::Local { .. } => unreachable!("ranged GETs are for S3 sources"),
        };
        let client = self.s3.as_ref().ok_or(FetchError::NoS3Client)?;
        let mut buffer = BytesMut::with_capacity((end - start) as usize);
        let mut attempt = 0;
        loop {
            let from = start + buffer.len() as u64;
            if from >= end {
                return Ok(buffer.freeze());
            }
            let received_before = buffer.len();
            attempt += 1;
            let mut request = client
                .get_object()
                .bucket(bucket)
                .key(key)
                .range(format!("bytes={from}-{}", end - 1));
            if let Some(etag) = etag {
                request = request.if_match(etag);
            }
            metrics().s3_request(S3Operation::GetRange);
            let failure = match request.send().await {
                Ok(response) => {
                    let expected = format!("bytes {from}-{}/", end - 1);
                    if !response
                        .content_range()
                        .is_some_and(|range| range.starts_with(&expected))
                    {
                        return Err(FetchError::Refused {
                            source_location: self.location.to_string(),
                            message: format!(
                                "asked for {expected}*, got Content-Range {:?}: the store does not honour ranged reads",
                                response.content_range()
                            ),
                        });
                    }
                    let mut body = response.body;
                    let mut failure = None;
                    loop {
                        match body.try_next().await {
                            Ok(Some(bytes)) => {
                                self.bytes_read
                                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                                buffer.extend_from_slice(&bytes);
                            }
                            Ok(None) => break,
                            Err(error) => {
                                failure = Some(error.to_string());
                                break;
                            }
                        }
                    }
                    match failure {
                        None if start + buffer.len() as u64 >= end => {
                            buffer.truncate((end - start) as usize);
                            return Ok(buffer.freeze());
                        }
                        None => format!(
                            "body ended at byte {} of range {start}-{}",
                            start + buffer.len() as u64,
                            end - 1
                        ),
                        Some(message) => message,
                    }
                }
                Err(error) => {
                    if is_precondition_failed(&error) {
                        return Err(FetchError::ObjectChanged {
                            source_location: self.location.to_string(),
                            expected: etag.unwrap_or_default().to_owned(),
                        });
                    }
                    if error
                        .as_service_error()
                        .map(|service| service.code() == Some("NoSuchKey"))
                        .unwrap_or(false)
                    {
                        return Err(FetchError::ObjectChanged {
                            source_location: self.location.to_string(),
                            expected: etag.unwrap_or_default().to_owned(),
                        });
                    }
                    match self.classify(&error) {
                        refused @ FetchError::Refused { .. } => return Err(refused),
                        other => other.to_string(),
                    }
                }
            };
            if buffer.len() > received_before {
                // The body broke after making progress: ask for the rest at once.
                attempt = 0;
                metrics().s3_retry();
                tracing::debug!(
                    source = %self.location,
                    byte = start + buffer.len() as u64,
                    error = %failure,
                    "ranged GET broke; resuming from the last byte received"
                );
                continue;
            }
            if attempt >= RANGE_ATTEMPTS {
                return Err(FetchError::Io {
                    source_location: self.location.to_string(),
                    message: format!("range starting at byte {from}: {failure}"),
                });
            }
            tracing::warn!(
                source = %self.location,
                byte = from,
                attempt,
                error = %failure,
                "ranged GET failed; retrying"
            );
            metrics().s3_retry();
            tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt))).await;
        }
    }

    /// A 4xx answer (other than timeouts and throttling) will not change on a retry:
    /// bad credentials, no permission, wrong region. Everything else might.
    fn classify<E>(&self, error: &SdkError<E, HttpResponse>) -> FetchError
    where
        E: std::error::Error + 'static,
    {
        let status = error
            .raw_response()
            .map(|response| response.status().as_u16());
        match status {
            Some(status) if (400..500).contains(&status) && status != 408 && status != 429 => {
                FetchError::Refused {
                    source_location: self.location.to_string(),
                    message: format!("HTTP {status}: {}", DisplayErrorChain(error)),
                }
            }
            _ => self.io_error(DisplayErrorChain(error)),
        }
    }

    /// A local file that is missing or that this process may not read fails the run;
    /// other errors (a disk or network file system away) may pass.
    fn local_error(&self, error: std::io::Error) -> FetchError {
        let source_location = self.location.to_string();
        match error.kind() {
            std::io::ErrorKind::NotFound => FetchError::NotFound { source_location },
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::IsADirectory => {
                FetchError::Unreadable {
                    source_location,
                    message: error.to_string(),
                }
            }
            _ => self.io_error(error),
        }
    }

    fn io_error(&self, error: impl fmt::Display) -> FetchError {
        FetchError::Io {
            source_location: self.location.to_string(),
            message: error.to_string(),
        }
    }
}

/// Splits `offset..size` into consecutive `[start, end)` ranges of `chunk` bytes.
/// What a local path that is neither a file nor a directory is, in words.
fn special_file_kind(metadata: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let kind = metadata.file_type();
        if kind.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
    }
    let _ = metadata;
    "a special file"
}

fn chunk_ranges(offset: u64, size: u64, chunk: u64) -> Vec<(u64, u64)> {
    let chunk = chunk.max(1);
    (offset..size)
        .step_by(chunk as usize)
        .map(|start| (start, (start + chunk).min(size)))
        .collect()
}

fn is_precondition_failed<E>(error: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    error
        .raw_response()
        .map(|response| response.status().as_u16())
        == Some(412)
        || error.code() == Some("PreconditionFailed")
}

/// The SDK's errors print only their outermost layer; the cause is what a person needs.
struct DisplayErrorChain<'a>(&'a dyn std::error::Error);

impl fmt::Display for DisplayErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Counts the bytes a local file delivers, like the S3 path counts its ranges.
struct CountingReader<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for CountingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let added = buf.filled().len() - before;
        self.counter.fetch_add(added as u64, Ordering::Relaxed);
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_and_local_sources() {
        assert_eq!(
            "s3://bucket/dir/data.csv"
                .parse::<SourceLocation>()
                .unwrap(),
            SourceLocation::S3 {
                bucket: "bucket".into(),
                key: "dir/data.csv".into()
            }
        );
        assert!("s3://bucket".parse::<SourceLocation>().is_err());
        assert!("s3:///key".parse::<SourceLocation>().is_err());
        let local: SourceLocation = "./x/data.csv.gz".parse().unwrap();
        assert_eq!(local.file_name(), "data.csv.gz");
    }

    #[test]
    fn ranges_cover_the_tail_exactly() {
        assert_eq!(chunk_ranges(0, 10, 4), vec![(0, 4), (4, 8), (8, 10)]);
        assert_eq!(chunk_ranges(5, 10, 4), vec![(5, 9), (9, 10)]);
        assert!(chunk_ranges(10, 10, 4).is_empty());
    }
}
