//! Stage `finalise`: one transaction turns the loaded commit into history: its row count,
//! tree hash and `committed_at` are set, `main` moves to it, the run is completed with
//! its summary, and a search-refresh request is queued in the outbox.
//!
//! The dataset row is locked first, so two imports finishing into one dataset take turns:
//! the second sees the first's commit as its parent and history stays linear.

use futures::TryStreamExt;
use sqlx::types::Json;
use sqlx::{Acquire, PgConnection, Postgres, Transaction};
use thiserror::Error;

use crate::import::decode::RowProblem;
use crate::import::hash::{RowHash, TreeHasher};
use crate::import::load::{LoadError, TOMBSTONE};
use crate::import::order::{sql_logical_reads, KeyTrail, KeyedOrder};
use crate::import::run::{ImportMode, ImportPlan, Lease, Lineage, OnConflict};

/// The finished commit's facts.
pub struct CommitFacts<'a> {
    pub dataset_id: i64,
    pub commit_id: &'a str,
    pub row_count: u64,
    pub tree_hash: &'a str,
    /// Batches the import committed: the run's checkpoint must be that of the last
    /// (see `load::save_checkpoint`), or a batch was lost in a crash.
    pub batches: u64,
    pub source: Lineage,
    /// How the loaded rows combine with the parent.
    pub merge: Merge<'a>,
}

/// What finalise does with the parent's rows.
pub struct Merge<'a> {
    pub mode: ImportMode,
    pub on_conflict: OnConflict,
    pub skip_bad_rows: bool,
    pub plan: &'a ImportPlan,
    /// What the file's keys said about their order.
    pub key_trail: &'a KeyTrail,
}

/// What the finalising transaction decided.
#[derive(Clone, Debug, Default)]
pub struct Finalised {
    pub parent: Option<String>,
    pub row_count: u64,
    pub tree_hash: String,
    /// `delete`: the parent's rows removed, and the file's keys the parent did not have.
    pub deleted_rows: u64,
    pub keys_not_found: u64,
    /// `append` with `on_conflict fail` and `--skip-bad-rows`: rows left out because the
    /// parent has their key.
    pub conflicting_rows: u64,
    /// The commit's `source` as stored.
    pub source: Option<Lineage>,
}

#[derive(Debug, Error)]
pub enum FinaliseError {
    #[error(
        "main moved from {} to {found} while this {mode} import ran, so its rows would \
         drop the other commit's; submit the file again to apply it to the new version",
        .expected.as_deref().unwrap_or("(no commit)")
    )]
    MainMoved {
        mode: &'static str,
        expected: Option<String>,
        found: String,
    },
    #[error("{problem}")]
    Conflict { problem: RowProblem },
    #[error(transparent)]
    Load(#[from] LoadError),
}

impl From<sqlx::Error> for FinaliseError {
    fn from(error: sqlx::Error) -> Self {
        FinaliseError::Load(LoadError::Database(error))
    }
}

/// Finalises the commit and completes the run. `summary` receives what finalise
/// decided and returns the run's output summary.
pub async fn finalise(
    conn: &mut PgConnection,
    lease: &Lease,
    mut facts: CommitFacts<'_>,
    summary: impl FnOnce(&Finalised) -> serde_json::Value,
) -> Result<Finalised, FinaliseError> {
    let mut tx = conn.begin().await?;
    // Batches may run with synchronous_commit off; this transaction must be durable
    // before anyone is told the import is done.
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await?;
    // NO KEY UPDATE serialises finalisers without blocking the key-share locks that
    // other imports' inserts (their commits and runs) take on the dataset row.
    sqlx::query("SELECT 1 FROM dsa_core.datasets WHERE id = $1 FOR NO KEY UPDATE")
        .bind(facts.dataset_id)
        .execute(&mut *tx)
        .await?;
    // A last batch lost in a database crash shows here already. The guarded update
    // that completes the run is what decides; this only spares carrying and hashing
    // the parent's rows for a commit that is then rolled back.
    if let Some(lost) = crate::import::load::checkpoint_lost(&mut tx, lease, facts.batches).await? {
        return Err(lost.into());
    }
    let parent: Option<String> = sqlx::query_scalar(
        "SELECT commit_id FROM dsa_core.refs WHERE dataset_id = $1 AND name = 'main'",
    )
    .bind(facts.dataset_id)
    .fetch_optional(&mut *tx)
    .await?;
    let mut done = Finalised {
        parent: parent.clone(),
        row_count: facts.row_count,
        tree_hash: facts.tree_hash.to_owned(),
        ..Finalised::default()
    };
    let merge = &facts.merge;
    if merge.mode != ImportMode::Replace || merge.plan.key.is_some() {
        // The parent's rows are carried in primary-key order, and the version is read
        // back in logical row order: both sort up to the whole version.
        sqlx::query(crate::db::SET_SORT_MEMORY)
            .execute(&mut *tx)
            .await?;
    }
    if merge.mode != ImportMode::Replace {
        // Below, the new version's entries are joined with the parent's. A commit
        // written since the table's last ANALYZE looks empty to the planner, which
        // then picks a nested loop that scans all of one commit's entries for each
        // entry of the other, its id left to a join filter: 10^10 comparisons for a
        // 1M-row parent and a 10,000-row file (an upsert still running after ten
        // minutes). Merge and hash joins take one pass over each side, whatever the
        // estimates.
        sqlx::query("SET LOCAL enable_nestloop = off")
            .execute(&mut *tx)
            .await?;
        if parent != merge.plan.parent {
            return Err(FinaliseError::MainMoved {
                mode: merge.mode.as_str(),
                expected: merge.plan.parent.clone(),
                found: parent.unwrap_or_default(),
            });
        }
        if let Some(parent) = &parent {
            carry_parent_rows(&mut tx, facts.commit_id, parent, merge, &mut done).await?;
            let stored: Option<serde_json::Value> =
                sqlx::query_scalar("SELECT source FROM dsa_core.commits WHERE commit_id = $1")
                    .bind(parent)
                    .fetch_optional(&mut *tx)
                    .await?
                    .flatten();
            // A parent whose source this version cannot read keeps its columns out.
            if let Some(parent) = stored.and_then(|value| serde_json::from_value(value).ok()) {
                let deleting = merge.mode == ImportMode::Delete;
                facts.source.keep_parent_columns(&parent, deleting);
            }
        } else if merge.mode == ImportMode::Delete {
            // Nothing to delete from: every key of the file is one not found, and the
            // version is empty.
            done.keys_not_found = drop_deletion_entries(&mut tx, facts.commit_id).await?;
        }
    }
    if merge.mode != ImportMode::Replace || merge.plan.key.is_some() {
        // A replace's version is the file's rows alone, so its sheets are the file's.
        let sheets = match merge.mode {
            ImportMode::Replace => facts.source.sheet_names(),
            _ => sheet_order(&merge.plan.parent_sheets, &facts.source.sheet_names()),
        };
        let keyed = merge.plan.key.is_some();
        let numeric = match keyed {
            true => numeric_key_sheets(&mut tx, facts.commit_id, &sheets, merge).await?,
            false => Vec::new(),
        };
        // A keyed file that came in logical row order is its own version in order:
        // the tree hash streamed while loading is the commit's. Any other version is
        // counted and hashed in logical row order, read back from the server.
        let streamed =
            keyed && merge.mode == ImportMode::Replace && merge.key_trail.in_logical_order(&sheets);
        if !streamed {
            let order = keyed.then(|| KeyedOrder {
                sheets: sheets.clone(),
                numeric_sheets: numeric.clone(),
            });
            hash_in_logical_order(&mut tx, facts.commit_id, &sheets, order, &mut done).await?;
        }
        facts.source.sheet_order = sheets;
        facts.source.numeric_key_sheets = numeric;
    }
    sqlx::query(
        "UPDATE dsa_core.commits
            SET parent_commit_id = $2, row_count = $3, tree_hash = $4, source = $5,
                committed_at = now()
          WHERE commit_id = $1 AND committed_at IS NULL",
    )
    .bind(facts.commit_id)
    .bind(parent.as_deref())
    .bind(done.row_count as i64)
    .bind(&done.tree_hash)
    .bind(Json(&facts.source))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO dsa_core.refs (dataset_id, name, commit_id) VALUES ($1, 'main', $2)
         ON CONFLICT (dataset_id, name)
         DO UPDATE SET commit_id = EXCLUDED.commit_id, updated_at = now()",
    )
    .bind(facts.dataset_id)
    .bind(facts.commit_id)
    .execute(&mut *tx)
    .await?;
    if merge.plan.set_key {
        sqlx::query("UPDATE dsa_core.datasets SET key_columns = $2 WHERE id = $1")
            .bind(facts.dataset_id)
            .bind(merge.plan.key.as_deref())
            .execute(&mut *tx)
            .await?;
    }
    done.source = Some(facts.source.clone());
    let output = summary(&done);
    let completed = sqlx::query(concat!(
        "UPDATE dsa_jobs.analysis_runs
            SET status = 'completed', completed_at = now(), output_summary = $3,
                progress = coalesce(progress, '{}'::jsonb)
                           || jsonb_build_object('percentage', 100, 'status', 'Completed',
                                                 'bytes_processed', ($3->>'bytes')::bigint,
                                                 'total_bytes', ($3->>'bytes')::bigint,
                                                 'rows_processed', $4::bigint),
                lease_owner = NULL, lease_expires_at = NULL, error_message = NULL
          WHERE id = $1 AND lease_token = $2 AND status = 'running'
            AND ",
        crate::runs::committed_batches_sql!(),
        " = $5"
    ))
    .bind(lease.run_id)
    .bind(lease.token)
    .bind(&output)
    // Progress is written every few batches; a finished run shows it all read.
    .bind(facts.row_count as i64)
    .bind(facts.batches as i64)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if completed != 1 {
        let refused =
            crate::import::load::checkpoint_refused(&mut tx, lease, facts.batches).await?;
        tx.rollback().await?;
        return Err(refused.into());
    }
    crate::outbox::queue_refresh(&mut tx, facts.dataset_id, facts.commit_id).await?;
    tx.commit().await?;
    Ok(done)
}

/// Brings the parent's rows into the new version, inside PostgreSQL and once per
/// import: a row whose id the file has (or deletes) stays the file's, by the primary
/// key's `ON CONFLICT DO NOTHING`.
async fn carry_parent_rows(
    tx: &mut Transaction<'_, Postgres>,
    commit_id: &str,
    parent: &str,
    merge: &Merge<'_>,
    done: &mut Finalised,
) -> Result<(), FinaliseError> {
    let keyed = merge.plan.key.is_some();
    if merge.mode == ImportMode::Append && keyed {
        match merge.on_conflict {
            OnConflict::Update => {}
            OnConflict::Ignore => {
                sqlx::query(
                    "DELETE FROM dsa_core.commit_rows n USING dsa_core.commit_rows p
                      WHERE n.commit_id = $1 AND p.commit_id = $2
                        AND p.logical_row_id = n.logical_row_id",
                )
                .bind(commit_id)
                .bind(parent)
                .execute(&mut **tx)
                .await?;
            }
            OnConflict::Fail => {
                let conflict: Option<String> = sqlx::query_scalar(
                    "SELECT n.logical_row_id FROM dsa_core.commit_rows n
                       JOIN dsa_core.commit_rows p
                         ON p.commit_id = $2 AND p.logical_row_id = n.logical_row_id
                      WHERE n.commit_id = $1
                      ORDER BY n.logical_row_id LIMIT 1",
                )
                .bind(commit_id)
                .bind(parent)
                .fetch_optional(&mut **tx)
                .await?;
                if let Some(id) = conflict {
                    if !merge.skip_bad_rows {
                        // The loader names the line; this catches what it could not see.
                        let key = id.split_once(':').map_or(id.as_str(), |(_, key)| key);
                        return Err(FinaliseError::Conflict {
                            problem: RowProblem::ExistingKey {
                                key: key.to_owned(),
                            },
                        });
                    }
                    done.conflicting_rows = sqlx::query(
                        "DELETE FROM dsa_core.commit_rows n USING dsa_core.commit_rows p
                          WHERE n.commit_id = $1 AND p.commit_id = $2
                            AND p.logical_row_id = n.logical_row_id",
                    )
                    .bind(commit_id)
                    .bind(parent)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
                }
            }
        }
    }
    if merge.mode == ImportMode::Delete {
        let (deletions, matched): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(p.logical_row_id)
               FROM dsa_core.commit_rows t
               LEFT JOIN dsa_core.commit_rows p
                 ON p.commit_id = $2 AND p.logical_row_id = t.logical_row_id
              WHERE t.commit_id = $1",
        )
        .bind(commit_id)
        .bind(parent)
        .fetch_one(&mut **tx)
        .await?;
        done.deleted_rows = matched as u64;
        done.keys_not_found = (deletions - matched) as u64;
    }
    // An anti-join in primary-key order rather than ON CONFLICT: plain inserts, each
    // next to the one before in the index (a third faster on a 1M-row parent).
    sqlx::query(
        "INSERT INTO dsa_core.commit_rows (commit_id, logical_row_id, row_hash)
         SELECT $1, p.logical_row_id, p.row_hash FROM dsa_core.commit_rows p
          WHERE p.commit_id = $2
            AND NOT EXISTS (SELECT 1 FROM dsa_core.commit_rows n
                             WHERE n.commit_id = $1 AND n.logical_row_id = p.logical_row_id)
          ORDER BY p.logical_row_id",
    )
    .bind(commit_id)
    .bind(parent)
    .execute(&mut **tx)
    .await?;
    if merge.mode == ImportMode::Delete {
        drop_deletion_entries(tx, commit_id).await?;
    }
    Ok(())
}

/// Removes a `delete` import's deletion entries (see `BatchWriter::push_tombstone`)
/// from its new version, once they have kept the parent's rows of their keys out;
/// returns how many there were.
async fn drop_deletion_entries(
    tx: &mut Transaction<'_, Postgres>,
    commit_id: &str,
) -> Result<u64, FinaliseError> {
    Ok(
        sqlx::query("DELETE FROM dsa_core.commit_rows WHERE commit_id = $1 AND row_hash = $2")
            .bind(commit_id)
            .bind(&TOMBSTONE[..])
            .execute(&mut **tx)
            .await?
            .rows_affected(),
    )
}

/// The sheets of the new version in logical order: the parent's, then the file's new
/// ones in the file's order.
fn sheet_order(parent: &[String], file: &[String]) -> Vec<String> {
    let mut order = parent.to_vec();
    for sheet in file {
        if !order.contains(sheet) {
            order.push(sheet.clone());
        }
    }
    order
}

/// The sheets of a keyed version whose keys are all numbers (they then sort as
/// numbers). The file's trail and the parent's record settle it for a sheet in almost
/// every case; the version is scanned only where they cannot: rows of a parent sheet
/// that was not numeric (or was empty) may all have been deleted, or the parent's
/// record predates it.
async fn numeric_key_sheets(
    tx: &mut Transaction<'_, Postgres>,
    commit_id: &str,
    sheets: &[String],
    merge: &Merge<'_>,
) -> Result<Vec<String>, FinaliseError> {
    let mut numeric = Vec::new();
    for sheet in sheets {
        let settled = match settled_numeric(sheet, merge) {
            Some(settled) => settled,
            None => {
                sqlx::query_scalar(
                    "SELECT coalesce(bool_and(substr(logical_row_id, length($2) + 2)
                                              ~ '^-?[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?$'), false)
                       FROM dsa_core.commit_rows
                      WHERE commit_id = $1 AND starts_with(logical_row_id, $2 || ':')",
                )
                .bind(commit_id)
                .bind(sheet)
                .fetch_one(&mut **tx)
                .await?
            }
        };
        if settled {
            numeric.push(sheet.clone());
        }
    }
    Ok(numeric)
}

/// Whether every key of `sheet` in the new version is a number, when the file's trail
/// and the parent's record say so for certain (an empty sheet counts as not numeric,
/// as the server's scan has it).
fn settled_numeric(sheet: &str, merge: &Merge<'_>) -> Option<bool> {
    let file = merge.key_trail.numeric(sheet)?;
    let file_rows = merge.key_trail.sheet(sheet).map_or(0, |keys| keys.rows);
    if merge.mode == ImportMode::Replace {
        return Some(file && file_rows > 0);
    }
    let parent =
        match merge.plan.parent.is_some() && merge.plan.parent_sheets.iter().any(|s| s == sheet) {
            true => Some(
                merge
                    .plan
                    .parent_numeric_key_sheets
                    .as_ref()?
                    .iter()
                    .any(|s| s == sheet),
            ),
            false => None,
        };
    match merge.mode {
        // The version is the parent's rows less some: numbers stay numbers.
        ImportMode::Delete => match parent {
            Some(true) => Some(true),
            None => Some(false),
            Some(false) => None,
        },
        // The version's keys are the parent's and the file's (a conflicting row
        // left out has its key in the parent).
        _ => match (file_rows, parent) {
            (0, parent) => Some(parent.unwrap_or(false)),
            _ if !file => Some(false),
            (_, Some(true) | None) => Some(true),
            (_, Some(false)) => None,
        },
    }
}

/// Counts the version and computes its tree hash in logical row order (`order.rs`):
/// sheets in `sheets` order; within a sheet, positional ids by their number, keyed ids
/// (`keyed`) by their key, as numbers on the sheets it lists, otherwise bytewise. A
/// keyed version is read a sheet at a time ([`sql_logical_reads`]).
async fn hash_in_logical_order(
    tx: &mut Transaction<'_, Postgres>,
    commit_id: &str,
    sheets: &[String],
    keyed: Option<KeyedOrder>,
    done: &mut Finalised,
) -> Result<(), FinaliseError> {
    let mut tree = TreeHasher::new();
    let mut count = 0u64;
    for (filter, order) in sql_logical_reads("logical_row_id", sheets, keyed.as_ref()) {
        let statement = format!(
            "SELECT logical_row_id, row_hash FROM dsa_core.commit_rows
              WHERE commit_id = $1 AND {filter} ORDER BY {order}"
        );
        let mut rows = sqlx::query_as::<_, (String, Vec<u8>)>(&statement)
            .bind(commit_id)
            .fetch(&mut **tx);
        while let Some((id, hash)) = rows.try_next().await? {
            let hash: RowHash = hash.as_slice().try_into().unwrap_or([0u8; 32]);
            tree.push(&id, &hash);
            count += 1;
        }
    }
    done.row_count = count;
    done.tree_hash = tree.to_hex();
    Ok(())
}
