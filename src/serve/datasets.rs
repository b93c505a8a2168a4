//! The read side of the history over HTTP: datasets, their commits, diffs and exports,
//! each the same as the command of the same name prints.
//!
//! Diffs and exports stream: the command runs on a task of its own and writes into a
//! bounded channel that the response body reads, so memory holds a few chunks whatever
//! the commit's size, and a client that reads slowly slows the query. The response
//! starts only with the first chunk, so anything that fails before it (an unknown
//! commit, a sheet the commit lacks, the database) is a problem; a failure after it
//! cuts the body short, which the client sees as an incomplete chunked body.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::db::{DatasetError, DatasetName};
use crate::history::diff::{write_diff, DiffForm, DiffPair};
use crate::history::resolve::{resolve, Dataset};
use crate::history::{ChannelWriter, Chunk, ExportFormat, HistoryError, Output};

use super::auth::Scope;
use super::problem::{json_response, Problem};
use super::query::{pairs, MAX_QUERY_BYTES};
use super::Api;

/// How many chunks (of up to 64 KiB) wait between a streaming command and its reader.
const CHANNEL_CHUNKS: usize = 4;

/// A dataset as the API shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct DatasetInfo {
    pub id: i64,
    pub name: String,
    /// The key columns of a keyed dataset, or null for one whose rows are positional.
    pub key_columns: Option<Vec<String>>,
    /// The commit `main` points at; null before the first import.
    pub main_commit: Option<String>,
    /// The rows of the main commit (0 before the first import).
    pub row_count: i64,
}

const DATASET_QUERY: &str = "SELECT d.id, d.name, d.key_columns, r.commit_id AS main_commit,
            coalesce(c.row_count, 0) AS row_count
       FROM dsa_core.datasets d
       LEFT JOIN dsa_core.refs r ON r.dataset_id = d.id AND r.name = 'main'
       LEFT JOIN dsa_core.commits c ON c.commit_id = r.commit_id";

/// A history command's error as a problem: what the client named wrongly is `4xx`,
/// what failed here is `5xx`.
pub fn history_problem(error: HistoryError) -> Problem {
    match error {
        HistoryError::Dataset(DatasetError::NotFound(_))
        | HistoryError::NoCommits(_)
        | HistoryError::UnknownCommit { .. }
        | HistoryError::OtherDataset { .. }
        | HistoryError::HistoryTooShort { .. } => Problem::not_found(error.to_string()),
        HistoryError::Dataset(DatasetError::InvalidName(_))
        | HistoryError::AmbiguousPrefix { .. }
        | HistoryError::PrefixTooShort(_)
        | HistoryError::BadName(_)
        | HistoryError::Usage(_) => Problem::bad_request(error.to_string()),
        HistoryError::Dataset(DatasetError::Database(error)) | HistoryError::Database(error) => {
            error.into()
        }
        HistoryError::MissingRow { .. } | HistoryError::Write { .. } | HistoryError::S3 { .. } => {
            Problem::internal(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
        }
    }
}

/// The dataset named in the path, after checking the caller may read it (before
/// looking it up, so a refusal says nothing of whether it exists).
async fn readable_dataset(api: &Api, headers: &HeaderMap, name: &str) -> Result<Dataset, Problem> {
    let caller = api.inner.clients.authenticate(headers)?;
    let name = DatasetName::parse(name).map_err(|error| Problem::bad_request(error.to_string()))?;
    caller.may(Scope::Read, name.as_str())?;
    Dataset::find(&api.inner.pool, name.as_str())
        .await
        .map_err(history_problem)
}

/// The query's `name=value` pairs; each name at most once and among `known`.
fn query_pairs(query: Option<&str>, known: &[&str]) -> Result<Vec<(String, String)>, Problem> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY_BYTES {
        return Err(Problem::bad_request(format!(
            "the query string has {} bytes, more than the limit of {MAX_QUERY_BYTES}",
            query.len()
        )));
    }
    let pairs = pairs(query).map_err(Problem::bad_request)?;
    for (index, (name, _)) in pairs.iter().enumerate() {
        if !known.contains(&name.as_str()) {
            return Err(Problem::bad_request(format!(
                "unknown query parameter {name:?}; the parameters are {}",
                known.join(", ")
            )));
        }
        if pairs[..index].iter().any(|(earlier, _)| earlier == name) {
            return Err(Problem::bad_request(format!("{name} is given twice")));
        }
    }
    Ok(pairs)
}

fn parameter<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// `GET /v1/datasets`: the datasets the token may read, by name.
pub async fn list_datasets(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let caller = api.inner.clients.authenticate(&headers)?;
    let datasets: Vec<DatasetInfo> = sqlx::query_as(&format!("{DATASET_QUERY} ORDER BY d.name"))
        .fetch_all(&api.inner.pool)
        .await?;
    let datasets: Vec<DatasetInfo> = datasets
        .into_iter()
        .filter(|dataset| caller.may_read(&dataset.name))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "datasets": datasets }),
    ))
}

/// `GET /v1/datasets/{name}`.
pub async fn get_dataset(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let dataset = readable_dataset(&api, &headers, &name).await?;
    let info: DatasetInfo = sqlx::query_as(&format!("{DATASET_QUERY} WHERE d.id = $1"))
        .bind(dataset.id)
        .fetch_optional(&api.inner.pool)
        .await?
        .ok_or_else(|| Problem::not_found(format!("dataset {name:?} does not exist")))?;
    Ok(json_response(StatusCode::OK, &info))
}

/// `GET /v1/datasets/{name}/commits?limit=N`: as `log --json`, newest first.
pub async fn list_commits(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let dataset = readable_dataset(&api, &headers, &name).await?;
    let pairs = query_pairs(query.as_deref(), &["limit"])?;
    let limit = parameter(&pairs, "limit")
        .map(|value| {
            value.parse::<u64>().map_err(|_| {
                Problem::bad_request(format!("limit={value:?}: expected a whole number"))
            })
        })
        .transpose()?;
    let commits = if limit == Some(0) {
        Vec::new()
    } else {
        crate::history::log::history(&api.inner.pool, &dataset, limit)
            .await
            .map_err(history_problem)?
    };
    Ok(json_response(StatusCode::OK, &commits))
}

/// `GET /v1/datasets/{name}/diff?from=&to=`: JSON Lines, as `diff --json`.
pub async fn diff(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let dataset = readable_dataset(&api, &headers, &name).await?;
    let pairs = query_pairs(query.as_deref(), &["from", "to"])?;
    let pool = api.inner.pool.clone();
    let pair = DiffPair::resolve(
        &pool,
        &dataset,
        parameter(&pairs, "from"),
        parameter(&pairs, "to"),
    )
    .await
    .map_err(history_problem)?;
    let body = stream(|writer| async move {
        write_diff(&pool, &pair, DiffForm::JsonLines, Output::Channel(writer)).await
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/jsonl"),
        )],
        body,
    )
        .into_response())
}

/// `GET /v1/datasets/{name}/export?commit=&format=csv|jsonl&sheet=&safe_formulas=`: the
/// commit's rows as a download.
pub async fn export(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let dataset = readable_dataset(&api, &headers, &name).await?;
    let pairs = query_pairs(
        query.as_deref(),
        &["commit", "format", "sheet", "safe_formulas"],
    )?;
    let format = match parameter(&pairs, "format").unwrap_or("csv") {
        "csv" => ExportFormat::Csv,
        "jsonl" => ExportFormat::Jsonl,
        other => {
            return Err(Problem::bad_request(format!(
                "format={other:?}: expected csv or jsonl"
            )))
        }
    };
    let sheet = parameter(&pairs, "sheet").map(str::to_owned);
    let safe_formulas = parameter(&pairs, "safe_formulas")
        .map(|value| super::query::boolean("safe_formulas", value))
        .transpose()
        .map_err(Problem::bad_request)?
        .unwrap_or(false);
    let pool = api.inner.pool.clone();
    let commit = resolve(
        &pool,
        &dataset,
        parameter(&pairs, "commit").unwrap_or("main"),
    )
    .await
    .map_err(history_problem)?;
    let file_name = download_name(&dataset.name, &commit.commit_id, sheet.as_deref(), format);
    let body = stream(|writer| async move {
        crate::history::export::export_into(
            &pool,
            &commit,
            format,
            sheet.as_deref(),
            safe_formulas,
            writer,
        )
        .await
        .map(|_| ())
    })
    .await?;
    let content_type = match format {
        ExportFormat::Csv => "text/csv; charset=utf-8",
        ExportFormat::Jsonl => "application/jsonl",
    };
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("attachment"));
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

/// `{dataset}-{commit}[-{sheet}].{csv|jsonl}`, with anything but letters, digits, `.`,
/// `_` and `-` made `_`, so the name needs no quoting and names no folder.
pub fn download_name(
    dataset: &str,
    commit_id: &str,
    sheet: Option<&str>,
    format: ExportFormat,
) -> String {
    let short = &commit_id[..commit_id.len().min(12)];
    let mut stem = format!("{dataset}-{short}");
    if let Some(sheet) = sheet {
        stem = format!("{stem}-{sheet}");
    }
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let extension = match format {
        ExportFormat::Csv => "csv",
        ExportFormat::Jsonl => "jsonl",
    };
    format!("{}.{extension}", stem.trim_start_matches('.'))
}

/// Runs `write` on a task of its own into a channel, and waits for its first chunk: an
/// error before it is the request's problem; after it, the body ends early.
async fn stream<F, Fut>(write: F) -> Result<Body, Problem>
where
    F: FnOnce(ChannelWriter) -> Fut,
    Fut: std::future::Future<Output = Result<(), HistoryError>> + Send + 'static,
{
    let (sender, mut receiver) = mpsc::channel::<Chunk>(CHANNEL_CHUNKS);
    let work = write(ChannelWriter::new(sender.clone()));
    tokio::spawn(async move {
        match work.await {
            Ok(()) => {}
            // The client went away; the query was stopped by that, nothing failed.
            Err(HistoryError::Write { source, .. })
                if source.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                tracing::debug!("the client left before the end of a streamed response");
            }
            Err(error) => {
                let _ = sender.send(Err(error)).await;
            }
        }
    });
    let first = match receiver.recv().await {
        None => return Ok(Body::empty()),
        Some(Err(error)) => return Err(history_problem(error)),
        Some(Ok(first)) => first,
    };
    let rest = futures::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        let item = chunk.map_err(|error| {
            tracing::error!(error = %error, "a streamed response failed midway; its body is cut short");
            std::io::Error::other(error.to_string())
        });
        Some((item, receiver))
    });
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(rest);
    Ok(Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_names_need_no_quoting() {
        assert_eq!(
            download_name("sales/eu", "0123456789abcdef", None, ExportFormat::Csv),
            "sales_eu-0123456789ab.csv"
        );
        assert_eq!(
            download_name("..x", "abc", Some("Q1 \"a\""), ExportFormat::Jsonl),
            "x-abc-Q1__a_.jsonl"
        );
    }
}
