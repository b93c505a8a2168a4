//! Watch rules: which objects of which bucket become runs of which dataset, with what
//! options, and what happens to an object once its run has ended.
//!
//! Rules come from `WATCH_RULES_FILE` (TOML, one `[[rule]]` table each) or, for one
//! rule, from the command line. Both roads end in [`Rule::build`], and [`check_rules`]
//! refuses, before anything is listed, a set whose rules overlap or reach outside
//! `IMPORT_ALLOWED_BUCKETS`: a mistake in the rules stops the process with a message
//! naming the file, the rule and the field, instead of importing the wrong thing.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

use crate::db::DatasetName;
use crate::import::run::ImportOptions;
use crate::policy::SourcePolicy;
use crate::watch::glob::Glob;

#[derive(Debug, Error)]
pub enum RulesError {
    #[error("cannot read WATCH_RULES_FILE {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("WATCH_RULES_FILE {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    /// One rule (or the file around it) is wrong; `origin` says where.
    #[error("{origin}: {message}")]
    Rule { origin: String, message: String },
    #[error("{origin}: rules {first:?} and {second:?} overlap ({reason}): an object would belong to both; give them prefixes that do not nest, or patterns with different endings (such as *.csv and *.xlsx)")]
    Overlap {
        origin: String,
        first: String,
        second: String,
        reason: String,
    },
}

/// One watch rule, checked.
#[derive(Clone, Debug)]
pub struct Rule {
    /// How logs, metrics and records name the rule (default `s3://BUCKET/PREFIX`).
    pub name: String,
    pub bucket: String,
    /// Only keys that start with this are listed (may be empty: the whole bucket).
    pub prefix: String,
    /// Matched against the rest of the key after `prefix`; absent: every key.
    pub pattern: Option<Glob>,
    pub dataset: DatasetChoice,
    /// The options of every run this rule creates; `message` may hold `{key}` and
    /// `{bucket}`, filled in per object.
    pub options: ImportOptions,
    /// Recorded as the run's user and the commit's author.
    pub user: Option<String>,
    /// Keys only grow (dated names): list after the last key seen instead of the
    /// whole prefix each time.
    pub ordered: bool,
    /// What happens to the object once its run completed.
    pub after: AfterAction,
    /// What happens to the object once its run failed.
    pub after_failure: AfterAction,
}

/// Which dataset an object's run imports into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatasetChoice {
    /// A name, possibly built from path segments of the key (`{segment:N}`).
    Template(DatasetTemplate),
    /// The order S3 event records follow: `S3_EVENT_DATASET`, the object's metadata
    /// (with `S3_EVENT_DATASET_FROM_METADATA`), the key's first segment, the file's
    /// base name.
    LikeS3Events,
}

/// A dataset name with `{segment:N}` placeholders: the key's Nth path segment,
/// counted from 1 (`orders/2026/a.csv` has segments `orders`, `2026`, `a.csv`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetTemplate {
    parts: Vec<TemplatePart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    Segment(usize),
}

impl DatasetTemplate {
    /// Parses `sales`, `{segment:2}` or `raw-{segment:1}`; a plain name must be a
    /// valid dataset name already.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .map(|close| open + close)
                .ok_or_else(|| format!("{text:?} has a `{{` without its `}}`"))?;
            let placeholder = &rest[open + 1..close];
            let segment = placeholder
                .strip_prefix("segment:")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    format!(
                        "{text:?}: unknown placeholder {{{placeholder}}}; the one placeholder is {{segment:N}}, N counting the key's path segments from 1"
                    )
                })?;
            parts.push(TemplatePart::Segment(segment));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_owned()));
        }
        let template = Self { parts };
        if !template.has_placeholders() {
            DatasetName::parse(text).map_err(|error| error.to_string())?;
        }
        Ok(template)
    }

    fn has_placeholders(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, TemplatePart::Segment(_)))
    }

    /// The dataset name for an object's key.
    pub fn render(&self, key: &str) -> Result<DatasetName, String> {
        let segments: Vec<&str> = key.split('/').collect();
        let mut name = String::new();
        for part in &self.parts {
            match part {
                TemplatePart::Text(text) => name.push_str(text),
                TemplatePart::Segment(n) => match segments.get(n - 1) {
                    Some(segment) if !segment.is_empty() => name.push_str(segment),
                    _ => {
                        return Err(format!(
                            "the key {key:?} has no path segment {n} to name its dataset"
                        ))
                    }
                },
            }
        }
        DatasetName::parse(&name).map_err(|error| format!("the key {key:?} gives {error}"))
    }
}

/// What happens to an object after its run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterAction {
    /// Leave it where it is.
    Keep,
    /// Delete it (only if it still has the ETag that was imported).
    Delete,
    /// Copy it under this prefix of the same bucket (the key's part below the rule's
    /// prefix appended: `incoming/a/b.csv` with `move:done/` becomes `done/a/b.csv`),
    /// then delete it.
    Move(String),
}

impl AfterAction {
    /// Parses `keep`, `delete` or `move:PREFIX` (the prefix ends with `/`).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "keep" => Ok(Self::Keep),
            "delete" => Ok(Self::Delete),
            _ => match text.strip_prefix("move:") {
                Some(prefix) if !prefix.is_empty() && prefix.ends_with('/') => {
                    Ok(Self::Move(prefix.to_owned()))
                }
                Some(_) => Err(format!(
                    "{text:?}: move needs a folder, a prefix that ends with `/` (move:done/)"
                )),
                None => Err(format!(
                    "{text:?} is not keep, delete or move:PREFIX/ (such as move:done/)"
                )),
            },
        }
    }

    /// What the record of an object says to do, with the destination worked out:
    /// `delete` or `move:KEY`; `None` for keep.
    pub fn for_object(&self, rule_prefix: &str, key: &str) -> Option<String> {
        match self {
            AfterAction::Keep => None,
            AfterAction::Delete => Some("delete".to_owned()),
            AfterAction::Move(prefix) => Some(format!(
                "move:{prefix}{}",
                key.strip_prefix(rule_prefix).unwrap_or(key)
            )),
        }
    }
}

impl fmt::Display for AfterAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AfterAction::Keep => f.write_str("keep"),
            AfterAction::Delete => f.write_str("delete"),
            AfterAction::Move(prefix) => write!(f, "move:{prefix}"),
        }
    }
}

/// A rule as written, before it is checked: the fields of a `[[rule]]` table other
/// than the import options, and what the command line's arguments give.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub ordered: bool,
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub after_failure: Option<String>,
}

impl RuleSpec {
    /// The fields a rule table takes besides the import options.
    const FIELDS: &'static [&'static str] = &[
        "name",
        "bucket",
        "prefix",
        "pattern",
        "dataset",
        "user",
        "ordered",
        "after",
        "after_failure",
    ];

    /// Parses `s3://BUCKET/PREFIX` (the prefix may be empty).
    pub fn from_location(location: &str) -> Result<Self, String> {
        let rest = location
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{location:?} is not of the form s3://BUCKET/PREFIX"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("{location:?} names no bucket"));
        }
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            ..Self::default()
        })
    }
}

impl Rule {
    /// Checks a rule as written; `origin` says where it came from, for errors.
    pub fn build(spec: RuleSpec, options: ImportOptions, origin: &str) -> Result<Self, RulesError> {
        let fail = |message: String| RulesError::Rule {
            origin: origin.to_owned(),
            message,
        };
        if spec.bucket.trim().is_empty() || spec.bucket.contains('/') {
            return Err(fail(format!(
                "bucket {:?} is not a bucket name",
                spec.bucket
            )));
        }
        options
            .check()
            .map_err(|message| fail(format!("options: {message}")))?;
        let pattern = spec
            .pattern
            .as_deref()
            .map(Glob::parse)
            .transpose()
            .map_err(|message| fail(format!("pattern: {message}")))?;
        let dataset = match spec.dataset.as_deref() {
            None => DatasetChoice::LikeS3Events,
            Some(text) => DatasetChoice::Template(
                DatasetTemplate::parse(text)
                    .map_err(|message| fail(format!("dataset: {message}")))?,
            ),
        };
        let action = |field: &str, text: Option<&str>| {
            text.map(AfterAction::parse)
                .transpose()
                .map(|action| action.unwrap_or(AfterAction::Keep))
                .map_err(|message| fail(format!("{field}: {message}")))
        };
        let after = action("after", spec.after.as_deref())?;
        let after_failure = action("after_failure", spec.after_failure.as_deref())?;
        let name = spec
            .name
            .unwrap_or_else(|| format!("s3://{}/{}", spec.bucket, spec.prefix));
        Ok(Self {
            name,
            bucket: spec.bucket,
            prefix: spec.prefix,
            pattern,
            dataset,
            options,
            user: spec.user,
            ordered: spec.ordered,
            after,
            after_failure,
        })
    }

    /// Whether an object's key belongs to this rule (its prefix and pattern).
    pub fn covers(&self, key: &str) -> bool {
        match key.strip_prefix(self.prefix.as_str()) {
            Some(rest) => self
                .pattern
                .as_ref()
                .is_none_or(|pattern| pattern.matches(rest)),
            None => false,
        }
    }

    /// The commit message for an object: the rule's, with `{key}` and `{bucket}`
    /// filled in, or one naming the object and the rule.
    pub fn message_for(&self, key: &str) -> String {
        match &self.options.message {
            Some(template) => template
                .replace("{key}", key)
                .replace("{bucket}", &self.bucket),
            None => format!(
                "Import s3://{}/{key} (watch rule {})",
                self.bucket, self.name
            ),
        }
    }

    /// Why this rule and `other` could both claim one object, if they could.
    fn overlap_with(&self, other: &Rule) -> Option<String> {
        if self.bucket != other.bucket {
            return None;
        }
        let nested =
            self.prefix.starts_with(&other.prefix) || other.prefix.starts_with(&self.prefix);
        if !nested {
            return None;
        }
        let same_prefix = self.prefix == other.prefix;
        match (&self.pattern, &other.pattern) {
            (Some(a), Some(b)) if a.disjoint(b, same_prefix) => None,
            (a, b) => Some(format!(
                "s3://{}/{}{} and s3://{}/{}{}",
                self.bucket,
                self.prefix,
                a.as_ref().map(Glob::as_str).unwrap_or("**"),
                other.bucket,
                other.prefix,
                b.as_ref().map(Glob::as_str).unwrap_or("**"),
            )),
        }
    }
}

/// Reads and checks `WATCH_RULES_FILE`.
pub fn load_rules_file(path: &Path, policy: &SourcePolicy) -> Result<Vec<Rule>, RulesError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
        path: shown.clone(),
        source,
    })?;
    let rules = parse_rules(&text, &shown)?;
    check_rules(&rules, policy, &format!("WATCH_RULES_FILE {shown}"))?;
    Ok(rules)
}

/// Parses the rules of a file's text; `path` names it in errors.
pub fn parse_rules(text: &str, path: &str) -> Result<Vec<Rule>, RulesError> {
    let table: toml::Table = toml::from_str(text).map_err(|error| RulesError::Syntax {
        path: path.to_owned(),
        message: error.message().to_owned(),
    })?;
    let file = format!("WATCH_RULES_FILE {path}");
    if let Some(unknown) = table.keys().find(|key| key.as_str() != "rule") {
        return Err(RulesError::Rule {
            origin: file,
            message: format!("unknown field {unknown:?}; the file holds [[rule]] tables only"),
        });
    }
    let entries = match table.get("rule") {
        None => Vec::new(),
        Some(toml::Value::Array(entries)) => entries.clone(),
        Some(_) => {
            return Err(RulesError::Rule {
                origin: file,
                message: "`rule` must be an array of tables ([[rule]])".to_owned(),
            })
        }
    };
    if entries.is_empty() {
        return Err(RulesError::Rule {
            origin: file,
            message: "no rules: add at least one [[rule]] table".to_owned(),
        });
    }
    let mut rules = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let toml::Value::Table(entry) = entry else {
            return Err(RulesError::Rule {
                origin: format!("{file}, rule {}", index + 1),
                message: "not a table".to_owned(),
            });
        };
        let origin = match entry.get("name").and_then(toml::Value::as_str) {
            Some(name) => format!("{file}, rule {} ({name})", index + 1),
            None => format!("{file}, rule {}", index + 1),
        };
        rules.push(rule_from_table(entry, &origin)?);
    }
    Ok(rules)
}

/// Splits a `[[rule]]` table into the rule's own fields and the import options, and
/// refuses a field that is neither.
fn rule_from_table(entry: toml::Table, origin: &str) -> Result<Rule, RulesError> {
    let fail = |message: String| RulesError::Rule {
        origin: origin.to_owned(),
        message,
    };
    let mut own = toml::Table::new();
    let mut options = BTreeMap::new();
    for (field, value) in entry {
        if RuleSpec::FIELDS.contains(&field.as_str()) {
            own.insert(field, value);
        } else if ImportOptions::FIELDS.contains(&field.as_str()) {
            options.insert(field, value);
        } else {
            return Err(fail(format!(
                "unknown field {field:?}; a rule takes {} and the import options {}",
                RuleSpec::FIELDS.join(", "),
                ImportOptions::FIELDS.join(", ")
            )));
        }
    }
    let spec: RuleSpec = toml::Value::Table(own)
        .try_into()
        .map_err(|error: toml::de::Error| fail(error.message().to_owned()))?;
    let options: ImportOptions = toml::Value::Table(options.into_iter().collect())
        .try_into()
        .map_err(|error: toml::de::Error| fail(format!("options: {}", error.message())))?;
    Rule::build(spec, options, origin)
}

/// Checks a set of rules together: unique names, no two rules claiming one object, every
/// prefix inside `IMPORT_ALLOWED_BUCKETS`, and no `move:` destination that a rule
/// would list again (the moved object would be imported a second time).
pub fn check_rules(rules: &[Rule], policy: &SourcePolicy, origin: &str) -> Result<(), RulesError> {
    let fail = |message: String| RulesError::Rule {
        origin: origin.to_owned(),
        message,
    };
    for (index, rule) in rules.iter().enumerate() {
        if let Some(earlier) = rules[..index].iter().find(|r| r.name == rule.name) {
            return Err(fail(format!(
                "two rules are named {:?}; names identify rules in records and logs",
                earlier.name
            )));
        }
        policy
            .check_object(&rule.bucket, &rule.prefix)
            .map_err(|refused| fail(format!("rule {:?}: {refused}", rule.name)))?;
        for earlier in &rules[..index] {
            if let Some(reason) = earlier.overlap_with(rule) {
                return Err(RulesError::Overlap {
                    origin: origin.to_owned(),
                    first: earlier.name.clone(),
                    second: rule.name.clone(),
                    reason,
                });
            }
        }
    }
    for rule in rules {
        for action in [&rule.after, &rule.after_failure] {
            let AfterAction::Move(destination) = action else {
                continue;
            };
            if let Some(lister) = rules
                .iter()
                .find(|other| other.bucket == rule.bucket && destination.starts_with(&other.prefix))
            {
                return Err(fail(format!(
                    "rule {:?} moves objects to s3://{}/{destination}, which rule {:?} lists: \
                     they would be imported again; move them outside every watched prefix",
                    rule.name, rule.bucket, lister.name
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::run::ImportMode;

    fn rules(text: &str) -> Result<Vec<Rule>, RulesError> {
        let rules = parse_rules(text, "rules.toml")?;
        check_rules(
            &rules,
            &SourcePolicy::default(),
            "WATCH_RULES_FILE rules.toml",
        )?;
        Ok(rules)
    }

    fn error(text: &str) -> String {
        rules(text).unwrap_err().to_string()
    }

    #[test]
    fn a_rules_file_gives_rules_with_their_import_options() {
        let rules = rules(
            r#"
            [[rule]]
            name = "orders"
            bucket = "landing"
            prefix = "orders/"
            pattern = "**/*.csv"
            dataset = "orders"
            key = ["order_id"]
            mode = "upsert"
            skip_bad_rows = true
            message = "Dropped {key} into {bucket}"
            after = "move:done/"
            after_failure = "move:failed/"

            [[rule]]
            bucket = "landing"
            prefix = "sheets/"
            dataset = "{segment:2}"
            ordered = true
            "#,
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        let orders = &rules[0];
        assert_eq!(orders.options.key, Some(vec!["order_id".to_owned()]));
        assert_eq!(orders.options.mode, ImportMode::Upsert);
        assert!(orders.options.skip_bad_rows);
        assert!(orders.covers("orders/2026/11/a.csv"));
        assert!(!orders.covers("orders/a.xlsx"));
        assert!(!orders.covers("other/a.csv"));
        assert_eq!(
            orders.message_for("orders/a.csv"),
            "Dropped orders/a.csv into landing"
        );
        assert_eq!(
            orders.after.for_object(&orders.prefix, "orders/2026/a.csv"),
            Some("move:done/2026/a.csv".to_owned())
        );
        let sheets = &rules[1];
        assert_eq!(sheets.name, "s3://landing/sheets/");
        assert!(sheets.ordered);
        assert_eq!(sheets.after, AfterAction::Keep);
        assert_eq!(
            sheets.after.for_object(&sheets.prefix, "sheets/a.csv"),
            None
        );
        assert_eq!(
            sheets.message_for("sheets/x/a.csv"),
            "Import s3://landing/sheets/x/a.csv (watch rule s3://landing/sheets/)"
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_file_rule_and_field() {
        let unknown = error("[[rule]]\nname = \"a\"\nbucket = \"b\"\nmdoe = \"upsert\"\n");
        assert!(
            unknown.starts_with("WATCH_RULES_FILE rules.toml, rule 1 (a): unknown field \"mdoe\""),
            "{unknown}"
        );
        let top = error("interval = 3\n[[rule]]\nbucket = \"b\"\n");
        assert!(top.contains("unknown field \"interval\""), "{top}");
        let mode = error("[[rule]]\nbucket = \"b\"\nmode = \"merge\"\n");
        assert!(
            mode.starts_with("WATCH_RULES_FILE rules.toml, rule 1: options:"),
            "{mode}"
        );
        let rekey = error("[[rule]]\nbucket = \"b\"\nmode = \"append\"\nrekey = true\n");
        assert!(rekey.contains("rekey is for mode replace only"), "{rekey}");
        let after = error("[[rule]]\nbucket = \"b\"\nafter = \"archive\"\n");
        assert!(
            after.contains("after: \"archive\" is not keep, delete"),
            "{after}"
        );
        let folder = error("[[rule]]\nbucket = \"b\"\nafter = \"move:done\"\n");
        assert!(folder.contains("ends with `/`"), "{folder}");
        let missing = error("[[rule]]\nprefix = \"a/\"\n");
        assert!(missing.contains("bucket"), "{missing}");
        let syntax = error("[[rule]\n");
        assert!(
            syntax.starts_with("WATCH_RULES_FILE rules.toml is not valid TOML"),
            "{syntax}"
        );
        assert!(error("").contains("no rules"));
        let placeholder = error("[[rule]]\nbucket = \"b\"\ndataset = \"{folder}\"\n");
        assert!(
            placeholder.contains("unknown placeholder {folder}"),
            "{placeholder}"
        );
    }

    #[test]
    fn rules_that_could_claim_one_object_overlap() {
        let nested = error(
            "[[rule]]\nname = \"all\"\nbucket = \"b\"\n\
             [[rule]]\nname = \"orders\"\nbucket = \"b\"\nprefix = \"orders/\"\n",
        );
        assert!(
            nested
                .contains("rules \"all\" and \"orders\" overlap (s3://b/** and s3://b/orders/**)"),
            "{nested}"
        );
        let same = error(
            "[[rule]]\nname = \"x\"\nbucket = \"b\"\nprefix = \"in/\"\npattern = \"*.csv\"\n\
             [[rule]]\nname = \"y\"\nbucket = \"b\"\nprefix = \"in/\"\npattern = \"**/*.csv\"\n",
        );
        assert!(same.contains("overlap"), "{same}");
        // Different endings, different buckets, prefixes that do not nest: no overlap.
        rules(
            "[[rule]]\nname = \"csv\"\nbucket = \"b\"\nprefix = \"in/\"\npattern = \"*.csv\"\n\
             [[rule]]\nname = \"xlsx\"\nbucket = \"b\"\nprefix = \"in/\"\npattern = \"**/*.xlsx\"\n\
             [[rule]]\nname = \"other\"\nbucket = \"c\"\nprefix = \"in/\"\n\
             [[rule]]\nname = \"sibling\"\nbucket = \"b\"\nprefix = \"inbox/\"\n",
        )
        .unwrap();
        let twice = error(
            "[[rule]]\nname = \"x\"\nbucket = \"b\"\nprefix = \"a/\"\n\
             [[rule]]\nname = \"x\"\nbucket = \"b\"\nprefix = \"c/\"\n",
        );
        assert!(twice.contains("two rules are named \"x\""), "{twice}");
    }

    #[test]
    fn moving_into_a_watched_prefix_and_leaving_the_allow_list_are_refused() {
        let loop_back = error(
            "[[rule]]\nname = \"in\"\nbucket = \"b\"\nprefix = \"in/\"\nafter = \"move:in/done/\"\n",
        );
        assert!(loop_back.contains("would be imported again"), "{loop_back}");
        let policy = SourcePolicy::new(Some("b/in/"), None).unwrap();
        let rules = parse_rules("[[rule]]\nbucket = \"b\"\nprefix = \"\"\n", "rules.toml").unwrap();
        let refused = check_rules(&rules, &policy, "WATCH_RULES_FILE rules.toml")
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("IMPORT_ALLOWED_BUCKETS permits only s3://b/in/*"),
            "{refused}"
        );
        let inside = parse_rules(
            "[[rule]]\nbucket = \"b\"\nprefix = \"in/x/\"\n",
            "rules.toml",
        )
        .unwrap();
        check_rules(&inside, &policy, "here").unwrap();
    }

    #[test]
    fn a_dataset_template_takes_path_segments_of_the_key() {
        let second = DatasetTemplate::parse("{segment:2}").unwrap();
        assert_eq!(
            second.render("landing/orders/a.csv").unwrap().as_str(),
            "orders"
        );
        let mixed = DatasetTemplate::parse("raw-{segment:1}-{segment:2}").unwrap();
        assert_eq!(
            mixed.render("eu/sales/2026.csv").unwrap().as_str(),
            "raw-eu-sales"
        );
        let missing = second.render("a.csv").unwrap_err();
        assert!(missing.contains("no path segment 2"), "{missing}");
        assert!(second.render("a//b.csv").is_err());
        assert!(DatasetTemplate::parse("{segment:0}").is_err());
        assert!(DatasetTemplate::parse("{segment:x}").is_err());
        assert!(DatasetTemplate::parse("open{segment:1").is_err());
        assert!(DatasetTemplate::parse("  ").is_err());
        assert_eq!(
            DatasetTemplate::parse("sales")
                .unwrap()
                .render("any/key.csv")
                .unwrap()
                .as_str(),
            "sales"
        );
    }

    #[test]
    fn a_command_line_location_is_a_bucket_and_a_prefix() {
        let spec = RuleSpec::from_location("s3://landing/in/").unwrap();
        assert_eq!(
            (spec.bucket.as_str(), spec.prefix.as_str()),
            ("landing", "in/")
        );
        let whole = RuleSpec::from_location("s3://landing").unwrap();
        assert_eq!(
            (whole.bucket.as_str(), whole.prefix.as_str()),
            ("landing", "")
        );
        assert!(RuleSpec::from_location("landing/in").is_err());
        assert!(RuleSpec::from_location("s3:///in").is_err());
    }
}
