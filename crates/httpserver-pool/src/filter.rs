//! Selecting servers by name, bind address or public URL with a glob or a regex.
//!
//! Patterns are compiled once, when built; an invalid one is an error, never an empty match.
//! A glob matches the whole value, case-insensitively (`api-*`, `127.0.0.1:*`); a regex follows
//! the `regex` crate and is unanchored unless it says `^…$`.

use globset::GlobBuilder;
use regex::Regex;

use crate::{Error, Server};

/// Which property of a server a pattern looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The configured name.
    Name,
    /// The canonical bind address, e.g. `127.0.0.1:8080`.
    Bind,
    /// The public URL (see [`Server::expose`]).
    Expose,
}

impl Field {
    /// The value of this field for `server`.
    pub fn of(self, server: &Server) -> String {
        match self {
            Field::Name => server.name(),
            Field::Bind => server.bind().to_string(),
            Field::Expose => server.expose(),
        }
    }
}

/// A compiled glob or regex.
#[derive(Clone, Debug)]
pub enum Pattern {
    /// A whole-value, case-insensitive glob.
    Glob(Glob),
    /// A regular expression.
    Regex(Regex),
}

/// A glob parsed by `globset` (its syntax: `*`, `?`, `[…]`, `{a,b}`), matched through the regex
/// `globset` translates it to. Matching that regex directly skips `globset`'s path handling
/// (file-name and extension split per candidate), which selection does not need: about half
/// the cost of a match.
#[derive(Clone, Debug)]
pub struct Glob {
    source: String,
    regex: regex::bytes::Regex,
}

impl Glob {
    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl Pattern {
    /// Compiles a glob.
    pub fn glob(pattern: &str) -> Result<Pattern, Error> {
        let error = |message: String| Error::Pattern { kind: "glob", pattern: pattern.to_owned(), message };
        let glob = GlobBuilder::new(pattern)
            .case_insensitive(true)
            .literal_separator(false)
            .build()
            .map_err(|e| error(e.to_string()))?;
        let regex = regex::bytes::Regex::new(glob.regex()).map_err(|e| error(e.to_string()))?;
        Ok(Pattern::Glob(Glob { source: pattern.to_owned(), regex }))
    }

    /// Compiles a regex.
    pub fn regex(pattern: &str) -> Result<Pattern, Error> {
        Regex::new(pattern).map(Pattern::Regex).map_err(|e| Error::Pattern {
            kind: "regex",
            pattern: pattern.to_owned(),
            message: e.to_string(),
        })
    }

    /// True when `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        match self {
            Pattern::Glob(g) => g.regex.is_match(value.as_bytes()),
            Pattern::Regex(r) => r.is_match(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn invalid_patterns_are_errors_that_name_the_pattern() {
        let e = Pattern::glob("api-[").unwrap_err().to_string();
        assert!(e.contains("glob") && e.contains("api-["), "{e}");
        let e = Pattern::regex("(").unwrap_err().to_string();
        assert!(e.contains("regex") && e.contains('('), "{e}");
    }

    #[test]
    fn a_glob_matches_the_whole_value_ignoring_case() {
        let p = Pattern::glob("api-*").unwrap();
        assert!(p.is_match("api-users") && p.is_match("API-x"));
        assert!(!p.is_match("my-api-users"));
        assert!(Pattern::glob("127.0.0.1:*").unwrap().is_match("127.0.0.1:8080"));
    }

    proptest! {
        #[test]
        fn a_literal_glob_matches_exactly_its_text_in_any_case(s in "[a-z0-9.:-]{1,20}", t in "[a-z0-9.:-]{1,20}") {
            let p = Pattern::glob(&s).unwrap();
            prop_assert!(p.is_match(&s));
            prop_assert!(p.is_match(&s.to_uppercase()));
            prop_assert_eq!(p.is_match(&t), s == t);
        }

        #[test]
        fn prefix_star_matches_every_extension(s in "[a-z0-9-]{1,10}", rest in "[a-z0-9.:-]{0,10}") {
            let p = Pattern::glob(&format!("{s}*")).unwrap();
            let value = format!("{s}{rest}");
            prop_assert!(p.is_match(&value));
        }

        #[test]
        fn an_escaped_regex_finds_its_text_anywhere(s in "\\PC{1,10}", pre in "\\PC{0,5}", post in "\\PC{0,5}") {
            let p = Pattern::regex(&regex::escape(&s)).unwrap();
            let value = format!("{pre}{s}{post}");
            prop_assert!(p.is_match(&value));
            let anchored = Pattern::regex(&format!("^{}$", regex::escape(&s))).unwrap();
            prop_assert_eq!(anchored.is_match(&value), pre.is_empty() && post.is_empty());
        }
    }
}
