//! Names of commits: a full id, a unique prefix of at least 7 characters, `main`, or
//! `main~N` (the Nth parent of `main`), always within one dataset.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::HistoryError;
use crate::db::{self, DatasetName};

/// The shortest prefix accepted as a commit's name, as in git.
pub const MIN_PREFIX: usize = 7;

/// A dataset named on the command line.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub id: i64,
    pub name: String,
}

impl Dataset {
    pub async fn find(pool: &PgPool, name: &str) -> Result<Self, HistoryError> {
        let name = DatasetName::parse(name)?;
        let id = db::find_dataset(pool, &name).await?;
        Ok(Self {
            id,
            name: name.as_str().to_owned(),
        })
    }
}

/// A finalised commit, as `log` shows it and the other commands read it.
#[derive(Clone, Debug, sqlx::FromRow, serde::Serialize)]
pub struct Commit {
    pub commit_id: String,
    pub parent_commit_id: Option<String>,
    pub message: String,
    pub author_id: Option<String>,
    pub committed_at: Option<DateTime<Utc>>,
    pub row_count: Option<i64>,
    pub tree_hash: Option<String>,
    pub run_id: Option<Uuid>,
    #[serde(skip)]
    pub dataset_id: i64,
    #[serde(skip)]
    pub source: Option<serde_json::Value>,
}

impl Commit {
    /// The keyed order its `source` records, or `None` for positional ids.
    pub fn keyed_order(&self) -> Option<crate::import::order::KeyedOrder> {
        self.source
            .as_ref()
            .and_then(crate::import::order::KeyedOrder::of_source)
    }

    /// The `ORDER BY` that reads this commit's rows (`column`) in logical row order;
    /// `sheets` are the sheet names positional ids follow.
    pub fn order_by(&self, column: &str, sheets: &[String]) -> String {
        match self.keyed_order() {
            Some(keyed) => crate::import::order::sql_order_by_keyed(column, &keyed),
            None => crate::import::order::sql_order_by(column, sheets),
        }
    }

    /// The reads that give this commit's rows (`column`) in logical row order, one
    /// after another (see [`crate::import::order::sql_logical_reads`]).
    pub fn logical_reads(&self, column: &str, sheets: &[String]) -> Vec<(String, String)> {
        crate::import::order::sql_logical_reads(column, sheets, self.keyed_order().as_ref())
    }

    /// The `ORDER BY` that reads the rows of one of this commit's sheets (`column`,
    /// filtered by [`Self::sheet_filter`]) in logical row order.
    pub fn order_within_sheet(&self, column: &str, sheet: &str) -> String {
        crate::import::order::sql_order_within_sheet(column, sheet, self.keyed_order().as_ref())
    }

    /// The `WHERE` condition that keeps the ids (`column`) of one of its sheets.
    pub fn sheet_filter(&self, column: &str, sheet: &str, sheets: &[String]) -> String {
        let keyed = self.keyed_order().is_some();
        crate::import::order::sql_sheet_filter(column, sheet, sheets, keyed)
    }

    /// The commit's sheet names in logical row order (empty for a CSV commit).
    pub fn sheets(&self) -> Vec<String> {
        self.source
            .as_ref()
            .map(crate::import::order::sheet_order)
            .unwrap_or_default()
    }
}

pub(crate) const COMMIT_COLUMNS: &str = "commit_id, parent_commit_id, message, author_id, \
     committed_at, row_count, tree_hash, run_id, dataset_id, source";

/// Reads one commit by its full id, whatever its dataset or state.
pub async fn commit_by_id(pool: &PgPool, commit_id: &str) -> Result<Option<Commit>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COMMIT_COLUMNS} FROM dsa_core.commits WHERE commit_id = $1"
    ))
    .bind(commit_id)
    .fetch_optional(pool)
    .await
}

/// The commit `main` points at, or `None` for a dataset without commits.
pub async fn main_commit(pool: &PgPool, dataset: &Dataset) -> Result<Option<Commit>, HistoryError> {
    let id: Option<String> = sqlx::query_scalar(
        "SELECT commit_id FROM dsa_core.refs WHERE dataset_id = $1 AND name = 'main'",
    )
    .bind(dataset.id)
    .fetch_optional(pool)
    .await?;
    match id {
        Some(id) => Ok(commit_by_id(pool, &id).await?),
        None => Ok(None),
    }
}

/// Resolves a commit's name within `dataset`; every failure says which name and why.
pub async fn resolve(pool: &PgPool, dataset: &Dataset, name: &str) -> Result<Commit, HistoryError> {
    let name = name.trim();
    if let Some(steps) = parse_main(name)? {
        let mut commit = main_commit(pool, dataset)
            .await?
            .ok_or_else(|| HistoryError::NoCommits(dataset.name.clone()))?;
        for step in 0..steps {
            let Some(parent) = commit.parent_commit_id.clone() else {
                return Err(HistoryError::HistoryTooShort {
                    name: name.to_owned(),
                    dataset: dataset.name.clone(),
                    commits: step + 1,
                });
            };
            commit =
                commit_by_id(pool, &parent)
                    .await?
                    .ok_or_else(|| HistoryError::UnknownCommit {
                        name: parent.clone(),
                        dataset: dataset.name.clone(),
                    })?;
        }
        return Ok(commit);
    }
    if name.len() < MIN_PREFIX {
        return Err(HistoryError::PrefixTooShort(name.to_owned()));
    }
    // Commit ids are hexadecimal; anything else names no commit (and needs no escaping
    // below, since it cannot contain LIKE's wildcards).
    if !name.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(HistoryError::UnknownCommit {
            name: name.to_owned(),
            dataset: dataset.name.clone(),
        });
    }
    let prefix = name.to_ascii_lowercase();
    let candidates: Vec<Commit> = sqlx::query_as(&format!(
        "SELECT {COMMIT_COLUMNS} FROM dsa_core.commits
          WHERE commit_id LIKE $1 || '%' AND committed_at IS NOT NULL
          ORDER BY (dataset_id = $2) DESC, commit_id LIMIT 10"
    ))
    .bind(&prefix)
    .bind(dataset.id)
    .fetch_all(pool)
    .await?;
    let (ours, others): (Vec<Commit>, Vec<Commit>) = candidates
        .into_iter()
        .partition(|commit| commit.dataset_id == dataset.id);
    match (ours.len(), others.first()) {
        (1, _) => Ok(ours.into_iter().next().expect("one candidate")),
        (0, Some(other)) => {
            let other_name: String =
                sqlx::query_scalar("SELECT name FROM dsa_core.datasets WHERE id = $1")
                    .bind(other.dataset_id)
                    .fetch_one(pool)
                    .await?;
            Err(HistoryError::OtherDataset {
                commit_id: other.commit_id.clone(),
                dataset: dataset.name.clone(),
                other: other_name,
            })
        }
        (0, None) => Err(HistoryError::UnknownCommit {
            name: name.to_owned(),
            dataset: dataset.name.clone(),
        }),
        _ => Err(HistoryError::AmbiguousPrefix {
            prefix: name.to_owned(),
            candidates: ours.into_iter().map(|commit| commit.commit_id).collect(),
        }),
    }
}

/// `main` is `Some(0)`, `main~N` is `Some(N)` (`main~` is `main~1`), other names `None`.
fn parse_main(name: &str) -> Result<Option<u64>, HistoryError> {
    let Some(rest) = name.strip_prefix("main") else {
        return Ok(None);
    };
    if rest.is_empty() {
        return Ok(Some(0));
    }
    let Some(steps) = rest.strip_prefix('~') else {
        return Ok(None);
    };
    if steps.is_empty() {
        return Ok(Some(1));
    }
    steps
        .parse()
        .map(Some)
        .map_err(|_| HistoryError::BadName(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_and_its_ancestors() {
        assert_eq!(parse_main("main").unwrap(), Some(0));
        assert_eq!(parse_main("main~").unwrap(), Some(1));
        assert_eq!(parse_main("main~12").unwrap(), Some(12));
        assert_eq!(parse_main("0a1b2c3d").unwrap(), None);
        assert_eq!(parse_main("mainline").unwrap(), None);
        assert!(parse_main("main~x").is_err());
    }
}
