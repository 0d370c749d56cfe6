//! The agent's allow-list for Docker API requests: deny by default, and the check looks at
//! everything that decides what a request does — method, path, API version, query parameters,
//! body and upgrade — not only at the path.
//!
//! # Paths
//!
//! Before any matching the path goes through a strict check, and a path that would change under
//! normalisation is **denied**, never repaired, so the agent and the Docker engine can never
//! disagree about which endpoint a request reaches:
//!
//! 1. the path must start with `/`;
//! 2. it is split at `/` and each segment is percent-decoded once (as the engine does);
//! 3. denied: an empty segment (`//`, a trailing `/`), a `.` or `..` segment (also when written
//!    as `%2e`), a segment that decodes to something containing `/` (`%2f`), a backslash, a NUL
//!    byte, or a segment that is not UTF-8 once decoded;
//! 4. a leading segment the engine would read as an API version (`v` followed by digits and
//!    dots) must be a canonical `vMAJOR.MINOR` (no leading zeros, at most three digits each) no
//!    older than [`MIN_API_VERSION`] (`1.24`); it is then removed before matching. Anything else
//!    in that place is denied ([`DenyReason::ApiVersion`]). Engines still honour request bodies
//!    of API versions up to 1.23 that later versions ignore or refuse (a `HostConfig` sent with
//!    `POST /v1.23/containers/{id}/start` is stored in the container), so the agent never
//!    forwards them. An unversioned path reaches the engine's current version.
//!
//! # Rules
//!
//! A rule is written `METHOD /pattern`, e.g. `POST /containers/{id}/start`. The pattern is a list
//! of segments: a literal segment must equal the request's (decoded) segment exactly (case
//! sensitive, like the engine's router); a segment written `{name}` matches exactly one non-empty
//! segment, whatever it holds. There are no wildcards spanning several segments and no regular
//! expressions. The method is one HTTP method in upper case; `GET` does **not** imply `HEAD`.
//! Patterns are written without the version prefix.
//!
//! Each rule also says what the request may carry ([`Rule::with_query`], [`Rule::with_body`],
//! [`Rule::with_upgrade`]; in TOML the table form below):
//!
//! * **query** — `any` (the default) or a list of what is allowed: `name` admits the parameter
//!   with any value, `name=value` with that value only; any other parameter is denied
//!   ([`DenyReason::QueryParameter`]). A rule with a list also refuses
//!   `application/x-www-form-urlencoded` bodies, which the engine reads as parameters too.
//! * **body** — [`BodyPolicy::Any`] (the default; streamed through), [`BodyPolicy::Empty`]
//!   (the request may carry no body: a `Content-Length` above zero is denied at once, a chunked
//!   body is read and denied if it holds a byte), or [`BodyPolicy::ServiceScale`]: the body must
//!   be a service spec that differs from the service's current spec in the replica count only.
//!   The agent then sends the engine the **current** spec with the new replica count (fields the
//!   body leaves out keep their current values; a field it sends with another value, `null`
//!   included, is denied with its name), so no other part of the service can change through it.
//! * **upgrade** — whether a `Connection: Upgrade` request (attach, exec start) may be carried
//!   out; `false` by default.
//!
//! ```toml
//! rules = [
//!     "GET /containers/{id}/logs",                                 # any query, any body
//!     { allow = "POST /containers/{id}/wait", query = ["condition"], body = "empty" },
//!     { allow = "POST /containers/{id}/attach", query = ["stream", "stdout"], upgrade = true },
//! ]
//! ```
//!
//! # Profiles
//!
//! * [`Profile::ReadOnly`]: `HEAD`/`GET /_ping`, `GET /version`, `/info`, `/events`,
//!   `/containers/json`, `/containers/{id}/json`, `/services`, `/services/{id}`, `/tasks`,
//!   `/tasks/{id}` — any query, no body, no upgrade. Reads change nothing; their parameters only
//!   narrow or widen what is listed.
//! * [`Profile::Lifecycle`]: read-only plus, with no body and only these parameters:
//!   `POST /containers/{id}/start` (none), `/stop` (`t`, `signal`), `/kill` (`signal`),
//!   `/restart` (`t`, `signal`), `/pause` and `/unpause` (none); and
//!   `POST /services/{id}/update` with the parameters `version` and `registryAuthFrom=spec` (the
//!   default, which bollard always sends) and a [`BodyPolicy::ServiceScale`] body; the agent
//!   drops an `X-Registry-Auth` header from it (stored with the spec, it would replace the pull
//!   credentials). `start`'s `checkpoint` parameters (restoring a checkpoint from a directory on
//!   the host), the update's `rollback`, `registryAuthFrom=previous-spec` and `queryRegistry`
//!   (re-resolving the image), and any body that would configure something are denied.
//! * [`Profile::None`]: no rule at all; only the custom rules apply.
//!
//! Exec, build, container create and update, secrets, swarm, plugins, auth and attach are in no
//! built-in profile. Custom rules ([`AclConfig::rules`]) are **added** to the profile's rules; to
//! replace a profile, choose [`Profile::None`] and list every rule yourself.
//!
//! # Redaction
//!
//! With [`AclConfig::redact_env`] (on by default, in every profile) the answers of
//! `GET /containers/{id}/json`, `/services`, `/services/{id}`, `/tasks` and `/tasks/{id}` —
//! whichever rule allowed them — have the value of every environment variable replaced by
//! [`REDACTED`] (`"KEY=<redacted>"`): secrets passed in the environment do not reach clients
//! that may only look.

use std::fmt;
use std::str::FromStr;

use http::{HeaderMap, Method, header};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};

/// The oldest Docker API version the agent forwards (`/v1.24/…`); see the [module docs](self).
pub const MIN_API_VERSION: &str = "1.24";
const MIN_VERSION: (u32, u32) = (1, 24);

/// What replaces the value of a redacted environment variable.
pub const REDACTED: &str = "<redacted>";

/// A built-in set of rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Look, never touch: ping, version, info, events, container/service/task lists and inspects.
    #[default]
    ReadOnly,
    /// Read-only plus starting, stopping, killing, restarting, pausing and unpausing existing
    /// containers and changing a service's replica count — nothing that configures anything.
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
        const LIFECYCLE: &[(&str, &[&str], BodyPolicy)] = &[
            ("POST /containers/{id}/start", &[], BodyPolicy::Empty),
            ("POST /containers/{id}/stop", &["t", "signal"], BodyPolicy::Empty),
            ("POST /containers/{id}/kill", &["signal"], BodyPolicy::Empty),
            ("POST /containers/{id}/restart", &["t", "signal"], BodyPolicy::Empty),
            ("POST /containers/{id}/pause", &[], BodyPolicy::Empty),
            ("POST /containers/{id}/unpause", &[], BodyPolicy::Empty),
            ("POST /services/{id}/update", &["version", "registryAuthFrom=spec"], BodyPolicy::ServiceScale),
        ];
        let read = |text: &str| -> Rule {
            text.parse::<Rule>().expect("built-in rules are valid").with_body(BodyPolicy::Empty)
        };
        let write = |(text, query, body): &(&str, &[&str], BodyPolicy)| -> Rule {
            text.parse::<Rule>()
                .expect("built-in rules are valid")
                .with_query(query.iter().copied())
                .with_body(*body)
        };
        match self {
            Profile::ReadOnly => READ_ONLY.iter().map(|t| read(t)).collect(),
            Profile::Lifecycle => {
                READ_ONLY.iter().map(|t| read(t)).chain(LIFECYCLE.iter().map(write)).collect()
            }
            Profile::None => Vec::new(),
        }
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

/// ACL settings: a built-in profile, custom rules added to it, and redaction.
///
/// In TOML:
///
/// ```toml
/// profile = "lifecycle"
/// rules = ["GET /containers/{id}/logs", { allow = "POST /containers/{id}/wait", body = "empty" }]
/// redact_env = true
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// The built-in profile (default `read-only`).
    #[serde(default)]
    pub profile: Profile,
    /// Extra rules, added to the profile's (`METHOD /pattern`, or the table form).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Replace environment variable values in inspect and list answers with [`REDACTED`]
    /// (default `true`); see the [module docs](self#redaction).
    #[serde(default = "default_redact_env")]
    pub redact_env: bool,
}

fn default_redact_env() -> bool {
    true
}

impl Default for AclConfig {
    fn default() -> Self {
        Self { profile: Profile::default(), rules: Vec::new(), redact_env: true }
    }
}

impl AclConfig {
    /// A configuration with this profile, no custom rule, redaction on.
    pub fn profile(profile: Profile) -> Self {
        Self { profile, ..Self::default() }
    }
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

/// What a rule lets a request carry as its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BodyPolicy {
    /// Anything, streamed through to the engine.
    #[default]
    Any,
    /// No body at all.
    Empty,
    /// A service spec equal to the service's current spec but for
    /// `Mode.Replicated.Replicas`; the agent forwards the current spec with the new count.
    ServiceScale,
}

impl BodyPolicy {
    fn as_str(self) -> &'static str {
        match self {
            BodyPolicy::Any => "any",
            BodyPolicy::Empty => "empty",
            BodyPolicy::ServiceScale => "service-scale",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// One allow rule: a method, a path pattern, and what the request may carry (see the
/// [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    method: Method,
    segments: Vec<Segment>,
    text: String,
    /// `None`: any parameter.
    query: Option<Vec<String>>,
    body: BodyPolicy,
    upgrade: bool,
}

impl Rule {
    /// The rule's method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// `METHOD /pattern` as written.
    pub fn pattern(&self) -> &str {
        &self.text
    }

    /// The query parameters allowed (`None`: any).
    pub fn query(&self) -> Option<&[String]> {
        self.query.as_deref()
    }

    /// What the body may be.
    pub fn body(&self) -> BodyPolicy {
        self.body
    }

    /// Whether an upgrade may be carried out.
    pub fn upgrade(&self) -> bool {
        self.upgrade
    }

    /// Allows only these query parameter names.
    pub fn with_query<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.query = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Sets what the body may be.
    pub fn with_body(mut self, body: BodyPolicy) -> Self {
        self.body = body;
        self
    }

    /// Allows (or not) `Connection: Upgrade` requests.
    pub fn with_upgrade(mut self, upgrade: bool) -> Self {
        self.upgrade = upgrade;
        self
    }

    fn matches(&self, method: &Method, segments: &[String]) -> bool {
        self.method == *method
            && self.segments.len() == segments.len()
            && self.segments.iter().zip(segments).all(|(pattern, seg)| match pattern {
                Segment::Literal(lit) => lit == seg,
                Segment::Param(_) => !seg.is_empty(),
            })
    }

    fn is_plain(&self) -> bool {
        self.query.is_none() && self.body == BodyPolicy::Any && !self.upgrade
    }
}

/// Shows the rule as its table form would read when it has options:
/// `POST /x (query: a, b; body: empty; upgrade)`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)?;
        if self.is_plain() {
            return Ok(());
        }
        let mut parts = Vec::new();
        if let Some(query) = &self.query {
            parts.push(if query.is_empty() {
                "query: none".to_owned()
            } else {
                format!("query: {}", query.join(", "))
            });
        }
        if self.body != BodyPolicy::Any {
            parts.push(format!("body: {}", self.body.as_str()));
        }
        if self.upgrade {
            parts.push("upgrade".to_owned());
        }
        write!(f, " ({})", parts.join("; "))
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
        if segments.first().is_some_and(|s| matches!(s, Segment::Literal(l) if is_version_shaped(l))) {
            return Err(invalid(
                "write the pattern without the API version prefix; it is removed before matching",
            ));
        }
        Ok(Rule {
            text: format!("{} {}", method, pattern),
            method,
            segments,
            query: None,
            body: BodyPolicy::Any,
            upgrade: false,
        })
    }
}

/// The table form of a rule in configuration files.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTable {
    allow: String,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "query_list")]
    query: Option<Vec<String>>,
    #[serde(default)]
    body: BodyPolicy,
    #[serde(default)]
    upgrade: bool,
}

/// `query = "any"` or `query = ["a", "b"]`.
mod query_list {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Form {
        Word(String),
        List(Vec<String>),
    }

    // serde's `with` hands `&Option<…>` to the serializer.
    #[allow(clippy::ref_option)]
    pub(super) fn serialize<S: Serializer>(value: &Option<Vec<String>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            None => Form::Word("any".to_owned()).serialize(s),
            Some(list) => Form::List(list.clone()).serialize(s),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        match Form::deserialize(d)? {
            Form::Word(w) if w == "any" => Ok(None),
            Form::Word(w) => Err(serde::de::Error::custom(format!(
                "query must be \"any\" or a list of parameter names, not {w:?}"
            ))),
            Form::List(list) => {
                if let Some(bad) = list.iter().find(|n| {
                    n.is_empty() || n.starts_with('=') || n.contains(['&', ';']) || n.matches('=').count() > 1
                }) {
                    return Err(serde::de::Error::custom(format!("{bad:?} is not a query parameter name")));
                }
                Ok(Some(list))
            }
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.is_plain() {
            return serializer.serialize_str(&self.text);
        }
        RuleTable {
            allow: self.text.clone(),
            query: self.query.clone(),
            body: self.body,
            upgrade: self.upgrade,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Table(RuleTable),
        }
        let form = Form::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "a rule is \"METHOD /pattern\" or a table { allow = \"METHOD /pattern\", query = [...], \
                 body = \"any\" | \"empty\" | \"service-scale\", upgrade = true|false }",
            )
        })?;
        match form {
            Form::Text(text) => text.parse().map_err(serde::de::Error::custom),
            Form::Table(table) => {
                let mut rule: Rule = table.allow.parse().map_err(serde::de::Error::custom)?;
                rule.query = table.query;
                rule.body = table.body;
                rule.upgrade = table.upgrade;
                Ok(rule)
            }
        }
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
    /// An API version prefix older than [`MIN_API_VERSION`] or not written `vMAJOR.MINOR`.
    ApiVersion {
        /// The version as written (without the `v`).
        version: String,
    },
    /// A query parameter the matching rule does not list.
    QueryParameter {
        /// The rule that matched the path.
        rule: String,
        /// The parameter's (decoded) name.
        name: String,
    },
    /// A form-encoded body, which the engine would read as query parameters, on a rule that
    /// restricts them.
    FormBody {
        /// The rule that matched the path.
        rule: String,
    },
    /// A body on a rule that admits none.
    Body {
        /// The rule that matched the path.
        rule: String,
    },
    /// An upgrade the matching rule does not allow.
    Upgrade {
        /// The rule that matched the path.
        rule: String,
    },
    /// A service update that is not a change of the replica count alone.
    NotAScale {
        /// What is wrong: the first field that differs from the current spec, or why the body
        /// cannot be read as a spec.
        detail: String,
    },
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
            DenyReason::ApiVersion { version } => write!(
                f,
                "API version {version:?} is not forwarded (the agent forwards canonical versions \
                 from {MIN_API_VERSION} on, or unversioned paths)"
            ),
            DenyReason::QueryParameter { rule, name } => {
                write!(f, "query parameter {name:?} is not allowed by rule `{rule}`")
            }
            DenyReason::FormBody { rule } => {
                write!(f, "a form-encoded body is not allowed by rule `{rule}` (it restricts parameters)")
            }
            DenyReason::Body { rule } => write!(f, "rule `{rule}` admits no request body"),
            DenyReason::Upgrade { rule } => write!(f, "rule `{rule}` does not allow a connection upgrade"),
            DenyReason::NotAScale { detail } => {
                write!(f, "only the replica count of a service may change: {detail}")
            }
        }
    }
}

/// The outcome of checking one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclDecision {
    /// Allowed by this rule (the body is still to be checked against [`Rule::body`]).
    Allow {
        /// The rule that allowed the request.
        rule: Rule,
    },
    /// Denied, with the reason.
    Deny {
        /// Why.
        reason: DenyReason,
    },
}

impl AclDecision {
    /// True for [`AclDecision::Allow`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, AclDecision::Allow { .. })
    }
}

/// The parts of a request the ACL looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path (anything from a `?` on is ignored here).
    pub path: &'a str,
    /// The raw query string, without the `?`.
    pub query: Option<&'a str>,
    /// The headers (for `Content-Length`, `Content-Type` and `Connection: Upgrade`).
    pub headers: &'a HeaderMap,
}

impl<'a> RequestHead<'a> {
    /// The head of an `http` request.
    pub fn of<B>(req: &'a http::Request<B>) -> Self {
        Self {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        }
    }
}

/// A compiled allow-list.
#[derive(Debug, Clone)]
pub struct Acl {
    profile: Profile,
    rules: Vec<Rule>,
    redact_env: bool,
}

impl Acl {
    /// The profile's rules followed by the custom ones.
    pub fn new(config: &AclConfig) -> Self {
        let mut rules = config.profile.rules();
        rules.extend(config.rules.iter().cloned());
        Self { profile: config.profile, rules, redact_env: config.redact_env }
    }

    /// The profile in force.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// All rules in force (profile first, then custom).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Checks a method and a path only (no query, no headers): which rule would admit it.
    /// Anything from a `?` on is ignored.
    pub fn check(&self, method: &Method, path: &str) -> AclDecision {
        let segments = match normalised_segments(path) {
            Ok(segments) => segments,
            Err(reason) => return AclDecision::Deny { reason },
        };
        match self.rules.iter().find(|rule| rule.matches(method, &segments)) {
            Some(rule) => AclDecision::Allow { rule: rule.clone() },
            None => AclDecision::Deny { reason: DenyReason::NotAllowed { profile: self.profile } },
        }
    }

    /// Checks a request's head: the path as [`Self::check`] does, then the matching rule's
    /// query, upgrade and (as far as the headers tell) body constraints. The body itself is
    /// checked by the server against the returned rule's [`Rule::body`].
    pub fn check_request(&self, head: RequestHead<'_>) -> AclDecision {
        let rule = match self.check(head.method, head.path) {
            AclDecision::Allow { rule } => rule,
            deny => return deny,
        };
        let deny = |reason| AclDecision::Deny { reason };
        if let Some(allowed) = &rule.query {
            let query = head.query.unwrap_or("");
            // Go's query parser drops (and complains about) a pair holding `;`: never forward one.
            if let Some(pair) = query.split('&').find(|pair| pair.contains(';')) {
                return deny(DenyReason::QueryParameter { rule: rule.text.clone(), name: pair.to_owned() });
            }
            if let Some((name, _)) = form_urlencoded::parse(query.as_bytes())
                .find(|(name, value)| !allowed.iter().any(|a| query_entry_admits(a, name, value)))
            {
                return deny(DenyReason::QueryParameter { rule: rule.text.clone(), name: name.into_owned() });
            }
            let form = head.headers.get_all(header::CONTENT_TYPE).iter().any(|v| {
                v.to_str().map_or(true, |v| {
                    v.trim_start().to_ascii_lowercase().starts_with("application/x-www-form-urlencoded")
                })
            });
            if form {
                return deny(DenyReason::FormBody { rule: rule.text.clone() });
            }
        }
        if !rule.upgrade && head.headers.contains_key(header::UPGRADE) {
            return deny(DenyReason::Upgrade { rule: rule.text.clone() });
        }
        if rule.body == BodyPolicy::Empty && declares_body(head.headers) {
            return deny(DenyReason::Body { rule: rule.text.clone() });
        }
        AclDecision::Allow { rule }
    }

    /// Whether the answer to this request has its environment values redacted (see the
    /// [module docs](self#redaction)).
    pub fn redacts(&self, method: &Method, path: &str) -> bool {
        self.redact_env
            && *method == Method::GET
            && normalised_segments(path).is_ok_and(|s| redacted_shape(&s))
    }
}

/// `name` admits the parameter with any value; `name=value` with that value only.
fn query_entry_admits(entry: &str, name: &str, value: &str) -> bool {
    match entry.split_once('=') {
        None => entry == name,
        Some((n, v)) => n == name && v == value,
    }
}

/// A `Content-Length` above zero (or one that is not a number).
fn declares_body(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .any(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0))
}

/// The answers that carry environment variables.
fn redacted_shape(segments: &[String]) -> bool {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    matches!(s.as_slice(), ["containers", id, "json"] if *id != "json")
        || matches!(s.as_slice(), ["services" | "tasks"] | ["services" | "tasks", _])
}

/// Replaces the value of every environment variable (`"KEY=VALUE"` strings in any array under a
/// key named `Env`) with [`REDACTED`]; returns how many were replaced.
pub fn redact_env(value: &mut serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut n = 0;
            for (key, v) in map.iter_mut() {
                if key == "Env"
                    && let Value::Array(items) = v
                {
                    for item in items.iter_mut() {
                        if let Value::String(s) = item {
                            let name = s.split_once('=').map_or(s.as_str(), |(k, _)| k);
                            *s = format!("{name}={REDACTED}");
                            n += 1;
                        }
                    }
                } else {
                    n += redact_env(v);
                }
            }
            n
        }
        Value::Array(items) => items.iter_mut().map(redact_env).sum(),
        _ => 0,
    }
}

/// A path split, decoded and checked: the version prefix (as written, without the `v`) and the
/// segments after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalisedPath {
    /// The API version prefix, when there is one (`"1.41"`).
    pub version: Option<String>,
    /// The decoded segments after it.
    pub segments: Vec<String>,
}

/// Splits, decodes and checks a request path; returns the decoded segments after the optional
/// version prefix. See the [module docs](self) for the rules.
pub fn normalised_segments(path: &str) -> Result<Vec<String>, DenyReason> {
    normalise(path).map(|p| p.segments)
}

/// [`normalised_segments`] keeping the version prefix.
pub fn normalise(path: &str) -> Result<NormalisedPath, DenyReason> {
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
    let mut version = None;
    if segments.first().is_some_and(|s| is_version_shaped(s)) {
        let v = segments.remove(0).split_off(1);
        match parse_version(&v) {
            Some(parsed) if parsed >= MIN_VERSION => version = Some(v),
            _ => return Err(DenyReason::ApiVersion { version: v }),
        }
    }
    Ok(NormalisedPath { version, segments })
}

/// What the engine's router takes for a version: `v` then one or more digits and dots.
fn is_version_shaped(seg: &str) -> bool {
    seg.strip_prefix('v').is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
}

/// `MAJOR.MINOR`, each 1–3 digits without a leading zero (but `0` itself).
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.split_once('.')?;
    let part = |p: &str| -> Option<u32> {
        let canonical = !p.is_empty() && p.len() <= 3 && (p == "0" || !p.starts_with('0'));
        if canonical && p.bytes().all(|b| b.is_ascii_digit()) { p.parse().ok() } else { None }
    };
    Some((part(major)?, part(minor)?))
}

/// The spec a [`BodyPolicy::ServiceScale`] update sends the engine: `current` (the service's
/// spec as the engine reports it) with `Mode.Replicated.Replicas` taken from `requested` (the
/// client's body). Denied when `requested` is not an object, sets no replica count, or sends
/// any other field with a value that differs from `current` (`null` for a field that has a value
/// included; a field it leaves out keeps its value); `0`, `false`, `""`, `[]` and `null` count as
/// equal to an absent field, as the engine's own encoding omits them.
pub fn scale_spec(
    requested: &serde_json::Value,
    current: &serde_json::Value,
) -> Result<serde_json::Value, DenyReason> {
    use serde_json::Value;
    let not_a_scale = |detail: String| DenyReason::NotAScale { detail };
    let Value::Object(_) = requested else {
        return Err(not_a_scale("the body is not a JSON object (a service spec)".into()));
    };
    let replicas = requested
        .pointer("/Mode/Replicated/Replicas")
        .ok_or_else(|| not_a_scale("the body sets no Mode.Replicated.Replicas".into()))?;
    let Some(count) = replicas.as_u64() else {
        return Err(not_a_scale(format!("Mode.Replicated.Replicas is {replicas}, not a count")));
    };
    if current.pointer("/Mode/Replicated").is_none_or(|r| !r.is_object()) {
        return Err(not_a_scale("the service is not in replicated mode".into()));
    }
    let mut rest = requested.clone();
    if let Some(Value::Object(replicated)) = rest.pointer_mut("/Mode/Replicated") {
        replicated.remove("Replicas");
    }
    if let Some(field) = first_difference(&rest, current, "") {
        return Err(not_a_scale(format!("the body changes {field}")));
    }
    let mut spec = current.clone();
    if let Some(Value::Object(replicated)) = spec.pointer_mut("/Mode/Replicated") {
        replicated.insert("Replicas".to_owned(), Value::from(count));
    }
    Ok(spec)
}

/// Zero values: what Go's `omitempty` leaves out (objects excepted, see below).
fn is_zero(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        // An object where there was none is a non-nil pointer in the engine's Go types: it
        // means something (`"Global": {}` switches the mode).
        Value::Object(_) => false,
    }
}

/// The path of the first field where `requested` differs from `current`; keys `requested`
/// leaves out are not differences.
fn first_difference(requested: &serde_json::Value, current: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    let here = || if at.is_empty() { "the spec".to_owned() } else { at.to_owned() };
    match (requested, current) {
        (Value::Object(req), Value::Object(cur)) => req.iter().find_map(|(key, value)| {
            let path = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
            match cur.get(key) {
                Some(cur_value) => first_difference(value, cur_value, &path),
                None => (!is_zero(value)).then_some(path),
            }
        }),
        (Value::Array(req), Value::Array(cur)) => {
            if req.len() != cur.len() {
                return Some(here());
            }
            req.iter()
                .zip(cur)
                .enumerate()
                .find_map(|(i, (r, c))| first_difference(r, c, &format!("{}[{i}]", here())))
        }
        (Value::Number(a), Value::Number(b)) => {
            let same = match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
                (Some(x), Some(y), _, _) => x == y,
                (_, _, Some(x), Some(y)) => x == y,
                _ => a.as_f64() == b.as_f64(),
            };
            (!same).then(here)
        }
        (r, c) if r == c || (is_zero(r) && is_zero(c)) => None,
        _ => Some(here()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn acl(profile: Profile, rules: &[&str]) -> Acl {
        Acl::new(&AclConfig {
            profile,
            rules: rules.iter().map(|r| r.parse().unwrap()).collect(),
            ..AclConfig::default()
        })
    }

    fn allowed(acl: &Acl, method: &str, path: &str) -> bool {
        acl.check(&Method::from_bytes(method.as_bytes()).unwrap(), path).is_allowed()
    }

    fn reason(acl: &Acl, method: &str, path: &str) -> DenyReason {
        match acl.check(&Method::from_bytes(method.as_bytes()).unwrap(), path) {
            AclDecision::Deny { reason } => reason,
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
            ("GET", "/v1.24/info"),
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

    fn head_check(acl: &Acl, method: Method, target: &str, headers: &[(&str, &str)]) -> AclDecision {
        let mut req = http::Request::builder().method(method).uri(target);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(()).unwrap();
        acl.check_request(RequestHead::of(&req))
    }

    fn denied_by(decision: AclDecision) -> DenyReason {
        match decision {
            AclDecision::Deny { reason } => reason,
            allow => panic!("allowed: {allow:?}"),
        }
    }

    #[test]
    fn api_versions_older_than_the_minimum_or_not_canonical_are_denied() {
        let acl = acl(Profile::Lifecycle, &[]);
        for ok in [
            "/v1.24/containers/c/start",
            "/v1.41/containers/c/start",
            "/v1.100/containers/c/start",
            "/containers/c/start",
        ] {
            assert!(head_check(&acl, Method::POST, ok, &[]).is_allowed(), "{ok}");
        }
        for (bad, version) in [
            ("/v1.23/containers/c/start", "1.23"),
            ("/v1.12/containers/c/start", "1.12"),
            ("/v1/containers/c/start", "1"),
            ("/v1.023/containers/c/start", "1.023"),
            ("/v01.41/containers/c/start", "01.41"),
            ("/v1.41.0/containers/c/start", "1.41.0"),
            ("/v1.99999999999999999999/containers/c/start", "1.99999999999999999999"),
            ("/v.../containers/c/start", "..."),
            ("/v1./containers/c/start", "1."),
            ("/%761.2/containers/c/start", "1.2"),
            ("/v0.99/containers/c/start", "0.99"),
        ] {
            assert_eq!(
                denied_by(head_check(&acl, Method::POST, bad, &[])),
                DenyReason::ApiVersion { version: version.to_owned() },
                "{bad}"
            );
        }
        let text = DenyReason::ApiVersion { version: "1.23".into() }.to_string();
        assert!(text.contains("1.24") && text.contains("1.23"), "{text}");
    }

    #[test]
    fn lifecycle_rules_admit_only_their_parameters_and_no_body() {
        let acl = acl(Profile::Lifecycle, &[]);
        for ok in [
            "/containers/c/stop?t=3",
            "/containers/c/stop?signal=SIGTERM&t=1",
            "/containers/c/kill?signal=KILL",
            "/containers/c/restart?t=0",
            "/containers/c/start",
            "/containers/c/start?",
            "/services/s/update?version=12",
            "/services/s/update?version=12&registryAuthFrom=spec",
        ] {
            assert!(head_check(&acl, Method::POST, ok, &[]).is_allowed(), "{ok}");
        }
        for (bad, name) in [
            ("/containers/c/start?checkpoint=cp1", "checkpoint"),
            ("/containers/c/start?checkpoint-dir=/etc", "checkpoint-dir"),
            ("/containers/c/start?detachKeys=a", "detachKeys"),
            ("/containers/c/stop?t=1&checkpoint=x", "checkpoint"),
            ("/containers/c/kill?t=1", "t"),
            ("/containers/c/pause?x", "x"),
            ("/services/s/update?version=1&rollback=previous", "rollback"),
            ("/services/s/update?version=1&registryAuthFrom=previous-spec", "registryAuthFrom"),
            ("/services/s/update?version=1&registryAuthFrom=", "registryAuthFrom"),
            ("/services/s/update?queryRegistry=1&version=1", "queryRegistry"),
            ("/containers/c/stop?%74=1;checkpoint=x", "%74=1;checkpoint=x"),
        ] {
            match denied_by(head_check(&acl, Method::POST, bad, &[])) {
                DenyReason::QueryParameter { name: got, .. } => assert_eq!(got, name, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // Percent-encoded names are decoded before the check, as the engine does.
        assert!(head_check(&acl, Method::POST, "/containers/c/stop?%74=1", &[]).is_allowed());
        for (headers, want) in [
            (&[("content-length", "52")][..], "Body"),
            (&[("content-length", "x")][..], "Body"),
            (&[("content-type", "application/x-www-form-urlencoded")][..], "FormBody"),
            (&[("content-type", "Application/X-WWW-Form-Urlencoded; charset=utf-8")][..], "FormBody"),
            (&[("connection", "Upgrade"), ("upgrade", "tcp")][..], "Upgrade"),
        ] {
            let reason = denied_by(head_check(&acl, Method::POST, "/containers/c/start", headers));
            assert!(format!("{reason:?}").starts_with(want), "{headers:?}: {reason:?}");
        }
        assert!(
            head_check(&acl, Method::POST, "/containers/c/start", &[("content-length", "0")]).is_allowed()
        );
        // Reads: any query, but no body and no upgrade.
        assert!(
            head_check(&acl, Method::GET, "/containers/json?all=1&size=1&filters=%7B%7D", &[]).is_allowed()
        );
        assert!(matches!(
            denied_by(head_check(&acl, Method::GET, "/events", &[("content-length", "5")])),
            DenyReason::Body { .. }
        ));
    }

    #[test]
    fn custom_rules_in_table_form_carry_the_same_constraints() {
        let cfg: AclConfig = toml::from_str(
            r#"
profile = "none"
redact_env = false
rules = [
    "GET /containers/{id}/logs",
    { allow = "POST /containers/{id}/wait", query = ["condition"], body = "empty" },
    { allow = "POST /containers/{id}/attach", query = "any", upgrade = true },
    { allow = "POST /services/{id}/update", query = ["version"], body = "service-scale" },
]
"#,
        )
        .unwrap();
        assert!(!cfg.redact_env);
        let acl = Acl::new(&cfg);
        assert!(head_check(&acl, Method::POST, "/containers/c/wait?condition=not-running", &[]).is_allowed());
        assert!(matches!(
            denied_by(head_check(&acl, Method::POST, "/containers/c/wait?x=1", &[])),
            DenyReason::QueryParameter { .. }
        ));
        assert!(matches!(
            denied_by(head_check(&acl, Method::POST, "/containers/c/wait", &[("content-length", "2")])),
            DenyReason::Body { .. }
        ));
        assert!(
            head_check(
                &acl,
                Method::POST,
                "/containers/c/attach?stream=1",
                &[("connection", "Upgrade"), ("upgrade", "tcp")]
            )
            .is_allowed()
        );
        // A plain rule takes any query and body but no upgrade.
        assert!(
            head_check(&acl, Method::GET, "/containers/c/logs?follow=1", &[("content-length", "3")])
                .is_allowed()
        );
        assert!(matches!(
            denied_by(head_check(
                &acl,
                Method::GET,
                "/containers/c/logs",
                &[("connection", "upgrade"), ("upgrade", "tcp")]
            )),
            DenyReason::Upgrade { .. }
        ));
        match head_check(&acl, Method::POST, "/services/s/update?version=2", &[]) {
            AclDecision::Allow { rule } => assert_eq!(rule.body(), BodyPolicy::ServiceScale),
            other => panic!("{other:?}"),
        }
        // Round trip through TOML keeps every option.
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(toml::from_str::<AclConfig>(&text).unwrap(), cfg);
        // Mistakes are reported.
        for bad in [
            r#"rules = [{ allow = "POST /x", body = "some" }]"#,
            r#"rules = [{ allow = "POST /x", query = "all" }]"#,
            r#"rules = [{ allow = "POST /x", query = ["a=b=c"] }]"#,
            r#"rules = [{ allow = "POST /x", query = ["=b"] }]"#,
            r#"rules = [{ allow = "POST /x", wat = 1 }]"#,
            r#"rules = [{ allow = "POST x" }]"#,
        ] {
            assert!(toml::from_str::<AclConfig>(bad).is_err(), "{bad}");
        }
        let lifecycle = Profile::Lifecycle.rules();
        let start = lifecycle.iter().find(|r| r.pattern() == "POST /containers/{id}/start").unwrap();
        assert_eq!(start.to_string(), "POST /containers/{id}/start (query: none; body: empty)");
    }

    #[test]
    fn scale_spec_changes_the_replica_count_and_nothing_else() {
        use serde_json::json;
        let current = json!({
            "Name": "web",
            "Labels": {"a": "b"},
            "TaskTemplate": {"ContainerSpec": {"Image": "busybox@sha256:1", "Args": ["httpd"], "Init": true}, "ForceUpdate": 0},
            "Mode": {"Replicated": {"Replicas": 1}},
            "EndpointSpec": {"Mode": "vip"}
        });
        // The CLI's shape: the whole spec back with a new count.
        let mut requested = current.clone();
        requested["Mode"]["Replicated"]["Replicas"] = json!(0);
        let spec = scale_spec(&requested, &current).unwrap();
        assert_eq!(spec["Mode"]["Replicated"]["Replicas"], json!(0));
        assert_eq!(spec["TaskTemplate"], current["TaskTemplate"]);
        // A minimal body: everything left out keeps its value; zero values equal absent ones.
        let spec = scale_spec(
            &json!({"Mode": {"Replicated": {"Replicas": 3}}, "Networks": [], "UpdateConfig": null}),
            &current,
        )
        .unwrap();
        assert_eq!(spec["Mode"]["Replicated"]["Replicas"], json!(3));
        assert_eq!(spec["Labels"], current["Labels"]);
        let bad = |req: serde_json::Value| match scale_spec(&req, &current) {
            Err(DenyReason::NotAScale { detail }) => detail,
            other => panic!("{req}: {other:?}"),
        };
        let mut attack = requested.clone();
        attack["TaskTemplate"]["ContainerSpec"]["Args"] = json!(["sh", "-c", "id"]);
        attack["TaskTemplate"]["ContainerSpec"]["Mounts"] =
            json!([{"Type": "bind", "Source": "/", "Target": "/host"}]);
        assert!(bad(attack).contains("TaskTemplate.ContainerSpec.Args"));
        let mut mounts = requested.clone();
        mounts["TaskTemplate"]["ContainerSpec"]["Mounts"] =
            json!([{"Type": "bind", "Source": "/", "Target": "/host"}]);
        assert!(bad(mounts).contains("TaskTemplate.ContainerSpec.Mounts"));
        let mut cleared = requested.clone();
        cleared["Labels"] = json!(null);
        assert!(bad(cleared).contains("Labels"));
        let mut forced = requested.clone();
        forced["TaskTemplate"]["ForceUpdate"] = json!(1);
        assert!(bad(forced).contains("ForceUpdate"));
        let mut global = requested.clone();
        global["Mode"] = json!({"Global": {}, "Replicated": {"Replicas": 1}});
        assert!(bad(global).contains("Mode.Global"));
        assert!(bad(json!({"Name": "web"})).contains("Replicas"));
        assert!(bad(json!({"Mode": {"Replicated": {"Replicas": -1}}})).contains("not a count"));
        assert!(bad(json!({"Mode": {"Replicated": {"Replicas": "2"}}})).contains("not a count"));
        assert!(bad(json!([1])).contains("not a JSON object"));
        let global_service = json!({"Mode": {"Global": {}}});
        assert!(matches!(
            scale_spec(&json!({"Mode": {"Replicated": {"Replicas": 1}}}), &global_service),
            Err(DenyReason::NotAScale { .. })
        ));
    }

    #[test]
    fn environment_values_are_redacted_in_inspect_and_list_answers() {
        use serde_json::json;
        let mut inspect = json!({
            "Config": {"Env": ["PATH=/bin", "DB_PASSWORD=hunter2", "EMPTY"], "Labels": {"Env": "label"}},
            "Spec": {"TaskTemplate": {"ContainerSpec": {"Env": ["TOKEN=s3cret"]}}},
        });
        assert_eq!(redact_env(&mut inspect), 4);
        assert_eq!(
            inspect["Config"]["Env"],
            json!(["PATH=<redacted>", "DB_PASSWORD=<redacted>", "EMPTY=<redacted>"])
        );
        assert_eq!(inspect["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"], json!(["TOKEN=<redacted>"]));
        assert_eq!(inspect["Config"]["Labels"]["Env"], json!("label"));
        let mut list = json!([{"Spec": {"ContainerSpec": {"Env": ["A=1"]}}}, {"Spec": {}}]);
        assert_eq!(redact_env(&mut list), 1);
        assert!(!list.to_string().contains("A=1"));

        let on = acl(Profile::ReadOnly, &[]);
        for path in [
            "/containers/c/json",
            "/v1.41/containers/c/json?size=1",
            "/services",
            "/services/s",
            "/tasks",
            "/tasks/t",
        ] {
            assert!(on.redacts(&Method::GET, path), "{path}");
        }
        for path in ["/containers/json", "/info", "/events", "/containers/c/logs"] {
            assert!(!on.redacts(&Method::GET, path), "{path}");
        }
        assert!(!on.redacts(&Method::HEAD, "/containers/c/json"));
        let off = Acl::new(&AclConfig { redact_env: false, ..AclConfig::profile(Profile::ReadOnly) });
        assert!(!off.redacts(&Method::GET, "/containers/c/json"));
        assert!(AclConfig::default().redact_env);
        assert!(toml::from_str::<AclConfig>("profile = \"read-only\"").unwrap().redact_env);
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
            AclDecision::Allow { rule } => assert_eq!(rule.to_string(), "POST /containers/{id}/wait"),
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
