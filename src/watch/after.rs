//! What happens to an object once its run has ended: `after` for a completed run,
//! `after_failure` for a failed one (`keep`, `delete` or `move:PREFIX/`).
//!
//! A run is `completed` only in the transaction that finalises its commit, so an
//! object is deleted or moved only once its commit is durable. Before touching it, the
//! object's ETag is checked against the version that was imported: a key overwritten
//! since holds a newer version, which is left for its own run.

use aws_sdk_s3::error::DisplayErrorContext;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::metrics::{metrics, S3Operation, WatchAfter};
use crate::watch::record::{self, EndedObject};
use crate::watch::{WatchError, WatchSetup};

/// Objects acted on per round; the rest wait for the next round.
const BATCH: i64 = 200;

/// Characters a copy source may carry as they are (RFC 3986 unreserved, and `/`).
const COPY_SOURCE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Acts on the objects whose run has ended since the last round. An object the store
/// refuses to delete or move now is logged and tried again next round.
pub async fn act_on_ended(setup: &WatchSetup) -> Result<(), WatchError> {
    for object in record::ended_objects(&setup.pool, BATCH).await? {
        match act_on(setup, &object).await {
            Ok(result) => {
                tracing::info!(
                    bucket = %object.bucket,
                    key = %object.key,
                    run.id = %object.run_id,
                    run.status = %object.status,
                    result = %result,
                    "acted on an object whose run ended"
                );
                record::after_done(&setup.pool, &object, &result).await?;
            }
            Err(error) => {
                tracing::warn!(bucket = %object.bucket, key = %object.key, error = %error, "cannot act on an object whose run ended; trying again next round");
            }
        }
    }
    Ok(())
}

async fn act_on(setup: &WatchSetup, object: &EndedObject) -> Result<String, WatchError> {
    let Some(action) = object.action.as_deref() else {
        return Ok("kept".to_owned());
    };
    let s3_error = |action: &str, error: &dyn std::error::Error| WatchError::S3 {
        action: format!("{action} s3://{}/{}", object.bucket, object.key),
        message: DisplayErrorContext(error).to_string(),
    };
    metrics().s3_request(S3Operation::Head);
    let head = setup
        .s3
        .head_object()
        .bucket(&object.bucket)
        .key(&object.key)
        .send()
        .await;
    let current_etag = match head {
        Ok(head) => head
            .e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned(),
        Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => {
            metrics().watch_after_action(WatchAfter::Left);
            return Ok("left: the object was gone already".to_owned());
        }
        Err(error) => return Err(s3_error("HEAD", &error)),
    };
    if current_etag != object.etag {
        metrics().watch_after_action(WatchAfter::Left);
        return Ok(format!(
            "left: the key holds a newer version now (ETag {current_etag}, imported {})",
            object.etag
        ));
    }
    let result = match action.strip_prefix("move:") {
        Some(destination) => {
            let source = format!(
                "{}/{}",
                object.bucket,
                utf8_percent_encode(&object.key, COPY_SOURCE)
            );
            metrics().s3_request(S3Operation::Copy);
            setup
                .s3
                .copy_object()
                .bucket(&object.bucket)
                .key(destination)
                .copy_source(source)
                .copy_source_if_match(format!("\"{}\"", object.etag))
                .send()
                .await
                .map_err(|error| s3_error("copying", &error))?;
            format!("moved to s3://{}/{destination}", object.bucket)
        }
        None => "deleted".to_owned(),
    };
    metrics().s3_request(S3Operation::Delete);
    setup
        .s3
        .delete_object()
        .bucket(&object.bucket)
        .key(&object.key)
        .send()
        .await
        .map_err(|error| s3_error("deleting", &error))?;
    metrics().watch_after_action(if action == "delete" {
        WatchAfter::Deleted
    } else {
        WatchAfter::Moved
    });
    Ok(result)
}
