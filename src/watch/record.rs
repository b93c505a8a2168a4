//! Every statement on `dsa_jobs.watched_objects` and `dsa_jobs.watch_cursors`: which
//! object versions were seen, with which run, what to do with them once the run ends,
//! and where an ordered rule's next listing starts.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// One object version as a listing returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    /// Without the quotes S3 puts around it.
    pub etag: String,
    pub size: Option<i64>,
    pub last_modified: Option<DateTime<Utc>>,
}

/// Of these objects of `bucket`, the keys whose version (key and ETag) is recorded
/// already. One query per listed page, on the primary key.
pub async fn known_keys(
    pool: &PgPool,
    bucket: &str,
    objects: &[&ListedObject],
) -> Result<HashSet<String>, sqlx::Error> {
    if objects.is_empty() {
        return Ok(HashSet::new());
    }
    let keys: Vec<&str> = objects.iter().map(|object| object.key.as_str()).collect();
    let etags: Vec<&str> = objects.iter().map(|object| object.etag.as_str()).collect();
    let known: Vec<String> = sqlx::query_scalar(
        "SELECT w.key
           FROM unnest($2::text[], $3::text[]) AS listed (key, etag)
           JOIN dsa_jobs.watched_objects w
             ON w.bucket = $1 AND w.key = listed.key AND w.etag = listed.etag",
    )
    .bind(bucket)
    .bind(&keys)
    .bind(&etags)
    .fetch_all(pool)
    .await?;
    Ok(known.into_iter().collect())
}

/// What the record of a newly seen version holds besides the object itself.
pub struct Sighting<'a> {
    pub bucket: &'a str,
    pub rule: &'a str,
    pub run_id: Uuid,
    /// Whether this watcher created (and queued) the run.
    pub queued: bool,
    /// `delete` or `move:KEY`, for when the run completed or failed.
    pub after_success: Option<String>,
    pub after_failure: Option<String>,
}

/// Records a version as seen, in the caller's transaction (the one that created and
/// queued its run). A version recorded meanwhile by another lister stays as it is.
pub async fn record(
    conn: &mut PgConnection,
    object: &ListedObject,
    sighting: &Sighting<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dsa_jobs.watched_objects
                (bucket, key, etag, rule, size_bytes, last_modified, run_id, queued,
                 after_success, after_failure)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (bucket, key, etag) DO NOTHING",
    )
    .bind(sighting.bucket)
    .bind(&object.key)
    .bind(&object.etag)
    .bind(sighting.rule)
    .bind(object.size)
    .bind(object.last_modified)
    .bind(sighting.run_id)
    .bind(sighting.queued)
    .bind(&sighting.after_success)
    .bind(&sighting.after_failure)
    .execute(conn)
    .await?;
    Ok(())
}

/// An object whose run has ended and whose record asks for something to be done.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct EndedObject {
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub run_id: Uuid,
    /// `completed` or `failed`.
    pub status: String,
    /// `delete` or `move:KEY`, chosen by the status; `None` leaves the object.
    pub action: Option<String>,
}

/// Up to `limit` objects whose run has ended and whose after-action is not done yet,
/// oldest first.
pub async fn ended_objects(pool: &PgPool, limit: i64) -> Result<Vec<EndedObject>, sqlx::Error> {
    sqlx::query_as(
        "SELECT w.bucket, w.key, w.etag, w.run_id, r.status::text AS status,
                CASE WHEN r.status = 'completed' THEN w.after_success ELSE w.after_failure END
                  AS action
           FROM dsa_jobs.watched_objects w
           JOIN dsa_jobs.analysis_runs r ON r.id = w.run_id
          WHERE w.after_done_at IS NULL
            AND (w.after_success IS NOT NULL OR w.after_failure IS NOT NULL)
            AND r.status IN ('completed', 'failed', 'cancelled')
          ORDER BY w.first_seen_at
          LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Marks an object's after-action done, with what happened.
pub async fn after_done(
    pool: &PgPool,
    object: &EndedObject,
    result: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE dsa_jobs.watched_objects SET after_done_at = now(), after_result = $4
          WHERE bucket = $1 AND key = $2 AND etag = $3",
    )
    .bind(&object.bucket)
    .bind(&object.key)
    .bind(&object.etag)
    .bind(result)
    .execute(pool)
    .await?;
    Ok(())
}

/// Removes up to 10,000 records older than `retention` whose object needs nothing
/// more; returns how many.
pub async fn forget_old(pool: &PgPool, retention: std::time::Duration) -> Result<u64, sqlx::Error> {
    let removed = sqlx::query(
        "DELETE FROM dsa_jobs.watched_objects
          WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM dsa_jobs.watched_objects
                 WHERE first_seen_at < now() - make_interval(secs => $1)
                   AND (after_done_at IS NOT NULL
                        OR (after_success IS NULL AND after_failure IS NULL))
                 LIMIT 10000))",
    )
    .bind(retention.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(removed.rows_affected())
}

/// Where an ordered rule's next listing starts (after this key), if it has listed before.
pub async fn cursor(
    pool: &PgPool,
    bucket: &str,
    prefix: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT start_after FROM dsa_jobs.watch_cursors WHERE bucket = $1 AND prefix = $2",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await
}

/// Moves an ordered rule's cursor forward (never back; compared bytewise, the order in
/// which S3 lists keys).
pub async fn advance_cursor(
    pool: &PgPool,
    bucket: &str,
    prefix: &str,
    start_after: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dsa_jobs.watch_cursors (bucket, prefix, start_after) VALUES ($1, $2, $3)
         ON CONFLICT (bucket, prefix) DO UPDATE
            SET start_after = excluded.start_after, updated_at = now()
          WHERE watch_cursors.start_after COLLATE \"C\" < excluded.start_after COLLATE \"C\"",
    )
    .bind(bucket)
    .bind(prefix)
    .bind(start_after)
    .execute(pool)
    .await?;
    Ok(())
}
