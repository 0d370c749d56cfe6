//! Connecting to in-memory agents.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use pool_api::{AgentConnection, BoxFuture, Connector, Endpoint, Hello, PendingConnection, TransportError};

use crate::agent::{AgentShared, MemoryAgent};
use crate::connection::MemoryConnection;

/// A [`Connector`] to [`MemoryAgent`]s: a registry of endpoints, each served by one agent.
///
/// Cloning gives another handle to the same registry. An endpoint is any address of the form
/// `scheme:rest` (`"mem://waf"`, `"unix:/run/waf.sock"`…), so a test can use the addresses the
/// code under test expects; [`with_schemes`](MemoryConnector::with_schemes) narrows the schemes
/// it serves, as a real transport's would be. What it refuses is listed at
/// [`validate_endpoint`](MemoryConnector::validate_endpoint).
/// Connecting to a well-formed endpoint no agent is registered under fails with
/// [`TransportError::Connect`] of kind [`ConnectionRefused`](std::io::ErrorKind::ConnectionRefused),
/// like a socket nobody listens on.
#[derive(Clone, Default)]
pub struct MemoryConnector {
    agents: Arc<Mutex<HashMap<Endpoint, MemoryAgent>>>,
    /// The schemes served; `None`: every scheme.
    schemes: Option<Arc<[String]>>,
}

impl fmt::Debug for MemoryConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut endpoints: Vec<Endpoint> = self.agents.lock().keys().cloned().collect();
        endpoints.sort();
        f.debug_struct("MemoryConnector")
            .field("endpoints", &endpoints)
            .field("schemes", &self.schemes)
            .finish()
    }
}

impl MemoryConnector {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves only endpoints of these schemes (compared exactly, without the `:`), like a
    /// transport that understands `unix:` and nothing else. The registry is shared with the
    /// connector this was made from.
    #[must_use]
    pub fn with_schemes<S: Into<String>>(mut self, schemes: impl IntoIterator<Item = S>) -> Self {
        self.schemes = Some(schemes.into_iter().map(Into::into).collect());
        self
    }

    /// Serves `endpoint` with `agent`, replacing any agent registered there. One agent may serve
    /// several endpoints.
    pub fn register(&self, endpoint: impl Into<Endpoint>, agent: &MemoryAgent) {
        self.agents.lock().insert(endpoint.into(), agent.clone());
    }

    /// Stops serving `endpoint` and returns the agent that did. Connections already open stay
    /// open, like those of a socket whose file was removed.
    pub fn unregister(&self, endpoint: impl Into<Endpoint>) -> Option<MemoryAgent> {
        self.agents.lock().remove(&endpoint.into())
    }

    /// The agent serving `endpoint`.
    pub fn agent(&self, endpoint: impl Into<Endpoint>) -> Option<MemoryAgent> {
        self.agents.lock().get(&endpoint.into()).cloned()
    }
}

impl Connector for MemoryConnector {
    /// Accepts `scheme:rest` where the scheme is a letter followed by letters, digits, `+`, `-`
    /// or `.` (and one [`with_schemes`](MemoryConnector::with_schemes) allows, if set) and
    /// `rest` — after an optional `//` — is not empty; nothing in the endpoint may be
    /// whitespace or a control character. Whether an agent is registered there does not
    /// matter: that is for [`connect`](Connector::connect) to find out.
    fn validate_endpoint(&self, endpoint: &Endpoint) -> Result<(), TransportError> {
        let s = endpoint.as_str();
        let invalid = |message: String| TransportError::InvalidEndpoint { endpoint: s.to_owned(), message };
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(format!("contains {c:?}")));
        }
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(invalid("expected scheme:address, such as mem://waf".to_owned()));
        };
        let mut chars = scheme.chars();
        let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !well_formed {
            return Err(invalid(format!("{scheme:?} is not a scheme")));
        }
        if let Some(schemes) = &self.schemes
            && !schemes.iter().any(|served| served == scheme)
        {
            return Err(invalid(format!("unknown scheme {scheme:?}: this connector serves {schemes:?}")));
        }
        if rest.strip_prefix("//").unwrap_or(rest).is_empty() {
            return Err(invalid(format!("nothing follows the scheme {scheme:?}")));
        }
        Ok(())
    }

    /// Refuses an endpoint [`validate_endpoint`](Connector::validate_endpoint) refuses, with
    /// the same error; otherwise looks it up when the future is polled, then connects per the
    /// agent's script (refused, never completing, or at once).
    fn connect(
        &self,
        endpoint: &Endpoint,
    ) -> BoxFuture<'static, Result<Box<dyn PendingConnection>, TransportError>> {
        if let Err(e) = self.validate_endpoint(endpoint) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let agents = Arc::clone(&self.agents);
        let endpoint = endpoint.clone();
        Box::pin(async move {
            let agent = agents.lock().get(&endpoint).cloned();
            match agent {
                Some(agent) => Arc::clone(&agent.shared).accept(endpoint).await,
                None => Err(TransportError::Connect {
                    endpoint: endpoint.to_string(),
                    kind: Some(std::io::ErrorKind::ConnectionRefused),
                    message: "no agent is registered at this endpoint".to_owned(),
                }),
            }
        })
    }
}

/// A connection to a [`MemoryAgent`] that has not handshaken yet.
pub(crate) struct MemoryPending {
    agent: Arc<AgentShared>,
    endpoint: Endpoint,
    /// The agent's disconnect epoch when the connection was made.
    epoch: u64,
}

impl MemoryPending {
    pub(crate) fn new(agent: Arc<AgentShared>, endpoint: Endpoint, epoch: u64) -> Self {
        Self { agent, endpoint, epoch }
    }
}

impl PendingConnection for MemoryPending {
    fn handshake(
        self: Box<Self>,
        hello: Hello,
    ) -> BoxFuture<'static, Result<Arc<dyn AgentConnection>, TransportError>> {
        Box::pin(async move {
            let Self { agent, endpoint, epoch } = *self;
            let reset = || TransportError::Handshake {
                endpoint: endpoint.to_string(),
                message: "the agent closed the connection".to_owned(),
            };
            agent.record_hello(hello.clone());
            let mut epochs = agent.epoch.subscribe();
            if *epochs.borrow_and_update() != epoch {
                return Err(reset());
            }
            if agent.handshake_silent() {
                // Never answers; only the agent dropping its connections ends the wait.
                let _ = epochs.wait_for(|e| *e != epoch).await;
                return Err(reset());
            }
            let versions = agent.protocol_versions();
            let Some(version) =
                versions.iter().copied().filter(|v| hello.supported_versions.contains(v)).max()
            else {
                return Err(TransportError::VersionMismatch {
                    endpoint: endpoint.to_string(),
                    proxy: hello.supported_versions,
                    agent: versions,
                });
            };
            let mut capabilities = agent.capabilities();
            capabilities.protocol_version = version;
            let connection: Arc<dyn AgentConnection> =
                MemoryConnection::open(&agent, &endpoint, capabilities);
            Ok(connection)
        })
    }
}
