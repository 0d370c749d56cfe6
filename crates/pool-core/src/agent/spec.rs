//! How an agent is described when it is added: id, endpoints, per-agent options, and an
//! optional connector of its own; and the check of all that against the pool's settings.

use std::sync::Arc;

use pool_api::{Connector, Endpoint};

use crate::config::{AgentOptions, AgentSettings, PoolConfig};
use crate::error::PoolError;

/// How an agent is to be added.
#[derive(Clone)]
pub struct AgentSpec {
    pub(crate) id: String,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) options: AgentOptions,
    pub(crate) connector: Option<Arc<dyn Connector>>,
}

impl std::fmt::Debug for AgentSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSpec")
            .field("id", &self.id)
            .field("endpoints", &self.endpoints)
            .field("options", &self.options)
            .field("connector", &self.connector.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl AgentSpec {
    /// An agent with the given id and no endpoint yet.
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into(), endpoints: Vec::new(), options: Default::default(), connector: None }
    }

    /// Adds an endpoint (a replica of the agent).
    #[must_use]
    pub fn endpoint(mut self, endpoint: impl Into<Endpoint>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }

    /// Adds several endpoints.
    #[must_use]
    pub fn endpoints<E: Into<Endpoint>>(mut self, endpoints: impl IntoIterator<Item = E>) -> Self {
        self.endpoints.extend(endpoints.into_iter().map(Into::into));
        self
    }

    /// Sets per-agent overrides of pool settings.
    #[must_use]
    pub fn options(mut self, options: AgentOptions) -> Self {
        self.options = options;
        self
    }

    /// Uses this connector for the agent instead of the pool's.
    #[must_use]
    pub fn connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connector = Some(connector);
        self
    }

    /// The agent's settings, or every problem found with the spec.
    pub(crate) fn validate(&self, config: &PoolConfig) -> Result<AgentSettings, PoolError> {
        let mut problems = Vec::new();
        if self.id.trim().is_empty() {
            problems.push("id: must not be empty".to_owned());
        }
        if self.endpoints.is_empty() {
            problems.push(format!("agent {:?}: endpoints: at least one is required", self.id));
        }
        let mut seen = std::collections::HashSet::new();
        for e in &self.endpoints {
            if e.as_str().trim().is_empty() {
                problems.push(format!("agent {:?}: endpoints: an endpoint is empty", self.id));
            } else if !seen.insert(e) {
                problems.push(format!("agent {:?}: endpoints: {e} is listed twice", self.id));
            }
        }
        let settings = AgentSettings::resolve(config, &self.options);
        match settings {
            Ok(s) if problems.is_empty() => Ok(s),
            Ok(_) => Err(PoolError::InvalidConfig { problems }),
            Err(more) => {
                problems.extend(more.into_iter().map(|p| format!("agent {:?}: {p}", self.id)));
                Err(PoolError::InvalidConfig { problems })
            }
        }
    }
}
