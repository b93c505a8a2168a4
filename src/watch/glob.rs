//! Glob patterns on the part of a key below a watch rule's prefix.
//!
//! `*` matches any run of characters within one path segment, `?` one character
//! other than `/`, `**` any run of characters across segments, and `**/` any number
//! of whole folders, none included (so `**/*.xlsx` matches `a.xlsx` and `x/y/a.xlsx`).
//! Every other character matches itself; there are no character classes. Small and
//! hand-written because this is all a rule needs.

use std::fmt;

/// A checked pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    tokens: Vec<Token>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`
    One,
    /// `*`
    Star,
    /// `**` not followed by `/`
    DoubleStar,
    /// `**/`: nothing, or anything that ends with `/`
    Folders,
}

impl Glob {
    /// Parses a pattern; an empty one, or one with `***`, is refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("the pattern is empty".to_owned());
        }
        if text.contains("***") {
            return Err(format!("{text:?}: use `*` or `**`, not `***`"));
        }
        let chars: Vec<char> = text.chars().collect();
        let mut tokens = Vec::with_capacity(chars.len());
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '*' if chars.get(i + 1) == Some(&'*') => {
                    if chars.get(i + 2) == Some(&'/') {
                        tokens.push(Token::Folders);
                        i += 3;
                    } else {
                        tokens.push(Token::DoubleStar);
                        i += 2;
                    }
                }
                '*' => {
                    tokens.push(Token::Star);
                    i += 1;
                }
                '?' => {
                    tokens.push(Token::One);
                    i += 1;
                }
                other => {
                    tokens.push(Token::Literal(other));
                    i += 1;
                }
            }
        }
        Ok(Self {
            text: text.to_owned(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the whole of `text` matches. Time is the pattern's length times the
    /// text's; keys are at most 1024 bytes.
    pub fn matches(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        // matched[j]: the tokens so far match chars[..j].
        let mut matched = vec![false; chars.len() + 1];
        matched[0] = true;
        for token in &self.tokens {
            let mut next = vec![false; chars.len() + 1];
            // Whether the tokens so far match some chars[..k] with k <= j.
            let mut any_before = false;
            for j in 0..=chars.len() {
                any_before |= matched[j];
                next[j] = match token {
                    Token::Literal(c) => j > 0 && matched[j - 1] && chars[j - 1] == *c,
                    Token::One => j > 0 && matched[j - 1] && chars[j - 1] != '/',
                    Token::Star => matched[j] || (j > 0 && next[j - 1] && chars[j - 1] != '/'),
                    Token::DoubleStar => any_before,
                    Token::Folders => matched[j] || (j > 0 && chars[j - 1] == '/' && any_before),
                };
            }
            matched = next;
        }
        matched[chars.len()]
    }

    /// The characters every match starts with (up to the first wildcard).
    fn literal_prefix(&self) -> String {
        self.tokens
            .iter()
            .map_while(|token| match token {
                Token::Literal(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    /// The characters every match ends with (after the last wildcard).
    fn literal_suffix(&self) -> String {
        let mut suffix: Vec<char> = self
            .tokens
            .iter()
            .rev()
            .map_while(|token| match token {
                Token::Literal(c) => Some(*c),
                _ => None,
            })
            .collect();
        suffix.reverse();
        suffix.into_iter().collect()
    }

    /// Whether no key can match both patterns, as far as their literal ends tell:
    /// `*.csv` and `*.xlsx` cannot, `2025/*` and `2026/*` cannot (when both apply
    /// below the same prefix). Anything this cannot rule out counts as overlapping.
    pub fn disjoint(&self, other: &Glob, same_prefix: bool) -> bool {
        let (a, b) = (self.literal_suffix(), other.literal_suffix());
        if !a.ends_with(&b) && !b.ends_with(&a) {
            return true;
        }
        if same_prefix {
            let (a, b) = (self.literal_prefix(), other.literal_prefix());
            if !a.starts_with(&b) && !b.starts_with(&a) {
                return true;
            }
        }
        false
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(text: &str) -> Glob {
        Glob::parse(text).unwrap()
    }

    #[test]
    fn a_star_stays_within_one_segment() {
        let csv = glob("*.csv");
        assert!(csv.matches("a.csv"));
        assert!(csv.matches(".csv"));
        assert!(csv.matches("orders 2026+11.csv"));
        assert!(!csv.matches("a/b.csv"));
        assert!(!csv.matches("a.csv.gz"));
        assert!(!csv.matches("a.xlsx"));
        assert!(glob("*/*.csv").matches("2026/a.csv"));
        assert!(!glob("*/*.csv").matches("a.csv"));
        assert!(glob("*").matches("anything"));
        assert!(!glob("*").matches("any/thing"));
    }

    #[test]
    fn a_double_star_crosses_folders_and_may_match_none() {
        let deep = glob("**/*.xlsx");
        assert!(deep.matches("a.xlsx"));
        assert!(deep.matches("x/a.xlsx"));
        assert!(deep.matches("x/y/z/a.xlsx"));
        assert!(!deep.matches("x/y/a.xls"));
        assert!(!deep.matches("x/a.xlsx/b"));
        let all = glob("**");
        assert!(all.matches(""));
        assert!(all.matches("a/b/c"));
        let under = glob("2026/**");
        assert!(under.matches("2026/a.csv"));
        assert!(under.matches("2026/11/a.csv"));
        assert!(!under.matches("2025/a.csv"));
        assert!(glob("a/**/b.csv").matches("a/b.csv"));
        assert!(glob("a/**/b.csv").matches("a/x/y/b.csv"));
        assert!(!glob("a/**/b.csv").matches("a/xb.csv"));
    }

    #[test]
    fn a_question_mark_is_one_character_but_not_a_slash() {
        let month = glob("2026-??.csv");
        assert!(month.matches("2026-11.csv"));
        assert!(month.matches("2026-ü1.csv"));
        assert!(!month.matches("2026-1.csv"));
        assert!(!month.matches("2026-1/.csv"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(Glob::parse("").is_err());
        assert!(Glob::parse("***.csv").is_err());
    }

    #[test]
    fn patterns_with_different_literal_ends_are_disjoint() {
        assert!(glob("*.csv").disjoint(&glob("**/*.xlsx"), false));
        assert!(glob("*.csv").disjoint(&glob("*.csv.gz"), false));
        assert!(!glob("*.csv").disjoint(&glob("**/*.csv"), false));
        assert!(!glob("a*.csv").disjoint(&glob("b*.csv"), false));
        assert!(glob("a*.csv").disjoint(&glob("b*.csv"), true));
        assert!(glob("2025/*").disjoint(&glob("2026/*"), true));
        assert!(!glob("2025/*").disjoint(&glob("2026/*"), false));
    }
}
