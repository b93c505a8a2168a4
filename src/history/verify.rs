//! `dsa-ingest verify`: recomputes what a commit claims from the database alone.
//!
//! For each commit: its `commit_rows` are read in logical row order and chained into
//! the tree hash with the import's own [`TreeHasher`]; the entries are counted against
//! `row_count`; every row hash must be in `dsa_core.rows` and equal sha256 of the JCS of
//! its `data`; positional ids must not skip a number the run did not reject; and the
//! parent chain must end at a root commit of the same dataset. Row content is hashed
//! on the blocking pool, a few thousand rows at a time, while the next rows stream in;
//! the ordered pass reads only ids and hashes, so no wide row is ever sorted.

use std::collections::HashSet;
use std::process::ExitCode;

use futures::stream::FuturesOrdered;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use sqlx::{PgPool, Row};

use super::resolve::{commit_by_id, resolve, Commit, Dataset, COMMIT_COLUMNS};
use super::{HistoryError, Stdout, VerifyArgs};
use crate::import::hash::{self, RowHash, TreeHasher};
use crate::import::order::{self, split_positional};

/// Rows hashed per task on the blocking pool.
const CHUNK_ROWS: usize = 4096;
/// Chunks being hashed at once; more only queue behind the CPUs.
const CHUNKS_IN_FLIGHT: usize = 3;
/// Row problems kept per commit for `--json` (the text output prints all of them).
const MAX_REPORTED: usize = 1000;

/// One thing that does not hold, with the row it concerns when there is one.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logical_row_id: Option<String>,
    pub problem: String,
}

/// A commit's verification.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub commit_id: String,
    pub ok: bool,
    pub rows: u64,
    pub tree_hash: String,
    pub problems: Vec<Problem>,
    /// Problems found beyond those listed.
    pub problems_not_listed: u64,
}

impl Report {
    fn add(&mut self, logical_row_id: Option<&str>, problem: String) {
        self.ok = false;
        if self.problems.len() < MAX_REPORTED {
            self.problems.push(Problem {
                logical_row_id: logical_row_id.map(str::to_owned),
                problem,
            });
        } else {
            self.problems_not_listed += 1;
        }
    }
}

/// Verifies one commit; `on_problem` sees each problem as it is reported (rows in
/// logical row order, then the commit's own problems).
pub async fn verify_commit(
    pool: &PgPool,
    commit: &Commit,
    mut on_problem: impl FnMut(&Problem),
) -> Result<Report, HistoryError> {
    let mut report = Report {
        commit_id: commit.commit_id.clone(),
        ok: true,
        rows: 0,
        tree_hash: String::new(),
        problems: Vec::new(),
        problems_not_listed: 0,
    };
    let mut note = |report: &mut Report, id: Option<&str>, problem: String| {
        let shown = Problem {
            logical_row_id: id.map(str::to_owned),
            problem: problem.clone(),
        };
        on_problem(&shown);
        report.add(id, problem);
    };
    if commit.committed_at.is_none() {
        note(&mut report, None, "the commit is not finalised".to_owned());
    }

    let rejected = rejected_rows(pool, commit).await?;
    // Two passes at once, on two connections: the entries alone in logical row order
    // (a narrow sort) for the tree hash, the count and the gaps; and every entry with
    // its content in whatever order the join gives (no sort of wide rows) for the row
    // hashes. Row problems are put in logical row order before they are reported.
    let sheets = commit.sheets();
    let (chain, (mut row_problems, not_listed)) = tokio::try_join!(
        chain_entries(pool, commit, &sheets),
        check_contents(pool, commit)
    )?;
    report.rows = chain.rows;
    match commit.keyed_order() {
        Some(keyed) => row_problems.sort_by(|a, b| keyed.compare(&a.0, &b.0)),
        None => row_problems.sort_by(|a, b| order::compare(&sheets, &a.0, &b.0)),
    }
    for (id, problem) in row_problems {
        note(&mut report, Some(&id), problem);
    }
    report.problems_not_listed += not_listed;
    let mut gaps = chain.gaps;
    let tree = chain.tree;

    // Skipped numbers are rows the run rejected, or entries missing from commit_rows.
    if gaps.skipped > rejected {
        for (id, problem) in std::mem::take(&mut gaps.unexplained) {
            note(&mut report, Some(&id), problem);
        }
    }
    report.tree_hash = tree.to_hex();
    if commit.row_count != Some(report.rows as i64) {
        let claimed = commit.row_count.map_or("no row_count".to_owned(), |count| {
            format!("row_count {count}")
        });
        let problem = format!("{claimed}, but commit_rows holds {} entries", report.rows);
        note(&mut report, None, problem);
    }
    match &commit.tree_hash {
        Some(stored) if *stored == report.tree_hash => {}
        stored => {
            let problem = format!(
                "tree hash recomputed from commit_rows is {}, the commit says {}",
                report.tree_hash,
                stored.as_deref().unwrap_or("nothing")
            );
            note(&mut report, None, problem);
        }
    }
    for problem in parent_chain(pool, commit).await? {
        note(&mut report, None, problem);
    }
    Ok(report)
}

/// What the entries in logical row order give.
struct Chain {
    tree: TreeHasher,
    rows: u64,
    gaps: Gaps,
}

/// Chains the commit's entries into the tree hash in logical row order.
async fn chain_entries(
    pool: &PgPool,
    commit: &Commit,
    sheets: &[String],
) -> Result<Chain, HistoryError> {
    let mut chain = Chain {
        tree: TreeHasher::new(),
        rows: 0,
        gaps: Gaps::default(),
    };
    let keyed = commit.keyed_order().is_some();
    let mut tx = pool.begin().await?;
    sqlx::query(crate::db::SET_SORT_MEMORY)
        .execute(&mut *tx)
        .await?;
    // A keyed commit is read a sheet at a time, as finalise hashed it.
    for (filter, order) in commit.logical_reads("logical_row_id", sheets) {
        let sql = format!(
            "SELECT logical_row_id, row_hash FROM dsa_core.commit_rows
              WHERE commit_id = $1 AND {filter} ORDER BY {order}"
        );
        let mut rows = sqlx::query(&sql).bind(&commit.commit_id).fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            let id: &str = row.try_get("logical_row_id")?;
            let stored: &[u8] = row.try_get("row_hash")?;
            chain.rows += 1;
            // A malformed hash is reported by the content pass; it chains as it is here.
            let mut row_hash = [0u8; 32];
            let length = stored.len().min(32);
            row_hash[..length].copy_from_slice(&stored[..length]);
            chain.tree.push(id, &row_hash);
            // Keys are not row numbers: only positional ids can skip one.
            if !keyed {
                chain.gaps.see(id);
            }
        }
    }
    tx.commit().await?;
    Ok(chain)
}

/// Checks every entry's content: present, and hashing to its row hash. Returns the
/// problems (at most [`MAX_REPORTED`]) and how many more there were.
async fn check_contents(
    pool: &PgPool,
    commit: &Commit,
) -> Result<(Vec<(String, String)>, u64), HistoryError> {
    let mut problems = Vec::new();
    let mut not_listed = 0u64;
    let mut keep = |found: Vec<(String, String)>| {
        for problem in found {
            if problems.len() < MAX_REPORTED {
                problems.push(problem);
            } else {
                not_listed += 1;
            }
        }
    };
    let mut hashing = FuturesOrdered::new();
    let mut chunk: Vec<(String, RowHash, Option<String>)> = Vec::with_capacity(CHUNK_ROWS);
    let mut conn = pool.acquire().await?;
    let mut rows = sqlx::query(
        "SELECT cr.logical_row_id, cr.row_hash, r.data::text AS data
           FROM dsa_core.commit_rows cr
           LEFT JOIN dsa_core.rows r ON r.row_hash = cr.row_hash
          WHERE cr.commit_id = $1",
    )
    .bind(&commit.commit_id)
    .fetch(&mut *conn);
    loop {
        while hashing.len() >= CHUNKS_IN_FLIGHT {
            keep(hashing.next().await.expect("in flight")?);
        }
        let Some(row) = rows.try_next().await? else {
            break;
        };
        let id: String = row.try_get("logical_row_id")?;
        let stored: Vec<u8> = row.try_get("row_hash")?;
        let data: Option<String> = row.try_get("data")?;
        let Ok(row_hash) = RowHash::try_from(stored.as_slice()) else {
            keep(vec![(
                id,
                format!("row hash {} is not 32 bytes", hex::encode(&stored)),
            )]);
            continue;
        };
        chunk.push((id, row_hash, data));
        if chunk.len() == CHUNK_ROWS {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_ROWS));
            hashing.push_back(hash_chunk(full));
        }
    }
    drop(rows);
    if !chunk.is_empty() {
        hashing.push_back(hash_chunk(chunk));
    }
    while let Some(found) = hashing.next().await {
        keep(found?);
    }
    Ok((problems, not_listed))
}

/// Hashes a chunk's content on the blocking pool; returns the rows that do not match.
fn hash_chunk(
    chunk: Vec<(String, RowHash, Option<String>)>,
) -> impl std::future::Future<Output = Result<Vec<(String, String)>, HistoryError>> {
    let task = tokio::task::spawn_blocking(move || {
        let mut problems = Vec::new();
        let mut canonical = Vec::new();
        for (id, stored, data) in chunk {
            let Some(data) = data else {
                problems.push((
                    id,
                    format!(
                        "row hash {} is missing from dsa_core.rows",
                        hex::encode(stored)
                    ),
                ));
                continue;
            };
            canonical.clear();
            let computed = if hash::write_canonical_flat_json(&data, &mut canonical) {
                Ok(hash::row_hash(&canonical))
            } else {
                serde_json::from_str::<serde_json::Value>(&data)
                    .map_err(|error| error.to_string())
                    .and_then(|value| {
                        hash::canonical_json(&value).map_err(|error| error.to_string())
                    })
                    .map(|canonical| hash::row_hash(&canonical))
            };
            match computed {
                Ok(computed) if computed == stored => {}
                Ok(computed) => problems.push((
                    id,
                    format!(
                        "data hashes to {}, not its row hash {}",
                        hex::encode(computed),
                        hex::encode(stored)
                    ),
                )),
                Err(error) => problems.push((id, format!("data cannot be hashed: {error}"))),
            }
        }
        problems
    });
    async move {
        task.await
            .map_err(|error| HistoryError::Usage(format!("hashing rows failed: {error}")))
    }
}

/// Positional ids a commit skips: `{sheet}:{n}` counts every data row from 1, so a
/// number that is absent was rejected by the run or lost from commit_rows.
#[derive(Default)]
struct Gaps {
    last: Option<(String, u64)>,
    skipped: u64,
    /// Skips: the first missing id and what is missing (at most [`MAX_REPORTED`]).
    unexplained: Vec<(String, String)>,
}

impl Gaps {
    fn see(&mut self, id: &str) {
        let Some((sheet, n)) = split_positional(id) else {
            return;
        };
        let expected = match &self.last {
            Some((last_sheet, last)) if last_sheet == sheet => last + 1,
            _ => 1,
        };
        self.last = Some((sheet.to_owned(), n));
        if n <= expected {
            return;
        }
        let missing = n - expected;
        self.skipped += missing;
        if self.unexplained.len() < MAX_REPORTED {
            let problem = if missing == 1 {
                format!(
                    "missing from commit_rows (the ids jump from {sheet}:{} to {id})",
                    expected - 1
                )
            } else {
                format!("missing from commit_rows, with the {} ids up to {sheet}:{} (the ids jump to {id})", missing - 1, n - 1)
            };
            self.unexplained
                .push((format!("{sheet}:{expected}"), problem));
        }
    }
}

/// How many rows the commit's run rejected (rows it was asked to skip).
async fn rejected_rows(pool: &PgPool, commit: &Commit) -> Result<u64, HistoryError> {
    let Some(run_id) = commit.run_id else {
        return Ok(0);
    };
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dsa_jobs.rejected_rows WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(pool)
            .await?;
    Ok(count as u64)
}

/// Follows `parent_commit_id` to a root; every link must be a finalised commit of the
/// same dataset, and no commit may come twice.
async fn parent_chain(pool: &PgPool, commit: &Commit) -> Result<Vec<String>, HistoryError> {
    let mut problems = Vec::new();
    let mut seen = HashSet::from([commit.commit_id.clone()]);
    let mut current = commit.clone();
    while let Some(parent_id) = current.parent_commit_id.clone() {
        let Some(parent) = commit_by_id(pool, &parent_id).await? else {
            problems.push(format!(
                "parent chain: {} names parent {parent_id}, which does not exist",
                current.commit_id
            ));
            break;
        };
        if parent.dataset_id != commit.dataset_id {
            problems.push(format!(
                "parent chain: parent {parent_id} of {} belongs to another dataset",
                current.commit_id
            ));
            break;
        }
        if parent.committed_at.is_none() {
            problems.push(format!(
                "parent chain: parent {parent_id} of {} is not finalised",
                current.commit_id
            ));
        }
        if !seen.insert(parent_id.clone()) {
            problems.push(format!(
                "parent chain: {parent_id} comes back, the history is a loop"
            ));
            break;
        }
        current = parent;
    }
    Ok(problems)
}

pub async fn command(pool: &PgPool, args: VerifyArgs) -> Result<ExitCode, HistoryError> {
    let dataset = Dataset::find(pool, &args.dataset).await?;
    let commits: Vec<Commit> = if args.all {
        sqlx::query_as(&format!(
            "SELECT {COMMIT_COLUMNS} FROM dsa_core.commits
              WHERE dataset_id = $1 AND committed_at IS NOT NULL
              ORDER BY committed_at, commit_id"
        ))
        .bind(dataset.id)
        .fetch_all(pool)
        .await?
    } else {
        vec![resolve(pool, &dataset, args.commit.as_deref().unwrap_or("main")).await?]
    };
    if commits.is_empty() {
        return Err(HistoryError::NoCommits(dataset.name));
    }
    let mut out = Stdout::new();
    let mut all_ok = true;
    for commit in &commits {
        let json = args.json;
        let mut printed = Ok(());
        let report = verify_commit(pool, commit, |problem| {
            if !json && printed.is_ok() {
                let line = match &problem.logical_row_id {
                    Some(id) => format!(
                        "commit {}: row {id}: {}\n",
                        commit.commit_id, problem.problem
                    ),
                    None => format!("commit {}: {}\n", commit.commit_id, problem.problem),
                };
                printed = out.write(line.as_bytes());
            }
        })
        .await?;
        printed?;
        all_ok &= report.ok;
        if json {
            let mut line = serde_json::to_vec(&report).expect("report serializes");
            line.push(b'\n');
            out.write(&line)?;
        } else if report.ok {
            out.write(
                format!(
                    "commit {}: ok ({} rows, tree hash {})\n",
                    commit.commit_id, report.rows, report.tree_hash
                )
                .as_bytes(),
            )?;
        } else {
            out.write(
                format!(
                    "commit {}: FAILED ({} problems)\n",
                    commit.commit_id,
                    report.problems.len() as u64 + report.problems_not_listed
                )
                .as_bytes(),
            )?;
        }
        out.flush()?;
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
