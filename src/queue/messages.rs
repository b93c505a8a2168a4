//! The bodies that arrive on the import queue, parsed into what the consumer acts on.
//!
//! Three forms are accepted (JSON Schemas for each live in `docs/schemas/`): a
//! reference to a run that exists, a request from a system without database access,
//! and an S3 event notification. Anything else is refused with a reason a person can
//! read in the dead-letter queue's logs.

use serde::Deserialize;
use thiserror::Error;
use uuid::Uuid;

use crate::import::run::ImportOptions;

#[derive(Debug, Error)]
pub enum MessageError {
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    #[error("the body is JSON but not an object")]
    NotAnObject,
    #[error("the body is not an import message: expected `analysis_run_id`, `idempotency_key` or `Records` (an S3 event)")]
    UnknownForm,
    #[error("{form}: {reason}")]
    Invalid { form: &'static str, reason: String },
}

/// One import message, whichever form it came in.
#[derive(Clone, Debug, PartialEq)]
pub enum ImportMessage {
    /// `{"analysis_run_id": "..."}`: the run exists; import it.
    Run(Uuid),
    /// Create the run once per idempotency key, then import it.
    Request(Box<ImportRequest>),
    /// Objects that landed in a bucket; one run per object.
    ObjectsCreated(Vec<CreatedObject>),
}

/// The body that names a run that exists: `{"analysis_run_id": "<uuid>"}`: the first
/// form [`ImportMessage`] reads, and what `submit` and the sweeper publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunReference {
    pub analysis_run_id: Uuid,
}

/// A request from a system that has no database access.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// The same key always names the same run, however often the message arrives.
    pub idempotency_key: String,
    /// The dataset by name (created when missing)...
    #[serde(default)]
    pub dataset: Option<String>,
    /// ...or by id (which must exist).
    #[serde(default)]
    pub dataset_id: Option<i64>,
    pub source: RequestSource,
    /// Who asked, recorded as the run's user and the commit's author.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default, deserialize_with = "strict_options")]
    pub options: ImportOptions,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSource {
    pub bucket: String,
    pub key: String,
    /// The ETag the sender saw; the import fails if the object has another.
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub version_id: Option<String>,
}

/// A request's options: the import options every entry point takes, with an unknown
/// name refused (a typo must not silently import another way) and combinations that
/// no import can honour refused too.
fn strict_options<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<ImportOptions, D::Error> {
    use serde::de::Error as _;
    let fields = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
    if let Some(unknown) = fields
        .keys()
        .find(|name| !ImportOptions::FIELDS.contains(&name.as_str()))
    {
        return Err(D::Error::custom(format!(
            "unknown option {unknown:?}, expected one of {}",
            ImportOptions::FIELDS.join(", ")
        )));
    }
    let options: ImportOptions =
        serde_json::from_value(serde_json::Value::Object(fields)).map_err(D::Error::custom)?;
    options.check().map_err(D::Error::custom)?;
    Ok(options)
}

/// Where a dataset is named in a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatasetRef {
    Name(String),
    Id(i64),
}

impl ImportRequest {
    pub fn dataset_ref(&self) -> DatasetRef {
        match (&self.dataset, self.dataset_id) {
            (Some(name), _) => DatasetRef::Name(name.clone()),
            (None, Some(id)) => DatasetRef::Id(id),
            // `parse` refuses a request with neither.
            (None, None) => DatasetRef::Id(0),
        }
    }
}

/// An object named by an S3 event record, its key already URL-decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedObject {
    pub bucket: String,
    pub key: String,
    pub etag: Option<String>,
    pub version_id: Option<String>,
    pub sequencer: Option<String>,
    pub event_name: Option<String>,
}

impl CreatedObject {
    /// One run per object version: the same event delivered twice (or relayed by two
    /// paths) creates one run, a new upload to the same key a new one.
    pub fn idempotency_key(&self) -> String {
        let version = self
            .version_id
            .as_deref()
            .or(self.etag.as_deref())
            .or(self.sequencer.as_deref())
            .unwrap_or("");
        format!(
            "s3:{}/{}@{}",
            self.bucket,
            self.key,
            version.trim_matches('"')
        )
    }

    /// The dataset an event's object goes to when neither the object's metadata nor
    /// the configuration names one: the key's first path segment (`orders/2026/a.csv`
    /// gives `orders`), or for a key without a folder the file's base name up to its
    /// first dot (`orders.csv` gives `orders`).
    pub fn dataset_from_key(&self) -> String {
        match self.key.split_once('/') {
            Some((first, _)) if !first.is_empty() => first.to_owned(),
            _ => {
                let base = self.key.rsplit('/').next().unwrap_or(&self.key);
                base.split('.').next().unwrap_or(base).to_owned()
            }
        }
    }
}

#[derive(Deserialize)]
struct S3Event {
    #[serde(rename = "Records")]
    records: Vec<S3Record>,
}

#[derive(Deserialize)]
struct S3Record {
    #[serde(rename = "eventName", default)]
    event_name: Option<String>,
    s3: S3Entity,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: S3Bucket,
    object: S3Object,
}

#[derive(Deserialize)]
struct S3Bucket {
    name: String,
}

#[derive(Deserialize)]
struct S3Object {
    key: String,
    #[serde(rename = "eTag", default)]
    etag: Option<String>,
    #[serde(rename = "versionId", default)]
    version_id: Option<String>,
    #[serde(default)]
    sequencer: Option<String>,
}

/// Most records one S3 event body may hold. AWS and MinIO send one per event; a body
/// with thousands would become as many runs from one message, resolved in one delivery.
pub const MAX_EVENT_RECORDS: usize = 100;

/// Longest idempotency key accepted; it is stored in a unique index.
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// Reads a body from the import queue.
pub fn parse(body: &[u8]) -> Result<ImportMessage, MessageError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| MessageError::NotJson(error.to_string()))?;
    let object = value.as_object().ok_or(MessageError::NotAnObject)?;
    if object.contains_key("analysis_run_id") {
        let reference: RunReference =
            serde_json::from_value(value).map_err(|error| MessageError::Invalid {
                form: "run reference",
                reason: error.to_string(),
            })?;
        return Ok(ImportMessage::Run(reference.analysis_run_id));
    }
    if object.contains_key("idempotency_key") {
        let invalid = |reason: String| MessageError::Invalid {
            form: "import request",
            reason,
        };
        let request: ImportRequest =
            serde_json::from_value(value).map_err(|error| invalid(error.to_string()))?;
        let key_length = request.idempotency_key.chars().count();
        if key_length == 0 || key_length > MAX_IDEMPOTENCY_KEY {
            return Err(invalid(format!(
                "idempotency_key must have 1 to {MAX_IDEMPOTENCY_KEY} characters"
            )));
        }
        match (&request.dataset, request.dataset_id) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give `dataset` or `dataset_id`, not both".to_owned(),
                ))
            }
            (None, None) => {
                return Err(invalid("`dataset` or `dataset_id` is required".to_owned()))
            }
            (None, Some(id)) if id <= 0 => {
                return Err(invalid(format!("dataset_id {id} is not a valid id")))
            }
            _ => {}
        }
        if request.source.bucket.is_empty() || request.source.key.is_empty() {
            return Err(invalid(
                "source.bucket and source.key must not be empty".to_owned(),
            ));
        }
        return Ok(ImportMessage::Request(Box::new(request)));
    }
    if object.contains_key("Records") {
        let invalid = |reason: String| MessageError::Invalid {
            form: "S3 event",
            reason,
        };
        let records = object["Records"].as_array().map_or(0, Vec::len);
        if records > MAX_EVENT_RECORDS {
            return Err(invalid(format!(
                "{records} records in one body, more than the limit of {MAX_EVENT_RECORDS}"
            )));
        }
        let event: S3Event =
            serde_json::from_value(value).map_err(|error| invalid(error.to_string()))?;
        let mut objects = Vec::with_capacity(event.records.len());
        for (index, record) in event.records.into_iter().enumerate() {
            if let Some(name) = &record.event_name {
                // Deletions and other events carry objects we must not import.
                if !name.contains("ObjectCreated") {
                    continue;
                }
            }
            let key = url_decode(&record.s3.object.key)
                .map_err(|reason| invalid(format!("Records[{index}].s3.object.key: {reason}")))?;
            if key.is_empty() || record.s3.bucket.name.is_empty() {
                return Err(invalid(format!(
                    "Records[{index}] has an empty bucket name or object key"
                )));
            }
            objects.push(CreatedObject {
                bucket: record.s3.bucket.name,
                key,
                etag: record.s3.object.etag.filter(|etag| !etag.is_empty()),
                version_id: record.s3.object.version_id.filter(|id| !id.is_empty()),
                sequencer: record.s3.object.sequencer.filter(|s| !s.is_empty()),
                event_name: record.event_name,
            });
        }
        return Ok(ImportMessage::ObjectsCreated(objects));
    }
    Err(MessageError::UnknownForm)
}

/// Decodes an S3 event's object key: `%XX` escapes, and `+` for a space (S3 encodes
/// keys as HTML form values).
pub fn url_decode(encoded: &str) -> Result<String, String> {
    // percent-encoding passes a malformed escape through unchanged, which would name
    // another key than the event meant; such a key is refused instead.
    let bytes = encoded.as_bytes();
    if let Some(index) = encoded
        .match_indices('%')
        .map(|(index, _)| index)
        .find(|&index| {
            !bytes
                .get(index + 1..index + 3)
                .is_some_and(|pair| pair.iter().all(u8::is_ascii_hexdigit))
        })
    {
        return Err(format!("bad escape at byte {index} of {encoded:?}"));
    }
    // `+` is replaced before decoding, so an escaped plus (`%2B`) stays a plus.
    let spaced = encoded.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| format!("{encoded:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_reference_is_read() {
        let id = Uuid::new_v4();
        let body = format!(r#"{{"analysis_run_id": "{id}"}}"#);
        assert_eq!(parse(body.as_bytes()).unwrap(), ImportMessage::Run(id));
        let error = parse(br#"{"analysis_run_id": "nope"}"#).unwrap_err();
        assert!(error.to_string().starts_with("run reference:"), "{error}");
    }

    #[test]
    fn a_request_carries_the_dialect_options_and_refuses_bad_ones() {
        let body = br#"{"idempotency_key": "k1", "dataset": "orders",
                        "source": {"bucket": "b", "key": "orders/a.txt"},
                        "options": {"delimiter": "\\t", "quote": "'", "escape": "\\",
                                    "no_header": true, "encoding": "windows-1252"}}"#;
        let ImportMessage::Request(request) = parse(body).unwrap() else {
            panic!("not a request")
        };
        assert_eq!(request.options.delimiter_byte(), Some(b'\t'));
        assert_eq!(request.options.quote_byte(), b'\'');
        assert_eq!(request.options.escape_byte(), Some(b'\\'));
        assert!(request.options.no_header);
        assert_eq!(request.options.encoding.as_deref(), Some("windows-1252"));

        let bad = br#"{"idempotency_key": "k1", "dataset": "orders",
                       "source": {"bucket": "b", "key": "a.csv"},
                       "options": {"encoding": "klingon"}}"#;
        let error = parse(bad).unwrap_err().to_string();
        assert!(
            error.contains("encoding \"klingon\" is not a known label"),
            "{error}"
        );
        let bad = br#"{"idempotency_key": "k1", "dataset": "orders",
                       "source": {"bucket": "b", "key": "a.csv"},
                       "options": {"delimiter": ";;"}}"#;
        let error = parse(bad).unwrap_err().to_string();
        assert!(error.contains("delimiter must be a single byte"), "{error}");
    }

    #[test]
    fn a_request_needs_exactly_one_dataset() {
        let body = br#"{"idempotency_key": "k1", "dataset": "orders",
                        "source": {"bucket": "b", "key": "orders/a.csv"},
                        "options": {"skip_bad_rows": true}}"#;
        let ImportMessage::Request(request) = parse(body).unwrap() else {
            panic!("not a request")
        };
        assert_eq!(request.dataset_ref(), DatasetRef::Name("orders".into()));
        assert!(request.options.skip_bad_rows);

        let both = br#"{"idempotency_key": "k", "dataset": "a", "dataset_id": 1,
                        "source": {"bucket": "b", "key": "k"}}"#;
        assert!(parse(both).unwrap_err().to_string().contains("not both"));
        let neither = br#"{"idempotency_key": "k", "source": {"bucket": "b", "key": "k"}}"#;
        assert!(parse(neither).unwrap_err().to_string().contains("required"));
        let unknown = br#"{"idempotency_key": "k", "dataset": "a", "colour": 1,
                           "source": {"bucket": "b", "key": "k"}}"#;
        assert!(parse(unknown).unwrap_err().to_string().contains("colour"));
    }

    #[test]
    fn an_s3_event_decodes_keys_and_keeps_only_created_objects() {
        let body = br#"{"EventName": "s3:ObjectCreated:Put", "Key": "in/orders/x.csv",
            "Records": [
              {"eventName": "s3:ObjectCreated:Put",
               "s3": {"bucket": {"name": "in"},
                      "object": {"key": "orders/2026+11/caf%C3%A9.csv", "eTag": "abc", "sequencer": "1"}}},
              {"eventName": "s3:ObjectRemoved:Delete",
               "s3": {"bucket": {"name": "in"}, "object": {"key": "orders/old.csv"}}},
              {"eventName": "ObjectCreated:CompleteMultipartUpload",
               "s3": {"bucket": {"name": "in"}, "object": {"key": "top.csv.gz"}}}
            ]}"#;
        let ImportMessage::ObjectsCreated(objects) = parse(body).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].key, "orders/2026 11/café.csv");
        assert_eq!(objects[0].dataset_from_key(), "orders");
        assert_eq!(
            objects[0].idempotency_key(),
            "s3:in/orders/2026 11/café.csv@abc"
        );
        assert_eq!(objects[1].dataset_from_key(), "top");
    }

    #[test]
    fn other_bodies_are_refused_with_a_reason() {
        assert!(matches!(parse(b"not json"), Err(MessageError::NotJson(_))));
        assert!(matches!(parse(b"[1]"), Err(MessageError::NotAnObject)));
        assert!(matches!(parse(b"{}"), Err(MessageError::UnknownForm)));
        assert_eq!(url_decode("a%2Bb+c%20d%C3%A9").unwrap(), "a+b c dé");
        assert_eq!(url_decode("%E6%97%A5%E6%9C%AC.csv").unwrap(), "日本.csv");
        assert!(url_decode("%C3").is_err());
        assert!(url_decode("%zz").is_err());
        assert!(url_decode("%").is_err());
        assert!(url_decode("%+1").is_err());
    }

    #[test]
    fn an_s3_event_with_too_many_records_is_refused() {
        let record = r#"{"eventName": "s3:ObjectCreated:Put",
            "s3": {"bucket": {"name": "in"}, "object": {"key": "a.csv"}}}"#;
        let body = |count: usize| format!(r#"{{"Records": [{}]}}"#, vec![record; count].join(","));
        assert!(parse(body(MAX_EVENT_RECORDS).as_bytes()).is_ok());
        let error = parse(body(MAX_EVENT_RECORDS + 1).as_bytes()).unwrap_err();
        assert!(
            error.to_string().contains("more than the limit of 100"),
            "{error}"
        );
    }
}
