//! `dsa-ingest log`: the commits reachable from `main`, newest first.

use sqlx::PgPool;

use super::resolve::{Commit, Dataset, COMMIT_COLUMNS};
use super::{HistoryError, LogArgs, Stdout};

/// The commits reachable from `main` by `parent_commit_id`, newest first, at most
/// `limit`. Finalising can only point a commit at one that existed before it, so the
/// walk ends at a root.
pub async fn history(
    pool: &PgPool,
    dataset: &Dataset,
    limit: Option<u64>,
) -> Result<Vec<Commit>, HistoryError> {
    let limit = limit.map_or(i64::MAX, |limit| limit.min(i64::MAX as u64) as i64);
    let commits = sqlx::query_as(&format!(
        "WITH RECURSIVE chain (id, parent, depth) AS (
             SELECT c.commit_id, c.parent_commit_id, 1::bigint
               FROM dsa_core.refs r JOIN dsa_core.commits c USING (commit_id)
              WHERE r.dataset_id = $1 AND r.name = 'main'
             UNION ALL
             SELECT c.commit_id, c.parent_commit_id, chain.depth + 1
               FROM chain JOIN dsa_core.commits c ON c.commit_id = chain.parent
              WHERE chain.depth < $2)
         SELECT {COMMIT_COLUMNS} FROM chain JOIN dsa_core.commits ON commit_id = chain.id
          ORDER BY chain.depth"
    ))
    .bind(dataset.id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(commits)
}

pub async fn command(pool: &PgPool, args: LogArgs) -> Result<(), HistoryError> {
    let dataset = Dataset::find(pool, &args.dataset).await?;
    if args.limit == Some(0) {
        if args.json {
            println!("[]");
        }
        return Ok(());
    }
    let commits = history(pool, &dataset, args.limit).await?;
    let mut out = Stdout::new();
    if args.json {
        let mut text = serde_json::to_vec(&commits).expect("commits serialize");
        text.push(b'\n');
        out.write(&text)?;
    } else {
        for (index, commit) in commits.iter().enumerate() {
            if index > 0 {
                out.write(b"\n")?;
            }
            out.write(format_commit(commit).as_bytes())?;
        }
    }
    out.flush()
}

fn format_commit(commit: &Commit) -> String {
    let mut text = format!("commit {}\n", commit.commit_id);
    if let Some(parent) = &commit.parent_commit_id {
        text += &format!("parent {parent}\n");
    }
    if let Some(at) = commit.committed_at {
        text += &format!("Date:   {}\n", at.format("%Y-%m-%d %H:%M:%S UTC"));
    }
    text += &format!(
        "Author: {}\n",
        commit.author_id.as_deref().unwrap_or("(unknown)")
    );
    text += &format!(
        "Rows:   {}\nTree:   {}\n",
        commit.row_count.unwrap_or(0),
        commit.tree_hash.as_deref().unwrap_or("-")
    );
    if let Some(run) = commit.run_id {
        text += &format!("Run:    {run}\n");
    }
    text += "\n";
    for line in commit.message.lines() {
        text += &format!("    {line}\n");
    }
    text
}
