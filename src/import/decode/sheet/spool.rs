//! Spooling: the object into a temporary file that has no name, so nothing is left
//! behind whatever happens to the process.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::SheetError;
use crate::metrics::SpoolUsage;

/// Copies `input` (the object from byte 0) into an anonymous temporary file in `dir`
/// and returns it rewound, with its bytes counted in the metrics until the usage is
/// dropped (with the file). On Linux the file is opened with `O_TMPFILE` and never has
/// a name, so its space is returned however the process ends, `kill -9` included;
/// elsewhere it is unlinked at once and created readable by its owner only.
pub async fn spool(
    mut input: std::pin::Pin<Box<dyn AsyncRead + Send>>,
    dir: &Path,
    file: &str,
    size: u64,
    limit: u64,
) -> Result<(File, SpoolUsage), SheetError> {
    let spool_error = |error: std::io::Error| SheetError::Spool {
        file: file.to_owned(),
        dir: dir.display().to_string(),
        message: error.to_string(),
    };
    let handle = tempfile::tempfile_in(dir).map_err(spool_error)?;

    let mut writer = std::io::BufWriter::with_capacity(1024 * 1024, handle);
    let mut buffer = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    let mut usage = crate::metrics::metrics().spool_usage();
    loop {
        let read = input
            .read(&mut buffer)
            .await
            .map_err(|error| SheetError::Source {
                file: file.to_owned(),
                error: crate::import::fetch::FetchError::Io {
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
        usage.grow(read as u64);
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
    Ok((handle, usage))
}
