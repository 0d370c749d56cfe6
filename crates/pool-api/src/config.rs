//! Configuration exchanged with agents: pushed by the proxy, or requested by the agent.

use bytes::Bytes;
use std::time::Duration;

/// Configuration the proxy pushes to an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigPush {
    /// Identifies this push; the agent's [`ConfigAck`] carries it back.
    pub push_id: u64,
    /// What kind of update this is (`"rules"`, `"full"`…), agent-defined.
    pub kind: String,
    /// Version label of the configuration, if the proxy tracks versions.
    pub version: Option<String>,
    /// The configuration itself, opaque to the pool (JSON, YAML, protobuf…).
    pub payload: Bytes,
}

/// An agent's answer to a [`ConfigPush`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigAck {
    /// The push this answers.
    pub push_id: u64,
    /// True if the agent applied it.
    pub accepted: bool,
    /// Why it was rejected.
    pub error: Option<String>,
}

impl ConfigAck {
    /// The agent applied push `push_id`.
    pub fn accepted(push_id: u64) -> Self {
        Self { push_id, accepted: true, error: None }
    }

    /// The agent rejected push `push_id`.
    pub fn rejected(push_id: u64, error: impl Into<String>) -> Self {
        Self { push_id, accepted: false, error: Some(error.into()) }
    }
}

/// What an agent asks of the proxy on its own initiative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigUpdateKind {
    /// Please push the configuration again.
    RequestReload,
    /// The agent's rule set changed.
    RuleUpdate {
        /// Which rule set.
        rule_set: String,
        /// The new rules, agent-defined encoding.
        rules: Bytes,
    },
    /// An allow/deny list changed.
    ListUpdate {
        /// Which list.
        list: String,
        /// Entries added.
        added: Vec<String>,
        /// Entries removed.
        removed: Vec<String>,
    },
    /// The agent must be restarted to apply a change.
    RestartRequired {
        /// Why.
        reason: String,
        /// How long the agent can keep serving before it must restart.
        grace: Option<Duration>,
    },
    /// The agent found its configuration invalid.
    ConfigError {
        /// What is wrong.
        error: String,
        /// The field at fault, if known.
        field: Option<String>,
    },
}

/// An agent-initiated configuration update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigUpdateRequest {
    /// Identifies the request; the proxy's [`ConfigUpdateAnswer`] carries it back.
    pub request_id: u64,
    /// What the agent asks.
    pub kind: ConfigUpdateKind,
}

/// The proxy's answer to a [`ConfigUpdateRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigUpdateAnswer {
    /// The request this answers.
    pub request_id: u64,
    /// True if the proxy accepted the update.
    pub accepted: bool,
    /// Why it was refused.
    pub error: Option<String>,
}
