//! Configuration exchanged with agents at run time.
//!
//! **Pushes** (proxy → agent): [`ConfigPushes::push`](crate::ConfigPushes::push)
//! sends one push per endpoint of the agent whose connection announces the `config_push`
//! feature, and returns their ids. Each push runs on its own task: it is sent on a live
//! connection of that endpoint and waits for the agent's acknowledgement up to the ack
//! time-out. An accept or a reject (with the agent's message) is final; a time-out or a lost
//! connection is retried after the retry interval, up to the configured number of retries,
//! then the push has failed. The outcome is observable as a [`PushState`], polled or awaited.
//!
//! **Updates** (agent → proxy): an agent may ask for a reload, report a rule or list change,
//! a needed restart or a configuration error. Each request goes to the
//! [`ConfigUpdateHandler`] registered on the pool, and its answer is sent back to the agent
//! on the connection the request came on. Without a handler the pool answers "rejected".

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use dashmap::DashMap;
use pool_api::{AgentConnection, BoxFuture, ConfigPush, ConfigUpdateAnswer, ConfigUpdateRequest};
use tokio::sync::watch;

use crate::agent::Agent;
use crate::config::ConfigPushConfig;
use crate::endpoint::EndpointState;

/// Where a push is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushState {
    /// Not yet answered; `attempts` made so far.
    Pending {
        /// Attempts sent so far.
        attempts: u32,
    },
    /// The agent applied it.
    Acked,
    /// The agent refused it.
    Rejected {
        /// The agent's reason.
        error: String,
    },
    /// No answer after every retry (or the pool shut down).
    Failed {
        /// The last problem met.
        error: String,
    },
}

impl PushState {
    /// True once the push is acked, rejected or failed.
    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Pending { .. })
    }
}

/// Push counts, for stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushCounts {
    /// Still waiting for an answer.
    pub pending: usize,
    /// Acknowledged.
    pub acked: u64,
    /// Rejected by the agent.
    pub rejected: u64,
    /// Failed after every retry.
    pub failed: u64,
}

/// Finished pushes kept for lookup; older ones are forgotten.
const KEEP_FINISHED: usize = 1024;

/// Every push of a pool.
pub(crate) struct Pushes {
    next_id: AtomicU64,
    states: DashMap<u64, watch::Sender<PushState>>,
    finished: Mutex<VecDeque<u64>>,
    acked: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
}

impl Pushes {
    pub(crate) fn new() -> Self {
        Self {
            next_id: AtomicU64::new(1),
            states: DashMap::new(),
            finished: Mutex::new(VecDeque::new()),
            acked: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Registers a new pending push.
    pub(crate) fn begin(&self) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.states.insert(id, watch::Sender::new(PushState::Pending { attempts: 0 }));
        metrics::gauge!("agentpool_config_pushes_pending").increment(1.0);
        id
    }

    pub(crate) fn set(&self, id: u64, state: PushState) {
        let finished = state.is_final();
        let outcome = match &state {
            PushState::Acked => Some((&self.acked, "acked")),
            PushState::Rejected { .. } => Some((&self.rejected, "rejected")),
            PushState::Failed { .. } => Some((&self.failed, "failed")),
            PushState::Pending { .. } => None,
        };
        if let Some((count, outcome)) = outcome {
            count.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("agentpool_config_pushes_total", "outcome" => outcome).increment(1);
            metrics::gauge!("agentpool_config_pushes_pending").decrement(1.0);
        }
        if let Some(tx) = self.states.get(&id) {
            tx.send_replace(state);
        }
        if finished {
            let mut done = self.finished.lock();
            done.push_back(id);
            while done.len() > KEEP_FINISHED {
                if let Some(old) = done.pop_front() {
                    self.states.remove(&old);
                }
            }
        }
    }

    pub(crate) fn state(&self, id: u64) -> Option<PushState> {
        self.states.get(&id).map(|tx| tx.borrow().clone())
    }

    pub(crate) fn watch(&self, id: u64) -> Option<watch::Receiver<PushState>> {
        self.states.get(&id).map(|tx| tx.subscribe())
    }

    pub(crate) fn counts(&self) -> PushCounts {
        PushCounts {
            pending: self.states.iter().filter(|s| !s.borrow().is_final()).count(),
            acked: self.acked.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// Answers agent-initiated configuration updates.
///
/// Implemented for any `Fn(String, ConfigUpdateRequest) -> impl Future<Output =
/// ConfigUpdateAnswer>` (the first argument is the agent's id).
pub trait ConfigUpdateHandler: Send + Sync + 'static {
    /// Decides on one request from agent `agent`.
    fn handle(&self, agent: String, request: ConfigUpdateRequest) -> BoxFuture<'static, ConfigUpdateAnswer>;
}

impl<F, Fut> ConfigUpdateHandler for F
where
    F: Fn(String, ConfigUpdateRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ConfigUpdateAnswer> + Send + 'static,
{
    fn handle(&self, agent: String, request: ConfigUpdateRequest) -> BoxFuture<'static, ConfigUpdateAnswer> {
        Box::pin(self(agent, request))
    }
}

/// The pool's registered handler, if any.
#[derive(Default)]
pub(crate) struct UpdateHandlerSlot(RwLock<Option<Arc<dyn ConfigUpdateHandler>>>);

impl UpdateHandlerSlot {
    pub(crate) fn set(&self, handler: Option<Arc<dyn ConfigUpdateHandler>>) {
        *self.0.write() = handler;
    }

    pub(crate) fn get(&self) -> Option<Arc<dyn ConfigUpdateHandler>> {
        self.0.read().clone()
    }
}

/// Starts one push per endpoint of `agent` whose connection announces config push, each on a
/// task of the agent; returns their ids.
pub(crate) fn start(
    agent: &Arc<Agent>,
    pushes: &Arc<Pushes>,
    kind: &str,
    version: Option<&str>,
    payload: &bytes::Bytes,
) -> Vec<u64> {
    let live = agent.live();
    let mut ids = Vec::new();
    for ep in &agent.all_endpoints() {
        let supports = live.iter().any(|s| {
            Arc::ptr_eq(&s.endpoint, ep) && s.capabilities().is_some_and(|c| c.features.config_push)
        });
        if !supports {
            continue;
        }
        let push_id = pushes.begin();
        let push = ConfigPush {
            push_id,
            kind: kind.to_owned(),
            version: version.map(str::to_owned),
            payload: payload.clone(),
        };
        let (task_agent, pushes, ep) = (agent.clone(), pushes.clone(), ep.clone());
        agent.spawn(async move { run(&task_agent, &pushes, ep, push).await });
        ids.push(push_id);
    }
    ids
}

/// One push: send on a live connection of the endpoint, wait for the ack, retry on time-out or
/// lost connection, record the outcome.
async fn run(agent: &Agent, pushes: &Pushes, endpoint: Arc<EndpointState>, push: ConfigPush) {
    let cfg: &ConfigPushConfig = &agent.shared.ctx.config.config_push;
    let stop = agent.stop_token();
    let id = push.push_id;
    let mut attempts = 0;
    loop {
        attempts += 1;
        pushes.set(id, PushState::Pending { attempts });
        let conn = agent
            .live()
            .iter()
            .filter(|s| Arc::ptr_eq(&s.endpoint, &endpoint))
            .find_map(|s| s.conn.load_full().filter(|l| l.conn.is_open()));
        let problem = match conn {
            None => format!("no live connection to {}", endpoint.endpoint),
            Some(live) => {
                let attempt = tokio::time::timeout(cfg.ack_timeout, live.conn.push_config(push.clone()));
                tokio::select! {
                    () = stop.cancelled() => {
                        pushes.set(id, PushState::Failed { error: "the pool shut down".into() });
                        return;
                    }
                    r = attempt => match r {
                        Ok(Ok(ack)) if ack.accepted => {
                            pushes.set(id, PushState::Acked);
                            return;
                        }
                        Ok(Ok(ack)) => {
                            let error = ack.error.unwrap_or_else(|| "rejected without a reason".into());
                            pushes.set(id, PushState::Rejected { error });
                            return;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("no acknowledgement within {:?}", cfg.ack_timeout),
                    },
                }
            }
        };
        if attempts > cfg.retries {
            pushes.set(id, PushState::Failed { error: problem });
            return;
        }
        tracing::debug!(agent = %agent.id(), push = id, %problem, "config push attempt failed; retrying");
        tokio::select! {
            () = stop.cancelled() => {
                pushes.set(id, PushState::Failed { error: "the pool shut down".into() });
                return;
            }
            () = tokio::time::sleep(cfg.retry_interval) => {}
        }
    }
}

/// Answers one agent-initiated update with the pool's handler, on a task of the agent, on the
/// connection it came on.
pub(crate) fn answer_update(
    agent: &Agent,
    handlers: &UpdateHandlerSlot,
    conn: Arc<dyn AgentConnection>,
    request: ConfigUpdateRequest,
) {
    let handler = handlers.get();
    let id = agent.id().to_owned();
    let stop = agent.stop_token().clone();
    agent.spawn(async move {
        let request_id = request.request_id;
        let answer = match handler {
            Some(h) => tokio::select! {
                () = stop.cancelled() => return,
                answer = h.handle(id, request) => answer,
            },
            None => ConfigUpdateAnswer {
                request_id,
                accepted: false,
                error: Some("no configuration update handler is registered".into()),
            },
        };
        conn.answer_config_update(ConfigUpdateAnswer { request_id, ..answer });
    });
}
