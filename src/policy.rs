//! What a message may make `consume` read: the allow-lists every source passes before a
//! byte of it (or its metadata) is read.
//!
//! Anyone who can publish to the import queue can name a bucket and a key, and a run
//! reference can carry a local path. The service's credentials may read far more than
//! it should import, so `consume` checks each source against `IMPORT_ALLOWED_BUCKETS`
//! (buckets, optionally with key prefixes) and refuses local paths unless
//! `IMPORT_ALLOW_LOCAL_SOURCES` names a directory they lie under once symlinks are
//! resolved. `dsa-ingest import` on the command line is run by a person on their own
//! machine and is not checked.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::import::run::SourceLocation;

/// An allow-list setting that cannot be used; `config` reports it as its own error.
#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?} is not valid: {reason}")]
pub struct PolicyError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

/// Why a source was refused; the text names the setting that refused it, and is
/// what the refused run's `error_message` says.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SourceRefused {
    #[error("s3://{bucket}/{key} is not allowed: IMPORT_ALLOWED_BUCKETS permits only {allowed}")]
    BucketNotAllowed {
        bucket: String,
        key: String,
        allowed: String,
    },
    #[error(
        "local source {path} is refused: consume reads local files only under the directory \
         IMPORT_ALLOW_LOCAL_SOURCES names, and it is unset"
    )]
    LocalSourcesOff { path: String },
    #[error(
        "local source {path} is refused: it is not a file under IMPORT_ALLOW_LOCAL_SOURCES \
         ({root}) once symlinks are resolved{detail}"
    )]
    OutsideLocalRoot {
        path: String,
        root: String,
        detail: String,
    },
}

/// One entry of `IMPORT_ALLOWED_BUCKETS`: a bucket, and optionally a key prefix in it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AllowedBucket {
    bucket: String,
    prefix: Option<String>,
}

/// The allow-lists `consume` applies to every source a message names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// `None`: any bucket the credentials can read (the setting is unset).
    buckets: Option<Vec<AllowedBucket>>,
    /// The canonical directory local sources must lie under; `None` refuses them all.
    local_root: Option<PathBuf>,
}

impl SourcePolicy {
    /// Reads `IMPORT_ALLOWED_BUCKETS` (comma-separated `bucket` or `bucket/prefix`)
    /// and `IMPORT_ALLOW_LOCAL_SOURCES` (a directory that must exist).
    pub fn from_env() -> Result<Self, PolicyError> {
        let buckets = std::env::var("IMPORT_ALLOWED_BUCKETS")
            .ok()
            .filter(|value| !value.trim().is_empty())
            .map(|value| Self::parse_buckets(&value))
            .transpose()?;
        let local_root = match std::env::var("IMPORT_ALLOW_LOCAL_SOURCES") {
            Ok(dir) if !dir.trim().is_empty() => Some(std::fs::canonicalize(dir.trim()).map_err(
                |error| PolicyError {
                    name: "IMPORT_ALLOW_LOCAL_SOURCES",
                    value: dir.clone(),
                    reason: format!("cannot resolve the directory: {error}"),
                },
            )?),
            _ => None,
        };
        Ok(Self {
            buckets,
            local_root,
        })
    }

    /// A policy with the given allow-lists (`bucket` or `bucket/prefix` entries).
    pub fn new(buckets: Option<&str>, local_root: Option<&Path>) -> Result<Self, PolicyError> {
        Ok(Self {
            buckets: buckets.map(Self::parse_buckets).transpose()?,
            local_root: local_root
                .map(|root| {
                    std::fs::canonicalize(root).map_err(|error| PolicyError {
                        name: "IMPORT_ALLOW_LOCAL_SOURCES",
                        value: root.display().to_string(),
                        reason: format!("cannot resolve the directory: {error}"),
                    })
                })
                .transpose()?,
        })
    }

    fn parse_buckets(value: &str) -> Result<Vec<AllowedBucket>, PolicyError> {
        let mut entries = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (bucket, prefix) = match entry.split_once('/') {
                Some((bucket, prefix)) => (bucket, (!prefix.is_empty()).then_some(prefix)),
                None => (entry, None),
            };
            if bucket.is_empty() || bucket.contains('*') {
                return Err(PolicyError {
                    name: "IMPORT_ALLOWED_BUCKETS",
                    value: value.to_owned(),
                    reason: format!("{entry:?} is not `bucket` or `bucket/prefix` (no wildcards)"),
                });
            }
            entries.push(AllowedBucket {
                bucket: bucket.to_owned(),
                prefix: prefix.map(str::to_owned),
            });
        }
        Ok(entries)
    }

    /// Whether any bucket is allowed (the setting is unset), for a warning at start.
    pub fn allows_any_bucket(&self) -> bool {
        self.buckets.is_none()
    }

    /// Checks an object against the bucket allow-list.
    pub fn check_object(&self, bucket: &str, key: &str) -> Result<(), SourceRefused> {
        let Some(allowed) = &self.buckets else {
            return Ok(());
        };
        let permitted = allowed.iter().any(|entry| {
            entry.bucket == bucket
                && entry
                    .prefix
                    .as_deref()
                    .is_none_or(|prefix| key.starts_with(prefix))
        });
        if permitted {
            return Ok(());
        }
        Err(SourceRefused::BucketNotAllowed {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            allowed: allowed
                .iter()
                .map(|entry| match &entry.prefix {
                    Some(prefix) => format!("s3://{}/{prefix}*", entry.bucket),
                    None => format!("s3://{}/*", entry.bucket),
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Checks any source: an object against the buckets, a local path against the
    /// local root after resolving every symlink in it.
    pub fn check(&self, source: &SourceLocation) -> Result<(), SourceRefused> {
        match source {
            SourceLocation::S3 { bucket, key } => self.check_object(bucket, key),
            SourceLocation::Local { path } => {
                let shown = path.display().to_string();
                let Some(root) = &self.local_root else {
                    return Err(SourceRefused::LocalSourcesOff { path: shown });
                };
                let outside = |detail: String| SourceRefused::OutsideLocalRoot {
                    path: shown.clone(),
                    root: root.display().to_string(),
                    detail,
                };
                // A relative path would resolve against the consumer's working
                // directory, which says nothing about what the sender meant.
                if !path.is_absolute() {
                    return Err(outside(" (the path is relative)".to_owned()));
                }
                let resolved =
                    std::fs::canonicalize(path).map_err(|error| outside(format!(" ({error})")))?;
                if resolved.starts_with(root) && resolved.is_file() {
                    Ok(())
                } else {
                    Err(outside(format!(" (it resolves to {})", resolved.display())))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, key: &str) -> SourceLocation {
        SourceLocation::S3 {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        }
    }

    #[test]
    fn buckets_and_prefixes_are_allowed_and_everything_else_refused() {
        let open = SourcePolicy::default();
        assert!(open.allows_any_bucket());
        assert!(open.check(&s3("any", "thing.csv")).is_ok());

        let policy = SourcePolicy::new(Some("in, shared/imports/ "), None).unwrap();
        assert!(policy.check(&s3("in", "a/b.csv")).is_ok());
        assert!(policy.check(&s3("shared", "imports/x.csv")).is_ok());
        let refused = policy.check(&s3("shared", "secrets/x.csv")).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "s3://shared/secrets/x.csv is not allowed: IMPORT_ALLOWED_BUCKETS permits only \
             s3://in/*, s3://shared/imports/*"
        );
        assert!(policy.check(&s3("inx", "a.csv")).is_err());
        assert!(SourcePolicy::new(Some("*"), None).is_err());
    }

    #[test]
    fn local_paths_must_resolve_under_the_allowed_directory() {
        let local = |path: &Path| SourceLocation::Local {
            path: path.to_owned(),
        };
        let closed = SourcePolicy::default();
        let refused = closed.check(&local(Path::new("/etc/passwd"))).unwrap_err();
        assert!(refused.to_string().contains("IMPORT_ALLOW_LOCAL_SOURCES"));

        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("data.csv");
        std::fs::write(&inside, "a\n1\n").unwrap();
        let escape = root.path().join("escape.csv");
        std::os::unix::fs::symlink("/etc/passwd", &escape).unwrap();
        let policy = SourcePolicy::new(None, Some(root.path())).unwrap();
        assert!(policy.check(&local(&inside)).is_ok());
        let refused = policy.check(&local(&escape)).unwrap_err().to_string();
        assert!(refused.contains("it resolves to /etc/passwd"), "{refused}");
        let dotdot = root.path().join("../../etc/passwd");
        assert!(policy.check(&local(&dotdot)).is_err());
        assert!(policy.check(&local(Path::new("data.csv"))).is_err());
        // The S3 side is unaffected by the local root.
        assert!(policy.check(&s3("any", "x.csv")).is_ok());
    }
}
