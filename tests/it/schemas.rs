//! The published message schemas (`docs/schemas/`) and the examples in README.md: each
//! schema is a valid draft 2020-12 schema, its own examples pass it, every README example
//! marked `<!-- message: NAME -->` passes `docs/schemas/NAME.schema.json`, and bodies the
//! consumer must refuse fail.
//!
//! Nothing here needs the local services; the schemas are resolved from the files alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use boon::{Compiler, SchemaIndex, Schemas};
use serde_json::{json, Value};

/// The dialect every published schema declares.
const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// The README line that marks the fenced JSON block right after it as a message body.
const MARKER_PREFIX: &str = "<!-- message: ";
const MARKER_SUFFIX: &str = " -->";

/// Schema files that describe one body form each; `import-message` is their union.
const BODY_FORMS: [&str; 4] = [
    "import-run-reference",
    "import-request",
    "s3-event",
    "maintenance-request",
];

fn repository_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// One schema file as published.
struct SchemaFile {
    /// File name without `.schema.json`; what README markers name.
    stem: String,
    document: Value,
}

impl SchemaFile {
    fn id(&self) -> &str {
        self.document["$id"]
            .as_str()
            .unwrap_or_else(|| panic!("{}.schema.json has no string $id", self.stem))
    }
}

/// Every `*.schema.json` under `docs/schemas`, by stem.
fn schema_files() -> BTreeMap<String, SchemaFile> {
    let directory = repository_path("docs/schemas");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", directory.display()))
    {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".schema.json") else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        let document: Value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{name} is not valid JSON: {error}"));
        files.insert(
            stem.to_owned(),
            SchemaFile {
                stem: stem.to_owned(),
                document,
            },
        );
    }
    files
}

/// The schemas compiled together, so that `$ref`s between the files resolve by `$id`
/// without reading anything from the network.
struct CompiledSchemas {
    schemas: Schemas,
    by_stem: BTreeMap<String, SchemaIndex>,
}

impl CompiledSchemas {
    fn compile(files: &BTreeMap<String, SchemaFile>) -> Self {
        let mut compiler = Compiler::new();
        // Draft 2020-12 treats `format` as an annotation by default; the schemas rely on
        // `uuid` being checked.
        compiler.enable_format_assertions();
        for file in files.values() {
            compiler
                .add_resource(file.id(), file.document.clone())
                .unwrap_or_else(|error| panic!("{}: {error:#}", file.stem));
        }
        let mut schemas = Schemas::new();
        let by_stem = files
            .values()
            .map(|file| {
                let index = compiler
                    .compile(file.id(), &mut schemas)
                    .unwrap_or_else(|error| {
                        panic!("{}.schema.json does not compile: {error:#}", file.stem)
                    });
                (file.stem.clone(), index)
            })
            .collect();
        Self { schemas, by_stem }
    }

    fn check(&self, stem: &str, body: &Value) -> Result<(), String> {
        let index = *self
            .by_stem
            .get(stem)
            .unwrap_or_else(|| panic!("there is no docs/schemas/{stem}.schema.json"));
        self.schemas
            .validate(body, index)
            .map_err(|error| format!("{error:#}"))
    }
}

/// A fenced JSON block in README.md that a marker line names as a message body.
pub struct ReadmeMessage {
    /// The schema file stem the marker names, e.g. `import-request`.
    pub schema: String,
    /// 1-based line of the marker, for messages that point a reader at the README.
    pub line: usize,
    pub body: Value,
}

/// Every README example marked `<!-- message: NAME -->`. The marker stands alone on its
/// line, directly followed by a line that opens a ```json fence; the block runs to the
/// next line that is exactly ```. A marker in any other position is an error, so that a
/// marked example can never be skipped silently.
pub fn readme_message_examples() -> Vec<ReadmeMessage> {
    let path = repository_path("README.md");
    let readme = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    message_examples_in(&readme)
}

/// The marked examples of a Markdown text, as [`readme_message_examples`] reads them.
fn message_examples_in(readme: &str) -> Vec<ReadmeMessage> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut examples = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let Some(schema) = lines[index]
            .trim()
            .strip_prefix(MARKER_PREFIX)
            .and_then(|rest| rest.strip_suffix(MARKER_SUFFIX))
        else {
            index += 1;
            continue;
        };
        let line = index + 1;
        assert_eq!(
            lines.get(index + 1).map(|next| next.trim()),
            Some("```json"),
            "README.md line {line}: the marker must be directly followed by a ```json line"
        );
        let start = index + 2;
        let length = lines[start..]
            .iter()
            .position(|candidate| candidate.trim() == "```")
            .unwrap_or_else(|| panic!("README.md line {line}: the ```json block never closes"));
        let text = lines[start..start + length].join("\n");
        let body = serde_json::from_str(&text).unwrap_or_else(|error| {
            panic!("README.md line {line}: the {schema} example is not valid JSON: {error}")
        });
        examples.push(ReadmeMessage {
            schema: schema.trim().to_owned(),
            line,
            body,
        });
        index = start + length + 1;
    }
    examples
}

#[test]
fn every_schema_is_a_documented_draft_2020_12_schema() {
    let files = schema_files();
    for stem in BODY_FORMS.iter().chain(&["import-message"]) {
        assert!(
            files.contains_key(*stem),
            "docs/schemas/{stem}.schema.json is missing"
        );
    }

    // Each file is checked against the draft's own meta-schema, not only compiled, so
    // that a misspelt keyword type (a string where a schema belongs, say) is reported.
    let mut compiler = Compiler::new();
    let mut meta = Schemas::new();
    let meta_index = compiler
        .compile(DRAFT_2020_12, &mut meta)
        .expect("the draft 2020-12 meta-schema ships with the validator");
    for file in files.values() {
        let name = format!("{}.schema.json", file.stem);
        let document = &file.document;
        assert_eq!(document["$schema"], DRAFT_2020_12, "{name}: $schema");
        assert!(
            file.id().ends_with(&format!("/{name}")),
            "{name}: $id {} should end with the file name",
            file.id()
        );
        for keyword in ["title", "description"] {
            assert!(
                document[keyword]
                    .as_str()
                    .is_some_and(|text| !text.is_empty()),
                "{name}: {keyword} is missing"
            );
        }
        if let Err(error) = meta.validate(document, meta_index) {
            panic!("{name} is not a valid draft 2020-12 schema: {error:#}");
        }
    }
    CompiledSchemas::compile(&files);
}

#[test]
fn each_schema_accepts_its_own_examples() {
    let files = schema_files();
    let compiled = CompiledSchemas::compile(&files);
    for file in files.values() {
        let examples = file.document["examples"]
            .as_array()
            .filter(|examples| !examples.is_empty())
            .unwrap_or_else(|| panic!("{}.schema.json has no examples", file.stem));
        for (position, example) in examples.iter().enumerate() {
            if let Err(error) = compiled.check(&file.stem, example) {
                panic!(
                    "{}.schema.json: example {position} does not validate:\n{error}",
                    file.stem
                );
            }
        }
    }
}

#[test]
fn readme_message_examples_match_their_schemas() {
    let compiled = CompiledSchemas::compile(&schema_files());
    check_examples(&compiled, &readme_message_examples());
}

/// Panics, naming the README line, at the first example its schema refuses.
fn check_examples(compiled: &CompiledSchemas, examples: &[ReadmeMessage]) {
    assert!(
        !examples.is_empty(),
        "README.md has no examples marked {MARKER_PREFIX}NAME{MARKER_SUFFIX}"
    );
    for form in BODY_FORMS {
        assert!(
            examples.iter().any(|example| example.schema == form),
            "README.md has no example marked {MARKER_PREFIX}{form}{MARKER_SUFFIX}"
        );
    }
    for example in examples {
        if let Err(error) = compiled.check(&example.schema, &example.body) {
            panic!(
                "README.md line {}: the {} example does not validate:\n{error}",
                example.line, example.schema
            );
        }
        // What goes to the import queue must also pass the union the consumer applies.
        if example.schema != "maintenance-request" && example.schema != "import-message" {
            if let Err(error) = compiled.check("import-message", &example.body) {
                panic!(
                    "README.md line {}: the {} example is not an import message:\n{error}",
                    example.line, example.schema
                );
            }
        }
    }
}

#[test]
fn bodies_the_consumer_must_refuse_fail_validation() {
    let compiled = CompiledSchemas::compile(&schema_files());
    let source = json!({"bucket": "dsa-ingest", "key": "orders.csv"});
    let refused_imports = [
        ("an empty object", json!({})),
        (
            "a JSON array",
            json!([{"analysis_run_id": "1c7a3f0e-5b7d-4d0e-9a51-3f2b8c6d9e14"}]),
        ),
        (
            "a run id that is no uuid",
            json!({"analysis_run_id": "run-17"}),
        ),
        (
            "a run reference with another field",
            json!({"analysis_run_id": "1c7a3f0e-5b7d-4d0e-9a51-3f2b8c6d9e14", "dataset": "orders"}),
        ),
        (
            "a request without an idempotency key",
            json!({"dataset": "orders", "source": source}),
        ),
        (
            "a request with an empty idempotency key",
            json!({"idempotency_key": "", "dataset": "orders", "source": source}),
        ),
        (
            "a request with an idempotency key over 200 characters",
            json!({"idempotency_key": "k".repeat(201), "dataset": "orders", "source": source}),
        ),
        (
            "a request with both dataset and dataset_id",
            json!({"idempotency_key": "a", "dataset": "orders", "dataset_id": 3, "source": source}),
        ),
        (
            "a request with neither dataset nor dataset_id",
            json!({"idempotency_key": "a", "source": source}),
        ),
        (
            "a blank dataset name",
            json!({"idempotency_key": "a", "dataset": "   ", "source": source}),
        ),
        (
            "a dataset name with a control character",
            json!({"idempotency_key": "a", "dataset": "ord\ters", "source": source}),
        ),
        (
            "a dataset id of zero",
            json!({"idempotency_key": "a", "dataset_id": 0, "source": source}),
        ),
        (
            "a source without a key",
            json!({"idempotency_key": "a", "dataset": "orders", "source": {"bucket": "b"}}),
        ),
        (
            "a source with an unknown field",
            json!({"idempotency_key": "a", "dataset": "orders",
                   "source": {"bucket": "b", "key": "k", "region": "eu-west-1"}}),
        ),
        (
            "an unknown option",
            json!({"idempotency_key": "a", "dataset": "orders", "source": source,
                   "options": {"batch_size": 10}}),
        ),
        (
            "skip_bad_rows as a string",
            json!({"idempotency_key": "a", "dataset": "orders", "source": source,
                   "options": {"skip_bad_rows": "yes"}}),
        ),
        ("an event without records", json!({"Records": []})),
        (
            "an event record without an object key",
            json!({"Records": [{"s3": {"bucket": {"name": "dsa-ingest"}, "object": {"size": 3}}}]}),
        ),
        (
            "an event record without a bucket name",
            json!({"Records": [{"s3": {"bucket": {}, "object": {"key": "orders.csv"}}}]}),
        ),
        (
            "the AWS test event sent when notifications are configured",
            json!({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "dsa-ingest"}),
        ),
    ];
    for (what, body) in &refused_imports {
        assert!(
            compiled.check("import-message", body).is_err(),
            "import-message accepts {what}: {body}"
        );
    }

    let refused_maintenance = [
        ("an unknown task", json!({"task": "vacuum"})),
        ("no task", json!({"dataset_id": 4})),
        (
            "a dataset id as a string",
            json!({"task": "refresh_search_index", "dataset_id": "4"}),
        ),
        (
            "an unknown field",
            json!({"task": "refresh_search_index", "force": true}),
        ),
    ];
    for (what, body) in &refused_maintenance {
        assert!(
            compiled.check("maintenance-request", body).is_err(),
            "maintenance-request accepts {what}: {body}"
        );
    }
}

#[test]
fn a_marked_readme_example_that_does_not_match_is_reported() {
    // The README test is only worth something if a wrong example fails it: the README
    // with one example spoiled the way a careless edit could (a string where a boolean
    // belongs) must fail the same check, naming the spoiled example's line.
    let readme = std::fs::read_to_string(repository_path("README.md")).unwrap();
    let right = r#""skip_bad_rows": true"#;
    let line = readme
        .lines()
        .position(|line| line.contains(right))
        .expect("a README example sets skip_bad_rows");
    let spoiled = readme.replacen(right, r#""skip_bad_rows": "true""#, 1);
    let examples = message_examples_in(&spoiled);
    let marker_line = examples
        .iter()
        .filter(|example| example.line <= line)
        .map(|example| example.line)
        .max()
        .expect("the spoiled line is inside a marked example");
    let compiled = CompiledSchemas::compile(&schema_files());
    let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_examples(&compiled, &examples)
    }))
    .expect_err("the spoiled README must fail the check");
    let message = failure
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.starts_with(&format!("README.md line {marker_line}:")),
        "{message}"
    );
    assert!(message.contains("skip_bad_rows"), "{message}");
}

/// The schemas and the consumer agree: every README example that validates is also a
/// message the service reads (and would act on, not dead-letter).
#[test]
fn readme_examples_are_read_by_the_service() {
    let examples = readme_message_examples();
    assert!(!examples.is_empty());
    for example in examples {
        let body = serde_json::to_vec(&example.body).unwrap();
        let read = match example.schema.as_str() {
            "maintenance-request" => dsa_ingest::outbox::MaintenanceRequest::parse(&body)
                .map(|_| ())
                .map_err(|error| error.to_string()),
            _ => dsa_ingest::queue::messages::parse(&body)
                .map(|_| ())
                .map_err(|error| error.to_string()),
        };
        assert!(
            read.is_ok(),
            "README line {}: the service refuses its {} example: {}",
            example.line,
            example.schema,
            read.unwrap_err()
        );
    }
}
