//! One listing of one rule: page by page, each page's objects sorted into skipped,
//! seen before, and new; the new ones become runs, each created and queued in one
//! transaction per page.
//!
//! Memory holds one page (at most 1,000 objects) at a time, whatever the prefix holds:
//! the comparison with what was seen before is one query per page on the record's
//! primary key, never a listing kept whole.

use std::collections::HashMap;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::db::{self, DatasetError, DatasetName};
use crate::import::run::{ImportOptions, ImportParameters, SourceLocation};
use crate::metrics::{metrics, S3Operation, WatchSkip};
use crate::queue::messages::CreatedObject;
use crate::runs;
use crate::watch::lock::ListerLock;
use crate::watch::record::{self, ListedObject, Sighting};
use crate::watch::rules::{DatasetChoice, Rule};
use crate::watch::{WatchError, WatchSetup};

/// What one listing of one rule did.
#[derive(Debug, Default)]
pub struct Listing {
    pub listed: u64,
    pub queued: u64,
    /// The `LastModified` of the oldest object it saw and did not queue (unsettled).
    pub oldest_unqueued: Option<DateTime<Utc>>,
}

/// How a listing ended.
#[derive(Debug)]
pub enum ListingEnd {
    Done(Listing),
    /// Another replica may be the lister now: stop listing.
    LostLock,
    Stopped,
}

/// Lists `rule`'s prefix (from its cursor when ordered) and queues every new object
/// version. Checks the lock before each page.
pub async fn list_rule(
    setup: &WatchSetup,
    rule: &Rule,
    lock: &mut ListerLock,
    stop: &CancellationToken,
) -> Result<ListingEnd, WatchError> {
    let start_after = if rule.ordered {
        record::cursor(&setup.pool, &rule.bucket, &rule.prefix).await?
    } else {
        None
    };
    let mut listing = Listing::default();
    let mut continuation: Option<String> = None;
    // Ordered rules: the last key of the run of handled objects from the start; an
    // object left for later (unsettled) stops the cursor for the rest of the listing.
    let mut cursor: Option<String> = None;
    let mut cursor_blocked = false;
    let mut datasets = HashMap::new();
    loop {
        if stop.is_cancelled() {
            return Ok(ListingEnd::Stopped);
        }
        if !lock.still_held().await {
            return Ok(ListingEnd::LostLock);
        }
        let mut request = setup
            .s3
            .list_objects_v2()
            .bucket(&rule.bucket)
            .prefix(&rule.prefix);
        match (&continuation, &start_after) {
            (Some(token), _) => request = request.continuation_token(token),
            (None, Some(after)) => request = request.start_after(after),
            (None, None) => {}
        }
        metrics().s3_request(S3Operation::List);
        let page = request.send().await.map_err(|error| WatchError::S3 {
            action: format!("listing s3://{}/{}", rule.bucket, rule.prefix),
            message: aws_sdk_s3::error::DisplayErrorContext(&error).to_string(),
        })?;
        let objects: Vec<ListedObject> = page
            .contents()
            .iter()
            .filter_map(|object| {
                Some(ListedObject {
                    key: object.key()?.to_owned(),
                    etag: object
                        .e_tag()
                        .unwrap_or_default()
                        .trim_matches('"')
                        .to_owned(),
                    size: object.size(),
                    last_modified: object.last_modified().and_then(|at| {
                        DateTime::<Utc>::from_timestamp(at.secs(), at.subsec_nanos())
                    }),
                })
            })
            .collect();
        metrics().watch_listed(objects.len() as u64);
        listing.listed += objects.len() as u64;

        let handled = handle_page(setup, rule, &objects, &mut datasets).await?;
        listing.queued += handled.queued;
        listing.oldest_unqueued = earliest(listing.oldest_unqueued, handled.oldest_unqueued);
        if rule.ordered && !cursor_blocked {
            for (object, done) in objects.iter().zip(&handled.done) {
                if !done {
                    cursor_blocked = true;
                    break;
                }
                cursor = Some(object.key.clone());
            }
            if let Some(key) = &cursor {
                record::advance_cursor(&setup.pool, &rule.bucket, &rule.prefix, key).await?;
            }
        }

        continuation = page.next_continuation_token().map(str::to_owned);
        if !page.is_truncated().unwrap_or(false) || continuation.is_none() {
            return Ok(ListingEnd::Done(listing));
        }
    }
}

/// What became of one page.
struct Page {
    /// Per object: dealt with for good (queued, seen, or skipped for a reason that
    /// will not change); `false` for one a later listing must look at again.
    done: Vec<bool>,
    queued: u64,
    oldest_unqueued: Option<DateTime<Utc>>,
}

async fn handle_page(
    setup: &WatchSetup,
    rule: &Rule,
    objects: &[ListedObject],
    datasets: &mut HashMap<String, i64>,
) -> Result<Page, WatchError> {
    let now: DateTime<Utc> = SystemTime::now().into();
    let settle = chrono::Duration::from_std(setup.settings.settle).unwrap_or_default();
    let mut page = Page {
        done: vec![true; objects.len()],
        queued: 0,
        oldest_unqueued: None,
    };
    let young = |object: &ListedObject| object.last_modified.is_some_and(|at| at + settle > now);
    let mut candidates = Vec::new();
    for (index, object) in objects.iter().enumerate() {
        let skip = if object.key.ends_with('/') {
            Some(WatchSkip::Folder)
        } else if !rule.covers(&object.key) {
            Some(WatchSkip::Pattern)
        } else if ignored_name(&object.key[rule.prefix.len()..], &setup.settings) {
            // A temporary name is usually renamed soon, and the new name may sort
            // before it: an ordered rule's cursor waits for it to settle first.
            if rule.ordered && young(object) {
                page.done[index] = false;
            }
            Some(WatchSkip::IgnoredName)
        } else if setup
            .policy
            .check_object(&rule.bucket, &object.key)
            .is_err()
        {
            Some(WatchSkip::Refused)
        } else if young(object) {
            page.done[index] = false;
            page.oldest_unqueued = earliest(page.oldest_unqueued, object.last_modified);
            Some(WatchSkip::Unsettled)
        } else {
            None
        };
        match skip {
            Some(reason) => metrics().watch_skipped(reason),
            None => candidates.push(object),
        }
    }

    let known = record::known_keys(&setup.pool, &rule.bucket, &candidates).await?;
    let mut new = Vec::new();
    for object in candidates {
        if known.contains(&object.key) {
            metrics().watch_skipped(WatchSkip::Seen);
        } else {
            new.push(object);
        }
    }
    if new.is_empty() {
        return Ok(page);
    }

    // Datasets first, outside the transaction: one that is created and then not used
    // (a crash) is an empty dataset, nothing worse.
    let mut resolved = Vec::with_capacity(new.len());
    for object in new {
        match dataset_for(setup, rule, object).await? {
            Ok(name) => {
                let id = match datasets.get(name.as_str()) {
                    Some(id) => *id,
                    None => {
                        let id = db::ensure_dataset(&setup.pool, &name, None)
                            .await
                            .map_err(|error| match error {
                                DatasetError::Database(error) => WatchError::Database(error),
                                other => WatchError::Dataset(other.to_string()),
                            })?
                            .0;
                        datasets.insert(name.as_str().to_owned(), id);
                        id
                    }
                };
                resolved.push((object, id));
            }
            Err(reason) => refuse(setup, rule, object, &reason).await?,
        }
    }

    let mut tx = setup.pool.begin().await?;
    let mut created_runs = 0;
    for (object, dataset_id) in &resolved {
        let identity = identity(&rule.bucket, object);
        let parameters = parameters(rule, object);
        let (run_id, created) = runs::create_keyed_run_in(
            &mut tx,
            Some(*dataset_id),
            rule.user.as_deref(),
            &parameters,
            &identity.idempotency_key(),
        )
        .await?;
        if created {
            crate::outbox::queue_import(&mut tx, run_id).await?;
            created_runs += 1;
        }
        record::record(&mut tx, object, &sighting(rule, object, run_id, created)).await?;
        tracing::info!(
            rule = %rule.name,
            bucket = %rule.bucket,
            key = %object.key,
            etag = %object.etag,
            run.id = %run_id,
            dataset.id = dataset_id,
            queued = created,
            "new object version"
        );
    }
    tx.commit().await?;
    metrics().watch_queued(created_runs);
    for _ in created_runs as usize..resolved.len() {
        metrics().watch_skipped(WatchSkip::HasRun);
    }
    page.queued = created_runs;
    if created_runs > 0 {
        let _ = setup.nudge.try_send(());
    }
    Ok(page)
}

/// The identity S3 event records use, so an object that arrives both ways gets one run.
fn identity(bucket: &str, object: &ListedObject) -> CreatedObject {
    CreatedObject {
        bucket: bucket.to_owned(),
        key: object.key.clone(),
        etag: Some(object.etag.clone()),
        version_id: None,
        sequencer: None,
        event_name: None,
    }
}

/// The run a rule asks for: this object, pinned to the ETag listed (if the key is
/// overwritten before the import reads it, the run fails and the newer version, a new
/// identity, is imported by the next listing).
fn parameters(rule: &Rule, object: &ListedObject) -> ImportParameters {
    ImportParameters {
        source: SourceLocation::S3 {
            bucket: rule.bucket.clone(),
            key: object.key.clone(),
        },
        expected_etag: (!object.etag.is_empty()).then(|| object.etag.clone()),
        options: ImportOptions {
            message: Some(rule.message_for(&object.key)),
            ..rule.options.clone()
        },
    }
}

fn sighting<'a>(
    rule: &'a Rule,
    object: &ListedObject,
    run_id: uuid::Uuid,
    queued: bool,
) -> Sighting<'a> {
    Sighting {
        bucket: &rule.bucket,
        rule: &rule.name,
        run_id,
        queued,
        after_success: rule.after.for_object(&rule.prefix, &object.key),
        after_failure: rule.after_failure.for_object(&rule.prefix, &object.key),
    }
}

/// The dataset of an object's run; `Err` with the reason when the rule cannot name
/// one for this key (a missing path segment, an invalid name).
async fn dataset_for(
    setup: &WatchSetup,
    rule: &Rule,
    object: &ListedObject,
) -> Result<Result<DatasetName, String>, WatchError> {
    match &rule.dataset {
        DatasetChoice::Template(template) => Ok(template.render(&object.key)),
        DatasetChoice::LikeS3Events => {
            if let Some(name) = &setup.event_dataset {
                return Ok(Ok(name.clone()));
            }
            let from_metadata = if setup.event_dataset_from_metadata {
                crate::s3::dataset_metadata(&setup.s3, &rule.bucket, &object.key)
                    .await
                    .map_err(|message| WatchError::S3 {
                        action: "reading an object's dataset metadata".to_owned(),
                        message,
                    })?
            } else {
                None
            };
            let name =
                from_metadata.unwrap_or_else(|| identity(&rule.bucket, object).dataset_from_key());
            Ok(DatasetName::parse(&name).map_err(|error| {
                format!(
                    "s3://{}/{}: cannot take a dataset name from it: {error}",
                    rule.bucket, object.key
                )
            }))
        }
    }
}

/// An object the rule cannot import: a failed run of its own says why (found by the
/// object's identity, as for a refused S3 event record), and the record keeps later
/// listings from trying again.
async fn refuse(
    setup: &WatchSetup,
    rule: &Rule,
    object: &ListedObject,
    reason: &str,
) -> Result<(), WatchError> {
    let identity = identity(&rule.bucket, object);
    let mut tx = setup.pool.begin().await?;
    let (run_id, created) = runs::create_keyed_run_in(
        &mut tx,
        None,
        rule.user.as_deref(),
        &parameters(rule, object),
        &identity.idempotency_key(),
    )
    .await?;
    record::record(&mut tx, object, &sighting(rule, object, run_id, false)).await?;
    tx.commit().await?;
    if created {
        runs::fail_run(&setup.pool, run_id, None, reason).await?;
        tracing::warn!(rule = %rule.name, run.id = %run_id, reason, "object refused");
    }
    Ok(())
}

/// Whether a key below a rule's prefix looks hidden or temporary: a folder or name
/// starting with one of the ignored prefixes, or a name ending with an ignored suffix.
pub fn ignored_name(rest: &str, settings: &crate::config::WatchSettings) -> bool {
    let name = rest.rsplit('/').next().unwrap_or(rest);
    rest.split('/').any(|segment| {
        settings
            .ignore_prefixes
            .iter()
            .any(|prefix| segment.starts_with(prefix.as_str()))
    }) || settings
        .ignore_suffixes
        .iter()
        .any(|suffix| name.ends_with(suffix.as_str()))
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WatchSettings;

    #[test]
    fn hidden_and_temporary_names_are_ignored() {
        let settings = WatchSettings::default();
        for ignored in [
            ".hidden.csv",
            "_SUCCESS",
            "_temporary/0/part.csv",
            "2026/.staging/a.csv",
            "a.csv.tmp",
            "a.csv.part",
            "report.xlsx.crdownload",
        ] {
            assert!(ignored_name(ignored, &settings), "{ignored}");
        }
        for kept in [
            "a.csv",
            "2026/11/a b+c%.csv",
            "tmp/a.csv",
            "a_b.csv",
            "ü.csv",
        ] {
            assert!(!ignored_name(kept, &settings), "{kept}");
        }
        let none = WatchSettings {
            ignore_prefixes: Vec::new(),
            ignore_suffixes: Vec::new(),
            ..WatchSettings::default()
        };
        assert!(!ignored_name(".hidden.csv", &none));
    }
}
