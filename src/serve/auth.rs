//! Who may do what: bearer tokens from `API_TOKENS_FILE`, each standing for a client
//! with the datasets it may touch and whether it may only read or also write.
//!
//! The file holds SHA-256 hashes, never tokens; a presented token is hashed and
//! compared with every client's hash in constant time. Tokens are never logged.

use std::path::Path;

use axum::http::{header, HeaderMap, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::watch::glob::Glob;

use super::problem::Problem;

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Read,
    Write,
}

impl Scope {
    fn verb(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "import into",
        }
    }
}

/// One client of the tokens file.
#[derive(Debug)]
pub struct Client {
    /// Recorded as the user of the runs it creates.
    pub name: String,
    token_sha256: [u8; 32],
    datasets: Vec<Glob>,
    write: bool,
}

/// Who made a request: a client of the tokens file, or anyone when authentication is
/// off (`--insecure-no-auth`).
#[derive(Clone, Copy, Debug)]
pub enum Caller<'a> {
    Client(&'a Client),
    Anyone,
}

impl Caller<'_> {
    /// The run's user: the client's name.
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::Client(client) => Some(&client.name),
            Caller::Anyone => None,
        }
    }

    /// Whether the caller may read `dataset`: what a listing of datasets shows.
    pub fn may_read(&self, dataset: &str) -> bool {
        match self {
            Caller::Client(client) => client.may_see(dataset),
            Caller::Anyone => true,
        }
    }

    /// `403` unless the caller may do `scope` on `dataset`; the message names only the
    /// dataset asked for.
    pub fn may(&self, scope: Scope, dataset: &str) -> Result<(), Problem> {
        let Caller::Client(client) = self else {
            return Ok(());
        };
        if (scope == Scope::Read || client.write) && client.may_see(dataset) {
            Ok(())
        } else {
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                format!(
                    "this token may not {} dataset {dataset:?}; ask for a token whose \
                     datasets and scopes include it",
                    scope.verb()
                ),
            ))
        }
    }
}

impl Client {
    /// Whether one of the client's patterns matches the dataset.
    pub fn may_see(&self, dataset: &str) -> bool {
        self.datasets.iter().any(|glob| glob.matches(dataset))
    }
}

/// The clients of the tokens file, or none when authentication is off.
#[derive(Debug)]
pub struct Clients {
    clients: Option<Vec<Client>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    clients: Vec<ClientEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    name: String,
    token_sha256: String,
    datasets: Vec<String>,
    scopes: Vec<String>,
}

impl Clients {
    /// Everyone may do everything.
    pub fn insecure_anyone() -> Self {
        Self { clients: None }
    }

    /// Reads and checks the tokens file; every mistake names the client and the field.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("reading API_TOKENS_FILE {}: {error}", path.display()))?;
        Self::parse(&text).map_err(|error| format!("API_TOKENS_FILE {}: {error}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TokensFile = toml::from_str(text).map_err(|error| error.to_string())?;
        let mut clients = Vec::new();
        for (index, entry) in file.clients.into_iter().enumerate() {
            let which = format!("client {} ({:?})", index + 1, entry.name);
            if entry.name.trim().is_empty() {
                return Err(format!("{which}: name must not be empty"));
            }
            let mut token_sha256 = [0u8; 32];
            hex::decode_to_slice(entry.token_sha256.trim(), &mut token_sha256).map_err(|_| {
                format!("{which}: token_sha256 must be 64 hex digits (the SHA-256 of the token)")
            })?;
            if clients
                .iter()
                .any(|client: &Client| client.token_sha256 == token_sha256)
            {
                return Err(format!("{which}: another client has the same token"));
            }
            let datasets = entry
                .datasets
                .iter()
                .map(|pattern| {
                    Glob::parse(pattern).map_err(|error| format!("{which}: datasets: {error}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let write = match entry
                .scopes
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice()
            {
                ["read"] => false,
                ["read", "write"] | ["write", "read"] => true,
                _ => {
                    return Err(format!(
                        "{which}: scopes must be [\"read\"] or [\"read\", \"write\"]"
                    ))
                }
            };
            clients.push(Client {
                name: entry.name,
                token_sha256,
                datasets,
                write,
            });
        }
        Ok(Self {
            clients: Some(clients),
        })
    }

    /// The caller a request's `Authorization: Bearer` token stands for, or `401`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller<'_>, Problem> {
        let Some(clients) = &self.clients else {
            return Ok(Caller::Anyone);
        };
        let unauthorized = |detail: &str| Problem::new(StatusCode::UNAUTHORIZED, detail);
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or_else(|| unauthorized("send a token as `Authorization: Bearer TOKEN`"))?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every client is compared, whichever matches, so the time taken does not say
        // how many clients come before the matching one.
        let mut found = None;
        for client in clients {
            if constant_time_eq(&client.token_sha256, &presented) {
                found = Some(client);
            }
        }
        found
            .map(Caller::Client)
            .ok_or_else(|| unauthorized("the token is not valid"))
    }
}

/// Whether `a` and `b` are equal, in a time that does not depend on where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn headers(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn tokens_give_their_clients_rights() {
        let clients = Clients::parse(&format!(
            "[[clients]]\nname = \"web\"\ntoken_sha256 = \"{}\"\ndatasets = [\"sales/**\"]\nscopes = [\"read\", \"write\"]\n\
             [[clients]]\nname = \"bi\"\ntoken_sha256 = \"{}\"\ndatasets = [\"**\"]\nscopes = [\"read\"]\n",
            hash("w-token"),
            hash("r-token")
        ))
        .unwrap();
        let web = clients.authenticate(&headers("w-token")).unwrap();
        assert_eq!(web.user(), Some("web"));
        assert!(web.may(Scope::Write, "sales/eu").is_ok());
        let refused = web.may(Scope::Read, "hr").unwrap_err();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(!refused.detail.contains("sales"), "{}", refused.detail);
        let bi = clients.authenticate(&headers("r-token")).unwrap();
        assert!(bi.may(Scope::Read, "hr").is_ok());
        assert!(bi.may(Scope::Write, "hr").is_err());
        let wrong = clients.authenticate(&headers("nope")).unwrap_err();
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        let missing = clients.authenticate(&HeaderMap::new()).unwrap_err();
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn mistakes_in_the_file_name_the_client() {
        let error = Clients::parse(
            "[[clients]]\nname = \"web\"\ntoken_sha256 = \"abc\"\ndatasets = [\"*\"]\nscopes = [\"read\"]\n",
        )
        .unwrap_err();
        assert!(
            error.starts_with("client 1 (\"web\"): token_sha256"),
            "{error}"
        );
        let error = Clients::parse(&format!(
            "[[clients]]\nname = \"web\"\ntoken_sha256 = \"{}\"\ndatasets = [\"*\"]\nscopes = [\"write\"]\n",
            hash("t")
        ))
        .unwrap_err();
        assert!(error.contains("scopes"), "{error}");
    }
}
