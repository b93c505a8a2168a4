//! `dsa-ingest export`: a commit's rows as CSV or JSON Lines, in logical row order.
//!
//! The server writes the file: `COPY (SELECT ... ORDER BY <logical row order>) TO STDOUT`
//! in CSV format gives RFC 4180 quoting, and the bytes are passed on as they arrive to
//! a local file (written beside its final name, renamed at the end), stdout, or an S3
//! multipart upload that holds one part in memory and is aborted on any failure.
//!
//! CSV fields are the values as stored: strings as they are, numbers and booleans as
//! their JSON text, null (and the empty string) as an empty field. A row whose content
//! is missing from `dsa_core.rows` stops the export with an error naming it, rather than
//! leaving a shorter file.

use std::path::{Path, PathBuf};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;

use super::resolve::{resolve, Commit, Dataset};
use super::{ChannelWriter, ExportArgs, ExportFormat, HistoryError};
use crate::config::Settings;

/// The size of one multipart part: what an S3 export holds in memory. S3 wants at
/// least 5 MiB for every part but the last.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Where an export goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
    S3 { bucket: String, key: String },
}

impl Destination {
    pub fn parse(text: Option<&str>) -> Result<Self, HistoryError> {
        let Some(text) = text else {
            return Ok(Self::Stdout);
        };
        if text == "-" {
            return Ok(Self::Stdout);
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() || key.is_empty() {
                return Err(HistoryError::Usage(format!(
                    "{text:?} is not s3://BUCKET/KEY"
                )));
            }
            return Ok(Self::S3 {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            });
        }
        Ok(Self::File(PathBuf::from(text)))
    }

    /// A directory or prefix, which receives one file per sheet.
    fn is_folder(&self) -> bool {
        match self {
            Self::Stdout => false,
            Self::File(path) => path.to_string_lossy().ends_with('/') || path.is_dir(),
            Self::S3 { key, .. } => key.ends_with('/'),
        }
    }

    fn join(&self, name: &str) -> Self {
        match self {
            Self::Stdout => Self::Stdout,
            Self::File(path) => Self::File(path.join(name)),
            Self::S3 { bucket, key } => Self::S3 {
                bucket: bucket.clone(),
                key: format!("{key}{name}"),
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Stdout => "stdout".to_owned(),
            Self::File(path) => path.display().to_string(),
            Self::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExportSummary {
    pub commit_id: String,
    pub format: &'static str,
    pub files: Vec<ExportedFile>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExportedFile {
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sheet: Option<String>,
    pub bytes: u64,
}

/// What to export and how.
pub struct ExportRequest<'a> {
    pub commit: &'a Commit,
    pub format: ExportFormat,
    pub sheet: Option<&'a str>,
    pub safe_formulas: bool,
    pub destination: Destination,
}

/// Exports a commit; `s3` is needed only for an s3:// destination.
pub async fn export(
    pool: &PgPool,
    s3: Option<&aws_sdk_s3::Client>,
    request: ExportRequest<'_>,
) -> Result<ExportSummary, HistoryError> {
    let commit = request.commit;
    let sheets = commit.sheets();
    let mut summary = ExportSummary {
        commit_id: commit.commit_id.clone(),
        format: match request.format {
            ExportFormat::Csv => "csv",
            ExportFormat::Jsonl => "jsonl",
        },
        files: Vec::new(),
    };
    check_sheet(commit, &sheets, request.sheet)?;
    // One file per sheet: CSV of a spreadsheet commit with several sheets.
    let per_sheet: Vec<Option<&str>> = match (request.format, request.sheet) {
        (_, Some(sheet)) => vec![Some(sheet)],
        (ExportFormat::Csv, None) if sheets.len() > 1 => {
            if !request.destination.is_folder() {
                return Err(HistoryError::Usage(format!(
                    "commit {} has {} sheets ({}): give --sheet NAME, or --output DIR/ \
                     (or s3://BUCKET/PREFIX/) for one {{sheet}}.csv per sheet",
                    commit.commit_id,
                    sheets.len(),
                    sheets.join(", ")
                )));
            }
            sheets.iter().map(|sheet| Some(sheet.as_str())).collect()
        }
        (ExportFormat::Csv, None) => vec![sheets.first().map(String::as_str)],
        (ExportFormat::Jsonl, None) => vec![None],
    };
    for sheet in per_sheet {
        let destination = match (sheet, request.destination.is_folder()) {
            (Some(sheet), true) => request.destination.join(&file_name(sheet)?),
            (None, true) => request.destination.join(&file_name(&csv_sheet(commit))?),
            _ => request.destination.clone(),
        };
        let statement = match request.format {
            ExportFormat::Csv => csv_statement(commit, &sheets, sheet, request.safe_formulas)?,
            ExportFormat::Jsonl => jsonl_statement(commit, &sheets, sheet),
        };
        let header = match request.format {
            ExportFormat::Csv => csv_header(commit, sheet, request.safe_formulas)?,
            ExportFormat::Jsonl => Vec::new(),
        };
        let mut sink = Sink::open(&destination, s3).await?;
        let result = copy_into(pool, &statement, header, &mut sink).await;
        let bytes = match result {
            Ok(()) => sink.finish().await?,
            Err(error) => {
                sink.abort().await;
                return Err(error);
            }
        };
        summary.files.push(ExportedFile {
            destination: destination.describe(),
            sheet: sheet.map(str::to_owned),
            bytes,
        });
    }
    Ok(summary)
}

/// `sheet`, when given, must be one of the commit's.
fn check_sheet(
    commit: &Commit,
    sheets: &[String],
    sheet: Option<&str>,
) -> Result<(), HistoryError> {
    if let Some(sheet) = sheet {
        if !sheets.iter().any(|name| name == sheet) {
            return Err(HistoryError::Usage(format!(
                "commit {} has no sheet {sheet:?} (its sheets: {})",
                commit.commit_id,
                if sheets.is_empty() {
                    "none, it is a CSV import".to_owned()
                } else {
                    sheets.join(", ")
                }
            )));
        }
    }
    Ok(())
}

/// Exports a commit as one file into `writer` (an HTTP response): CSV of one sheet,
/// or JSON Lines of every row. A CSV of a commit with several sheets needs `sheet`.
/// Returns the number of bytes written.
pub async fn export_into(
    pool: &PgPool,
    commit: &Commit,
    format: ExportFormat,
    sheet: Option<&str>,
    safe_formulas: bool,
    writer: ChannelWriter,
) -> Result<u64, HistoryError> {
    let sheets = commit.sheets();
    check_sheet(commit, &sheets, sheet)?;
    let sheet = match (format, sheet) {
        (ExportFormat::Csv, None) if sheets.len() > 1 => {
            return Err(HistoryError::Usage(format!(
                "commit {} has {} sheets ({}): give sheet=NAME for one of them as CSV, \
                 or ask for format=jsonl",
                commit.commit_id,
                sheets.len(),
                sheets.join(", ")
            )))
        }
        (ExportFormat::Csv, None) => sheets.first().map(String::as_str),
        (_, sheet) => sheet,
    };
    let (statement, header) = match format {
        ExportFormat::Csv => (
            csv_statement(commit, &sheets, sheet, safe_formulas)?,
            csv_header(commit, sheet, safe_formulas)?,
        ),
        ExportFormat::Jsonl => (jsonl_statement(commit, &sheets, sheet), Vec::new()),
    };
    let mut sink = Sink::Channel(writer);
    copy_into(pool, &statement, header, &mut sink).await?;
    sink.finish().await
}

/// The one sheet of a CSV commit, named as the import named it: the source's base
/// name up to its first dot.
fn csv_sheet(commit: &Commit) -> String {
    let source = commit.source.clone().unwrap_or_default();
    let location = source["key"]
        .as_str()
        .or(source["path"].as_str())
        .unwrap_or("export");
    let file_name = location.rsplit('/').next().unwrap_or(location);
    crate::import::run::sheet_name(file_name)
}

/// A sheet's file name: `{sheet}.csv`, which a re-import turns back into the same ids.
fn file_name(sheet: &str) -> Result<String, HistoryError> {
    if sheet.is_empty() || sheet.contains(['/', '\\', '\0']) || sheet == "." || sheet == ".." {
        return Err(HistoryError::Usage(format!(
            "sheet {sheet:?} cannot be a file name: export it alone with --sheet and --output FILE"
        )));
    }
    Ok(format!("{sheet}.csv"))
}

/// Streams the COPY's bytes into `sink`, after `header`.
async fn copy_into(
    pool: &PgPool,
    statement: &str,
    header: Vec<u8>,
    sink: &mut Sink,
) -> Result<(), HistoryError> {
    let mut conn = pool.acquire().await?;
    // A COPY that is not read to its end leaves the connection unusable; an export
    // that fails midway closes it instead of returning it to the pool.
    conn.close_on_drop();
    let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
    // Literals below are written for standard strings; the sort may use some memory
    // on the server, never here.
    sqlx::query("SET LOCAL standard_conforming_strings = on")
        .execute(&mut *tx)
        .await?;
    sqlx::query(crate::db::SET_SORT_MEMORY)
        .execute(&mut *tx)
        .await?;
    if !header.is_empty() {
        sink.write(Bytes::from(header)).await?;
    }
    let mut stream = tx.copy_out_raw(statement).await?;
    while let Some(chunk) = stream.try_next().await.map_err(missing_row_error)? {
        sink.write(chunk).await?;
    }
    drop(stream);
    tx.commit().await?;
    Ok(())
}

/// The server names a row whose content is missing (see the migration's `missing_row`).
fn missing_row_error(error: sqlx::Error) -> HistoryError {
    if let sqlx::Error::Database(database) = &error {
        if database.code().as_deref() == Some("P0002") {
            return HistoryError::Usage(database.message().to_owned());
        }
    }
    HistoryError::Database(error)
}

/// A SQL string literal (standard_conforming_strings is on for the export's session).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The commit's rows (one sheet's, when `sheet` is given) in logical row order: the
/// `fields` (expressions over the row's content `r.data`), or an error naming the first
/// row whose content is missing.
///
/// The rows of one sheet are sorted by that sheet's short key
/// ([`crate::import::order::sql_order_within_sheet`]). The fields are computed before
/// the sort, so the server sorts their text rather than whole JSON documents (a
/// narrower sort that stays in memory longer). The missing-row
/// check runs after it, row by row as rows are sent: the function it calls is volatile,
/// so the server cannot move it before the sort, and an export streams and fails at the
/// row, not before the first.
fn rows_query(
    commit: &Commit,
    sheets: &[String],
    sheet: Option<&str>,
    fields: &[String],
) -> String {
    let mut filter = format!("cr.commit_id = {}", literal(&commit.commit_id));
    let order = match sheet {
        Some(sheet) => {
            filter += &format!(
                " AND {}",
                commit.sheet_filter("cr.logical_row_id", sheet, sheets)
            );
            commit.order_within_sheet("cr.logical_row_id", sheet)
        }
        None => commit.order_by("cr.logical_row_id", sheets),
    };
    let inner: Vec<String> = fields
        .iter()
        .enumerate()
        .map(|(index, field)| format!("{field} AS f{index}"))
        .collect();
    let mut outer: Vec<String> = (0..fields.len())
        .map(|index| format!("s.f{index}"))
        .collect();
    if let Some(first) = outer.first_mut() {
        *first = "CASE WHEN s.missing \
                  THEN dsa_core.missing_row(s.commit_id, s.logical_row_id, s.row_hash)::text \
                  ELSE s.f0 END"
            .to_owned();
    }
    format!(
        "SELECT {outer}
           FROM (SELECT cr.commit_id, cr.logical_row_id, cr.row_hash,
                        r.row_hash IS NULL AS missing, {inner}
                   FROM dsa_core.commit_rows cr
                   LEFT JOIN dsa_core.rows r ON r.row_hash = cr.row_hash
                  WHERE {filter}
                  ORDER BY {order}) s",
        outer = outer.join(", "),
        inner = inner.join(", "),
    )
}

fn csv_statement(
    commit: &Commit,
    sheets: &[String],
    sheet: Option<&str>,
    safe_formulas: bool,
) -> Result<String, HistoryError> {
    let columns = columns(commit, sheet)?;
    let mut fields: Vec<String> = columns
        .iter()
        .map(|column| {
            let value = format!("nullif(r.data ->> {}, '')", literal(column));
            if safe_formulas {
                // OWASP: a leading =, +, -, @, tab or carriage return starts a formula.
                format!("regexp_replace({value}, '^([=+@\\t\\r-])', '''\\1')")
            } else {
                value
            }
        })
        .collect();
    if fields.is_empty() {
        fields.push("''".to_owned());
    }
    Ok(format!(
        "COPY ({}) TO STDOUT (FORMAT csv)",
        rows_query(commit, sheets, sheet, &fields)
    ))
}

fn jsonl_statement(commit: &Commit, sheets: &[String], sheet: Option<&str>) -> String {
    let line = "'{\"logical_row_id\":' || to_json(cr.logical_row_id::text)::text \
                || ',\"data\":' || r.data::text || '}'"
        .to_owned();
    // CSV format with a quote and delimiter that JSON text never contains (JSON escapes
    // control characters) passes each line through untouched.
    format!(
        "COPY ({}) TO STDOUT (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')",
        rows_query(commit, sheets, sheet, &[line])
    )
}

/// The columns of the commit (or of one of its sheets), in their order.
fn columns(commit: &Commit, sheet: Option<&str>) -> Result<Vec<String>, HistoryError> {
    let source = commit.source.clone().unwrap_or_default();
    let columns = match sheet {
        Some(sheet) if source.get("sheets").is_some() => source["sheets"]
            .as_array()
            .and_then(|sheets| sheets.iter().find(|entry| entry["name"] == sheet))
            .map(|entry| entry["columns"].clone()),
        _ => source.get("columns").cloned(),
    };
    let columns: Option<Vec<String>> = columns.and_then(|columns| {
        columns
            .as_array()?
            .iter()
            .map(|column| column.as_str().map(str::to_owned))
            .collect()
    });
    columns.ok_or_else(|| {
        HistoryError::Usage(format!(
            "commit {} does not record its columns in its source; export it as --format jsonl",
            commit.commit_id
        ))
    })
}

/// The header line, quoted as RFC 4180 says (and as PostgreSQL quotes the rows).
fn csv_header(
    commit: &Commit,
    sheet: Option<&str>,
    safe_formulas: bool,
) -> Result<Vec<u8>, HistoryError> {
    let mut line = Vec::new();
    for (index, column) in columns(commit, sheet)?.iter().enumerate() {
        if index > 0 {
            line.push(b',');
        }
        let mut field = column.clone();
        if safe_formulas && field.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            field.insert(0, '\'');
        }
        if field.contains([',', '"', '\n', '\r']) || field.is_empty() {
            line.push(b'"');
            line.extend_from_slice(field.replace('"', "\"\"").as_bytes());
            line.push(b'"');
        } else {
            line.extend_from_slice(field.as_bytes());
        }
    }
    line.push(b'\n');
    Ok(line)
}

/// Where the bytes go: a file written beside its name and renamed when complete,
/// stdout, or an S3 multipart upload.
enum Sink {
    Stdout {
        out: tokio::io::BufWriter<tokio::io::Stdout>,
        bytes: u64,
    },
    File {
        file: tokio::io::BufWriter<tokio::fs::File>,
        partial: PathBuf,
        path: PathBuf,
        bytes: u64,
    },
    S3(MultipartWriter),
    /// An HTTP response's body.
    Channel(ChannelWriter),
}

impl Sink {
    async fn open(
        destination: &Destination,
        s3: Option<&aws_sdk_s3::Client>,
    ) -> Result<Self, HistoryError> {
        Ok(match destination {
            Destination::Stdout => Self::Stdout {
                // The server sends a message per row: unbuffered, each would be a
                // write of its own.
                out: tokio::io::BufWriter::with_capacity(256 * 1024, tokio::io::stdout()),
                bytes: 0,
            },
            Destination::File(path) => {
                let partial = partial_path(path);
                if let Some(parent) = path
                    .parent()
                    .filter(|parent| !parent.as_os_str().is_empty())
                {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(|source| write_error(parent, source))?;
                }
                let file = tokio::fs::File::create(&partial)
                    .await
                    .map_err(|source| write_error(&partial, source))?;
                Self::File {
                    file: tokio::io::BufWriter::with_capacity(256 * 1024, file),
                    partial,
                    path: path.clone(),
                    bytes: 0,
                }
            }
            Destination::S3 { bucket, key } => {
                let s3 = s3.ok_or_else(|| {
                    HistoryError::Usage("an s3:// export needs the S3 settings".to_owned())
                })?;
                Self::S3(MultipartWriter::new(s3.clone(), bucket, key))
            }
        })
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), HistoryError> {
        match self {
            Self::Stdout { out, bytes } => {
                *bytes += chunk.len() as u64;
                out.write_all(&chunk).await.map_err(super::stdout_error)
            }
            Self::File {
                file,
                partial,
                bytes,
                ..
            } => {
                *bytes += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(|source| write_error(partial, source))
            }
            Self::S3(writer) => writer.write(&chunk).await,
            Self::Channel(writer) => writer.write(&chunk).await,
        }
    }

    /// Completes the output; returns its size in bytes.
    async fn finish(self) -> Result<u64, HistoryError> {
        match self {
            Self::Stdout { mut out, bytes } => {
                out.flush().await.map_err(super::stdout_error)?;
                Ok(bytes)
            }
            Self::File {
                mut file,
                partial,
                path,
                bytes,
            } => {
                let done = async {
                    file.flush().await?;
                    file.get_ref().sync_all().await?;
                    tokio::fs::rename(&partial, &path).await
                };
                if let Err(source) = done.await {
                    let _ = tokio::fs::remove_file(&partial).await;
                    return Err(write_error(&path, source));
                }
                Ok(bytes)
            }
            Self::S3(writer) => writer.finish().await,
            Self::Channel(writer) => writer.finish().await,
        }
    }

    /// Leaves nothing behind: the partial file is removed, the upload aborted.
    async fn abort(self) {
        match self {
            Self::Stdout { .. } | Self::Channel(_) => {}
            Self::File { partial, .. } => {
                let _ = tokio::fs::remove_file(&partial).await;
            }
            Self::S3(writer) => writer.abort().await,
        }
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    path.with_file_name(name)
}

fn write_error(path: &Path, source: std::io::Error) -> HistoryError {
    HistoryError::Write {
        target: path.display().to_string(),
        source,
    }
}

/// A streaming S3 upload: bytes fill one part in memory; a full part is uploaded
/// (the multipart upload starts with the first), and the end completes the upload,
/// or, when everything fit in one part, is a single PutObject. `abort` removes the
/// parts of an unfinished upload, so a failed export leaves neither an object nor an
/// open upload.
pub struct MultipartWriter {
    s3: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    part: Vec<u8>,
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    bytes: u64,
}

impl MultipartWriter {
    pub fn new(s3: aws_sdk_s3::Client, bucket: &str, key: &str) -> Self {
        Self {
            s3,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            part: Vec::with_capacity(PART_SIZE),
            upload_id: None,
            parts: Vec::new(),
            bytes: 0,
        }
    }

    fn error(&self, action: &'static str, message: String) -> HistoryError {
        HistoryError::S3 {
            action,
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            message,
        }
    }

    pub async fn write(&mut self, mut chunk: &[u8]) -> Result<(), HistoryError> {
        self.bytes += chunk.len() as u64;
        while !chunk.is_empty() {
            let room = PART_SIZE - self.part.len();
            let take = room.min(chunk.len());
            self.part.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.part.len() == PART_SIZE {
                self.upload_part().await?;
            }
        }
        Ok(())
    }

    async fn upload_part(&mut self) -> Result<(), HistoryError> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let created = self
                    .s3
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .send()
                    .await
                    .map_err(|error| {
                        self.error(
                            "starting the multipart upload",
                            DisplayErrorContext(&error).to_string(),
                        )
                    })?;
                let id = created
                    .upload_id()
                    .ok_or_else(|| {
                        self.error("starting the multipart upload", "no upload id".to_owned())
                    })?
                    .to_owned();
                self.upload_id = Some(id.clone());
                id
            }
        };
        let part_number = self.parts.len() as i32 + 1;
        let body = Bytes::from(std::mem::replace(
            &mut self.part,
            Vec::with_capacity(PART_SIZE),
        ));
        let uploaded = self
            .s3
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .part_number(part_number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|error| {
                self.error("uploading a part", DisplayErrorContext(&error).to_string())
            })?;
        let e_tag = uploaded.e_tag().ok_or_else(|| {
            self.error(
                "uploading a part",
                format!("no ETag for part {part_number}"),
            )
        })?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(part_number)
                .e_tag(e_tag)
                .build(),
        );
        tracing::debug!(part = part_number, key = %self.key, "uploaded part");
        Ok(())
    }

    /// Completes the upload; returns the object's size. Fails (and aborts) as `write`.
    pub async fn finish(mut self) -> Result<u64, HistoryError> {
        let result = self.complete().await;
        if result.is_err() {
            self.abort().await;
        }
        result
    }

    async fn complete(&mut self) -> Result<u64, HistoryError> {
        if self.upload_id.is_none() {
            let body = Bytes::from(std::mem::take(&mut self.part));
            self.s3
                .put_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|error| {
                    self.error(
                        "uploading the object",
                        DisplayErrorContext(&error).to_string(),
                    )
                })?;
            return Ok(self.bytes);
        }
        if !self.part.is_empty() {
            self.upload_part().await?;
        }
        let upload_id = self.upload_id.clone().expect("started");
        self.s3
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.parts)))
                    .build(),
            )
            .send()
            .await
            .map_err(|error| {
                self.error(
                    "completing the multipart upload",
                    DisplayErrorContext(&error).to_string(),
                )
            })?;
        Ok(self.bytes)
    }

    /// Aborts the multipart upload, if one was started; its parts are then gone.
    pub async fn abort(self) {
        let Some(upload_id) = self.upload_id else {
            return;
        };
        if let Err(error) = self
            .s3
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .send()
            .await
        {
            tracing::warn!(
                bucket = %self.bucket,
                key = %self.key,
                upload_id = %upload_id,
                error = %DisplayErrorContext(&error),
                "could not abort the multipart upload; a bucket lifecycle rule or \
                 `AbortMultipartUpload` with this id removes its parts"
            );
        }
    }
}

pub async fn command(
    pool: &PgPool,
    settings: &Settings,
    args: ExportArgs,
) -> Result<(), HistoryError> {
    let dataset = Dataset::find(pool, &args.dataset).await?;
    let commit = resolve(pool, &dataset, args.commit.as_deref().unwrap_or("main")).await?;
    let destination = Destination::parse(args.output.as_deref())?;
    let s3 = match destination {
        Destination::S3 { .. } => Some(crate::s3::client(&settings.s3).await),
        _ => None,
    };
    let to_stdout = destination == Destination::Stdout;
    let summary = export(
        pool,
        s3.as_ref(),
        ExportRequest {
            commit: &commit,
            format: args.format,
            sheet: args.sheet.as_deref(),
            safe_formulas: args.safe_formulas,
            destination,
        },
    )
    .await?;
    // On stdout the export itself is the output; the summary would corrupt it.
    if args.json && !to_stdout {
        println!(
            "{}",
            serde_json::to_string(&summary).expect("summary serializes")
        );
    } else if !to_stdout {
        for file in &summary.files {
            println!(
                "exported commit {} to {} ({} bytes)",
                summary.commit_id, file.destination, file.bytes
            );
        }
    }
    Ok(())
}
