//! Per-client limits: a rate of API requests (`HTTP_REQUESTS_PER_SECOND`, a token
//! bucket) and uploads at once (`HTTP_MAX_CONCURRENT_UPLOADS`). Past either the answer
//! is `429` with `Retry-After`.
//!
//! A client is a name of the tokens file, so the state is one entry per client and
//! cannot grow with traffic. Without a tokens file (`--insecure-no-auth`) every caller
//! is the same client. Requests without a valid token are not counted: they are `401`
//! before they cost anything but a hash.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{metrics, HttpRoute};

use super::auth::Caller;
use super::problem::Problem;
use super::Api;

/// The limits of every client.
pub struct Limits {
    requests_per_second: f64,
    max_concurrent_uploads: usize,
    /// Each client's bucket of requests: how many it may make now, and when that was.
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    /// Each client's upload slots.
    uploads: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// The key of a caller's limits.
fn client_key(caller: &Caller<'_>) -> String {
    caller.user().unwrap_or_default().to_owned()
}

impl Limits {
    pub fn new(requests_per_second: u64, max_concurrent_uploads: u64) -> Self {
        Self {
            requests_per_second: requests_per_second.max(1) as f64,
            max_concurrent_uploads: max_concurrent_uploads.max(1) as usize,
            buckets: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from the client's bucket, or says how long until one is back.
    fn take_request(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let rate = self.requests_per_second;
        let mut buckets = self
            .buckets
            .lock()
            .expect("the limits lock is not poisoned");
        let (tokens, at) = buckets.entry(client.to_owned()).or_insert((rate, now));
        // A full bucket holds one second's worth: the burst a client may send at once.
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }

    /// One of the client's upload slots, held until the permit is dropped, or `429`.
    pub fn upload_slot(&self, caller: &Caller<'_>) -> Result<OwnedSemaphorePermit, Problem> {
        let slots = self
            .uploads
            .lock()
            .expect("the limits lock is not poisoned")
            .entry(client_key(caller))
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_concurrent_uploads)))
            .clone();
        slots.try_acquire_owned().map_err(|_| {
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this token has {} uploads under way, the limit \
                     (HTTP_MAX_CONCURRENT_UPLOADS); send this one when one of them ends",
                    self.max_concurrent_uploads
                ),
            )
            .retry_after(1)
        })
    }
}

/// Counts every request by route and status class, and holds each client to its rate
/// on the API's routes.
pub async fn limit_and_count(
    State(api): State<Api>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = HttpRoute::of_template(matched.as_ref().map(MatchedPath::as_str));
    let api_route = !matches!(
        route,
        HttpRoute::Healthz
            | HttpRoute::Readyz
            | HttpRoute::Metrics
            | HttpRoute::OpenApi
            | HttpRoute::Unmatched
    );
    let refused = if api_route {
        match api.inner.clients.authenticate(request.headers()) {
            Ok(caller) => api
                .inner
                .limits
                .take_request(&client_key(&caller), Instant::now())
                .err(),
            // The handler answers `401`.
            Err(_) => None,
        }
    } else {
        None
    };
    let response = match refused {
        Some(wait) => Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "this token sent more than {} requests a second (HTTP_REQUESTS_PER_SECOND); \
                 wait and send it again",
                api.inner.limits.requests_per_second
            ),
        )
        .retry_after(wait.as_secs_f64().ceil().max(1.0) as u64)
        .into_response(),
        None => next.run(request).await,
    };
    metrics().http_request(route, response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_the_rate() {
        let limits = Limits::new(2, 1);
        let start = Instant::now();
        assert!(limits.take_request("a", start).is_ok());
        assert!(limits.take_request("a", start).is_ok());
        let wait = limits.take_request("a", start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another client has a bucket of its own.
        assert!(limits.take_request("b", start).is_ok());
        let later = start + Duration::from_millis(500);
        assert!(limits.take_request("a", later).is_ok());
        assert!(limits.take_request("a", later).is_err());
    }
}
