//! Connecting to in-memory agents.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use pool_api::{AgentConnection, BoxFuture, Connector, Endpoint, Hello, PendingConnection, TransportError};

use crate::agent::{AgentShared, MemoryAgent};
use crate::connection::MemoryConnection;
use crate::lock;

/// A [`Connector`] to [`MemoryAgent`]s: a registry of endpoints, each served by one agent.
///
/// Cloning gives another handle to the same registry. Any string is an endpoint (`"mem://waf"`,
/// `"unix:/run/waf.sock"`…), so a test can use the addresses the code under test expects.
/// Connecting to an endpoint no agent is registered under fails with
/// [`TransportError::Connect`] of kind [`ConnectionRefused`](std::io::ErrorKind::ConnectionRefused),
/// like a socket nobody listens on.
#[derive(Clone, Default)]
pub struct MemoryConnector {
    agents: Arc<Mutex<HashMap<Endpoint, MemoryAgent>>>,
}

impl fmt::Debug for MemoryConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut endpoints: Vec<Endpoint> = lock(&self.agents).keys().cloned().collect();
        endpoints.sort();
        f.debug_struct("MemoryConnector").field("endpoints", &endpoints).finish()
    }
}

impl MemoryConnector {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `endpoint` with `agent`, replacing any agent registered there. One agent may serve
    /// several endpoints.
    pub fn register(&self, endpoint: impl Into<Endpoint>, agent: &MemoryAgent) {
        lock(&self.agents).insert(endpoint.into(), agent.clone());
    }

    /// Stops serving `endpoint` and returns the agent that did. Connections already open stay
    /// open, like those of a socket whose file was removed.
    pub fn unregister(&self, endpoint: impl Into<Endpoint>) -> Option<MemoryAgent> {
        lock(&self.agents).remove(&endpoint.into())
    }

    /// The agent serving `endpoint`.
    pub fn agent(&self, endpoint: impl Into<Endpoint>) -> Option<MemoryAgent> {
        lock(&self.agents).get(&endpoint.into()).cloned()
    }
}

impl Connector for MemoryConnector {
    /// Looks the endpoint up when the future is polled, then connects per the agent's script
    /// (refused, never completing, or at once).
    fn connect(
        &self,
        endpoint: &Endpoint,
    ) -> BoxFuture<'static, Result<Box<dyn PendingConnection>, TransportError>> {
        let agents = Arc::clone(&self.agents);
        let endpoint = endpoint.clone();
        Box::pin(async move {
            let agent = lock(&agents).get(&endpoint).cloned();
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
