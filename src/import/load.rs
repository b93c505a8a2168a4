//! Stage `load`: one batch, one transaction: store the rows not stored yet, write the
//! batch's commit_rows, and move the run's checkpoint, all under the run's lease token.
//! A batch's rows are stored while the batch before it commits, on another connection,
//! and batches commit in order.
//!
//! Because data and checkpoint commit together, a crash loses at most the batches in
//! flight and a resumed run never loads a row twice.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Acquire, PgPool, Postgres, Transaction};
use thiserror::Error;

use crate::import::decode::RowProblem;
use crate::import::hash::RowHash;
use crate::import::run::{Checkpoint, Lease, Progress};

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("run {run_id} was taken over by another worker (lease token {token} is stale)")]
    LeaseLost { run_id: uuid::Uuid, token: i64 },
    /// A keyed row the version cannot take (its key is there already).
    #[error("sheet {sheet:?}, line {line}: {problem}")]
    BadRow {
        sheet: String,
        line: u64,
        problem: RowProblem,
    },
    #[error(
        "run {run_id}: gc removed rows this batch relies on without storing them (found \
         stored a moment before, or stored by a batch just ahead); the batch is read again"
    )]
    RowsCollected { run_id: uuid::Uuid },
    /// With several batches storing at once, a batch waited too long for rows (or
    /// entries) another transaction holds (see [`Loader::bound_row_waits`]).
    #[error(
        "run {run_id}: a batch waited more than {} ms for rows another import is storing \
         (or for entries of this run another worker is writing); with several batches \
         storing at once two imports of overlapping rows can wait for each other, so \
         this one stepped back (a consumer retries it from its checkpoint; with \
         IMPORT_STAGING_BATCHES=1 imports never wait this way)",
        waited.as_millis()
    )]
    RowsHeld {
        run_id: uuid::Uuid,
        waited: Duration,
    },
    /// With several batches storing at once, a batch waited too long for a lock on a
    /// whole table it writes, which another session holds.
    #[error(
        "run {run_id}: a batch waited more than {} ms for a lock on a table it writes, \
         which another session holds (a schema change, VACUUM FULL, REINDEX or LOCK \
         TABLE; see pg_locks); the import stepped back (a consumer retries it from its \
         checkpoint)",
        waited.as_millis()
    )]
    TableLocked {
        run_id: uuid::Uuid,
        waited: Duration,
    },
    /// The run's checkpoint is older than the one this import last wrote: a batch
    /// committed without waiting for its flush was lost (see [`save_checkpoint`]).
    #[error(
        "run {run_id}: the database holds the checkpoint of batch {found}, not of batch \
         {expected} that this import committed last: a batch committed without waiting \
         for its flush was lost, most likely in a database crash; the run is retried \
         from the checkpoint the database kept"
    )]
    CheckpointLost {
        run_id: uuid::Uuid,
        expected: u64,
        found: u64,
    },
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

/// One batch, encoded for COPY, plus what the batch moves the checkpoint to.
pub struct Batch {
    pub rows: RowsCopy,
    pub rejected: Vec<RejectedRow>,
    /// The checkpoint once this batch is durable, except `new_rows`, which holds the
    /// count before this batch: only the load learns how many of its rows were new.
    pub checkpoint: Checkpoint,
    /// Time spent decoding and hashing this batch (CPU, off the executor).
    pub encode_duration: Duration,
    /// Time spent finding which of its rows are stored already.
    pub lookup_duration: Duration,
}

/// A batch's rows as the tuples of two binary COPY streams: the content for
/// `dsa_core.rows` (only the rows not stored yet are sent) and the snapshot entries for
/// `dsa_core.commit_rows`. Binary rather than text: the hashes travel as their 32
/// bytes instead of 64 hex digits the server decodes, and nothing is escaped.
#[derive(Default)]
pub struct RowsCopy {
    /// `(row_hash bytea, data jsonb)` tuples.
    content: Vec<u8>,
    /// Where each row's tuple in `content` ends, to send a subset of them.
    content_ends: Vec<usize>,
    hashes: Vec<RowHash>,
    /// `(commit_id text, logical_row_id text, row_hash bytea)` tuples.
    commit_rows: Vec<u8>,
    /// Keyed rows: each entry's key and line, in the order of `commit_rows`, to name
    /// the rows whose key an earlier batch had already.
    keyed: Vec<(String, u64)>,
    /// Rows whose content was dropped because the look-up found them stored or a batch
    /// ahead has them: the batch relies on them without storing them (see
    /// [`still_stored`]).
    relied_on: Vec<RowHash>,
    /// The oldest gc generation seen by this batch's look-up and those of the batches
    /// ahead of it: a gc since then may have removed a row in `relied_on`.
    looked_up_at: i64,
}

impl RowsCopy {
    pub fn len(&self) -> u64 {
        self.hashes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty() && self.commit_rows.is_empty()
    }

    /// Rows whose content the look-up dropped: the batch relies on them being stored.
    pub fn relied_on_rows(&self) -> usize {
        self.relied_on.len()
    }

    /// The smallest and the largest logical row id of the batch's entries, in the
    /// primary key's byte order, and how many entries it has; `None` without entries
    /// or when an id is not UTF-8 text.
    fn id_range(&self) -> Option<(&str, &str, usize)> {
        let field = |at: &mut usize| -> Option<&[u8]> {
            let length = self.commit_rows.get(*at..*at + 4)?;
            let length = i32::from_be_bytes(length.try_into().ok()?) as usize;
            let bytes = self.commit_rows.get(*at + 4..*at + 4 + length)?;
            *at += 4 + length;
            Some(bytes)
        };
        let mut range: Option<(&[u8], &[u8])> = None;
        let mut entries = 0;
        let mut at = 0;
        while at < self.commit_rows.len() {
            // Field count, commit id, logical row id, row hash.
            at += 2;
            field(&mut at)?;
            let id = field(&mut at)?;
            field(&mut at)?;
            entries += 1;
            range = Some(match range {
                None => (id, id),
                Some((first, last)) => (first.min(id), last.max(id)),
            });
        }
        let (first, last) = range?;
        Some((
            std::str::from_utf8(first).ok()?,
            std::str::from_utf8(last).ok()?,
            entries,
        ))
    }

    /// Drops the content lines of rows `known` says are stored, keeping the others in
    /// order; the commit_rows entries of all rows stay. Returns the dropped rows' hashes.
    fn drop_content_of(&mut self, known: impl Fn(&RowHash) -> bool) -> Vec<RowHash> {
        let mut dropped = Vec::new();
        let mut kept = 0;
        let mut start = 0;
        for (hash, &end) in self.hashes.iter().zip(&self.content_ends) {
            if known(hash) {
                dropped.push(*hash);
            } else {
                self.content.copy_within(start..end, kept);
                kept += end - start;
            }
            start = end;
        }
        self.content.truncate(kept);
        // What was dropped is given back now rather than when the batch is stored, which
        // may be a while when the batches before it are busy: a re-import's batches
        // would otherwise each hold their whole content for nothing.
        if self.content.capacity() > 2 * kept {
            self.content.shrink_to_fit();
        }
        self.content_ends.clear();
        dropped
    }
}

/// Appends rows to a batch's COPY streams.
pub struct BatchWriter {
    /// What every entry starts with: its field count and the commit id field.
    entry_prefix: Vec<u8>,
    /// `sheet:`, which every logical row id starts with.
    sheet_prefix: Vec<u8>,
    copy: RowsCopy,
}

impl BatchWriter {
    pub fn new(commit_id: &str, sheet: &str, rows: usize) -> Self {
        let mut entry_prefix = Vec::with_capacity(commit_id.len() + 6);
        entry_prefix.extend_from_slice(&3i16.to_be_bytes());
        push_field(commit_id.as_bytes(), &mut entry_prefix);
        let sheet_prefix = [sheet.as_bytes(), b":"].concat();
        Self {
            copy: RowsCopy {
                content: Vec::with_capacity(rows * 192),
                content_ends: Vec::with_capacity(rows),
                hashes: Vec::with_capacity(rows),
                commit_rows: Vec::with_capacity(
                    rows * (entry_prefix.len() + sheet_prefix.len() + 56),
                ),
                ..RowsCopy::default()
            },
            entry_prefix,
            sheet_prefix,
        }
    }

    /// Adds row `n` of the sheet.
    pub fn push(&mut self, n: u64, row_hash: &RowHash, canonical_json: &[u8]) {
        self.push_content(row_hash, canonical_json);
        self.push_entry(row_hash, |entries| push_decimal(n, entries));
    }

    /// Adds a keyed row: its id is `{sheet}:{key}`; `line` names it in errors.
    pub fn push_keyed(&mut self, key: &str, line: u64, row_hash: &RowHash, canonical_json: &[u8]) {
        self.push_content(row_hash, canonical_json);
        self.push_entry(row_hash, |entries| {
            entries.extend_from_slice(key.as_bytes())
        });
        self.copy.keyed.push((key.to_owned(), line));
    }

    /// Adds a deletion: an entry whose hash is all zeros, which no row has, and no
    /// content. Finalise removes the key from the new version and then the entry.
    pub fn push_tombstone(&mut self, key: &str, line: u64) {
        self.push_entry(&TOMBSTONE, |entries| {
            entries.extend_from_slice(key.as_bytes())
        });
        self.copy.keyed.push((key.to_owned(), line));
        self.copy.hashes.push(TOMBSTONE);
    }

    /// `(row_hash, data)` for `dsa_core.rows`; jsonb's binary form is a version byte
    /// (1) and the JSON text.
    fn push_content(&mut self, row_hash: &RowHash, canonical_json: &[u8]) {
        let content = &mut self.copy.content;
        content.extend_from_slice(&2i16.to_be_bytes());
        push_field(row_hash, content);
        content.extend_from_slice(&(canonical_json.len() as i32 + 1).to_be_bytes());
        content.push(JSONB_VERSION);
        content.extend_from_slice(canonical_json);
        self.copy.content_ends.push(content.len());
        self.copy.hashes.push(*row_hash);
    }

    /// `(commit_id, sheet:<id>, row_hash)` for `dsa_core.commit_rows`; `write_id`
    /// writes what follows the sheet's colon.
    fn push_entry(&mut self, row_hash: &RowHash, write_id: impl FnOnce(&mut Vec<u8>)) {
        let entries = &mut self.copy.commit_rows;
        entries.extend_from_slice(&self.entry_prefix);
        // The id's length goes before it and is known once it is written.
        let length_at = entries.len();
        entries.extend_from_slice(&[0; 4]);
        entries.extend_from_slice(&self.sheet_prefix);
        write_id(entries);
        let length = (entries.len() - length_at - 4) as i32;
        entries[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
        push_field(row_hash, entries);
    }

    pub fn rows(&self) -> u64 {
        self.copy.len()
    }

    /// The batch's streams, with the content lines in row-hash order and each hash once:
    /// the insert sorts
    /// by hash (see [`store_new_rows`]) and PostgreSQL's sort returns at once on input that
    /// is already in order, so the sorting is done here, off the database's core.
    pub fn finish(self) -> RowsCopy {
        let RowsCopy {
            content,
            content_ends,
            mut hashes,
            commit_rows,
            keyed,
            ..
        } = self.copy;
        // Deletions have no content.
        hashes.retain(|hash| *hash != TOMBSTONE);
        let mut order: Vec<usize> = (0..hashes.len()).collect();
        order.sort_unstable_by_key(|&index| hashes[index]);
        let mut sorted = RowsCopy {
            content: Vec::with_capacity(content.len()),
            content_ends: Vec::with_capacity(content_ends.len()),
            hashes: Vec::with_capacity(hashes.len()),
            commit_rows,
            keyed,
            ..RowsCopy::default()
        };
        let mut previous: Option<RowHash> = None;
        for index in order {
            // A row repeated within the batch is sent once (its commit_rows entries all
            // stay), so the COPY into dsa_core.rows never meets its own duplicate.
            if previous == Some(hashes[index]) {
                continue;
            }
            previous = Some(hashes[index]);
            let start = if index == 0 {
                0
            } else {
                content_ends[index - 1]
            };
            sorted
                .content
                .extend_from_slice(&content[start..content_ends[index]]);
            sorted.content_ends.push(sorted.content.len());
            sorted.hashes.push(hashes[index]);
        }
        sorted
    }
}

/// The row hash of a deletion entry in an unfinished commit (see
/// [`BatchWriter::push_tombstone`]); sha256 never gives it for any row.
pub const TOMBSTONE: RowHash = [0u8; 32];

/// What a binary COPY stream starts with: the signature, no flags, no header extension.
const COPY_BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// What it ends with: a field count of -1.
const COPY_BINARY_TRAILER: &[u8] = &[0xff, 0xff];
/// The version byte that starts jsonb's binary form.
const JSONB_VERSION: u8 = 1;

/// Writes one field of a binary COPY tuple: its length, then its bytes.
fn push_field(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The most bytes one COPY message carries. sqlx writes a message whole into the
/// connection's write buffer, which keeps its largest size for the connection's life:
/// a batch sent as one message would leave every pooled connection holding a buffer
/// the size of a batch.
const COPY_MESSAGE_BYTES: usize = 64 * 1024;

/// Sends `tuples` as one binary COPY stream on a COPY started with `FORMAT binary`.
async fn send_binary(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    statement: &str,
    tuples: &[u8],
) -> Result<u64, sqlx::Error> {
    let mut copy = tx.copy_in_raw(statement).await?;
    copy.send(COPY_BINARY_HEADER).await?;
    for message in tuples.chunks(COPY_MESSAGE_BYTES) {
        copy.send(message).await?;
    }
    copy.send(COPY_BINARY_TRAILER).await?;
    copy.finish().await
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

/// What one batch did, for the summary and the logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchOutcome {
    pub new_rows: u64,
    /// Keyed rows left out because an earlier batch had their key (rejected).
    pub repeated_rows: u64,
    /// Storing the rows the look-up did not find (see [`store_new_rows`]).
    pub insert_duration: Duration,
    /// COPY of the batch's entries into `dsa_core.commit_rows`.
    pub commit_rows_duration: Duration,
    /// Checkpoint update and COMMIT.
    pub commit_duration: Duration,
}

/// The longest a batch waits for rows another transaction holds when several batches
/// of its import store at once (see [`Loader::bound_row_waits`]). Rows are held from
/// a batch's COPY to its COMMIT, normally well under a second.
pub const ROW_WAIT_LIMIT: Duration = Duration::from_secs(30);

/// A batch's transaction, begun and holding gc's fence, before its rows are stored
/// ([`Loader::open`]).
pub struct Opened {
    tx: Transaction<'static, Postgres>,
    started: Instant,
}

/// A batch whose rows (and positional entries) [`Loader::stage`] has stored in the
/// batch's open transaction; [`Loader::commit`] writes its keyed entries and
/// checkpoint and commits it.
pub struct Staged {
    tx: Transaction<'static, Postgres>,
    started: Instant,
    outcome: BatchOutcome,
}

/// Writes an import's batches, each in one transaction on a pooled connection of its
/// own, so that batches can store their rows while the batch before them commits (see
/// [`Loader::stage`]).
pub struct Loader {
    pool: PgPool,
    lease: Lease,
    /// Whether a row whose key an earlier batch had is rejected rather than failing
    /// the import.
    skip_bad_rows: bool,
    /// `append` with `on_conflict fail`: the parent commit, whose keys a batch must not
    /// have (checked per batch, so the error names the row's line).
    refuse_keys_of: Option<String>,
    /// How long a batch may wait for rows another transaction holds, when bounded
    /// (see [`Loader::bound_row_waits`]).
    row_wait_limit: Option<Duration>,
}

impl Loader {
    pub fn new(pool: &PgPool, lease: Lease) -> Self {
        Self {
            pool: pool.clone(),
            lease,
            skip_bad_rows: false,
            refuse_keys_of: None,
            row_wait_limit: None,
        }
    }

    /// For an import whose batches store their rows several at once: a batch that
    /// waits longer than `limit` ([`ROW_WAIT_LIMIT`]) for a row another transaction is
    /// storing fails with [`LoadError::RowsHeld`], a transient error.
    ///
    /// A batch waits for such a row until the other transaction ends. With one batch
    /// storing at a time that wait always ends: the batch waited for is storing or
    /// committing, and commits wait on no other import. With several, a later batch of
    /// this import may hold rows while an earlier one waits for another import's later
    /// batch, and that import's earlier batch for this one's rows: each later batch
    /// commits only after its earlier one, a cycle PostgreSQL cannot see. The limit
    /// breaks it: the import that steps back fails with a transient error, which a
    /// consumer retries from the run's checkpoint.
    pub fn bound_row_waits(mut self, limit: Option<Duration>) -> Self {
        self.row_wait_limit = limit;
        self
    }

    /// A keyed row whose key `parent` has already fails the import, naming its line
    /// (with `skip_bad_rows`, finalise leaves such rows out instead).
    pub fn refuse_keys_of(&mut self, parent: Option<String>) {
        self.refuse_keys_of = parent;
    }

    /// Rows whose key an earlier batch had are rejected instead of failing the import.
    pub fn skip_bad_rows(mut self, skip: bool) -> Self {
        self.skip_bad_rows = skip;
        self
    }

    /// The first half of a batch: begins its transaction, stores the rows the look-up
    /// did not find (then frees their content) and, for a positional batch, writes its
    /// `commit_rows` entries. Nothing is visible to others until [`Loader::commit`].
    ///
    /// A batch may be staged while the batch before it commits and other batches
    /// stage, each on its own connection: the rows it stores are never the ones those
    /// batches store (the look-up drops them, see [`Lookup`]), the only entries it
    /// writes have line numbers for ids, which no other batch of the import has, and it
    /// does not touch the run's row, so they never wait for one another. Its commit
    /// must wait for theirs.
    pub async fn stage(&self, batch: &mut Batch) -> Result<Staged, LoadError> {
        let opened = self.open(batch).await?;
        self.store(opened, batch).await
    }

    /// The start of [`Loader::stage`]: begins the batch's transaction and takes gc's
    /// fence. Batches that store their rows at once are opened one after another in
    /// file order, so that a gc waiting for the fence never sits between two of them
    /// (the later one holding the fence, the earlier one queued behind gc).
    pub async fn open(&self, batch: &Batch) -> Result<Opened, LoadError> {
        let opened = self.open_batch(batch).await;
        self.blame_lease(opened).await
    }

    /// The rest of [`Loader::stage`]: stores the rows the look-up did not find (then
    /// frees their content) and a positional batch's entries.
    pub async fn store(&self, opened: Opened, batch: &mut Batch) -> Result<Staged, LoadError> {
        let staged = self.store_batch(opened, &mut batch.rows).await;
        self.blame_lease(staged).await
    }

    /// The second half: a keyed batch's `commit_rows` entries (a key may repeat one of
    /// an earlier batch, which must have committed first), its rejected rows and the
    /// run's checkpoint (`batch.checkpoint`, which the caller has brought up to date
    /// with the batches committed since the staging), then COMMIT.
    ///
    /// A worker whose lease was taken over learns it here or in [`Loader::stage`],
    /// whatever its batch ran into first: the new holder may have written the same ids
    /// already, so a stale batch can fail on the primary key before it reaches its
    /// checkpoint's token check. Any failure is therefore reported as
    /// [`LoadError::LeaseLost`] when the token is no longer ours.
    pub async fn commit(
        &self,
        staged: Staged,
        batch: &Batch,
        progress: Option<&Progress>,
    ) -> Result<BatchOutcome, LoadError> {
        let outcome = self.commit_batch(staged, batch, progress).await;
        self.blame_lease(outcome).await
    }

    /// Turns a failure into [`LoadError::LeaseLost`] when the run's lease token is no
    /// longer ours.
    async fn blame_lease<T>(&self, result: Result<T, LoadError>) -> Result<T, LoadError> {
        match result {
            Err(error) if !matches!(error, LoadError::LeaseLost { .. }) => {
                let token: Option<i64> = sqlx::query_scalar(
                    "SELECT lease_token FROM dsa_jobs.analysis_runs WHERE id = $1",
                )
                .bind(self.lease.run_id)
                .fetch_optional(&self.pool)
                .await
                .unwrap_or(Some(self.lease.token));
                if token.is_some_and(|token| token != self.lease.token) {
                    return Err(LoadError::LeaseLost {
                        run_id: self.lease.run_id,
                        token: self.lease.token,
                    });
                }
                Err(error)
            }
            other => other,
        }
    }

    async fn open_batch(&self, batch: &Batch) -> Result<Opened, LoadError> {
        let started = Instant::now();
        let mut tx = crate::db::begin(&self.pool).await?;
        // A batch is safe without waiting for its WAL flush: data and checkpoint commit
        // together, so a batch lost in a crash is simply read again on resume (and the
        // batches after it never build on it, see `save_checkpoint`). Only the
        // finalising transaction, which tells the world, waits for durability.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        if !batch.rows.is_empty() {
            // gc removes rows no commit references; this batch may reference rows it
            // did not store, so no gc may run until it has committed.
            hold_gc_fence(&mut tx).await?;
        }
        Ok(Opened { tx, started })
    }

    async fn store_batch(&self, opened: Opened, rows: &mut RowsCopy) -> Result<Staged, LoadError> {
        let Opened { mut tx, started } = opened;
        let mut outcome = BatchOutcome::default();
        // Positional entries are written here, beside the rows, where batches run side
        // by side: their ids are line numbers, which no other batch of the import has.
        // Keyed entries wait for the commit (see `Loader::commit`).
        let entries_now = rows.keyed.is_empty() && !rows.commit_rows.is_empty();
        if rows.content.is_empty() && !entries_now {
            rows.content = Vec::new();
            return Ok(Staged {
                tx,
                started,
                outcome,
            });
        }
        if let Some(limit) = self.row_wait_limit {
            sqlx::query(&format!(
                "SET LOCAL lock_timeout = '{}ms'",
                limit.as_millis()
            ))
            .execute(&mut *tx)
            .await?;
        }
        let written = store_rows_and_entries(&mut tx, rows, entries_now, &mut outcome).await;
        match (written, self.row_wait_limit) {
            (Err(sqlx::Error::Database(error)), Some(waited))
                if error.code().as_deref() == Some("55P03") =>
            {
                let run_id = self.lease.run_id;
                drop(tx);
                return Err(if tables_locked_by_another_session(&self.pool).await {
                    LoadError::TableLocked { run_id, waited }
                } else {
                    LoadError::RowsHeld { run_id, waited }
                });
            }
            (written, _) => written?,
        }
        if self.row_wait_limit.is_some() {
            sqlx::query("SET LOCAL lock_timeout TO DEFAULT")
                .execute(&mut *tx)
                .await?;
        }
        Ok(Staged {
            tx,
            started,
            outcome,
        })
    }

    async fn commit_batch(
        &self,
        staged: Staged,
        batch: &Batch,
        progress: Option<&Progress>,
    ) -> Result<BatchOutcome, LoadError> {
        let Staged {
            mut tx,
            started: batch_started,
            mut outcome,
        } = staged;
        let mut repeated: Vec<(String, u64)> = Vec::new();
        let rows = &batch.rows;
        // Checked here rather than as the batch is staged: the batches before it, whose
        // rows it may rely on, have all committed by now.
        if !still_stored(&mut tx, rows.looked_up_at, &rows.relied_on).await? {
            return Err(LoadError::RowsCollected {
                run_id: self.lease.run_id,
            });
        }
        // Positional entries were written with the rows (see `Loader::store`).
        if !rows.keyed.is_empty() {
            let started = Instant::now();
            if let (Some(parent), false) = (&self.refuse_keys_of, self.skip_bad_rows) {
                refuse_existing_keys(&mut tx, parent, &batch.checkpoint.sheet, rows).await?;
            }
            repeated = store_keyed_entries(&mut tx, &batch.checkpoint, rows).await?;
            outcome.commit_rows_duration = started.elapsed();
        }

        let mut rejected = Vec::new();
        if let Some((key, line)) = repeated.first() {
            if !self.skip_bad_rows {
                return Err(LoadError::BadRow {
                    sheet: batch.checkpoint.sheet.clone(),
                    line: *line,
                    problem: RowProblem::RepeatedKey {
                        key: key.clone(),
                        first_line: None,
                    },
                });
            }
            rejected.extend(repeated.iter().map(|(key, line)| RejectedRow {
                line: *line,
                byte: 0,
                problem: RowProblem::RepeatedKey {
                    key: key.clone(),
                    first_line: None,
                },
                raw: Vec::new(),
            }));
        }
        let rejected: Vec<&RejectedRow> = batch.rejected.iter().chain(&rejected).collect();
        if !rejected.is_empty() {
            insert_rejected(&mut tx, self.lease.run_id, &batch.checkpoint, &rejected).await?;
        }

        // The producer cannot know how many rows were new, nor which keys an earlier
        // batch had; that is counted here.
        let mut checkpoint = batch.checkpoint.clone();
        checkpoint.new_rows += outcome.new_rows;
        outcome.repeated_rows = repeated.len() as u64;
        checkpoint.loaded_rows -= outcome.repeated_rows;
        checkpoint.rejected_rows += outcome.repeated_rows;
        let started = Instant::now();
        save_checkpoint(&mut tx, &self.lease, &checkpoint, progress).await?;
        tx.commit().await?;
        outcome.commit_duration = started.elapsed();
        crate::metrics::metrics().observe_batch(batch_started.elapsed());
        Ok(outcome)
    }

    /// Creates the run's commit (unfinalised: `committed_at` stays NULL) together with
    /// the first checkpoint that names it, so a crash never leaves a commit no run knows.
    pub async fn begin_commit(
        &self,
        dataset_id: i64,
        message: &str,
        author_id: Option<&str>,
        checkpoint: &Checkpoint,
    ) -> Result<(), LoadError> {
        let mut tx = crate::db::begin(&self.pool).await?;
        // The batches' checkpoints build on this one (see `save_checkpoint`); it must
        // outlive a crash even where the server's default is not to wait.
        sqlx::query("SET LOCAL synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
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

    /// A connection for the import's other transactions (its plan, its finalising).
    pub async fn connection(&self) -> Result<PoolConnection<Postgres>, LoadError> {
        Ok(crate::db::acquire(&self.pool).await?)
    }
}

/// The part of a batch that may run beside other batches of its import: the rows the
/// look-up did not find, and, when `entries` (a positional batch), the batch's
/// `commit_rows` entries.
/// Each stream is freed once sent: only a keyed batch's entries are needed afterwards.
async fn store_rows_and_entries(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    rows: &mut RowsCopy,
    entries: bool,
    outcome: &mut BatchOutcome,
) -> Result<(), sqlx::Error> {
    if !rows.content.is_empty() {
        let started = Instant::now();
        outcome.new_rows = store_new_rows(tx, &rows.content).await?;
        outcome.insert_duration = started.elapsed();
    }
    rows.content = Vec::new();
    if entries {
        let started = Instant::now();
        send_binary(
            tx,
            "COPY dsa_core.commit_rows (commit_id, logical_row_id, row_hash)
             FROM STDIN (FORMAT binary)",
            &rows.commit_rows,
        )
        .await?;
        outcome.commit_rows_duration = started.elapsed();
        rows.commit_rows = Vec::new();
    }
    Ok(())
}

/// Stores rows that the look-up did not find; returns how many were new.
///
/// The fast way is a COPY straight into `dsa_core.rows`, which works whenever none of
/// the rows is stored by now. A row stored meanwhile (by a concurrent import, or by an
/// earlier batch of this one when the look-up's sample skipped the full look-up) makes
/// the COPY fail on the primary key; the savepoint undoes it and the rows go through
/// the staging table and `ON CONFLICT DO NOTHING` instead. Content arrives sorted by
/// hash and without repeats, so two imports of the same rows take index locks in one
/// order and never deadlock.
async fn store_new_rows(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    content: &[u8],
) -> Result<u64, sqlx::Error> {
    sqlx::query("SAVEPOINT direct_rows")
        .execute(&mut **tx)
        .await?;
    let direct = send_binary(
        tx,
        "COPY dsa_core.rows (row_hash, data) FROM STDIN (FORMAT binary)",
        content,
    )
    .await;
    match direct {
        Ok(stored) => {
            sqlx::query("RELEASE SAVEPOINT direct_rows")
                .execute(&mut **tx)
                .await?;
            Ok(stored)
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("23505") => {
            sqlx::query("ROLLBACK TO SAVEPOINT direct_rows")
                .execute(&mut **tx)
                .await?;
            // A temporary table is private to its session, so concurrent imports never
            // see each other's rows; ON COMMIT DELETE ROWS empties it after the batch.
            // It takes the same binary COPY stream as `dsa_core.rows`, so its data is
            // jsonb.
            sqlx::query(
                "CREATE TEMPORARY TABLE IF NOT EXISTS import_rows (
                     row_hash bytea NOT NULL,
                     data jsonb NOT NULL
                 ) ON COMMIT DELETE ROWS",
            )
            .execute(&mut **tx)
            .await?;
            send_binary(
                tx,
                "COPY import_rows (row_hash, data) FROM STDIN (FORMAT binary)",
                content,
            )
            .await?;
            let stored = sqlx::query(
                "INSERT INTO dsa_core.rows (row_hash, data)
                 SELECT row_hash, data FROM import_rows ORDER BY row_hash
                 ON CONFLICT (row_hash) DO NOTHING",
            )
            .execute(&mut **tx)
            .await?
            .rows_affected();
            Ok(stored)
        }
        Err(error) => Err(error),
    }
}

/// Fails on the first row of the batch whose key `parent` has already.
async fn refuse_existing_keys(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    parent: &str,
    sheet: &str,
    rows: &RowsCopy,
) -> Result<(), LoadError> {
    let ids: Vec<String> = rows
        .keyed
        .iter()
        .map(|(key, _)| format!("{sheet}:{key}"))
        .collect();
    // One primary key probe per id. Written as `logical_row_id = ANY($2)`, a planner
    // whose statistics still show the parent small takes `commit_id` alone as the index
    // condition and filters the rest, reading every entry of the parent for every batch
    // (10,000 ids against a 1M-row parent: 0.49 s, 990,000 rows filtered, against
    // 0.04 s this way). `OFFSET 0` keeps the lateral subquery a probe per id: the
    // planner cannot turn it into a join and put the parent's entries outside.
    let existing: Vec<String> = sqlx::query_scalar(
        "SELECT found.id
           FROM unnest($2::text[]) AS wanted(id)
          CROSS JOIN LATERAL (
                SELECT c.logical_row_id AS id FROM dsa_core.commit_rows c
                 WHERE c.commit_id = $1 AND c.logical_row_id = wanted.id
                OFFSET 0) AS found",
    )
    .bind(parent)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    if existing.is_empty() {
        return Ok(());
    }
    let existing: HashSet<&str> = existing.iter().map(String::as_str).collect();
    let (key, line) = rows
        .keyed
        .iter()
        .zip(&ids)
        .find(|(_, id)| existing.contains(id.as_str()))
        .map(|(entry, _)| entry.clone())
        .expect("a found id is one of the batch's");
    Err(LoadError::BadRow {
        sheet: sheet.to_owned(),
        line,
        problem: RowProblem::ExistingKey { key },
    })
}

/// Writes a keyed batch's commit_rows entries; returns the keys (with their lines)
/// that an earlier batch of the commit had, whose entries were left out.
///
/// The fast way is a COPY straight into `dsa_core.commit_rows`, whose primary key
/// refuses a repeated id; only then (under a savepoint) do the entries go through a
/// staging table, which finds the repeats and writes the rest.
async fn store_keyed_entries(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    checkpoint: &Checkpoint,
    rows: &RowsCopy,
) -> Result<Vec<(String, u64)>, sqlx::Error> {
    sqlx::query("SAVEPOINT keyed_entries")
        .execute(&mut **tx)
        .await?;
    let direct = send_binary(
        tx,
        "COPY dsa_core.commit_rows (commit_id, logical_row_id, row_hash)
         FROM STDIN (FORMAT binary)",
        &rows.commit_rows,
    )
    .await;
    match direct {
        Ok(_) => {
            sqlx::query("RELEASE SAVEPOINT keyed_entries")
                .execute(&mut **tx)
                .await?;
            Ok(Vec::new())
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("23505") => {
            sqlx::query("ROLLBACK TO SAVEPOINT keyed_entries")
                .execute(&mut **tx)
                .await?;
            sqlx::query(
                "CREATE TEMPORARY TABLE IF NOT EXISTS import_entries (
                     commit_id text COLLATE \"C\" NOT NULL,
                     logical_row_id text COLLATE \"C\" NOT NULL,
                     row_hash bytea NOT NULL
                 ) ON COMMIT DELETE ROWS",
            )
            .execute(&mut **tx)
            .await?;
            send_binary(
                tx,
                "COPY import_entries (commit_id, logical_row_id, row_hash)
                 FROM STDIN (FORMAT binary)",
                &rows.commit_rows,
            )
            .await?;
            let repeated: Vec<String> = sqlx::query_scalar(
                "SELECT i.logical_row_id FROM import_entries i
                   JOIN dsa_core.commit_rows c
                     ON c.commit_id = i.commit_id AND c.logical_row_id = i.logical_row_id",
            )
            .fetch_all(&mut **tx)
            .await?;
            sqlx::query(
                "INSERT INTO dsa_core.commit_rows (commit_id, logical_row_id, row_hash)
                 SELECT commit_id, logical_row_id, row_hash FROM import_entries
                 ON CONFLICT (commit_id, logical_row_id) DO NOTHING",
            )
            .execute(&mut **tx)
            .await?;
            let prefix = format!("{}:", checkpoint.sheet);
            let repeated: HashSet<&str> = repeated
                .iter()
                .filter_map(|id| id.strip_prefix(prefix.as_str()))
                .collect();
            Ok(rows
                .keyed
                .iter()
                .filter(|(key, _)| repeated.contains(key.as_str()))
                .cloned()
                .collect())
        }
        Err(error) => Err(error),
    }
}

/// The advisory lock between gc's row sweep (exclusive) and import batches (shared).
pub const GC_LOCK: i64 = 0x6473_615f_6763; // "dsa_gc"

/// Reads the gc generation (which gc moves each time it removes rows); an import's
/// look-up reads it before it looks.
pub async fn generation(conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT generation FROM dsa_core.gc_state")
        .fetch_one(conn)
        .await
}

/// Called at the start of every import batch transaction, before it writes rows or
/// commit_rows: takes [`GC_LOCK`] shared, held to the end of the transaction, so no gc
/// removes rows while the batch runs.
async fn hold_gc_fence(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(GC_LOCK)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Called under [`hold_gc_fence`] once the batches before have committed, before the
/// batch commits its commit_rows (a positional batch has written them already, in the
/// same transaction): when gc has removed rows since `looked_up_at`, checks
/// that every row the batch relies on without storing it is still stored. `false`
/// means some were removed: the batch must not commit.
async fn still_stored(
    conn: &mut sqlx::PgConnection,
    looked_up_at: i64,
    relied_on: &[RowHash],
) -> Result<bool, sqlx::Error> {
    if relied_on.is_empty() || generation(conn).await? == looked_up_at {
        return Ok(true);
    }
    let hashes: Vec<&[u8]> = relied_on.iter().map(|hash| hash.as_slice()).collect();
    let present: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dsa_core.rows WHERE row_hash = ANY($1)")
            .bind(&hashes)
            .fetch_one(&mut *conn)
            .await?;
    Ok(present as usize == relied_on.len())
}

/// Hashes looked up to guess whether a batch is mostly new or mostly stored.
const LOOKUP_SAMPLE: usize = 64;

/// Batches looked up without the parent's entries after one whose rows they did not
/// mostly hold; then the parent is tried again.
const PARENT_SKIPS_AFTER_A_MISS: u32 = 7;

/// Whether another session holds a lock on `dsa_core.rows` or `dsa_core.commit_rows`
/// that keeps a batch from writing them (a schema change, `VACUUM FULL`, `LOCK
/// TABLE`): asked once a bounded wait has timed out, to tell such a wait from one for
/// rows another transaction is writing. The server's own messages cannot tell them
/// apart reliably (their context is translated), and asking costs the batches
/// nothing while no wait times out. A lock released in the meantime reads as a wait
/// for rows; either way the import steps back with a transient error.
async fn tables_locked_by_another_session(pool: &PgPool) -> bool {
    let Ok(mut tx) = pool.begin().await else {
        return false;
    };
    let locked =
        sqlx::query("LOCK TABLE dsa_core.rows, dsa_core.commit_rows IN ROW EXCLUSIVE MODE NOWAIT")
            .execute(&mut *tx)
            .await;
    matches!(locked, Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03"))
}

/// The hashes of `parent`'s entries whose ids lie between the smallest and the largest
/// of the batch's ids (in the primary key's byte order), at most a quarter more than
/// the batch has entries: one range scan of the primary key of `commit_rows`, stopped
/// where a range wider than the batch (ids in no order) would make it cost more than it
/// saves. Every hash returned is that of a stored row.
async fn parent_hashes_around(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    parent: &str,
    rows: &RowsCopy,
) -> Result<HashSet<RowHash>, sqlx::Error> {
    let Some((first, last, entries)) = rows.id_range() else {
        return Ok(HashSet::new());
    };
    // An index scan stops at the limit; a bitmap scan would read the whole range first.
    sqlx::query("SET LOCAL enable_bitmapscan = off")
        .execute(&mut **tx)
        .await?;
    let found: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT row_hash FROM dsa_core.commit_rows
          WHERE commit_id = $1 AND logical_row_id >= $2 AND logical_row_id <= $3
          ORDER BY logical_row_id
          LIMIT $4",
    )
    .bind(parent)
    .bind(first)
    .bind(last)
    .bind((entries + entries / 4 + 64) as i64)
    .fetch_all(&mut **tx)
    .await?;
    sqlx::query("SET LOCAL enable_bitmapscan = on")
        .execute(&mut **tx)
        .await?;
    Ok(row_hashes(found).collect())
}

/// The row hashes among `bytea` values a query returned.
fn row_hashes(found: Vec<Vec<u8>>) -> impl Iterator<Item = RowHash> {
    found
        .into_iter()
        .filter_map(|hash| RowHash::try_from(hash.as_slice()).ok())
}

/// Batches that may be ahead of the database when a batch is looked up, besides the
/// ones staging: the one committing, and the one waiting between the look-up and the
/// loader (`Importer::load_batches`, fed by `produce::drop_known_rows`).
const BATCHES_AHEAD_BESIDES_STAGING: usize = 2;

/// Finds which rows of a batch are stored already, on a connection of its own, so the
/// look-up of one batch runs while the batches before it load. Only the content of
/// rows not found is then sent; a row stored between the look-up and the load is
/// caught by the insert's ON CONFLICT, so a stale answer costs bytes, never correctness.
pub struct Lookup {
    conn: PoolConnection<Postgres>,
    /// The hashes of the batches just before, with the gc generation their look-up
    /// saw: the database may not show them yet (they are loading while this look-up
    /// runs), but they are stored before this batch is, since batches commit in order
    /// or the import fails.
    ahead: VecDeque<(i64, HashSet<RowHash>)>,
    /// How many batches `ahead` keeps.
    batches_ahead: usize,
    /// The commit the new version follows, whose entries are read first (see
    /// [`Lookup::following`]).
    parent: Option<String>,
    /// Batches that go without the parent's entries, after one they did not help.
    parent_skips: u32,
    /// Rows found through the parent's entries so far.
    found_in_parent: u64,
}

impl Lookup {
    /// A look-up for an import whose loader stages `staging_batches` batches at once
    /// (`IMPORT_STAGING_BATCHES`): that many, and two more, may be ahead of the
    /// database when a batch is looked up.
    pub async fn new(pool: &PgPool, staging_batches: usize) -> Result<Self, LoadError> {
        let batches_ahead = staging_batches.max(1) + BATCHES_AHEAD_BESIDES_STAGING;
        Ok(Self {
            conn: crate::db::acquire(pool).await?,
            ahead: VecDeque::with_capacity(batches_ahead + 1),
            batches_ahead,
            parent: None,
            parent_skips: 0,
            found_in_parent: 0,
        })
    }

    /// Looks in `parent`'s entries before the stored rows. A file imported again
    /// mostly repeats the version before it under the same ids, and a batch's ids lie
    /// together in the primary key of `commit_rows` (positional ids once they have as
    /// many digits as the parent's last one, keys when the file is sorted by them):
    /// one range scan there finds in a few milliseconds what one index descent per
    /// hash into `dsa_core.rows` finds in tens. Every entry of a committed version
    /// references a stored row, so each hash the range holds is stored; the batch's
    /// other hashes are looked up as before.
    pub fn following(mut self, parent: Option<String>) -> Self {
        self.parent = parent;
        self
    }

    /// Rows of the batches so far that the parent's entries showed stored.
    pub fn rows_found_in_parent(&self) -> u64 {
        self.found_in_parent
    }

    /// Whether one of the batches ahead has `hash`.
    fn ahead_has(&self, hash: &RowHash) -> bool {
        self.ahead.iter().any(|(_, batch)| batch.contains(hash))
    }

    /// Drops the content `known` names or a batch ahead has, and notes every row
    /// dropped as relied on. A batch ahead stores a row it has, but with
    /// `--skip-bad-rows` it may then leave out the row's only entry (its key was taken),
    /// and a gc after that batch commits removes the row. So a row taken from a batch
    /// ahead counts as looked up when that batch was: the generation to check against
    /// is the oldest one of the batches ahead.
    fn drop_known_and_ahead(&self, rows: &mut RowsCopy, generation: i64, known: &HashSet<RowHash>) {
        rows.looked_up_at = self
            .ahead
            .iter()
            .map(|&(seen, _)| seen)
            .fold(generation, i64::min);
        rows.relied_on = rows.drop_content_of(|hash| known.contains(hash) || self.ahead_has(hash));
    }

    /// Remembers `rows` as the latest batch ahead of the ones still to be looked up.
    fn remember(&mut self, rows: &RowsCopy, generation: i64) {
        if self.ahead.len() == self.batches_ahead {
            self.ahead.pop_front();
        }
        self.ahead
            .push_back((generation, rows.hashes.iter().copied().collect()));
    }

    /// Removes the content of rows already stored from `rows`; returns how long it took.
    ///
    /// The parent's entries are read first (see [`Lookup::following`]); a batch of a
    /// file imported again is then done. Of the rows left, a sample is looked up
    /// first: when none of it is stored (a first import), a full look-up would miss
    /// almost every time and only take CPU from the load, so the batch is sent as it is
    /// and a rare stored row is caught by the fallback in [`store_new_rows`].
    pub async fn drop_known(&mut self, rows: &mut RowsCopy) -> Result<Duration, LoadError> {
        let started = Instant::now();
        let mut tx = self.conn.begin().await?;
        let seen = generation(&mut tx).await?;
        // The statistics of a table that grows a batch at a time lag behind it; with
        // them the planner may prefer reading the whole table to probing its index once
        // per hash, which would make an import quadratic. Only index probes are allowed
        // (LOCAL: the connection goes back to the pool with its settings intact).
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await?;
        let mut known = match self.parent.as_deref() {
            Some(parent) if self.parent_skips == 0 && !rows.hashes.is_empty() => {
                let in_parent = parent_hashes_around(&mut tx, parent, rows).await?;
                let resolved = rows
                    .hashes
                    .iter()
                    .filter(|hash| in_parent.contains(*hash))
                    .count();
                // A batch the range did not cover (a file of other rows, ids in
                // another order than the parent's, or more of the parent's ids than
                // the batch's in its range) is looked up without it, and so are the
                // next few.
                if resolved * 2 < rows.hashes.len() {
                    self.parent_skips = PARENT_SKIPS_AFTER_A_MISS;
                }
                self.found_in_parent += resolved as u64;
                in_parent
            }
            Some(_) => {
                self.parent_skips = self.parent_skips.saturating_sub(1);
                HashSet::new()
            }
            None => HashSet::new(),
        };
        // Rows a batch ahead has count as stored (see `drop_known_and_ahead`).
        let ahead = &self.ahead;
        let wanted: Vec<&[u8]> = rows
            .hashes
            .iter()
            .filter(|hash| {
                !known.contains(*hash) && !ahead.iter().any(|(_, batch)| batch.contains(*hash))
            })
            .map(|hash| hash.as_slice())
            .collect();
        let sampled_known: i64 = if wanted.len() > LOOKUP_SAMPLE {
            let step = wanted.len() / LOOKUP_SAMPLE;
            let sample: Vec<&[u8]> = wanted
                .iter()
                .step_by(step)
                .take(LOOKUP_SAMPLE)
                .copied()
                .collect();
            sqlx::query_scalar("SELECT count(*) FROM dsa_core.rows WHERE row_hash = ANY($1)")
                .bind(&sample)
                .fetch_one(&mut *tx)
                .await?
        } else {
            // As many as a sample: they are looked up whole.
            1
        };
        if !wanted.is_empty() && sampled_known > 0 {
            let found: Vec<Vec<u8>> =
                sqlx::query_scalar("SELECT row_hash FROM dsa_core.rows WHERE row_hash = ANY($1)")
                    .bind(wanted)
                    .fetch_all(&mut *tx)
                    .await?;
            known.extend(row_hashes(found));
        }
        tx.commit().await?;
        self.drop_known_and_ahead(rows, seen, &known);
        self.remember(rows, seen);
        Ok(started.elapsed())
    }
}

/// Moves the run's checkpoint (and progress, when given) and renews the lease, but only
/// while the lease token is still ours; otherwise the whole transaction is abandoned.
///
/// A batch's checkpoint (`batches` above 0) replaces only that of the batch before
/// it. Batches commit without waiting for their WAL flush, and a database crash loses
/// the last of them; an import that goes on over new connections once the server is
/// back would otherwise commit the next batch over the lost one's rows, and its
/// checkpoint would say they were loaded. Then the batch fails with
/// [`LoadError::CheckpointLost`], a transient error: a consumer retries the run from
/// what the database kept.
pub async fn save_checkpoint(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    lease: &Lease,
    checkpoint: &Checkpoint,
    progress: Option<&Progress>,
) -> Result<(), LoadError> {
    let follows = checkpoint
        .batches
        .checked_sub(1)
        .map(|batches| batches as i64);
    let updated = sqlx::query(concat!(
        "UPDATE dsa_jobs.analysis_runs
            SET checkpoint = $3,
                progress = coalesce($4, progress),
                lease_expires_at = now() + make_interval(secs => $5)
          WHERE id = $1 AND lease_token = $2 AND status = 'running'
            AND ($6::bigint IS NULL OR ",
        crate::runs::committed_batches_sql!(),
        " = $6)"
    ))
    .bind(lease.run_id)
    .bind(lease.token)
    .bind(sqlx::types::Json(checkpoint))
    .bind(progress.map(sqlx::types::Json))
    .bind(lease.duration.as_secs_f64())
    .bind(follows)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    match (updated, follows) {
        (1, _) => Ok(()),
        (_, Some(follows)) => Err(checkpoint_refused(tx, lease, follows as u64).await?),
        _ => Err(LoadError::LeaseLost {
            run_id: lease.run_id,
            token: lease.token,
        }),
    }
}

/// Why the run's row refused an update, made under `lease`, that expected its
/// checkpoint to count `batches`: [`LoadError::CheckpointLost`] when the lease is still
/// ours but the checkpoint counts other batches, [`LoadError::LeaseLost`] otherwise.
pub async fn checkpoint_refused(
    conn: &mut sqlx::PgConnection,
    lease: &Lease,
    batches: u64,
) -> Result<LoadError, sqlx::Error> {
    Ok(checkpoint_lost(conn, lease, batches)
        .await?
        .unwrap_or(LoadError::LeaseLost {
            run_id: lease.run_id,
            token: lease.token,
        }))
}

/// [`LoadError::CheckpointLost`] when the run is still ours under `lease` but its
/// checkpoint counts other batches than `batches` (one was lost in a database crash).
pub async fn checkpoint_lost(
    conn: &mut sqlx::PgConnection,
    lease: &Lease,
    batches: u64,
) -> Result<Option<LoadError>, sqlx::Error> {
    let found: Option<(i64, i64)> = sqlx::query_as(concat!(
        "SELECT lease_token, ",
        crate::runs::committed_batches_sql!(),
        " FROM dsa_jobs.analysis_runs WHERE id = $1 AND status = 'running'"
    ))
    .bind(lease.run_id)
    .fetch_optional(conn)
    .await?;
    Ok(match found {
        Some((token, found)) if token == lease.token && found as u64 != batches => {
            Some(LoadError::CheckpointLost {
                run_id: lease.run_id,
                expected: batches,
                found: found as u64,
            })
        }
        _ => None,
    })
}

async fn insert_rejected(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    run_id: uuid::Uuid,
    checkpoint: &Checkpoint,
    rejected: &[&RejectedRow],
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

    /// Splits binary COPY tuples into their fields.
    fn tuples(mut bytes: &[u8]) -> Vec<Vec<Vec<u8>>> {
        let mut tuples = Vec::new();
        while !bytes.is_empty() {
            let count = i16::from_be_bytes([bytes[0], bytes[1]]);
            bytes = &bytes[2..];
            let mut fields = Vec::new();
            for _ in 0..count {
                let length = i32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
                fields.push(bytes[4..4 + length].to_vec());
                bytes = &bytes[4 + length..];
            }
            tuples.push(fields);
        }
        tuples
    }

    #[test]
    fn binary_tuples_carry_ids_hashes_and_json_as_they_are() {
        let mut writer = BatchWriter::new("c1", "my\tsheet", 0);
        writer.push(7, &[0xab; 32], br#"{"a":"x\ny\\"}"#);
        writer.push(10, &[0xcd; 32], b"{}");
        writer.push(8, &[0xab; 32], br#"{"a":"x\ny\\"}"#);
        let copy = writer.finish();
        let entry =
            |id: &str, hash: u8| vec![b"c1".to_vec(), id.as_bytes().to_vec(), vec![hash; 32]];
        assert_eq!(
            tuples(&copy.commit_rows),
            vec![
                entry("my\tsheet:7", 0xab),
                entry("my\tsheet:10", 0xcd),
                entry("my\tsheet:8", 0xab)
            ]
        );
        // Content is in hash order, each hash once; jsonb starts with its version byte.
        let first = vec![vec![0xab; 32], [&[1u8][..], br#"{"a":"x\ny\\"}"#].concat()];
        let second = vec![vec![0xcd; 32], b"\x01{}".to_vec()];
        assert_eq!(tuples(&copy.content), vec![first.clone(), second]);
        let mut copy = copy;
        let dropped = copy.drop_content_of(|hash| *hash == [0xcd; 32]);
        assert_eq!(dropped, vec![[0xcd; 32]]);
        assert_eq!(tuples(&copy.content), vec![first]);
    }
}
