//! The task that keeps one connection slot connected.
//!
//! One supervisor per slot: it connects (bounded by the connect time-out), handshakes (bounded
//! by the handshake time-out), publishes the connection, mirrors the agent's signals into the
//! slot as they change (no polling), pings on an interval, and when the connection dies takes
//! it out of the snapshot and reconnects after a jittered exponential back-off. Supervisors of
//! different slots and agents run independently, so a hung agent stalls nobody else.

use std::sync::Arc;

use pool_api::{AgentConnection, BoxFuture, Connector, Endpoint, TransportError};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::agent::{Agent, Slot};
use crate::backoff::Backoff;
use crate::config_push::{self, UpdateHandlerSlot};
use crate::context::PoolCtx;
use crate::directory::Directory;

/// What the tasks of a slot reach of the pool beside their agent: the directory, to republish
/// the agent's connected slots when a connection comes or goes, and the handler of
/// agent-initiated configuration updates.
#[derive(Clone)]
pub(crate) struct Links {
    pub(crate) directory: Arc<Directory>,
    pub(crate) updates: Arc<UpdateHandlerSlot>,
}

/// Starts one supervisor per slot of `agent`, each dialling with `connector`. The receivers
/// report whether each slot's first connection attempt succeeded.
pub(crate) fn start(
    agent: &Arc<Agent>,
    connector: &Arc<dyn Connector>,
    links: &Links,
) -> Vec<oneshot::Receiver<bool>> {
    let slots = agent.slots();
    let mut firsts = Vec::with_capacity(slots.len());
    for slot in slots {
        let (tx, rx) = oneshot::channel();
        firsts.push(rx);
        agent.spawn(supervise(agent.clone(), slot, connector.clone(), links.clone(), tx));
    }
    firsts
}

/// Why the connected phase ended.
pub(crate) enum Exit {
    /// The pool or agent is stopping.
    Stopped,
    /// The connection died (or was closed after a failed ping).
    Closed(String),
}

async fn supervise(
    agent: Arc<Agent>,
    slot: Arc<Slot>,
    connector: Arc<dyn Connector>,
    links: Links,
    first: oneshot::Sender<bool>,
) {
    let ctx = agent.shared.ctx.clone();
    let mut backoff = match ctx.next_seed() {
        Some(seed) => Backoff::seeded(&ctx.config.reconnect, seed),
        None => Backoff::new(&ctx.config.reconnect),
    };
    let mut first = Some(first);
    let endpoint = slot.endpoint.endpoint.clone();
    let stop = agent.stop_token().clone();
    loop {
        let attempt = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = connect(&*connector, &endpoint, &ctx) => r,
        };
        match attempt {
            Ok(conn) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(true);
                }
                backoff.reset();
                slot.attach(conn.clone(), Instant::now());
                slot.endpoint.reconnected();
                links.directory.republish(&agent);
                tracing::debug!(agent = %agent.id(), connection = conn.label(), "connected");
                let exit = run_connected(&agent, &slot, &conn, &links).await;
                slot.detach();
                links.directory.republish(&agent);
                match exit {
                    Exit::Stopped => {
                        conn.close();
                        break;
                    }
                    Exit::Closed(reason) => {
                        slot.record_error(Instant::now(), &reason);
                        agent.shared.metrics.reconnects.increment(1);
                        tracing::warn!(agent = %agent.id(), connection = conn.label(), %reason, "connection lost");
                    }
                }
            }
            Err(e) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(false);
                }
                slot.record_error(Instant::now(), &e);
                tracing::debug!(agent = %agent.id(), %endpoint, error = %e, "connect failed");
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = sleep(delay) => {}
        }
    }
    if let Some(live) = slot.detach() {
        live.conn.close();
    }
}

/// Connects and handshakes, each step under its own time-out.
async fn connect(
    connector: &dyn Connector,
    endpoint: &Endpoint,
    ctx: &PoolCtx,
) -> Result<Arc<dyn AgentConnection>, TransportError> {
    let cfg = &ctx.config;
    let pending = timeout(cfg.connect_timeout, connector.connect(endpoint)).await.map_err(|_| {
        TransportError::Timeout {
            operation: "connect",
            target: endpoint.to_string(),
            after: cfg.connect_timeout,
        }
    })??;
    timeout(cfg.handshake_timeout, pending.handshake(ctx.hello.clone())).await.map_err(|_| {
        TransportError::Timeout {
            operation: "handshake",
            target: endpoint.to_string(),
            after: cfg.handshake_timeout,
        }
    })?
}

type Ping =
    std::pin::Pin<Box<tokio::time::Timeout<BoxFuture<'static, Result<std::time::Duration, TransportError>>>>>;

/// Runs a connected slot until its connection dies or the agent stops: mirrors the agent's
/// signals, answers its configuration updates, pings.
pub(crate) async fn run_connected(
    agent: &Agent,
    slot: &Slot,
    conn: &Arc<dyn AgentConnection>,
    links: &Links,
) -> Exit {
    let ctx = &agent.shared.ctx;
    let mut signals = conn.signals();
    {
        let s = signals.borrow_and_update().clone();
        if !s.open {
            return Exit::Closed("closed right after the handshake".into());
        }
        slot.apply_signals(&s);
    }
    agent.shared.wake_waiters();
    let every = ctx.config.health.ping_interval;
    let ping_timeout = ctx.config.health.ping_timeout;
    let mut next_ping = (!every.is_zero()).then(|| Instant::now() + every);
    let mut ping: Option<Ping> = None;
    let mut update = conn.next_config_update();
    let mut updates_open = true;
    let stop = agent.stop_token();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return Exit::Stopped,
            changed = signals.changed() => {
                if changed.is_err() {
                    return Exit::Closed("the connection's task ended".into());
                }
                let s = signals.borrow_and_update().clone();
                if !s.open {
                    return Exit::Closed("closed by the transport".into());
                }
                slot.apply_signals(&s);
                agent.shared.wake_waiters();
            }
            request = &mut update, if updates_open => {
                match request {
                    Some(request) => {
                        update = conn.next_config_update();
                        config_push::answer_update(agent, &links.updates, conn.clone(), request);
                    }
                    // The connection's update stream ended: it is closing.
                    None => updates_open = false,
                }
            }
            () = sleep_until(next_ping.unwrap_or_else(Instant::now)), if next_ping.is_some() && ping.is_none() => {
                ping = Some(Box::pin(timeout(ping_timeout, conn.ping())));
            }
            r = async { ping.as_mut().expect("guarded").await }, if ping.is_some() => {
                ping = None;
                next_ping = Some(Instant::now() + every);
                let failure = match r {
                    Ok(Ok(_rtt)) => None,
                    Ok(Err(e)) => Some(format!("ping failed: {e}")),
                    Err(_) => Some(format!("ping not answered within {ping_timeout:?}")),
                };
                if let Some(reason) = failure {
                    conn.close();
                    return Exit::Closed(reason);
                }
            }
        }
    }
}
