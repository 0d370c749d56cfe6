//! The agent's allow-list for Docker API requests: deny by default.
//!
//! A request is allowed only when a rule names its method and its path matches the rule's
//! pattern. Before any matching the path goes through a strict check, and a path that would
//! change under normalisation is **denied**, never repaired, so the agent and the Docker engine
//! can never disagree about which endpoint a request reaches:
//!
//! 1. the path must start with `/`; the query string is never looked at;
//! 2. it is split at `/` and each segment is percent-decoded once (as the engine does);
//! 3. denied: an empty segment (`//`, a trailing `/`), a `.` or `..` segment (also when written
//!    as `%2e`), a segment that decodes to something containing `/` (`%2f`), a backslash, a NUL
//!    byte, or a segment that is not UTF-8 once decoded;
//! 4. one leading API version segment (`/v1.41`, `/v1.53`, …: `v` followed by digits and dots)
//!    is removed.
//!
//! # Patterns
//!
//! A rule is written `METHOD /pattern`, e.g. `POST /containers/{id}/start`. The pattern is a list
//! of segments: a literal segment must equal the request's (decoded) segment exactly (case
//! sensitive, like the engine's router); a segment written `{name}` matches exactly one non-empty
//! segment, whatever it holds. There are no wildcards spanning several segments and no regular
//! expressions. The method is one HTTP method in upper case; `GET` does **not** imply `HEAD`.
//! Patterns are written without the version prefix.
//!
//! # Profiles
//!
//! * [`Profile::ReadOnly`]: `HEAD`/`GET /_ping`, `GET /version`, `/info`, `/events`,
//!   `/containers/json`, `/containers/{id}/json`, `/services`, `/services/{id}`, `/tasks`,
//!   `/tasks/{id}`.
//! * [`Profile::Lifecycle`]: read-only plus `POST /containers/{id}/start|stop|kill|restart|pause|unpause`
//!   and `POST /services/{id}/update`.
//! * [`Profile::None`]: no rule at all; only the custom rules apply.
//!
//! Exec, build, container create, secrets, swarm, plugins, auth and attach are in no built-in
//! profile. Custom rules ([`AclConfig::rules`]) are **added** to the profile's rules; to replace
//! a profile, choose [`Profile::None`] and list every rule yourself.

use std::fmt;
use std::str::FromStr;

use http::Method;
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};

/// A built-in set of rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Look, never touch: ping, version, info, events, container/service/task lists and inspects.
    #[default]
    ReadOnly,
    /// Read-only plus starting, stopping, killing, restarting, pausing and unpausing containers and
    /// updating services (what scaling to and from zero needs).
    Lifecycle,
    /// No built-in rule: only the custom rules allow anything.
    None,
}

impl Profile {
    /// The profile's name as written in configuration (`read-only`, `lifecycle`, `none`).
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::ReadOnly => "read-only",
            Profile::Lifecycle => "lifecycle",
            Profile::None => "none",
        }
    }

    /// The profile's rules.
    pub fn rules(self) -> Vec<Rule> {
        const READ_ONLY: &[&str] = &[
            "HEAD /_ping",
            "GET /_ping",
            "GET /version",
            "GET /info",
            "GET /events",
            "GET /containers/json",
            "GET /containers/{id}/json",
            "GET /services",
            "GET /services/{id}",
            "GET /tasks",
            "GET /tasks/{id}",
        ];
        const LIFECYCLE: &[&str] = &[
            "POST /containers/{id}/start",
            "POST /containers/{id}/stop",
            "POST /containers/{id}/kill",
            "POST /containers/{id}/restart",
            "POST /containers/{id}/pause",
            "POST /containers/{id}/unpause",
            "POST /services/{id}/update",
        ];
        let texts: Vec<&str> = match self {
            Profile::ReadOnly => READ_ONLY.to_vec(),
            Profile::Lifecycle => READ_ONLY.iter().chain(LIFECYCLE).copied().collect(),
            Profile::None => Vec::new(),
        };
        texts.into_iter().map(|t| t.parse().expect("built-in rules are valid")).collect()
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Profile {
    type Err = AclError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read-only" => Ok(Profile::ReadOnly),
            "lifecycle" => Ok(Profile::Lifecycle),
            "none" => Ok(Profile::None),
            other => Err(AclError::UnknownProfile(other.to_owned())),
        }
    }
}

/// ACL settings: a built-in profile plus custom rules added to it.
///
/// In TOML:
///
/// ```toml
/// profile = "lifecycle"
/// rules = ["POST /containers/{id}/wait", "GET /containers/{id}/logs"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// The built-in profile (default `read-only`).
    #[serde(default)]
    pub profile: Profile,
    /// Extra rules, added to the profile's (`METHOD /pattern`).
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Errors in ACL configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AclError {
    /// A rule that cannot be parsed.
    #[error("invalid ACL rule {rule:?}: {reason}")]
    InvalidRule {
        /// The rule as written.
        rule: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A profile name that is not one of `read-only`, `lifecycle`, `none`.
    #[error("unknown ACL profile {0:?} (expected read-only, lifecycle or none)")]
    UnknownProfile(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// One allow rule: a method and a path pattern (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    method: Method,
    segments: Vec<Segment>,
    text: String,
}

impl Rule {
    /// The rule's method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    fn matches(&self, method: &Method, segments: &[String]) -> bool {
        self.method == *method
            && self.segments.len() == segments.len()
            && self.segments.iter().zip(segments).all(|(pattern, seg)| match pattern {
                Segment::Literal(lit) => lit == seg,
                Segment::Param(_) => !seg.is_empty(),
            })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Rule {
    type Err = AclError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| AclError::InvalidRule { rule: s.to_owned(), reason: reason.to_owned() };
        let mut parts = s.split_whitespace();
        let (Some(method), Some(pattern), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid("expected `METHOD /pattern`"));
        };
        if !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(invalid("the method must be an upper-case HTTP method such as GET or POST"));
        }
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| invalid("not an HTTP method"))?;
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(invalid("the pattern must start with `/`"));
        };
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for seg in rest.split('/') {
                if seg.is_empty() {
                    return Err(invalid("empty segment (`//` or a trailing `/`)"));
                }
                if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                        return Err(invalid("a parameter is `{name}` with letters, digits or `_`"));
                    }
                    segments.push(Segment::Param(name.to_owned()));
                    continue;
                }
                if seg == "." || seg == ".." {
                    return Err(invalid("`.` and `..` segments never match"));
                }
                if seg.contains(['{', '}', '%', '\\', '?', '#', '*']) {
                    return Err(invalid(
                        "a literal segment cannot contain `{`, `}`, `%`, `\\`, `?`, `#` or `*` \
                         (write the decoded text; `{name}` must be a whole segment)",
                    ));
                }
                segments.push(Segment::Literal(seg.to_owned()));
            }
        }
        if segments.first().is_some_and(|s| matches!(s, Segment::Literal(l) if is_version_segment(l))) {
            return Err(invalid(
                "write the pattern without the API version prefix; it is removed before matching",
            ));
        }
        Ok(Rule {
            method,
            segments,
            text: format!("{} {}", s.split_whitespace().next().unwrap_or(""), pattern),
        })
    }
}

impl TryFrom<String> for Rule {
    type Error = AclError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Rule> for String {
    fn from(rule: Rule) -> String {
        rule.text
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a request was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// The path is well-formed but no rule allows this method on it.
    NotAllowed {
        /// The profile in force.
        profile: Profile,
    },
    /// The path does not start with `/`.
    NotAbsolute,
    /// An empty segment: `//` or a trailing `/`.
    EmptySegment,
    /// A `.` or `..` segment, written plainly or percent-encoded.
    DotSegment,
    /// A segment whose decoded text contains `/` (`%2f`).
    EncodedSlash,
    /// A backslash, plain or encoded.
    Backslash,
    /// A NUL byte (`%00`).
    Nul,
    /// A segment that is not UTF-8 once decoded.
    NotUtf8,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::NotAllowed { profile } => {
                write!(f, "not allowed by the agent's ACL (profile {profile} plus custom rules)")
            }
            DenyReason::NotAbsolute => f.write_str("path does not start with '/'"),
            DenyReason::EmptySegment => {
                f.write_str("path is not normalised: empty segment ('//' or trailing '/')")
            }
            DenyReason::DotSegment => f.write_str("path is not normalised: '.' or '..' segment"),
            DenyReason::EncodedSlash => f.write_str("path is not normalised: encoded '/' in a segment"),
            DenyReason::Backslash => f.write_str("path contains a backslash"),
            DenyReason::Nul => f.write_str("path contains a NUL byte"),
            DenyReason::NotUtf8 => f.write_str("path is not valid UTF-8 once percent-decoded"),
        }
    }
}

/// The outcome of checking one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this rule.
    Allow {
        /// The rule that allowed the request (as written).
        rule: String,
    },
    /// Denied, with the reason.
    Deny {
        /// Why.
        reason: DenyReason,
    },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// A compiled allow-list.
#[derive(Debug, Clone)]
pub struct Acl {
    profile: Profile,
    rules: Vec<Rule>,
}

impl Acl {
    /// The profile's rules followed by the custom ones.
    pub fn new(config: &AclConfig) -> Self {
        let mut rules = config.profile.rules();
        rules.extend(config.rules.iter().cloned());
        Self { profile: config.profile, rules }
    }

    /// The profile in force.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// All rules in force (profile first, then custom).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Checks a request given its method and its path (without the query string; anything from a
    /// `?` on is ignored if present).
    pub fn check(&self, method: &Method, path: &str) -> Decision {
        let segments = match normalised_segments(path) {
            Ok(segments) => segments,
            Err(reason) => return Decision::Deny { reason },
        };
        match self.rules.iter().find(|rule| rule.matches(method, &segments)) {
            Some(rule) => Decision::Allow { rule: rule.text.clone() },
            None => Decision::Deny { reason: DenyReason::NotAllowed { profile: self.profile } },
        }
    }
}

/// Splits, decodes and checks a request path; returns the decoded segments after the optional
/// version prefix. See the [module docs](self) for the rules.
pub fn normalised_segments(path: &str) -> Result<Vec<String>, DenyReason> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let Some(rest) = path.strip_prefix('/') else {
        return Err(DenyReason::NotAbsolute);
    };
    let mut segments = Vec::new();
    if !rest.is_empty() {
        for raw in rest.split('/') {
            if raw.contains('\\') {
                return Err(DenyReason::Backslash);
            }
            let decoded = percent_decode_str(raw).collect::<Vec<u8>>();
            let decoded = String::from_utf8(decoded).map_err(|_| DenyReason::NotUtf8)?;
            if decoded.is_empty() {
                return Err(DenyReason::EmptySegment);
            }
            if decoded == "." || decoded == ".." {
                return Err(DenyReason::DotSegment);
            }
            if decoded.contains('/') {
                return Err(DenyReason::EncodedSlash);
            }
            if decoded.contains('\\') {
                return Err(DenyReason::Backslash);
            }
            if decoded.contains('\0') {
                return Err(DenyReason::Nul);
            }
            segments.push(decoded);
        }
    }
    if segments.first().is_some_and(|s| is_version_segment(s)) {
        segments.remove(0);
    }
    Ok(segments)
}

/// `v` followed by at least one digit, then digits and dots (the engine's `/v{version:[0-9.]+}`).
fn is_version_segment(seg: &str) -> bool {
    seg.strip_prefix('v').is_some_and(|v| {
        v.starts_with(|c: char| c.is_ascii_digit()) && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn acl(profile: Profile, rules: &[&str]) -> Acl {
        Acl::new(&AclConfig { profile, rules: rules.iter().map(|r| r.parse().unwrap()).collect() })
    }

    fn allowed(acl: &Acl, method: &str, path: &str) -> bool {
        acl.check(&Method::from_bytes(method.as_bytes()).unwrap(), path).is_allowed()
    }

    fn reason(acl: &Acl, method: &str, path: &str) -> DenyReason {
        match acl.check(&Method::from_bytes(method.as_bytes()).unwrap(), path) {
            Decision::Deny { reason } => reason,
            allow => panic!("{method} {path} was allowed: {allow:?}"),
        }
    }

    #[test]
    fn read_only_profile_allows_exactly_reads() {
        let acl = acl(Profile::ReadOnly, &[]);
        for (m, p) in [
            ("HEAD", "/_ping"),
            ("GET", "/_ping"),
            ("GET", "/version"),
            ("GET", "/info"),
            ("GET", "/events"),
            ("GET", "/events?filters=%7B%7D&since=1"),
            ("GET", "/containers/json"),
            ("GET", "/containers/json?all=1"),
            ("GET", "/containers/abc123/json"),
            ("GET", "/services"),
            ("GET", "/services/svc"),
            ("GET", "/tasks"),
            ("GET", "/tasks/t1"),
            ("GET", "/v1.41/containers/json"),
            ("GET", "/v1.53/version"),
            ("GET", "/v1/info"),
        ] {
            assert!(allowed(&acl, m, p), "{m} {p} should be allowed");
        }
        for (m, p) in [
            ("POST", "/containers/abc/start"),
            ("POST", "/containers/create"),
            ("POST", "/_ping"),
            ("HEAD", "/version"),
            ("DELETE", "/containers/abc"),
            ("GET", "/containers/abc/logs"),
            ("GET", "/containers/abc/json/extra"),
            ("GET", "/images/json"),
            ("GET", "/secrets"),
            ("GET", "/"),
            ("POST", "/services/x/update"),
        ] {
            assert_eq!(reason(&acl, m, p), DenyReason::NotAllowed { profile: Profile::ReadOnly }, "{m} {p}");
        }
    }

    #[test]
    fn lifecycle_profile_adds_container_actions_and_service_update() {
        let acl = acl(Profile::Lifecycle, &[]);
        for action in ["start", "stop", "kill", "restart", "pause", "unpause"] {
            assert!(allowed(&acl, "POST", &format!("/containers/c1/{action}")), "{action}");
            assert!(allowed(&acl, "POST", &format!("/v1.41/containers/c1/{action}?t=2")), "{action}");
            assert!(!allowed(&acl, "GET", &format!("/containers/c1/{action}")), "{action}");
        }
        assert!(allowed(&acl, "POST", "/services/s/update?version=3"));
        assert!(allowed(&acl, "GET", "/containers/json"));
        // Never in a built-in profile.
        for (m, p) in [
            ("POST", "/containers/create"),
            ("POST", "/containers/c1/exec"),
            ("POST", "/exec/e1/start"),
            ("POST", "/containers/c1/attach"),
            ("GET", "/containers/c1/attach/ws"),
            ("POST", "/build"),
            ("POST", "/auth"),
            ("GET", "/secrets"),
            ("POST", "/secrets/create"),
            ("POST", "/swarm/init"),
            ("GET", "/swarm"),
            ("GET", "/plugins"),
            ("POST", "/plugins/pull"),
            ("DELETE", "/containers/c1"),
            ("POST", "/services/create"),
            ("POST", "/containers/c1/update"),
            ("PUT", "/containers/c1/archive"),
            ("POST", "/images/create"),
            ("POST", "/containers/prune"),
        ] {
            assert!(!allowed(&acl, m, p), "{m} {p} must be denied");
        }
        let names: Vec<String> = acl.rules().iter().map(ToString::to_string).collect();
        assert!(names.iter().all(|r| !r.contains("exec") && !r.contains("create") && !r.contains("attach")));
    }

    #[test]
    fn none_profile_and_custom_rules() {
        let none = acl(Profile::None, &[]);
        assert!(!allowed(&none, "GET", "/_ping"));
        assert_eq!(reason(&none, "GET", "/_ping"), DenyReason::NotAllowed { profile: Profile::None });
        let custom = acl(Profile::None, &["GET /containers/{id}/logs"]);
        assert!(allowed(&custom, "GET", "/containers/x/logs?follow=1"));
        assert!(!allowed(&custom, "GET", "/containers/json"));
        let added = acl(Profile::ReadOnly, &["POST /containers/{id}/wait"]);
        assert!(allowed(&added, "POST", "/v1.41/containers/x/wait"));
        assert!(allowed(&added, "GET", "/info"));
        match added.check(&Method::POST, "/containers/x/wait") {
            Decision::Allow { rule } => assert_eq!(rule, "POST /containers/{id}/wait"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn param_matches_exactly_one_non_empty_segment() {
        let acl = acl(Profile::None, &["POST /containers/{id}/start", "GET /"]);
        assert!(allowed(&acl, "POST", "/containers/abc/start"));
        assert!(allowed(&acl, "POST", "/containers/name%20with%20space/start"));
        assert!(!allowed(&acl, "POST", "/containers/a/b/start"));
        assert!(!allowed(&acl, "POST", "/containers/start"));
        assert!(allowed(&acl, "GET", "/"));
        assert_eq!(reason(&acl, "POST", "/containers//start"), DenyReason::EmptySegment);
    }

    #[test]
    fn literal_segments_compare_decoded_and_case_sensitive() {
        let acl = acl(Profile::ReadOnly, &[]);
        assert!(allowed(&acl, "GET", "/%63ontainers/json"));
        assert!(allowed(&acl, "GET", "/%761.41/containers/json"));
        assert!(!allowed(&acl, "GET", "/Containers/json"));
        assert!(!allowed(&acl, "GET", "/v1.41/v1.41/containers/json"));
        assert!(!allowed(&acl, "GET", "/va/containers/json"));
        assert!(!allowed(&acl, "GET", "/v/containers/json"));
    }

    #[test]
    fn paths_that_change_under_normalisation_are_denied_with_a_reason() {
        let acl =
            acl(Profile::None, &["GET /{a}", "GET /{a}/{b}", "GET /{a}/{b}/{c}", "GET /{a}/{b}/{c}/{d}"]);
        for (path, want) in [
            ("containers/json", DenyReason::NotAbsolute),
            ("", DenyReason::NotAbsolute),
            ("//containers/json", DenyReason::EmptySegment),
            ("/containers//json", DenyReason::EmptySegment),
            ("/containers/json/", DenyReason::EmptySegment),
            ("/v1.41/../containers/create", DenyReason::DotSegment),
            ("/containers/./json", DenyReason::DotSegment),
            ("/containers/%2e%2e/create", DenyReason::DotSegment),
            ("/containers/%2E%2E/create", DenyReason::DotSegment),
            ("/containers/.%2e/create", DenyReason::DotSegment),
            ("/containers/%2e/json", DenyReason::DotSegment),
            ("/containers/x%2fy/start", DenyReason::EncodedSlash),
            ("/containers/x%2Fy/start", DenyReason::EncodedSlash),
            ("/containers/%2f/start", DenyReason::EncodedSlash),
            ("/containers\\..\\create", DenyReason::Backslash),
            ("/containers/%5c/x", DenyReason::Backslash),
            ("/containers/%5C/x", DenyReason::Backslash),
            ("/containers/a%00b/json", DenyReason::Nul),
            ("/containers/%ff/json", DenyReason::NotUtf8),
            ("/containers/%c3%28/json", DenyReason::NotUtf8),
        ] {
            assert_eq!(reason(&acl, "GET", path), want, "{path:?}");
        }
        // Decoded once only, like the engine: a double-encoded dot is a literal name.
        assert!(allowed(&acl, "GET", "/containers/%252e%252e/json"));
        // A query string never decides anything.
        assert!(allowed(&acl, "GET", "/containers/json?x=/../../"));
    }

    #[test]
    fn rule_parsing_rejects_bad_rules() {
        for bad in [
            "",
            "GET",
            "get /x",
            "GET x",
            "GET /a//b",
            "GET /a/",
            "GET /a/..",
            "GET /a/.",
            "GET /{}",
            "GET /{a-b}",
            "GET /a{id}",
            "GET /a%2fb",
            "GET /a*",
            "GET /v1.41/containers/json",
            "GET /a /b",
            "G@T /a",
        ] {
            assert!(matches!(bad.parse::<Rule>(), Err(AclError::InvalidRule { .. })), "{bad:?} should fail");
        }
        let rule: Rule = "  POST   /containers/{id}/start ".parse().unwrap();
        assert_eq!(rule.to_string(), "POST /containers/{id}/start");
        assert_eq!(rule.method(), Method::POST);
        assert!(matches!("admin".parse::<Profile>(), Err(AclError::UnknownProfile(p)) if p == "admin"));
        for p in [Profile::ReadOnly, Profile::Lifecycle, Profile::None] {
            assert_eq!(p.as_str().parse::<Profile>().unwrap(), p);
        }
    }

    #[test]
    fn acl_config_from_toml() {
        let cfg: AclConfig =
            toml::from_str("profile = \"lifecycle\"\nrules = [\"GET /containers/{id}/logs\"]\n").unwrap();
        assert_eq!(cfg.profile, Profile::Lifecycle);
        assert_eq!(cfg.rules.len(), 1);
        let err = toml::from_str::<AclConfig>("rules = [\"GET nope\"]").unwrap_err().to_string();
        assert!(err.contains("GET nope"), "{err}");
        let err = toml::from_str::<AclConfig>("profile = \"admin\"").unwrap_err().to_string();
        assert!(err.contains("admin"), "{err}");
        assert_eq!(toml::from_str::<AclConfig>("").unwrap(), AclConfig::default());
        assert_eq!(AclConfig::default().profile, Profile::ReadOnly);
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(toml::from_str::<AclConfig>(&text).unwrap(), cfg);
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("..".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("%2E.".to_owned()),
            Just(".%2e".to_owned()),
            Just(".".to_owned()),
            Just("containers".to_owned()),
            Just("json".to_owned()),
            Just("create".to_owned()),
            Just("v1.41".to_owned()),
            Just("%2f".to_owned()),
            Just("%25".to_owned()),
            Just("".to_owned()),
            "[a-z0-9._%]{1,6}",
        ]
    }

    proptest! {
        #[test]
        fn no_path_with_a_dot_dot_segment_is_ever_allowed(segs in proptest::collection::vec(segment(), 0..7)) {
            let path = format!("/{}", segs.join("/"));
            // Every shape of path up to six segments is allowed by some rule, so only the
            // normalisation check can deny.
            let acl = acl(Profile::Lifecycle, &[
                "GET /{a}", "GET /{a}/{b}", "GET /{a}/{b}/{c}", "GET /{a}/{b}/{c}/{d}",
                "GET /{a}/{b}/{c}/{d}/{e}", "GET /{a}/{b}/{c}/{d}/{e}/{f}",
            ]);
            let has_dot_dot = path
                .split('/')
                .any(|s| percent_decode_str(s).decode_utf8().is_ok_and(|d| d == ".." || d.split('/').any(|x| x == "..")));
            if has_dot_dot {
                prop_assert!(!acl.check(&Method::GET, &path).is_allowed(), "{path} allowed");
            }
        }
    }
}
