//! The handshake: what the proxy offers and what the agent can do.

use std::num::NonZeroU32;

use crate::event::{EventKind, EventSet};

/// The agent protocol version this crate describes.
pub const PROTOCOL_VERSION: u32 = 1;

/// The proxy's opening message on a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Hello {
    /// Identifies the proxy instance in the agent's logs.
    pub proxy_id: String,
    /// The proxy software version.
    pub proxy_version: String,
    /// Protocol versions the proxy speaks; the agent picks one or refuses.
    pub supported_versions: Vec<u32>,
}

impl Hello {
    /// A hello for this crate's [`PROTOCOL_VERSION`].
    pub fn new(proxy_id: impl Into<String>) -> Self {
        Self {
            proxy_id: proxy_id.into(),
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            supported_versions: vec![PROTOCOL_VERSION],
        }
    }
}

/// Optional protocol features an agent may support.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
pub struct Features {
    /// Accepts configuration pushed by the proxy.
    pub config_push: bool,
    /// Sends its own configuration updates to the proxy.
    pub config_updates: bool,
    /// Reports its own health.
    pub health_reports: bool,
    /// Sends pause / resume / capacity signals.
    pub flow_control: bool,
    /// Acts on cancels (aborts the work of a cancelled request).
    pub cancellation: bool,
    /// Sends metrics reports.
    pub metrics_reports: bool,
}

/// What an agent told the proxy it can do, learned in the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Capabilities {
    /// The agent's own id (for reverse connections, the id it registers under).
    pub agent_id: String,
    /// Human-readable name.
    pub name: String,
    /// Agent software version.
    pub version: String,
    /// The protocol version chosen for this connection.
    pub protocol_version: u32,
    /// Events the agent wants to see. The proxy never sends others.
    pub supported_events: EventSet,
    /// Requests the agent handles at once on one connection; `None` = no limit of its own.
    pub max_concurrency: Option<NonZeroU32>,
    /// Largest body, in bytes, the agent accepts; `None` = no limit of its own.
    pub max_body_size: Option<u64>,
    /// Optional features.
    pub features: Features,
}

impl Capabilities {
    /// An agent with the given id that accepts request headers only, no limits, no features.
    pub fn new(agent_id: impl Into<String>) -> Self {
        let agent_id = agent_id.into();
        Self {
            name: agent_id.clone(),
            agent_id,
            version: String::new(),
            protocol_version: PROTOCOL_VERSION,
            supported_events: EventSet::EMPTY.with(EventKind::RequestHeaders),
            max_concurrency: None,
            max_body_size: None,
            features: Features::default(),
        }
    }

    /// Replaces the supported events.
    #[must_use]
    pub fn with_events(mut self, events: impl IntoIterator<Item = EventKind>) -> Self {
        self.supported_events = events.into_iter().collect();
        self
    }

    /// Sets the per-connection concurrency limit (0 means none).
    #[must_use]
    pub fn with_max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = NonZeroU32::new(n);
        self
    }

    /// Sets the body size limit.
    #[must_use]
    pub fn with_max_body_size(mut self, bytes: u64) -> Self {
        self.max_body_size = Some(bytes);
        self
    }

    /// Sets the features.
    #[must_use]
    pub fn with_features(mut self, features: Features) -> Self {
        self.features = features;
        self
    }

    /// True if the agent wants events of `kind`.
    pub fn supports(&self, kind: EventKind) -> bool {
        self.supported_events.contains(kind)
    }
}
