//! The S3 client, configured to work alike against AWS S3, Garage, MinIO and LocalStack.

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
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}
