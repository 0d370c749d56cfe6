//! Reverse connections: agents that dial the proxy.
//!
//! The transport's listener accepts an agent's connection, runs the handshake, and hands the
//! established connection to [`AgentPool::add_reverse_connection`](crate::AgentPool) with the
//! agent id, a replica id and the token it presented. The pool checks the token against the
//! configured ones ([`ReverseConfig`](crate::ReverseConfig)) in constant time and the agent id against the allow-list, then adds the
//! connection to that agent — creating the agent if it is not registered — as one more
//! connection slot. Several replicas of an agent each get their own slot (and circuit
//! breaker). A replica that registers again replaces its previous connection in the same
//! slot; a replica whose connection closes is removed. Reverse connections are refused
//! unless at least one token is configured.
//!
//! Here: adding such a connection to its agent as a slot, and watching it until it closes.

use std::sync::Arc;

use pool_api::{AgentConnection, Endpoint};
use tokio::time::Instant;

use crate::agent::{Agent, Slot};
use crate::supervisor::{self, Exit, Links};

/// Adds (or replaces) replica `replica`'s reverse connection as a slot of `agent`, and watches
/// it, on a task of the agent, until it closes.
pub(crate) fn attach(agent: &Arc<Agent>, replica: &str, conn: Arc<dyn AgentConnection>, links: &Links) {
    let slot = {
        let mut replicas = agent.replicas.lock();
        let slot = replicas
            .entry(replica.to_owned())
            .or_insert_with(|| {
                agent.new_replica_slot(Endpoint::from(format!("reverse://{}/{replica}", agent.id())))
            })
            .clone();
        // The same replica again: its old connection is replaced, in the same slot.
        if let Some(old) = slot.detach() {
            old.conn.close();
        }
        slot.attach(conn.clone(), Instant::now());
        slot
    };
    links.directory.republish(agent);
    tracing::info!(agent = %agent.id(), replica, connection = conn.label(), "reverse connection registered");
    let (task_agent, replica, links) = (agent.clone(), replica.to_owned(), links.clone());
    agent.spawn(async move { watch(task_agent, replica, slot, conn, links).await });
}

/// Runs a reverse connection like a supervisor does, without reconnecting: when it closes,
/// its replica is removed — unless a newer connection of the replica took the slot.
async fn watch(
    agent: Arc<Agent>,
    replica: String,
    slot: Arc<Slot>,
    conn: Arc<dyn AgentConnection>,
    links: Links,
) {
    let generation = slot.generation();
    let exit = supervisor::run_connected(&agent, &slot, &conn, &links).await;
    if matches!(exit, Exit::Stopped) {
        conn.close();
    }
    {
        let mut replicas = agent.replicas.lock();
        if slot.generation() != generation {
            return;
        }
        slot.detach();
        if replicas.get(&replica).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            replicas.remove(&replica);
            agent.remove_replica_slot(&slot);
        }
    }
    tracing::info!(agent = %agent.id(), replica, "reverse connection closed; replica removed");
    links.directory.republish(&agent);
}
