//! `POST /v1/datasets/{name}/imports?filename=F&...`: the body streams into the store
//! (memory holds one part), then the run is created and queued as `submit` does.
//!
//! Every way an upload can end early (too large, not a file an import can read, a
//! client that goes quiet or away, the store failing) aborts the multipart upload, so
//! the store keeps neither an object nor parts. The upload runs on a task of its own:
//! a client that disconnects ends the request's future, and the abort must still run.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use uuid::Uuid;

use crate::db::DatasetName;
use crate::history::export::MultipartWriter;
use crate::import::decode::sniff::{refuse_content, HEAD_BYTES};
use crate::import::fetch::Fetcher;
use crate::import::run::{ImportParameters, SourceLocation};

use super::auth::Scope;
use super::problem::{json_response, Problem};
use super::query::UploadQuery;
use super::Api;

/// Idempotency keys longer than this are refused.
const MAX_IDEMPOTENCY_KEY: usize = 200;

pub async fn create_import(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let caller = api.inner.clients.authenticate(&headers)?;
    let dataset =
        DatasetName::parse(&name).map_err(|error| Problem::bad_request(error.to_string()))?;
    caller.may(Scope::Write, dataset.as_str())?;
    // Held by the upload's task, so a client that disconnects keeps its slot until the
    // abort is done.
    let slot = api.inner.limits.upload_slot(&caller)?;
    let request = UploadQuery::parse(query.as_deref()).map_err(Problem::bad_request)?;
    let limit = api.inner.settings.import.max_file_size;
    let declared = match headers.get(header::CONTENT_LENGTH) {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.parse::<u64>().ok())
                .ok_or_else(|| Problem::bad_request("Content-Length is not a number"))?,
        ),
        None => None,
    };
    // Before a body byte is read (and before `100 Continue` is sent, which hyper does
    // only once the body is polled).
    if let Some(length) = declared {
        if length > limit {
            return Err(too_large(length, limit));
        }
    }
    let user = caller.user().map(str::to_owned);
    let idempotency_key = match headers.get("idempotency-key") {
        Some(value) => {
            let key = value
                .to_str()
                .ok()
                .filter(|key| !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY)
                .ok_or_else(|| {
                    Problem::bad_request(format!(
                        "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                    ))
                })?;
            // Scoped to the client, so two clients choosing the same key stay apart.
            Some(format!("http:{}:{key}", user.as_deref().unwrap_or("")))
        }
        None => None,
    };
    if let Some(key) = &idempotency_key {
        if let Some(run_id) = crate::runs::run_by_key(&api.inner.pool, key).await? {
            return accepted_existing(&api, run_id).await;
        }
    }
    // A broker that is away refuses the upload before it is sent.
    if let Err(error) = api.inner.queue.connected().await {
        return Err(Problem::internal(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the import queue is not reachable, nothing was stored: {error}"),
        )
        .retry_after(10));
    }
    let upload = Upload {
        api: api.clone(),
        dataset,
        request,
        user,
        idempotency_key,
        declared,
        limit,
        _slot: slot,
        _in_flight: crate::metrics::metrics().http_upload_in_flight(),
    };
    tokio::spawn(upload.run(body))
        .await
        .unwrap_or_else(|error| {
            Err(Problem::internal(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the upload task failed: {error}"),
            ))
        })
}

fn too_large(length: u64, limit: u64) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the file has {length} bytes or more, more than the limit of {limit} \
             (IMPORT_MAX_FILE_SIZE); nothing was stored"
        ),
    )
}

/// `202` for a run an earlier request with the same idempotency key created.
async fn accepted_existing(api: &Api, run_id: Uuid) -> Result<Response, Problem> {
    let run = crate::runs::run_status(&api.inner.pool, run_id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("run {run_id} no longer exists")))?;
    Ok(accepted(
        run_id,
        run.dataset.as_deref().unwrap_or(""),
        &run.status,
    ))
}

fn accepted(run_id: Uuid, dataset: &str, status: &str) -> Response {
    let mut response = json_response(
        StatusCode::ACCEPTED,
        &serde_json::json!({"run_id": run_id, "dataset": dataset, "status": status}),
    );
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/runs/{run_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

struct Upload {
    api: Api,
    dataset: DatasetName,
    request: UploadQuery,
    user: Option<String>,
    idempotency_key: Option<String>,
    declared: Option<u64>,
    limit: u64,
    /// One of the client's `HTTP_MAX_CONCURRENT_UPLOADS`, until the upload ends.
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// `dsa_http_uploads_in_flight`, until the upload ends.
    _in_flight: crate::metrics::GaugeGuard,
}

/// The next piece of the body, within the idle timeout.
async fn next_chunk(
    stream: &mut (impl futures::Stream<Item = Result<Bytes, axum::Error>> + Unpin),
    idle: Duration,
) -> Result<Option<Bytes>, Problem> {
    match tokio::time::timeout(idle, stream.next()).await {
        Err(_) => Err(Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body sent nothing for {} seconds (HTTP_BODY_TIMEOUT_SECONDS); nothing was stored",
                idle.as_secs()
            ),
        )),
        Ok(Some(Err(error))) => Err(Problem::bad_request(format!(
            "reading the body failed ({error}); nothing was stored"
        ))),
        Ok(Some(Ok(chunk))) => {
            crate::metrics::metrics().http_upload_bytes(chunk.len() as u64);
            Ok(Some(chunk))
        }
        Ok(None) => Ok(None),
    }
}

impl Upload {
    async fn run(self, body: Body) -> Result<Response, Problem> {
        let api = &self.api.inner;
        let idle = api.settings.http.body_timeout;
        let mut stream = body.into_data_stream();

        // The first bytes decide whether the file can be imported at all.
        let mut head = Vec::new();
        while head.len() < HEAD_BYTES {
            match next_chunk(&mut stream, idle).await? {
                Some(chunk) => head.extend_from_slice(&chunk),
                None => break,
            }
        }
        if head.is_empty() {
            return Err(Problem::bad_request(
                "the body is empty; send the file as the request body",
            ));
        }
        if let Some(reason) = refuse_content(&self.request.filename, &head) {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("{reason}; nothing was stored"),
            ));
        }

        let key = crate::cli::submit::upload_key(
            &self.dataset,
            &self.request.filename,
            chrono::Utc::now().date_naive(),
            Uuid::new_v4(),
        );
        let mut writer = MultipartWriter::new(api.s3.clone(), &api.bucket, &key);
        let started = std::time::Instant::now();
        let received = async {
            let mut bytes = head.len() as u64;
            if bytes > self.limit {
                return Err(too_large(bytes, self.limit));
            }
            writer.write(&head).await.map_err(store_error)?;
            while let Some(chunk) = next_chunk(&mut stream, idle).await? {
                bytes += chunk.len() as u64;
                if bytes > self.limit {
                    return Err(too_large(bytes, self.limit));
                }
                writer.write(&chunk).await.map_err(store_error)?;
            }
            if let Some(declared) = self.declared {
                if bytes != declared {
                    return Err(Problem::bad_request(format!(
                        "the body ended after {bytes} of the {declared} bytes Content-Length \
                         announced; nothing was stored"
                    )));
                }
            }
            Ok(bytes)
        }
        .await;
        let bytes = match received {
            Ok(bytes) => bytes,
            Err(problem) => {
                writer.abort().await;
                tracing::info!(
                    dataset = %self.dataset.as_str(),
                    status = problem.status.as_u16(),
                    reason = %problem.detail,
                    "upload refused"
                );
                return Err(problem);
            }
        };
        writer.finish().await.map_err(store_error)?;
        tracing::info!(
            bucket = %api.bucket,
            key = %key,
            bytes,
            duration_ms = started.elapsed().as_millis() as u64,
            "uploaded"
        );

        let source = SourceLocation::S3 {
            bucket: api.bucket.clone(),
            key: key.clone(),
        };
        // The ETag the store gives the new object pins the run to these bytes.
        let object = Fetcher::new(source.clone(), Some(api.s3.clone()), &api.settings.import)
            .head(self.limit)
            .await
            .map_err(|error| {
                Problem::internal(
                    StatusCode::BAD_GATEWAY,
                    format!("reading back the stored upload failed: {error}"),
                )
            })?;
        let parameters = ImportParameters {
            source,
            expected_etag: object.etag,
            options: self.request.options.clone(),
        };
        let user = self.user.as_deref();
        let run_id = match &self.idempotency_key {
            None => {
                crate::runs::create_for_dataset(&api.pool, &self.dataset, user, &parameters)
                    .await
                    .map_err(|error| {
                        Problem::internal(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
                    })?
                    .0
            }
            Some(idempotency_key) => {
                let (dataset_id, _) = crate::db::ensure_dataset(&api.pool, &self.dataset, None)
                    .await
                    .map_err(|error| {
                        Problem::internal(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
                    })?;
                let mut connection = api.pool.acquire().await?;
                let (run_id, created) = crate::runs::create_keyed_run_in(
                    &mut connection,
                    Some(dataset_id),
                    user,
                    &parameters,
                    idempotency_key,
                )
                .await?;
                if !created {
                    // A retry that raced the first request: the first one's run stands
                    // and this copy of the file is not needed.
                    let _ = api
                        .s3
                        .delete_object()
                        .bucket(&api.bucket)
                        .key(&key)
                        .send()
                        .await;
                    return accepted_existing(&self.api, run_id).await;
                }
                run_id
            }
        };
        api.queue.queue(&api.pool, run_id).await.map_err(|error| {
            Problem::internal(StatusCode::SERVICE_UNAVAILABLE, error.to_string()).retry_after(10)
        })?;
        tracing::info!(run.id = %run_id, dataset = %self.dataset.as_str(), key = %key, "run queued");
        Ok(accepted(run_id, self.dataset.as_str(), "pending"))
    }
}

fn store_error(error: crate::history::HistoryError) -> Problem {
    Problem::internal(
        StatusCode::BAD_GATEWAY,
        format!("storing the upload failed, nothing was kept: {error}"),
    )
}
