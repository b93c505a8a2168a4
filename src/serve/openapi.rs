//! `GET /v1/openapi.json`: an OpenAPI 3.1 description of the server, built from the
//! route table below, which is also what the router is built from. A route cannot be
//! served without being described, nor described without being served: `handler`
//! matches every [`HttpRoute`], and [`OPERATIONS`] is checked against it by a test.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use serde_json::{json, Map, Value};

use crate::metrics::HttpRoute;

use super::problem::json_response;
use super::{datasets, runs, upload, Api};

/// One method on one route, as the description shows it.
pub struct Operation {
    pub route: HttpRoute,
    /// `get` or `post`, as OpenAPI spells it.
    pub method: &'static str,
    pub summary: &'static str,
    /// The query parameters, none required unless named in `required`.
    pub query: &'static [&'static str],
    pub required: &'static [&'static str],
    /// The status and media type of a successful answer.
    pub success: (u16, &'static str),
    /// Whether it needs a bearer token (when the server has a tokens file).
    pub authenticated: bool,
}

const JSON: &str = "application/json";

/// Every route the server answers, in the order the description lists them.
pub const OPERATIONS: &[Operation] = &[
    Operation {
        route: HttpRoute::Datasets,
        method: "get",
        summary: "The datasets the token may read.",
        query: &[],
        required: &[],
        success: (200, JSON),
        authenticated: true,
    },
    Operation {
        route: HttpRoute::Dataset,
        method: "get",
        summary: "One dataset: id, name, key columns, main commit, row count.",
        query: &[],
        required: &[],
        success: (200, JSON),
        authenticated: true,
    },
    Operation {
        route: HttpRoute::Commits,
        method: "get",
        summary: "The commits reachable from main, newest first, as `log --json`.",
        query: &["limit"],
        required: &[],
        success: (200, JSON),
        authenticated: true,
    },
    Operation {
        route: HttpRoute::Diff,
        method: "get",
        summary: "What changed between two commits, as the JSON Lines of `diff --json`.",
        query: &["from", "to"],
        required: &[],
        success: (200, "application/jsonl"),
        authenticated: true,
    },
    Operation {
        route: HttpRoute::Export,
        method: "get",
        summary: "A commit's rows as a CSV or JSON Lines download, as `export`.",
        query: &["commit", "format", "sheet", "safe_formulas"],
        required: &[],
        success: (200, "text/csv"),
        authenticated: true,
    },
    Operation {
        route: HttpRoute::Imports,
        method: "post",
        summary: "Upload a file (the body) and queue its import; answers the run.",
        query: &[
            "filename",
            "sheet",
            "skip_bad_rows",
            "message",
            "key",
            "mode",
            "on_conflict",
            "rekey",
            "sheet_name",
        ],
        required: &["filename"],
        success: (202, JSON),
        authenticated: true,
    },
    Operation {
        route: HttpRoute::Run,
        method: "get",
        summary: "A run, as `status --json`.",
        query: &[],
        required: &[],
        success: (200, JSON),
        authenticated: true,
    },
    Operation {
        route: HttpRoute::RunEvents,
        method: "get",
        summary: "Server-Sent Events: progress, then completed or failed.",
        query: &[],
        required: &[],
        success: (200, "text/event-stream"),
        authenticated: true,
    },
    Operation {
        route: HttpRoute::OpenApi,
        method: "get",
        summary: "This description.",
        query: &[],
        required: &[],
        success: (200, JSON),
        authenticated: false,
    },
    Operation {
        route: HttpRoute::Healthz,
        method: "get",
        summary: "Liveness: the process runs.",
        query: &[],
        required: &[],
        success: (200, "text/plain"),
        authenticated: false,
    },
    Operation {
        route: HttpRoute::Readyz,
        method: "get",
        summary: "Readiness: the database answers and the broker connection is up.",
        query: &[],
        required: &[],
        success: (200, "text/plain"),
        authenticated: false,
    },
    Operation {
        route: HttpRoute::Metrics,
        method: "get",
        summary: "The Prometheus metrics.",
        query: &[],
        required: &[],
        success: (200, "text/plain"),
        authenticated: false,
    },
];

/// The handler of an API route; `None` for the routes of [`crate::http::router`] and
/// for `Unmatched`. The match names every route, so a new one needs a decision here.
pub fn handler(route: HttpRoute) -> Option<MethodRouter<Api>> {
    Some(match route {
        HttpRoute::Datasets => get(datasets::list_datasets),
        HttpRoute::Dataset => get(datasets::get_dataset),
        HttpRoute::Commits => get(datasets::list_commits),
        HttpRoute::Diff => get(datasets::diff),
        HttpRoute::Export => get(datasets::export),
        HttpRoute::Imports => post(upload::create_import),
        HttpRoute::Run => get(runs::get_run),
        HttpRoute::RunEvents => get(runs::run_events),
        HttpRoute::OpenApi => get(openapi_json),
        HttpRoute::Healthz | HttpRoute::Readyz | HttpRoute::Metrics | HttpRoute::Unmatched => {
            return None
        }
    })
}

async fn openapi_json(State(_): State<Api>) -> Response {
    json_response(StatusCode::OK, &document())
}

/// The description of every operation.
pub fn document() -> Value {
    let problem = json!({
        "description": "A problem (RFC 9457); 429 and 503 carry Retry-After.",
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    });
    let mut paths = Map::new();
    for operation in OPERATIONS {
        let template = operation.route.as_str();
        let mut parameters: Vec<Value> = template
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        parameters.extend(operation.query.iter().map(|name| {
            json!({
                "name": name,
                "in": "query",
                "required": operation.required.contains(name),
                "schema": {"type": "string"}
            })
        }));
        let (status, media_type) = operation.success;
        let mut entry = json!({
            "operationId": format!("{}{}", operation.method, template.replace(['{', '}'], "").replace('/', "_")),
            "summary": operation.summary,
            "parameters": parameters,
            "responses": {
                status.to_string(): {"description": "Success.", "content": {media_type: {}}},
                "default": problem.clone(),
            }
        });
        if operation.route == HttpRoute::Imports {
            entry["requestBody"] = json!({
                "required": true,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
            });
        }
        if !operation.authenticated {
            entry["security"] = json!([]);
        }
        let methods = paths
            .entry(template.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        methods[operation.method] = entry;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "dsa-ingest", "version": env!("CARGO_PKG_VERSION")},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Problem": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"}
                }
            }}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described_once_and_every_api_route_has_a_handler() {
        for route in HttpRoute::ALL {
            let described = OPERATIONS
                .iter()
                .filter(|operation| operation.route == *route)
                .count();
            if *route == HttpRoute::Unmatched {
                assert_eq!(described, 0);
            } else {
                assert_eq!(described, 1, "{}", route.as_str());
            }
            let health = matches!(
                route,
                HttpRoute::Healthz | HttpRoute::Readyz | HttpRoute::Metrics | HttpRoute::Unmatched
            );
            assert_eq!(handler(*route).is_none(), health, "{}", route.as_str());
        }
        let document = document();
        assert_eq!(
            document["paths"].as_object().unwrap().len(),
            HttpRoute::ALL.len() - 1
        );
        assert_eq!(
            document["paths"]["/v1/datasets/{name}/imports"]["post"]["parameters"][0]["name"],
            "name"
        );
    }
}
