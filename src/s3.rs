//! The S3 client, configured to work alike against AWS S3, Garage, MinIO and LocalStack.

use std::time::Duration;

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};

use crate::config::S3Settings;

/// Builds a client from the settings and the standard AWS credential chain.
///
/// Path-style addressing is forced because self-hosted stores rarely have wildcard DNS
/// for virtual-hosted buckets, and checksums are only sent where S3 requires them
/// because not every S3-compatible store implements the newer checksum headers.
pub async fn client(settings: &S3Settings) -> aws_sdk_s3::Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(settings.region.clone()));
    if let Some(endpoint) = &settings.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let shared = loader.load().await;
    // Without these a store that accepts a connection and never sends a response would
    // hang an import for ever. A body that stalls midway is caught by the SDK's stalled
    // stream protection (on by default), and the range is resumed from its last byte.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .operation_attempt_timeout(Duration::from_secs(300))
        .build();
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .timeout_config(timeouts)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The object's user metadata `dataset` (`x-amz-meta-dataset`, trimmed), when it has
/// one; a missing object has none (the import's own HEAD then reports it). Any other
/// failure is returned as a message naming the object, for the caller to retry.
pub async fn dataset_metadata(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<Option<String>, String> {
    let head = match client.head_object().bucket(bucket).key(key).send().await {
        Ok(head) => head,
        Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => {
            return Ok(None)
        }
        Err(error) => {
            return Err(format!(
                "HEAD s3://{bucket}/{key} for its dataset metadata: {}",
                aws_sdk_s3::error::DisplayErrorContext(&error)
            ))
        }
    };
    Ok(head
        .metadata()
        .and_then(|metadata| metadata.get("dataset"))
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty()))
}
