//! `dsa-ingest diff`: what changed between two commits of a dataset, by logical row id.
//!
//! The server merges the two commits' `commit_rows` on the primary key
//! `(commit_id, logical_row_id)`: both sides come out of the index in the same order,
//! so the merge reads each commit once and holds nothing. Only the changed entries are
//! then sorted into logical row order and joined to their content; this process sees
//! one changed row at a time.

use futures::TryStreamExt;
use serde::Serialize;
use sqlx::{PgPool, Row};

use super::resolve::{resolve, Commit, Dataset};
use super::{json_string, DiffArgs, HistoryError, Output};

/// How many rows were added, removed, changed and left as they were.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DiffSummary {
    pub added: i64,
    pub removed: i64,
    pub changed: i64,
    pub unchanged: i64,
}

/// One changed row, as `--json` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Added,
    Removed,
    Changed,
}

impl Op {
    fn parse(text: &str) -> Self {
        match text {
            "added" => Self::Added,
            "removed" => Self::Removed,
            _ => Self::Changed,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Removed => "removed",
            Self::Changed => "changed",
        }
    }
}

/// The two commits of a diff: `from` is `None` when `to` is a root commit.
pub struct DiffPair {
    pub from: Option<Commit>,
    pub to: Commit,
}

impl DiffPair {
    pub async fn resolve(
        pool: &PgPool,
        dataset: &Dataset,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Self, HistoryError> {
        let to = resolve(pool, dataset, to.unwrap_or("main")).await?;
        let from = match from {
            Some(name) => Some(resolve(pool, dataset, name).await?),
            None => match &to.parent_commit_id {
                Some(parent) => Some(resolve(pool, dataset, parent).await?),
                None => None,
            },
        };
        Ok(Self { from, to })
    }

    fn older_id(&self) -> &str {
        // No commit has the empty id, so a root commit is compared with nothing.
        self.from
            .as_ref()
            .map_or("", |from| from.commit_id.as_str())
    }

    /// Equal tree hashes mean equal ids and row hashes: nothing to read.
    fn same_tree(&self) -> Option<DiffSummary> {
        let from = self.from.as_ref()?;
        (from.tree_hash.is_some() && from.tree_hash == self.to.tree_hash).then(|| DiffSummary {
            unchanged: self.to.row_count.unwrap_or(0),
            ..DiffSummary::default()
        })
    }

    /// Both commits' sheets, `to`'s first, for the order of rows in the output.
    fn sheets(&self) -> Vec<String> {
        let mut sheets = self.to.sheets();
        if let Some(from) = &self.from {
            for sheet in from.sheets() {
                if !sheets.contains(&sheet) {
                    sheets.push(sheet);
                }
            }
        }
        sheets
    }

    /// The counts alone, from one merge of the two commits.
    pub async fn summary(&self, pool: &PgPool) -> Result<DiffSummary, HistoryError> {
        if let Some(summary) = self.same_tree() {
            return Ok(summary);
        }
        let mut tx = pool.begin().await?;
        prefer_merge(&mut tx).await?;
        let summary = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE a.row_hash IS NULL) AS added,
                    count(*) FILTER (WHERE b.row_hash IS NULL) AS removed,
                    count(*) FILTER (WHERE a.row_hash <> b.row_hash) AS changed,
                    count(*) FILTER (WHERE a.row_hash = b.row_hash) AS unchanged
               FROM (SELECT logical_row_id, row_hash FROM dsa_core.commit_rows
                      WHERE commit_id = $1 ORDER BY logical_row_id) a
               FULL JOIN (SELECT logical_row_id, row_hash FROM dsa_core.commit_rows
                           WHERE commit_id = $2 ORDER BY logical_row_id) b
                 ON a.logical_row_id = b.logical_row_id",
        )
        .bind(self.older_id())
        .bind(&self.to.commit_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(summary)
    }

    /// Streams every changed row to `out` in logical row order, as `line` writes it from
    /// the row's old and new content (JSON text); returns the counts. `unchanged` is the
    /// rows of `to` that were neither added nor changed.
    pub async fn changes(
        &self,
        pool: &PgPool,
        out: &mut Output,
        mut line: impl FnMut(Op, &str, Option<&str>, Option<&str>, &mut Vec<u8>),
    ) -> Result<DiffSummary, HistoryError> {
        if let Some(summary) = self.same_tree() {
            return Ok(summary);
        }
        let mut summary = DiffSummary::default();
        let mut text = Vec::with_capacity(4096);
        let mut tx = pool.begin().await?;
        prefer_merge(&mut tx).await?;
        let sql = format!(
            "SELECT CASE WHEN d.old_hash IS NULL THEN 'added'
                         WHEN d.new_hash IS NULL THEN 'removed'
                         ELSE 'changed' END AS op,
                    d.id, d.old_hash, d.new_hash, o.data::text AS old, n.data::text AS new
               FROM (SELECT coalesce(a.logical_row_id, b.logical_row_id) AS id,
                            a.row_hash AS old_hash, b.row_hash AS new_hash
                       FROM (SELECT logical_row_id, row_hash FROM dsa_core.commit_rows
                              WHERE commit_id = $1 ORDER BY logical_row_id) a
                       FULL JOIN (SELECT logical_row_id, row_hash FROM dsa_core.commit_rows
                                   WHERE commit_id = $2 ORDER BY logical_row_id) b
                         ON a.logical_row_id = b.logical_row_id
                      WHERE a.row_hash IS DISTINCT FROM b.row_hash) d
               LEFT JOIN dsa_core.rows o ON o.row_hash = d.old_hash
               LEFT JOIN dsa_core.rows n ON n.row_hash = d.new_hash
              ORDER BY {}",
            self.to.order_by("d.id", &self.sheets())
        );
        let mut rows = sqlx::query(&sql)
            .bind(self.older_id())
            .bind(&self.to.commit_id)
            .fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            let op = Op::parse(row.try_get("op")?);
            let id: &str = row.try_get("id")?;
            let old: Option<&str> = row.try_get("old")?;
            let new: Option<&str> = row.try_get("new")?;
            for (hash, data, commit) in [
                ("old_hash", old, self.older_id()),
                ("new_hash", new, self.to.commit_id.as_str()),
            ] {
                let hash: Option<Vec<u8>> = row.try_get(hash)?;
                if let (Some(hash), None) = (hash, data) {
                    return Err(HistoryError::MissingRow {
                        commit_id: commit.to_owned(),
                        logical_row_id: id.to_owned(),
                        row_hash: hex::encode(hash),
                    });
                }
            }
            match op {
                Op::Added => summary.added += 1,
                Op::Removed => summary.removed += 1,
                Op::Changed => summary.changed += 1,
            }
            text.clear();
            line(op, id, old, new, &mut text);
            out.write(&text).await?;
        }
        drop(rows);
        tx.commit().await?;
        summary.unchanged = self.to.row_count.unwrap_or(0) - summary.added - summary.changed;
        Ok(summary)
    }
}

/// Both sides of the merge come out of the primary key's index in the same order (the
/// `ORDER BY` inside each side says so to the planner, which otherwise sorted them);
/// a hash join would build a table of a whole commit instead. The plan is a few
/// operators over index scans, which compiling (JIT) only slows down.
async fn prefer_merge(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL enable_hashjoin = off")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
    Ok(())
}

pub async fn command(pool: &PgPool, args: DiffArgs) -> Result<(), HistoryError> {
    let dataset = Dataset::find(pool, &args.dataset).await?;
    let pair = DiffPair::resolve(pool, &dataset, args.from.as_deref(), args.to.as_deref()).await?;
    let form = match (args.summary, args.json) {
        (true, true) => DiffForm::SummaryJson,
        (true, false) => DiffForm::Summary,
        (false, true) => DiffForm::JsonLines,
        (false, false) => DiffForm::Text,
    };
    write_diff(pool, &pair, form, Output::stdout()).await
}

/// How a diff is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffForm {
    /// `+ id {...}` lines, then the counts in words.
    Text,
    /// The counts in words only.
    Summary,
    /// One JSON object per changed row, then `{"summary": ...}`.
    JsonLines,
    /// `{"summary": ...}` only.
    SummaryJson,
}

/// Writes the diff of `pair` to `out` in `form`; the same bytes wherever they go.
pub async fn write_diff(
    pool: &PgPool,
    pair: &DiffPair,
    form: DiffForm,
    mut out: Output,
) -> Result<(), HistoryError> {
    let json = matches!(form, DiffForm::JsonLines | DiffForm::SummaryJson);
    let summary = if matches!(form, DiffForm::Summary | DiffForm::SummaryJson) {
        pair.summary(pool).await?
    } else {
        pair.changes(pool, &mut out, |op, id, old, new, line| {
            if json {
                line.extend_from_slice(b"{\"op\":\"");
                line.extend_from_slice(op.name().as_bytes());
                line.extend_from_slice(b"\",\"logical_row_id\":");
                json_string(id, line);
                line.extend_from_slice(b",\"old\":");
                line.extend_from_slice(old.unwrap_or("null").as_bytes());
                line.extend_from_slice(b",\"new\":");
                line.extend_from_slice(new.unwrap_or("null").as_bytes());
                line.extend_from_slice(b"}\n");
            } else {
                let (sign, text) = match op {
                    Op::Added => ("+", new.unwrap_or("").to_owned()),
                    Op::Removed => ("-", old.unwrap_or("").to_owned()),
                    Op::Changed => (
                        "~",
                        format!("{} -> {}", old.unwrap_or(""), new.unwrap_or("")),
                    ),
                };
                line.extend_from_slice(format!("{sign} {id} {text}\n").as_bytes());
            }
        })
        .await?
    };
    if json {
        // Through the struct, so the counts keep their documented order.
        let mut line = b"{\"summary\":".to_vec();
        line.extend(serde_json::to_vec(&summary).expect("summary serializes"));
        line.extend_from_slice(b"}\n");
        out.write(&line).await?;
    } else {
        if form == DiffForm::Text {
            out.write(b"\n").await?;
        }
        out.write(
            format!(
                "{} added, {} removed, {} changed, {} unchanged\n",
                summary.added, summary.removed, summary.changed, summary.unchanged
            )
            .as_bytes(),
        )
        .await?;
    }
    out.finish().await
}
