//! The in-memory transport passes the same conformance suite as the real ones, so tests written
//! against it mean what they say.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use pool_api::{AgentHandler, Connector, Endpoint};
use test_support::conformance::{Harness, RunningAgent};
use test_support::{MemoryAgent, MemoryConnector, conformance_tests};

#[derive(Default)]
struct Memory {
    connector: MemoryConnector,
    next: AtomicUsize,
}

impl Memory {
    fn run(&self, endpoint: Endpoint, agent: MemoryAgent) -> RunningAgent {
        self.connector.register(endpoint.clone(), &agent);
        let connector = self.connector.clone();
        let stop = endpoint.clone();
        RunningAgent::new(endpoint, move || {
            connector.unregister(stop);
            agent.disconnect_all();
        })
    }

    fn fresh(&self) -> Endpoint {
        Endpoint::new(format!("mem://agent-{}", self.next.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Harness for Memory {
    fn connector(&self) -> Arc<dyn Connector> {
        Arc::new(self.connector.clone())
    }

    async fn serve<H: AgentHandler>(&self, handler: H) -> RunningAgent {
        self.run(self.fresh(), MemoryAgent::new(handler))
    }

    async fn serve_at<H: AgentHandler>(&self, endpoint: &Endpoint, handler: H) -> RunningAgent {
        self.run(endpoint.clone(), MemoryAgent::new(handler))
    }

    async fn silent(&self) -> RunningAgent {
        let agent = MemoryAgent::new(test_support::AllowAll);
        agent.set_handshake_silent(true);
        self.run(self.fresh(), agent)
    }
}

conformance_tests!(Memory::default());
