//! Stage `load`: one batch, one transaction: COPY the batch into a session-local staging
//! table, insert the rows not stored yet, write the batch's commit_rows, and move the
//! run's checkpoint, all under the run's lease token.
//!
//! Because data and checkpoint commit together, a crash loses at most the batch in flight
//! and a resumed run never loads a row twice.

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::{Acquire, PgPool, Postgres};
use thiserror::Error;

use crate::claim::{Checkpoint, Lease};
use crate::decode::RowProblem;
use crate::hash::RowHash;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("run {run_id} was taken over by another worker (lease token {token} is stale)")]
    LeaseLost { run_id: uuid::Uuid, token: i64 },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A row the run chose to skip, kept for a person to look at.
#[derive(Clone, Debug)]
pub struct RejectedRow {
    pub line: u64,
    pub byte: u64,
    pub problem: RowProblem,
    pub raw: Vec<u8>,
}

/// Rows of one batch in COPY text format, ready to send, plus what the batch moves the
/// checkpoint to.
pub struct Batch {
    /// `logical_row_id \t \\x<row_hash hex> \t <canonical JSON>` lines.
    pub copy_data: Vec<u8>,
    pub rows: u64,
    pub rejected: Vec<RejectedRow>,
    /// The checkpoint once this batch is durable, except `new_rows`, which holds the
    /// count before this batch: only the load learns how many of its rows were new.
    pub checkpoint: Checkpoint,
    /// Time spent decoding and hashing this batch (CPU, off the executor).
    pub encode_duration: Duration,
}

/// Appends rows to a batch's COPY buffer.
pub struct BatchWriter {
    /// `sheet:` escaped for COPY text once, since every row repeats it.
    sheet_prefix: Vec<u8>,
    copy_data: Vec<u8>,
    rows: u64,
}

impl BatchWriter {
    pub fn new(sheet: &str, capacity: usize) -> Self {
        let mut sheet_prefix = Vec::with_capacity(sheet.len() + 1);
        push_copy_escaped(sheet.as_bytes(), &mut sheet_prefix);
        sheet_prefix.push(b':');
        Self {
            sheet_prefix,
            copy_data: Vec::with_capacity(capacity),
            rows: 0,
        }
    }

    /// Adds row `n` of the sheet. `canonical_json` comes from the encoder, which escapes
    /// every control character, so only backslashes need doubling for COPY text.
    pub fn push(&mut self, n: u64, row_hash: &RowHash, canonical_json: &[u8]) {
        let out = &mut self.copy_data;
        out.extend_from_slice(&self.sheet_prefix);
        push_decimal(n, out);
        out.extend_from_slice(b"\t\\\\x");
        let mut hex = [0u8; 64];
        hex::encode_to_slice(row_hash, &mut hex).expect("64 bytes hold a 32-byte hash");
        out.extend_from_slice(&hex);
        out.push(b'\t');
        push_copy_escaped(canonical_json, out);
        out.push(b'\n');
        self.rows += 1;
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.copy_data.len()
    }

    pub fn into_copy_data(self) -> Vec<u8> {
        self.copy_data
    }
}

/// Writes `n` in decimal without allocating; called once per row.
fn push_decimal(mut n: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Escapes bytes for PostgreSQL's COPY text format.
fn push_copy_escaped(bytes: &[u8], out: &mut Vec<u8>) {
    let mut run_start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escaped: &[u8] = match byte {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run_start..index]);
        out.extend_from_slice(escaped);
        run_start = index + 1;
    }
    out.extend_from_slice(&bytes[run_start..]);
}

/// Bytes-based progress, as people and dashboards read it from `analysis_runs.progress`.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub bytes_processed: u64,
    pub total_bytes: u64,
    pub percentage: f64,
    pub rows_processed: u64,
    pub rows_per_second: f64,
    pub status: String,
}

impl Progress {
    pub fn new(
        checkpoint: &Checkpoint,
        total_bytes: u64,
        rows_this_attempt: u64,
        elapsed: Duration,
    ) -> Self {
        let percentage = if total_bytes == 0 {
            100.0
        } else {
            (checkpoint.byte_offset as f64 / total_bytes as f64 * 10_000.0).round() / 100.0
        };
        let rows_per_second = if elapsed.as_secs_f64() > 0.0 {
            (rows_this_attempt as f64 / elapsed.as_secs_f64()).round()
        } else {
            0.0
        };
        Self {
            bytes_processed: checkpoint.byte_offset,
            total_bytes,
            percentage,
            rows_processed: checkpoint.records,
            rows_per_second,
            status: format!(
                "Processing: {percentage:.1}% ({} rows, {} bytes of {})",
                checkpoint.records, checkpoint.byte_offset, total_bytes
            ),
        }
    }
}

/// What one batch did, for the summary and the logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchOutcome {
    pub new_rows: u64,
    pub copy_duration: Duration,
    pub insert_duration: Duration,
    pub commit_rows_duration: Duration,
    pub commit_duration: Duration,
}

/// Holds one connection for the whole import, with its staging table.
pub struct Loader {
    conn: PoolConnection<Postgres>,
    lease: Lease,
    /// Whether the next batch is expected to be mostly rows not stored yet, which picks
    /// the cheaper of the two ways to insert them.
    expect_new_rows: bool,
}

impl Loader {
    pub async fn new(pool: &PgPool, lease: Lease) -> Result<Self, LoadError> {
        let mut conn = pool.acquire().await?;
        // A temporary table is private to this session, so concurrent imports never see
        // each other's batches; ON COMMIT DELETE ROWS empties it after every batch.
        // The data column stays text: only rows that are new get parsed into jsonb.
        sqlx::query(
            "CREATE TEMPORARY TABLE IF NOT EXISTS import_batch (
                 logical_row_id text NOT NULL,
                 row_hash bytea NOT NULL,
                 data text NOT NULL
             ) ON COMMIT DELETE ROWS",
        )
        .execute(&mut *conn)
        .await?;
        Ok(Self {
            conn,
            lease,
            expect_new_rows: false,
        })
    }

    /// Loads one batch and moves the checkpoint, atomically.
    pub async fn load(
        &mut self,
        batch: &Batch,
        progress: Option<&Progress>,
    ) -> Result<BatchOutcome, LoadError> {
        let mut outcome = BatchOutcome::default();
        let mut tx = self.conn.begin().await?;
        // A batch is safe without waiting for its WAL flush: data and checkpoint commit
        // together, so a batch lost in a crash is simply read again on resume. Only the
        // finalising transaction, which tells the world, waits for durability.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        // The look-up of a batch's hashes must probe the rows index once per row. The
        // statistics of a table that grows by a batch at a time lag behind it, and with
        // them the planner picks merge or hash anti-joins that read the whole table for
        // every batch, making an import quadratic; these two settings rule those out.
        sqlx::query("SET LOCAL enable_mergejoin = off")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SET LOCAL enable_hashjoin = off")
            .execute(&mut *tx)
            .await?;
        let commit_id = &batch.checkpoint.commit_id;

        if batch.rows > 0 {
            let started = Instant::now();
            let mut copy = tx
                .copy_in_raw("COPY import_batch (logical_row_id, row_hash, data) FROM STDIN")
                .await?;
            copy.send(batch.copy_data.as_slice()).await?;
            copy.finish().await?;
            outcome.copy_duration = started.elapsed();

            // Sorted inserts make two imports of overlapping rows take index locks in
            // the same order, so they wait for each other instead of deadlocking.
            let started = Instant::now();
            let statement = if self.expect_new_rows {
                // Mostly new rows: parse every row and let the primary key turn away the
                // few already stored.
                "INSERT INTO dsa_core.rows (row_hash, data)
                 SELECT DISTINCT ON (row_hash) row_hash, data::jsonb
                   FROM import_batch ORDER BY row_hash
                 ON CONFLICT (row_hash) DO NOTHING"
            } else {
                // Mostly known rows: filter them out before their text is parsed into
                // jsonb; ON CONFLICT still covers a concurrent import storing a row first.
                "INSERT INTO dsa_core.rows (row_hash, data)
                 SELECT DISTINCT ON (b.row_hash) b.row_hash, b.data::jsonb
                   FROM import_batch b
                  WHERE NOT EXISTS (SELECT 1 FROM dsa_core.rows r WHERE r.row_hash = b.row_hash)
                  ORDER BY b.row_hash
                 ON CONFLICT (row_hash) DO NOTHING"
            };
            outcome.new_rows = sqlx::query(statement)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            // Files are rarely half new, half known; the last batch predicts the next.
            self.expect_new_rows = outcome.new_rows * 2 > batch.rows;
            outcome.insert_duration = started.elapsed();

            let started = Instant::now();
            sqlx::query(
                "INSERT INTO dsa_core.commit_rows (commit_id, logical_row_id, row_hash)
                 SELECT $1, logical_row_id, row_hash FROM import_batch",
            )
            .bind(commit_id)
            .execute(&mut *tx)
            .await?;
            outcome.commit_rows_duration = started.elapsed();
        }

        if !batch.rejected.is_empty() {
            insert_rejected(
                &mut tx,
                self.lease.run_id,
                &batch.checkpoint,
                &batch.rejected,
            )
            .await?;
        }

        // The producer cannot know how many rows were new; that is counted here.
        let mut checkpoint = batch.checkpoint.clone();
        checkpoint.new_rows += outcome.new_rows;
        let started = Instant::now();
        save_checkpoint(&mut tx, &self.lease, &checkpoint, progress).await?;
        tx.commit().await?;
        outcome.commit_duration = started.elapsed();
        Ok(outcome)
    }

    /// Creates the run's commit (unfinalised: `committed_at` stays NULL) together with
    /// the first checkpoint that names it, so a crash never leaves a commit no run knows.
    pub async fn begin_commit(
        &mut self,
        dataset_id: i64,
        message: &str,
        author_id: Option<&str>,
        checkpoint: &Checkpoint,
    ) -> Result<(), LoadError> {
        let mut tx = self.conn.begin().await?;
        sqlx::query(
            "INSERT INTO dsa_core.commits (commit_id, dataset_id, message, author_id, run_id)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&checkpoint.commit_id)
        .bind(dataset_id)
        .bind(message)
        .bind(author_id)
        .bind(self.lease.run_id)
        .execute(&mut *tx)
        .await?;
        save_checkpoint(&mut tx, &self.lease, checkpoint, None).await?;
        tx.commit().await?;
        Ok(())
    }

    pub fn connection(&mut self) -> &mut PoolConnection<Postgres> {
        &mut self.conn
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}

/// Moves the run's checkpoint (and progress, when given) and renews the lease, but only
/// while the lease token is still ours; otherwise the whole transaction is abandoned.
pub async fn save_checkpoint(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    lease: &Lease,
    checkpoint: &Checkpoint,
    progress: Option<&Progress>,
) -> Result<(), LoadError> {
    let updated = sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET checkpoint = $3,
                progress = coalesce($4, progress),
                lease_expires_at = now() + make_interval(secs => $5)
          WHERE id = $1 AND lease_token = $2 AND status = 'running'",
    )
    .bind(lease.run_id)
    .bind(lease.token)
    .bind(sqlx::types::Json(checkpoint))
    .bind(progress.map(sqlx::types::Json))
    .bind(lease.duration.as_secs_f64())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if updated != 1 {
        return Err(LoadError::LeaseLost {
            run_id: lease.run_id,
            token: lease.token,
        });
    }
    Ok(())
}

async fn insert_rejected(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    run_id: uuid::Uuid,
    checkpoint: &Checkpoint,
    rejected: &[RejectedRow],
) -> Result<(), sqlx::Error> {
    let lines: Vec<i64> = rejected.iter().map(|row| row.line as i64).collect();
    let bytes: Vec<i64> = rejected.iter().map(|row| row.byte as i64).collect();
    let columns: Vec<Option<i32>> = rejected
        .iter()
        .map(|row| row.problem.column().map(|column| column as i32))
        .collect();
    let errors: Vec<String> = rejected.iter().map(|row| row.problem.to_string()).collect();
    let raws: Vec<Vec<u8>> = rejected.iter().map(|row| row.raw.clone()).collect();
    sqlx::query(
        "INSERT INTO dsa_jobs.rejected_rows (run_id, sheet, line, byte_offset, \"column\", error, raw)
         SELECT $1, $2, * FROM unnest($3::bigint[], $4::bigint[], $5::int[], $6::text[], $7::bytea[])",
    )
    .bind(run_id)
    .bind(&checkpoint.sheet)
    .bind(lines)
    .bind(bytes)
    .bind(columns)
    .bind(errors)
    .bind(raws)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_escape_the_sheet_and_backslashes() {
        let mut writer = BatchWriter::new("my\tsheet", 0);
        writer.push(7, &[0xab; 32], br#"{"a":"x\ny\\"}"#);
        let line = String::from_utf8(writer.into_copy_data()).unwrap();
        assert_eq!(
            line,
            format!(
                "my\\tsheet:7\t\\\\x{}\t{{\"a\":\"x\\\\ny\\\\\\\\\"}}\n",
                "ab".repeat(32)
            )
        );
    }
}
