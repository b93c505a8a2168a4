//! `dsa-ingest serve` as a child process, spoken to over plain HTTP/1.1 on a socket, so
//! each test decides exactly what is sent and when (chunked bodies, huge declared
//! lengths, bodies that stop).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dsa_ingest::sample::sample_csv;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::broker::TestBroker;
use crate::helpers::{spawn_app, TestApp};
use crate::process::Consumer;

const WRITER: &str = "writer-token";
const READER: &str = "reader-token";

/// A tokens file: `web` may import into `sales*`, `bi` may read everything.
fn tokens_file() -> tempfile::NamedTempFile {
    let hash = |token: &str| hex::encode(Sha256::digest(token.as_bytes()));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!(
            "[[clients]]\nname = \"web\"\ntoken_sha256 = \"{}\"\ndatasets = [\"sales*\"]\nscopes = [\"read\", \"write\"]\n\n\
             [[clients]]\nname = \"bi\"\ntoken_sha256 = \"{}\"\ndatasets = [\"**\"]\nscopes = [\"read\"]\n",
            hash(WRITER),
            hash(READER)
        ),
    )
    .unwrap();
    file
}

/// `dsa-ingest serve` with the tokens of [`tokens_file`] and `extra` settings; the
/// tokens file lives as long as the server.
struct Api {
    server: Consumer,
    addr: SocketAddr,
    _tokens: tempfile::NamedTempFile,
}

impl Api {
    async fn start(app: &TestApp, broker: &TestBroker, extra: &[(&str, &str)]) -> Self {
        let tokens = tokens_file();
        let path = tokens.path().to_str().unwrap().to_owned();
        let mut settings = vec![("API_TOKENS_FILE", path.as_str())];
        settings.extend_from_slice(extra);
        let server = Consumer::start_server(app, broker, &settings);
        let addr = server.metrics_addr().await;
        Self {
            server,
            addr,
            _tokens: tokens,
        }
    }
}

/// A response as read off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("{error}: not JSON: {}", self.body))
    }
}

/// Reads a whole response from a connection the server closes or that says
/// `Connection: close`; decodes a chunked body.
async fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(key, value)| key.eq_ignore_ascii_case("transfer-encoding") && value == "chunked");
    let body = if chunked {
        let mut body = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || after.len() < size {
                break;
            }
            body.push_str(&after[..size]);
            rest = after[size..].trim_start_matches("\r\n");
        }
        body
    } else {
        rest.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// Sends a GET and leaves its answer to be read.
async fn send_get(addr: SocketAddr, path: &str, token: Option<&str>) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |token| {
        format!("Authorization: Bearer {token}\r\n")
    });
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

/// A request without a body.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Answer {
    read_answer(&mut send_get(addr, path, token).await).await
}

/// Opens a POST whose body is sent chunked by the caller.
async fn start_post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    extra_headers: &str,
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |token| {
        format!("Authorization: Bearer {token}\r\n")
    });
    stream
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: test\r\n{auth}{extra_headers}Connection: close\r\n\
                 Transfer-Encoding: chunked\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

async fn send_chunk(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    stream
        .write_all(format!("{:x}\r\n", bytes.len()).as_bytes())
        .await?;
    stream.write_all(bytes).await?;
    stream.write_all(b"\r\n").await
}

/// POSTs `body` chunked, 64 KiB at a time, and reads the answer.
async fn upload(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    extra_headers: &str,
    body: &[u8],
) -> Answer {
    let mut stream = start_post(addr, path, token, extra_headers).await;
    for chunk in body.chunks(64 * 1024) {
        if send_chunk(&mut stream, chunk).await.is_err() {
            // The server answered early and closed; its answer is what counts.
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    read_answer(&mut stream).await
}

/// An open `GET .../events` response, read as far as a test needs.
struct EventStream {
    stream: TcpStream,
    raw: Vec<u8>,
}

impl EventStream {
    async fn open(addr: SocketAddr, path: &str, token: &str) -> Self {
        Self {
            stream: send_get(addr, path, Some(token)).await,
            raw: Vec::new(),
        }
    }

    /// Reads until the events so far satisfy `enough`; returns them all.
    async fn read_until(
        &mut self,
        enough: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut buffer = [0u8; 8192];
        loop {
            let text = String::from_utf8_lossy(&self.raw).into_owned();
            let events = sse_events(&text);
            if enough(&events) {
                return events;
            }
            assert!(Instant::now() < deadline, "not the events wanted in {text}");
            let read = tokio::time::timeout(Duration::from_secs(60), self.stream.read(&mut buffer))
                .await
                .expect("the event stream went quiet")
                .unwrap();
            assert!(read > 0, "the event stream ended early: {text}");
            self.raw.extend_from_slice(&buffer[..read]);
        }
    }

    /// Reads up to and including the first `completed` or `failed` event.
    async fn read_to_end_event(&mut self) -> Vec<(String, String)> {
        self.read_until(|events| {
            events
                .iter()
                .any(|(name, _)| name == "completed" || name == "failed")
        })
        .await
    }
}

/// The events of a stream up to and including the first `completed` or `failed`.
async fn follow_events(addr: SocketAddr, path: &str, token: &str) -> Vec<(String, String)> {
    EventStream::open(addr, path, token)
        .await
        .read_to_end_event()
        .await
}

/// `(event, data)` pairs found in a (chunked) event-stream response so far.
fn sse_events(text: &str) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let mut name = None;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("event: ") {
            name = Some(value.to_owned());
        } else if let Some(value) = line.strip_prefix("data: ") {
            if let Some(name) = name.take() {
                events.push((name, value.to_owned()));
            }
        }
    }
    events
}

async fn multipart_uploads(app: &TestApp) -> usize {
    app.s3
        .list_multipart_uploads()
        .bucket(&app.bucket)
        .send()
        .await
        .unwrap()
        .uploads()
        .len()
}

async fn objects(app: &TestApp) -> usize {
    app.s3
        .list_objects_v2()
        .bucket(&app.bucket)
        .send()
        .await
        .unwrap()
        .contents()
        .len()
}

#[tokio::test]
async fn an_upload_is_imported_and_its_events_end_completed() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let api = Api::start(&app, &broker, &[]).await;
    let (server, addr) = (&api.server, api.addr);

    let csv = sample_csv(3_000, 7);
    let path = "/v1/datasets/sales/imports?filename=q1.csv&message=first+upload";
    let answer = upload(addr, path, Some(WRITER), "Idempotency-Key: k-1\r\n", &csv).await;
    assert_eq!(answer.status, 202, "{answer:?}\n{}", server.log());
    let body = answer.json();
    let run_id = body["run_id"].as_str().unwrap().to_owned();
    assert_eq!(body["dataset"], "sales");
    assert_eq!(body["status"], "pending");
    assert_eq!(
        answer.header("location"),
        Some(format!("/v1/runs/{run_id}").as_str())
    );

    // The retry returns the first run; nothing else is stored.
    let retry = upload(addr, path, Some(WRITER), "Idempotency-Key: k-1\r\n", &csv).await;
    assert_eq!(retry.status, 202, "{retry:?}");
    assert_eq!(retry.json()["run_id"].as_str(), Some(run_id.as_str()));
    assert_eq!(objects(&app).await, 1);

    // No consumer yet: the stream starts at pending and ends when one takes the run.
    let mut stream = EventStream::open(addr, &format!("/v1/runs/{run_id}/events"), READER).await;
    stream.read_until(|events| !events.is_empty()).await;
    let _consumer = Consumer::start(&app, &broker, &[]);
    let events = stream.read_to_end_event().await;
    let (first, data) = &events[0];
    assert_eq!(first, "progress");
    assert!(data.contains("\"status\":\"pending\""), "{events:?}");
    let (last, summary) = events.last().unwrap();
    assert_eq!(last, "completed", "{events:?}");
    let summary: serde_json::Value = serde_json::from_str(summary).unwrap();
    assert_eq!(summary["rows"], 3_000, "{summary}");

    let run_id = body["run_id"].as_str().unwrap();
    let run = get(addr, &format!("/v1/runs/{run_id}"), Some(READER)).await;
    assert_eq!(run.status, 200);
    assert_eq!(run.json()["status"], "completed");
    let user: Option<String> =
        sqlx::query_scalar("SELECT user_id FROM dsa_jobs.analysis_runs WHERE id = $1::uuid")
            .bind(run_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(user.as_deref(), Some("web"));
}

#[tokio::test]
async fn refusals_store_nothing() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let limit = 10 * 1024 * 1024;
    let api = Api::start(
        &app,
        &broker,
        &[("IMPORT_MAX_FILE_SIZE", &limit.to_string())],
    )
    .await;
    let (server, addr) = (&api.server, api.addr);
    let path = "/v1/datasets/sales/imports?filename=big.csv";

    // A declared 10 GiB body is refused at once, before a byte of it is sent.
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {WRITER}\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                10u64 << 30
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = read_answer(&mut stream).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json")
    );
    assert!(answer.json()["detail"]
        .as_str()
        .unwrap()
        .contains("IMPORT_MAX_FILE_SIZE"));

    // A chunked body that passes the limit: its multipart upload (begun at 8 MiB) is
    // aborted.
    let mut big = sample_csv(150_000, 1);
    big.truncate(limit as usize + 2 * 1024 * 1024);
    assert!(big.len() > limit as usize);
    let answer = upload(addr, path, Some(WRITER), "", &big).await;
    assert_eq!(answer.status, 413, "{answer:?}\n{}", server.log());

    // A PNG named .csv, and text named .xlsx.
    let png = upload(
        addr,
        "/v1/datasets/sales/imports?filename=photo.csv",
        Some(WRITER),
        "",
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
    )
    .await;
    assert_eq!(png.status, 415, "{png:?}");
    assert!(png.json()["detail"]
        .as_str()
        .unwrap()
        .contains("a PNG image"));
    let text = upload(
        addr,
        "/v1/datasets/sales/imports?filename=book.xlsx",
        Some(WRITER),
        "",
        b"id,name\n1,a\n",
    )
    .await;
    assert_eq!(text.status, 415, "{text:?}");

    // Who may do what.
    let csv = b"id,name\n1,a\n";
    assert_eq!(upload(addr, path, None, "", csv).await.status, 401);
    assert_eq!(upload(addr, path, Some("wrong"), "", csv).await.status, 401);
    let read_only = upload(addr, path, Some(READER), "", csv).await;
    assert_eq!(read_only.status, 403, "{read_only:?}");
    let elsewhere = upload(
        addr,
        "/v1/datasets/hr/imports?filename=a.csv",
        Some(WRITER),
        "",
        csv,
    )
    .await;
    assert_eq!(elsewhere.status, 403);
    let detail = elsewhere.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("\"hr\"") && !detail.contains("sales") && !detail.contains(WRITER));

    // A bad option is named.
    let bad = upload(
        addr,
        "/v1/datasets/sales/imports?filename=a.csv&mode=merge",
        Some(WRITER),
        "",
        csv,
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["detail"].as_str().unwrap().starts_with("mode="));

    assert_eq!(multipart_uploads(&app).await, 0);
    assert_eq!(objects(&app).await, 0);
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, 0);
}

#[tokio::test]
async fn a_client_that_goes_away_midway_leaves_nothing() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    // Without a tokens file the server refuses to start.
    let mut refused = Consumer::start_server(&app, &broker, &[]);
    let status = refused.exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    assert!(
        refused.log().contains("API_TOKENS_FILE is not set"),
        "{}",
        refused.log()
    );

    let server = Consumer::start_server_with_args(&app, &broker, &["--insecure-no-auth"], &[]);
    let addr = server.metrics_addr().await;
    let mut stream = start_post(addr, "/v1/datasets/sales/imports?filename=a.csv", None, "").await;
    let csv = sample_csv(120_000, 3);
    // More than one part (8 MiB), so a multipart upload is open when the client goes.
    for chunk in csv.chunks(64 * 1024).take(200) {
        send_chunk(&mut stream, chunk).await.unwrap();
    }
    drop(stream);
    crate::helpers::wait_until(
        Duration::from_secs(30),
        "the upload to be aborted",
        || async { server.log().contains("upload refused") && multipart_uploads(&app).await == 0 },
    )
    .await;
    assert_eq!(objects(&app).await, 0);
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, 0);
}

/// A CSV of `rows` rows `id,name` whose names carry `version`.
fn people(rows: u64, version: u64) -> Vec<u8> {
    let mut csv = String::from("id,name\n");
    for n in 1..=rows {
        let name = if n % 3 == 0 {
            format!("p{n} v{version}")
        } else {
            format!("p{n}")
        };
        csv += &format!("{n},\"{name}, x\"\n");
    }
    csv.into_bytes()
}

fn assert_problem(answer: &Answer, status: u16, detail_contains: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json"),
        "{answer:?}"
    );
    let detail = answer.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains(detail_contains), "{detail}");
}

#[tokio::test]
async fn datasets_and_their_commits_are_listed_as_the_token_may_read() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("sales.csv", people(20, 1)).await;
    app.import("sales", "sales.csv").await;
    app.put("sales.csv", people(25, 2)).await;
    let second = app.import("sales", "sales.csv").await;
    app.put("hr.csv", people(5, 1)).await;
    app.import("hr", "hr.csv").await;
    let api = Api::start(&app, &broker, &[]).await;
    let addr = api.addr;

    let names = |answer: Answer| -> Vec<String> {
        assert_eq!(answer.status, 200, "{answer:?}");
        answer.json()["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|dataset| dataset["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(get(addr, "/v1/datasets", Some(WRITER)).await),
        ["sales"]
    );
    assert_eq!(
        names(get(addr, "/v1/datasets", Some(READER)).await),
        ["hr", "sales"]
    );
    assert_eq!(get(addr, "/v1/datasets", None).await.status, 401);

    let sales = get(addr, "/v1/datasets/sales", Some(WRITER)).await;
    assert_eq!(sales.status, 200, "{sales:?}");
    let sales = sales.json();
    assert_eq!(sales["name"], "sales");
    assert!(sales["id"].is_i64());
    assert_eq!(sales["main_commit"], second.commit_id.as_str());
    assert_eq!(sales["row_count"], 25);
    assert_eq!(sales["key_columns"], serde_json::Value::Null);

    assert_problem(
        &get(addr, "/v1/datasets/hr", Some(WRITER)).await,
        403,
        "\"hr\"",
    );
    assert_problem(
        &get(addr, "/v1/datasets/nope", Some(READER)).await,
        404,
        "\"nope\"",
    );
    assert_problem(
        &get(addr, "/v1/datasets/salesX/commits", Some(WRITER)).await,
        404,
        "\"salesX\"",
    );

    // The commits are `log --json`'s, newest first.
    let log: serde_json::Value =
        serde_json::from_str(&app.cli_text(&["log", "sales", "--json"])).unwrap();
    let commits = get(addr, "/v1/datasets/sales/commits", Some(READER)).await;
    assert_eq!(commits.status, 200, "{commits:?}");
    assert_eq!(commits.json(), log);
    let limited = get(addr, "/v1/datasets/sales/commits?limit=1", Some(READER)).await;
    assert_eq!(limited.json(), serde_json::json!([log[0]]));
    let none = get(addr, "/v1/datasets/sales/commits?limit=0", Some(READER)).await;
    assert_eq!(none.json(), serde_json::json!([]));
    assert_problem(
        &get(addr, "/v1/datasets/sales/commits?limit=x", Some(READER)).await,
        400,
        "limit=",
    );
    assert_problem(
        &get(addr, "/v1/datasets/sales/commits?colour=red", Some(READER)).await,
        400,
        "\"colour\"",
    );
}

#[tokio::test]
async fn diffs_and_exports_stream_the_commands_bytes() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("sales.csv", people(20_000, 1)).await;
    let first = app.import("sales", "sales.csv").await;
    app.put("sales.csv", people(20_500, 2)).await;
    let second = app.import("sales", "sales.csv").await;
    let api = Api::start(&app, &broker, &[]).await;
    let addr = api.addr;

    // The diff is `diff --json`'s lines, byte for byte.
    let expected = app.cli_text(&["diff", "sales", "--json"]);
    let diff = get(addr, "/v1/datasets/sales/diff", Some(WRITER)).await;
    assert_eq!(diff.status, 200, "{:?}", diff.headers);
    assert_eq!(diff.header("content-type"), Some("application/jsonl"));
    assert_eq!(diff.body.len(), expected.len());
    assert!(diff.body == expected);
    let path = format!(
        "/v1/datasets/sales/diff?from={}&to={}",
        first.commit_id, second.commit_id
    );
    assert!(get(addr, &path, Some(WRITER)).await.body == expected);
    let reverse = app.cli_text(&["diff", "sales", "main", &first.commit_id[..10], "--json"]);
    let path = format!(
        "/v1/datasets/sales/diff?from=main&to={}",
        &first.commit_id[..10]
    );
    assert!(get(addr, &path, Some(WRITER)).await.body == reverse);

    // The export is `export`'s, as a download.
    let csv = app.cli_text(&["export", "sales"]);
    let export = get(addr, "/v1/datasets/sales/export", Some(WRITER)).await;
    assert_eq!(export.status, 200, "{:?}", export.headers);
    assert_eq!(
        export.header("content-type"),
        Some("text/csv; charset=utf-8")
    );
    assert_eq!(
        export.header("content-disposition"),
        Some(
            format!(
                "attachment; filename=\"sales-{}.csv\"",
                &second.commit_id[..12]
            )
            .as_str()
        )
    );
    assert_eq!(export.body.len(), csv.len());
    assert!(export.body == csv);
    let jsonl = app.cli_text(&[
        "export",
        "sales",
        "--format",
        "jsonl",
        "--commit",
        &first.commit_id,
    ]);
    let path = format!(
        "/v1/datasets/sales/export?format=jsonl&commit={}",
        first.commit_id
    );
    let export = get(addr, &path, Some(READER)).await;
    assert_eq!(export.status, 200);
    assert!(export.body == jsonl);
    assert!(export
        .header("content-disposition")
        .unwrap()
        .ends_with(".jsonl\""));

    // Mistakes are problems, before any byte of a body.
    assert_problem(
        &get(addr, "/v1/datasets/sales/export?format=xml", Some(WRITER)).await,
        400,
        "format=",
    );
    assert_problem(
        &get(
            addr,
            "/v1/datasets/sales/export?commit=abcdef0123",
            Some(WRITER),
        )
        .await,
        404,
        "abcdef0123",
    );
    assert_problem(
        &get(addr, "/v1/datasets/sales/export?sheet=Q1", Some(WRITER)).await,
        400,
        "no sheet \"Q1\"",
    );
    assert_problem(
        &get(addr, "/v1/datasets/sales/diff?from=main~9", Some(WRITER)).await,
        404,
        "main~9",
    );
    assert_problem(
        &get(addr, "/v1/datasets/hr/diff", Some(WRITER)).await,
        403,
        "\"hr\"",
    );

    // Clients that leave after the first bytes, more of them than the pool has
    // connections: each export's connection is given back or closed, none is held.
    for _ in 0..12 {
        let mut stream = send_get(addr, "/v1/datasets/sales/export", Some(READER)).await;
        let mut first = [0u8; 1024];
        stream.read_exact(&mut first).await.unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"));
    }
    let again = get(addr, "/v1/datasets/sales/export", Some(READER)).await;
    assert!(again.body == csv, "{:?}", again.headers);
}

/// The value of one series in a `/metrics` text, or `None` when it is absent.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn each_token_has_its_rate_and_upload_slots_and_serve_counts_its_requests() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let api = Api::start(
        &app,
        &broker,
        &[
            ("HTTP_REQUESTS_PER_SECOND", "3"),
            ("HTTP_MAX_CONCURRENT_UPLOADS", "1"),
        ],
    )
    .await;
    let (server, addr) = (&api.server, api.addr);

    // Every series of the closed label sets is there from the start, at zero.
    let text = get(addr, "/metrics", None).await.body;
    for name in [
        "dsa_http_requests_total{route=\"/v1/datasets/{name}/export\",status_class=\"5xx\"}",
        "dsa_http_requests_total{route=\"unmatched\",status_class=\"4xx\"}",
        "dsa_http_upload_bytes_total",
        "dsa_http_uploads_in_flight",
    ] {
        assert_eq!(series(&text, name), Some(0.0), "{name} in\n{text}");
    }

    // One upload at a time for `web`: a second is refused while the first is open.
    let mut open = start_post(
        addr,
        "/v1/datasets/sales/imports?filename=a.csv",
        Some(WRITER),
        "",
    )
    .await;
    send_chunk(&mut open, b"id,name\n1,a\n").await.unwrap();
    crate::helpers::wait_until(
        Duration::from_secs(30),
        "the first upload to be in flight",
        || async {
            series(
                &get(addr, "/metrics", None).await.body,
                "dsa_http_uploads_in_flight",
            ) == Some(1.0)
        },
    )
    .await;
    let second = upload(
        addr,
        "/v1/datasets/sales/imports?filename=b.csv",
        Some(WRITER),
        "",
        b"id,name\n1,a\n",
    )
    .await;
    assert_problem(&second, 429, "HTTP_MAX_CONCURRENT_UPLOADS");
    assert_eq!(second.header("retry-after"), Some("1"));
    let text = get(addr, "/metrics", None).await.body;
    assert!(
        series(&text, "dsa_http_upload_bytes_total").unwrap() >= 12.0,
        "{text}"
    );
    let _ = open.write_all(b"0\r\n\r\n").await;
    let first = read_answer(&mut open).await;
    assert_eq!(first.status, 202, "{first:?}\n{}", server.log());

    // `bi` has a bucket of its own: three at once, then 429 until it refills.
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..8 {
        let answer = get(addr, "/v1/datasets", Some(READER)).await;
        if answer.status == 429 {
            assert_problem(&answer, 429, "HTTP_REQUESTS_PER_SECOND");
            retry_after = answer.header("retry-after").map(str::to_owned);
        }
        statuses.push(answer.status);
    }
    assert_eq!(&statuses[..3], [200, 200, 200], "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Health, readiness and metrics are never limited.
    for _ in 0..5 {
        assert_eq!(get(addr, "/healthz", None).await.status, 200);
    }
    assert_eq!(get(addr, "/nowhere", Some(READER)).await.status, 404);

    let text = get(addr, "/metrics", None).await.body;
    let count = |route: &str, class: &str| {
        series(
            &text,
            &format!("dsa_http_requests_total{{route=\"{route}\",status_class=\"{class}\"}}"),
        )
        .unwrap_or_else(|| panic!("no series for {route} {class} in\n{text}"))
    };
    assert_eq!(count("/v1/datasets", "2xx"), 3.0);
    assert!(count("/v1/datasets", "4xx") >= 1.0);
    assert_eq!(count("/v1/datasets/{name}/imports", "2xx"), 1.0);
    assert_eq!(count("/v1/datasets/{name}/imports", "4xx"), 1.0);
    assert!(count("/healthz", "2xx") >= 5.0);
    assert_eq!(count("unmatched", "4xx"), 1.0);
    assert_eq!(series(&text, "dsa_http_uploads_in_flight"), Some(0.0));
}

#[tokio::test]
async fn the_openapi_document_describes_exactly_the_routes_served() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let api = Api::start(&app, &broker, &[]).await;
    let addr = api.addr;

    let document = get(addr, "/v1/openapi.json", None).await;
    assert_eq!(document.status, 200, "{document:?}");
    let document = document.json();
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();

    // Every route template the server counts is described, and nothing else.
    let mut described: Vec<&str> = paths.keys().map(String::as_str).collect();
    let mut routes: Vec<&str> = dsa_ingest::metrics::HttpRoute::ALL
        .iter()
        .map(|route| route.as_str())
        .filter(|route| route.starts_with('/'))
        .collect();
    described.sort_unstable();
    routes.sort_unstable();
    assert_eq!(described, routes);

    // Every described operation is one the router matches: its answer is the
    // handler's (a problem at worst), never the router's bare 404 or a 405.
    for (template, methods) in paths {
        let path = template
            .replace("{name}", "no-such-dataset")
            .replace("{id}", "00000000-0000-4000-8000-000000000000");
        for method in methods.as_object().unwrap().keys() {
            let answer = match method.as_str() {
                "get" => get(addr, &path, Some(READER)).await,
                "post" => upload(addr, &path, Some(READER), "", b"").await,
                other => panic!("{other} {template}"),
            };
            assert_ne!(answer.status, 405, "{method} {template}: {answer:?}");
            if answer.status == 404 {
                assert_eq!(
                    answer.header("content-type"),
                    Some("application/problem+json"),
                    "{method} {template}: {answer:?}"
                );
            }
        }
    }
    // The router's own 404 is counted as unmatched, so the checks above mean something.
    let metrics = get(addr, "/metrics", None).await.body;
    assert_eq!(
        series(
            &metrics,
            "dsa_http_requests_total{route=\"unmatched\",status_class=\"4xx\"}"
        ),
        Some(0.0)
    );
}

/// Reads a response's head (status line and headers) and nothing more.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut byte))
            .await
            .expect("no answer within 30 s")
            .unwrap();
        assert!(read > 0, "the connection closed after {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Sends a POST's head with `Expect: 100-continue` and a `Content-Length`, no body.
async fn post_expecting_continue(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    length: u64,
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |token| {
        format!("Authorization: Bearer {token}\r\n")
    });
    stream
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Length: {length}\r\n\
                 Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

#[tokio::test]
async fn expect_100_continue_is_answered_only_when_the_upload_may_go_on_and_a_failed_runs_events_end_with_its_error(
) {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let api = Api::start(&app, &broker, &[("IMPORT_MAX_FILE_SIZE", "1000000")]).await;
    let (server, addr) = (&api.server, api.addr);
    let path = "/v1/datasets/sales/imports?filename=bad.csv";

    // Refusals are final answers in place of `100 Continue`: the client never sends the
    // body it was about to.
    for (token, length, status) in [
        (Some(WRITER), 2_000_000, "413"),
        (None, 100, "401"),
        (Some(READER), 100, "403"),
    ] {
        let mut stream = post_expecting_continue(addr, path, token, length).await;
        let head = read_head(&mut stream).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{token:?} {length}: {head}"
        );
    }

    // An upload that may go on is told to, then sends its body. Its third line has a
    // field too many, and the run (without skip_bad_rows) fails on it.
    let csv = b"id,name\n1,a\n2,b,extra\n3,c\n";
    let mut stream = post_expecting_continue(addr, path, Some(WRITER), csv.len() as u64).await;
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    stream.write_all(csv).await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert_eq!(answer.status, 202, "{answer:?}\n{}", server.log());
    let run_id = answer.json()["run_id"].as_str().unwrap().to_owned();

    let _consumer = Consumer::start(&app, &broker, &[]);
    let events = follow_events(addr, &format!("/v1/runs/{run_id}/events"), READER).await;
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "failed", "{events:?}");
    let end: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(end["status"], "failed", "{end}");
    let message = end["message"].as_str().unwrap();
    assert!(
        message.contains("line 3") && message.contains("bad.csv"),
        "the failed event names neither the line nor the file: {message}"
    );
    let run = get(addr, &format!("/v1/runs/{run_id}"), Some(READER)).await;
    assert_eq!(run.json()["status"], "failed");
    assert_eq!(app.count("dsa_core.commit_rows").await, 0);
}

#[tokio::test]
async fn an_export_for_a_spreadsheet_program_quotes_what_would_be_a_formula() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put(
        "sales.csv",
        b"id,note,=total\n1,=1+2,x\n2,@SUM(A1),-3\n3,plain,+4\n".to_vec(),
    )
    .await;
    app.import("sales", "sales.csv").await;
    let api = Api::start(&app, &broker, &[]).await;
    let addr = api.addr;

    let safe = get(
        addr,
        "/v1/datasets/sales/export?safe_formulas=true",
        Some(READER),
    )
    .await;
    assert_eq!(safe.status, 200, "{safe:?}");
    assert_eq!(
        safe.body,
        app.cli_text(&["export", "sales", "--safe-formulas"])
    );
    assert!(
        safe.body.starts_with("id,note,'=total\n") && safe.body.contains("1,'=1+2,x\n"),
        "{}",
        safe.body
    );
    assert!(safe.body.contains("2,'@SUM(A1),'-3\n") && safe.body.contains("3,plain,'+4\n"));

    let plain = get(addr, "/v1/datasets/sales/export", Some(READER)).await;
    assert_eq!(plain.body, app.cli_text(&["export", "sales"]));
    assert!(plain.body.contains("1,=1+2,x\n"), "{}", plain.body);
    assert_problem(
        &get(
            addr,
            "/v1/datasets/sales/export?safe_formulas=maybe",
            Some(READER),
        )
        .await,
        400,
        "safe_formulas=",
    );
}

#[tokio::test]
async fn an_export_that_fails_midway_ends_without_its_last_chunk() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let rows = 20_000;
    app.put("sales.csv", people(rows, 1)).await;
    let summary = app.import("sales", "sales.csv").await;
    let whole = app.cli_text(&["export", "sales"]);
    // The content of a row near the end goes missing: the export has sent most of the
    // commit by the time it reaches it.
    let lost = format!("sales:{}", rows - 10);
    sqlx::query(
        "DELETE FROM dsa_core.rows WHERE row_hash = \
         (SELECT row_hash FROM dsa_core.commit_rows WHERE commit_id = $1 AND logical_row_id = $2)",
    )
    .bind(&summary.commit_id)
    .bind(&lost)
    .execute(&app.pool)
    .await
    .unwrap();
    let api = Api::start(&app, &broker, &[]).await;
    let (server, addr) = (&api.server, api.addr);

    let mut stream = send_get(addr, "/v1/datasets/sales/export", Some(READER)).await;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .expect("the server neither finished nor cut the response")
        .ok();
    let answer = parse_answer(&raw);
    // The head went out with the first rows; what follows the failure is not sent, and
    // the chunked body has no last chunk, so no client takes it for the whole export.
    assert_eq!(answer.status, 200, "{:?}", answer.headers);
    assert!(!raw.ends_with(b"0\r\n\r\n"), "the body was terminated");
    assert!(
        answer.body.len() > whole.len() / 2 && answer.body.len() < whole.len(),
        "{} of {} bytes",
        answer.body.len(),
        whole.len()
    );
    assert!(whole.starts_with(&answer.body));
    let log = server.log();
    assert!(
        log.contains("a streamed response failed midway") && log.contains(&lost),
        "{log}"
    );

    // The failure took no connection with it: the dataset's other reads answer.
    let commits = get(addr, "/v1/datasets/sales/commits", Some(READER)).await;
    assert_eq!(commits.status, 200);
    assert_eq!(commits.json().as_array().unwrap().len(), 1);
}
