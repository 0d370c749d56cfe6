//! Response bodies through the agents that take them: the upstream's body is streamed to the
//! client chunk by chunk, each chunk asked of every such agent (in the route's order, on the
//! connection that saw the request's headers: correlation affinity) just before it goes on.
//! Nothing is buffered beyond the chunk in hand; a chunk is not held back to learn whether it
//! is the last.
//!
//! What the gateway does with each part of an agent's decision on a response chunk:
//!
//! * `Allow` — the chunk goes on; a [`BodyMutation`] naming this chunk's index replaces its
//!   bytes (`Replace`) or forwards nothing for it (`Drop`); a mutation naming another index is
//!   ignored. Later agents see the chunk as the earlier ones left it; a dropped chunk is not
//!   shown to later agents.
//! * `Block`, `Redirect`, `Challenge` — the status and headers are already on their way to the
//!   client, so the only honest answer is to abort the response: the body ends with an error
//!   (HTTP/1.1: the connection is closed before the terminating chunk; HTTP/2: the stream is
//!   reset), counted in `gateway_response_aborted_total{route,agent}`.
//! * `request_headers`, `response_headers` — too late to apply: ignored (logged at debug).
//! * `needs_more` — nothing to wait for: every chunk is shown anyway.
//!
//! Since a mutation may change the body's length, a response whose body goes through agents
//! loses its `content-length` (HTTP/1.1 sends it chunked).
//!
//! The `last` flag: a chunk is marked last when the upstream's body says it is finished right
//! after it (a `content-length` body's final chunk). When the end is only known later (a
//! chunked body), the agents get one more, empty chunk marked last.
//!
//! An agent's `max_body_size`: an agent sees the body's chunks as long as the running total
//! stays within its limit — none when `content-length` already says more. Past it the agent is
//! shown no more chunks of that response, which goes on to the client untouched by it, and
//! `gateway_response_body_uninspected_total{route,agent}` counts it. An agent that cannot
//! answer on a chunk: on a `closed` route the response is aborted; on an `open` one the agent is
//! shown no more of that body.
//!
//! A client that goes away while an agent is deciding on a chunk cancels that agent request
//! (`Cancel` with reason `ClientDisconnected`); one that goes away while the upstream's next
//! chunk is awaited stops the reading of it.
//!
//! `RequestComplete` goes to the request's agents once the body has been streamed (or
//! aborted, or its client went away), with the bytes sent to the client.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use httpserver_pool::{BoxError, ResponseBody};
use hyper::body::{Body, Frame};
use pool_api::{Action, BodyChunk, BodyMutation, CancelReason, Decision, Event, EventKind};
use pool_core::{AgentPool, FailureMode, PoolError};
use tokio::time::Instant;

/// One agent that takes the response body, and how much of it it has seen.
struct Watcher {
    name: String,
    limit: Option<u64>,
    seen: u64,
    /// False once the agent is shown no more of this body.
    active: bool,
}

/// What the gateway tells the request's agents when the response is done.
pub(crate) struct Completion {
    /// The request's agents (those its headers went to).
    pub(crate) asked: Vec<String>,
    /// The status the client got.
    pub(crate) status: http::StatusCode,
    /// When the request started.
    pub(crate) start: Instant,
}

/// Streams one response body through the agents that take it.
pub(crate) struct ResponseInspector {
    pool: AgentPool,
    watchers: Vec<Watcher>,
    id: String,
    declared: Option<u64>,
    failure_mode: FailureMode,
    route: String,
    completion: Completion,
}

/// Why a response ended early.
enum Stop {
    /// An agent cut it off.
    Abort {
        /// The agent.
        agent: String,
        /// What it did.
        why: &'static str,
    },
    /// The client went away.
    ClientGone,
}

/// What the inspector's task feeds the client's body.
type Feed = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// The body the client gets: the frames the inspector lets through, in order; an error ends it
/// (an aborted response). Dropped with the client's connection, which the inspector notices.
struct Piped {
    frames: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl Body for Piped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.frames.poll_recv(cx)
    }
}

impl ResponseInspector {
    /// An inspector for request `id`'s response on `route`, for `agents` (those of the
    /// request's agents that take `ResponseBody`); `declared` is the upstream's
    /// `content-length`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pool: AgentPool,
        agents: Vec<String>,
        id: String,
        declared: Option<u64>,
        failure_mode: FailureMode,
        route: String,
        completion: Completion,
    ) -> Self {
        let watchers = agents
            .into_iter()
            .map(|name| {
                let limit = pool.capabilities(&name).and_then(|c| c.max_body_size);
                Watcher { name, limit, seen: 0, active: true }
            })
            .collect();
        Self { pool, watchers, id, declared, failure_mode, route, completion }
    }

    /// The body the client gets: `body`, chunk by chunk as the agents let it through, fed by a
    /// task of its own.
    pub(crate) fn pipe(self, body: ResponseBody) -> ResponseBody {
        let (feed, frames) = tokio::sync::mpsc::channel(1);
        tokio::spawn(self.run(body, feed));
        Piped { frames }.boxed()
    }

    async fn run(mut self, mut body: ResponseBody, client: Feed) {
        let mut index = 0u32;
        let mut sent = 0u64;
        let mut last_shown = false;
        let mut trailers = None;
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                () = client.closed() => return self.client_gone(sent),
            };
            let frame = match frame {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    tracing::warn!(route = %self.route, error = %e, "the upstream's response body broke off");
                    let _ = client.send(Err(e)).await;
                    return self.complete(sent);
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            };
            if data.is_empty() {
                continue;
            }
            let last = body.is_end_stream();
            match self.ask(index, last, data, &client).await {
                Ok(Some(data)) => {
                    sent += data.len() as u64;
                    if client.send(Ok(Frame::data(data))).await.is_err() {
                        return self.client_gone(sent);
                    }
                }
                Ok(None) => {}
                Err(stop) => return self.stop(&client, stop, sent).await,
            }
            last_shown = last;
            index = index.saturating_add(1);
        }
        if !last_shown && self.watchers.iter().any(|w| w.active) {
            // The end was learned after the last chunk went: an empty chunk marked last.
            match self.ask(index, true, Bytes::new(), &client).await {
                Ok(Some(data)) if !data.is_empty() => {
                    sent += data.len() as u64;
                    let _ = client.send(Ok(Frame::data(data))).await;
                }
                Ok(_) => {}
                Err(stop) => return self.stop(&client, stop, sent).await,
            }
        }
        if let Some(trailers) = trailers {
            let _ = client.send(Ok(Frame::trailers(trailers))).await;
        }
        drop(client);
        self.complete(sent);
    }

    /// Asks every active agent about one chunk; the bytes to forward (`None`: dropped), or why
    /// the response must be cut off.
    async fn ask(
        &mut self,
        index: u32,
        last: bool,
        mut data: Bytes,
        client: &Feed,
    ) -> Result<Option<Bytes>, Stop> {
        let (pool, id, declared) = (&self.pool, &self.id, self.declared);
        for w in self.watchers.iter_mut().filter(|w| w.active) {
            let over = w.limit.is_some_and(|limit| {
                declared.is_some_and(|d| d > limit) || w.seen + data.len() as u64 > limit
            });
            if over {
                stop_showing(&self.route, w, "over its max_body_size");
                continue;
            }
            w.seen += data.len() as u64;
            let chunk = BodyChunk {
                correlation_id: id.as_str().into(),
                index,
                last,
                total_size: declared,
                data: data.clone(),
            };
            let event = Event::ResponseBody(chunk);
            let answer = {
                let asked = pool.send(&w.name, &event);
                tokio::pin!(asked);
                tokio::select! {
                    answer = &mut asked => answer,
                    () = client.closed() => {
                        // Told before the pending call is dropped, so the agent learns why.
                        let _ = pool.cancel(&w.name, &id.as_str().into(), CancelReason::ClientDisconnected);
                        return Err(Stop::ClientGone);
                    }
                }
            };
            match answer {
                Ok(decision) if matches!(decision.action, Action::Allow) => {
                    note_ignored(&self.route, &w.name, &decision);
                    match decision.body {
                        Some(BodyMutation::Replace { chunk_index, data: new }) if chunk_index == index => {
                            data = new
                        }
                        Some(BodyMutation::Drop { chunk_index }) if chunk_index == index => return Ok(None),
                        _ => {}
                    }
                }
                Ok(_) => return Err(Stop::Abort { agent: w.name.clone(), why: "refused a response chunk" }),
                Err(PoolError::BodyTooLarge { .. }) => stop_showing(&self.route, w, "over its max_body_size"),
                Err(e) => {
                    metrics::counter!("gateway_agent_errors_total", "route" => self.route.clone(), "agent" => w.name.clone())
                        .increment(1);
                    tracing::warn!(route = %self.route, agent = %w.name, error = %e, "agent could not answer on the response body");
                    match self.failure_mode {
                        FailureMode::Closed => {
                            return Err(Stop::Abort {
                                agent: w.name.clone(),
                                why: "could not answer (failing closed)",
                            });
                        }
                        FailureMode::Open => stop_showing(&self.route, w, "unavailable, failing open"),
                    }
                }
            }
        }
        Ok(Some(data))
    }

    /// Ends a response an agent cut off (the client's body ends with an error), or whose
    /// client went away.
    async fn stop(self, client: &Feed, stop: Stop, sent: u64) {
        let Stop::Abort { agent, why } = stop else { return self.client_gone(sent) };
        metrics::counter!("gateway_response_aborted_total", "route" => self.route.clone(), "agent" => agent.clone())
            .increment(1);
        tracing::warn!(route = %self.route, agent = %agent, id = %self.id, "response aborted: the agent {why}");
        let _ = client.send(Err(format!("agent {agent} {why}").into())).await;
        self.complete(sent);
    }

    fn client_gone(self, sent: u64) {
        tracing::debug!(route = %self.route, id = %self.id, "the client went away during the response body");
        self.complete(sent);
    }

    fn complete(self, sent: u64) {
        let c = &self.completion;
        complete(&self.pool, &c.asked, &self.id, c.status, c.start.elapsed(), sent);
    }
}

fn stop_showing(route: &str, w: &mut Watcher, why: &str) {
    w.active = false;
    metrics::counter!("gateway_response_body_uninspected_total", "route" => route.to_owned(), "agent" => w.name.clone())
        .increment(1);
    tracing::debug!(route, agent = %w.name, why, "agent shown no more of this response body");
}

fn note_ignored(route: &str, agent: &str, decision: &Decision) {
    if !decision.request_headers.is_empty() || !decision.response_headers.is_empty() {
        tracing::debug!(route, agent, "header changes on a response chunk come too late: ignored");
    }
}

/// Tells the agents of `asked` that take it that request `id` is complete (which also ends its
/// correlation affinity), each on a task of its own.
pub(crate) fn complete(
    pool: &AgentPool,
    asked: &[impl AsRef<str>],
    id: &str,
    status: http::StatusCode,
    duration: Duration,
    response_bytes: u64,
) {
    for agent in asked {
        let agent = agent.as_ref();
        if pool.supports(agent, EventKind::RequestComplete) {
            let complete = pool_api::RequestComplete {
                correlation_id: id.into(),
                status,
                duration,
                request_bytes: 0,
                response_bytes,
            };
            let (pool, agent) = (pool.clone(), agent.to_owned());
            tokio::spawn(async move {
                let _ = pool.send(&agent, &Event::RequestComplete(complete)).await;
            });
        }
    }
}
