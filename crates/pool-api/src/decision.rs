//! What an agent answers.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// What the proxy should do with the request.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Action {
    /// Let the request continue.
    #[default]
    Allow,
    /// Answer the client directly and stop.
    Block {
        /// Status sent to the client.
        status: StatusCode,
        /// Extra response headers.
        headers: HeaderMap,
        /// Response body.
        body: Bytes,
    },
    /// Send the client elsewhere.
    Redirect {
        /// Target of the `location` header.
        location: String,
        /// A 3xx status.
        status: StatusCode,
    },
    /// Ask the client to prove something first (captcha, JS check, login).
    Challenge {
        /// The challenge type, agent-defined (`"captcha"`, `"js"`…).
        kind: String,
        /// Parameters of the challenge.
        params: BTreeMap<String, String>,
    },
}

/// One change to a header map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderOp {
    /// Replace every value of the header with this one.
    Set {
        /// Header name.
        name: HeaderName,
        /// New value.
        value: HeaderValue,
    },
    /// Append a value, keeping existing ones.
    Add {
        /// Header name.
        name: HeaderName,
        /// Added value.
        value: HeaderValue,
    },
    /// Remove every value of the header.
    Remove {
        /// Header name.
        name: HeaderName,
    },
}

impl HeaderOp {
    /// Applies the change to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        match self {
            Self::Set { name, value } => {
                headers.insert(name.clone(), value.clone());
            }
            Self::Add { name, value } => {
                headers.append(name.clone(), value.clone());
            }
            Self::Remove { name } => {
                headers.remove(name);
            }
        }
    }
}

/// A change to the body chunk the decision answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyMutation {
    /// Forward these bytes instead of the chunk.
    Replace {
        /// Index of the chunk being replaced.
        chunk_index: u32,
        /// The new bytes.
        data: Bytes,
    },
    /// Forward nothing for this chunk.
    Drop {
        /// Index of the dropped chunk.
        chunk_index: u32,
    },
}

/// Why the agent decided what it did: for logs, metrics and security review.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Audit {
    /// Ids of the rules that matched.
    pub rule_ids: Vec<String>,
    /// Free-form tags (`"sqli"`, `"bot"`…).
    pub tags: Vec<String>,
    /// A human-readable reason.
    pub reason: Option<String>,
    /// Confidence in the decision, 0.0–1.0, if the agent scores.
    pub confidence: Option<f32>,
    /// Anything else the agent wants logged.
    pub custom: BTreeMap<String, String>,
}

impl Audit {
    /// True if nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.rule_ids.is_empty()
            && self.tags.is_empty()
            && self.reason.is_none()
            && self.confidence.is_none()
            && self.custom.is_empty()
    }
}

/// An agent's answer to one [`Event`](crate::Event).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Decision {
    /// Allow, block, redirect or challenge.
    pub action: Action,
    /// Changes to the request headers sent upstream.
    pub request_headers: Vec<HeaderOp>,
    /// Changes to the response headers sent to the client.
    pub response_headers: Vec<HeaderOp>,
    /// A change to the body chunk this decision answers.
    pub body: Option<BodyMutation>,
    /// The agent wants to see more (the body) before it decides for good.
    pub needs_more: bool,
    /// Why.
    pub audit: Audit,
}

impl Decision {
    /// Let the request through unchanged.
    pub fn allow() -> Self {
        Self::default()
    }

    /// Answer the client with `status` and an empty body.
    pub fn block(status: StatusCode) -> Self {
        Self {
            action: Action::Block { status, headers: HeaderMap::new(), body: Bytes::new() },
            ..Self::default()
        }
    }

    /// Redirect the client to `location` with `status` (a 3xx).
    pub fn redirect(location: impl Into<String>, status: StatusCode) -> Self {
        Self { action: Action::Redirect { location: location.into(), status }, ..Self::default() }
    }

    /// Challenge the client.
    pub fn challenge(kind: impl Into<String>, params: BTreeMap<String, String>) -> Self {
        Self { action: Action::Challenge { kind: kind.into(), params }, ..Self::default() }
    }

    /// True if the action is [`Action::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self.action, Action::Allow)
    }

    /// Adds a request header change.
    #[must_use]
    pub fn with_request_header(mut self, op: HeaderOp) -> Self {
        self.request_headers.push(op);
        self
    }

    /// Adds a response header change.
    #[must_use]
    pub fn with_response_header(mut self, op: HeaderOp) -> Self {
        self.response_headers.push(op);
        self
    }

    /// Sets the body mutation.
    #[must_use]
    pub fn with_body(mut self, body: BodyMutation) -> Self {
        self.body = Some(body);
        self
    }

    /// Marks that the agent needs more of the request before it decides.
    #[must_use]
    pub fn needing_more(mut self) -> Self {
        self.needs_more = true;
        self
    }

    /// Sets the audit reason.
    #[must_use]
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.audit.reason = Some(reason.into());
        self
    }

    /// Adds a matched rule id.
    #[must_use]
    pub fn with_rule(mut self, rule_id: impl Into<String>) -> Self {
        self.audit.rule_ids.push(rule_id.into());
        self
    }

    /// Adds an audit tag.
    #[must_use]
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.audit.tags.push(tag.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_ops_set_add_and_remove() {
        let mut h = HeaderMap::new();
        let name = HeaderName::from_static("x-a");
        HeaderOp::Set { name: name.clone(), value: HeaderValue::from_static("1") }.apply(&mut h);
        HeaderOp::Add { name: name.clone(), value: HeaderValue::from_static("2") }.apply(&mut h);
        assert_eq!(h.get_all(&name).iter().count(), 2);
        HeaderOp::Set { name: name.clone(), value: HeaderValue::from_static("3") }.apply(&mut h);
        assert_eq!(h.get_all(&name).iter().count(), 1);
        HeaderOp::Remove { name: name.clone() }.apply(&mut h);
        assert!(h.get(&name).is_none());
    }

    #[test]
    fn builders_fill_the_decision() {
        let d = Decision::block(StatusCode::FORBIDDEN).with_rule("942100").with_tag("sqli");
        assert!(!d.is_allow());
        assert_eq!(d.audit.rule_ids, ["942100"]);
        assert!(Decision::allow().is_allow());
        assert!(Decision::allow().audit.is_empty());
    }
}
