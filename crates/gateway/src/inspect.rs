//! Request bodies through the agents that take them: chunk by chunk, as the client sends them,
//! each chunk asked of every such agent (on the connection that saw the request's headers:
//! correlation affinity) before it goes on to the upstream. Nothing is buffered beyond the
//! chunk in hand and the one read ahead to know which chunk is the last.
//!
//! An agent may replace or drop a chunk ([`BodyMutation`]), or refuse the request; a body over
//! the smallest `max_body_size` of those agents is refused with 413 — at once when the
//! `content-length` says so, else when the running total passes it. A refusal aborts the body
//! the upstream is reading, and the refusal is the answer to the client.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use http_body_util::channel::Sender;
use httpserver_pool::{BoxError, RequestBody, ResponseBody};
use pool_api::{Action, BodyChunk, BodyMutation, Event};
use pool_core::{AgentPool, FailureMode};

use crate::reply::{plain, respond};

/// How a body's inspection ended.
pub(crate) enum Inspection {
    /// Every chunk went on (the string lists agents skipped by fail-open, if any).
    Passed(Vec<String>),
    /// The answer to the client instead of the upstream's: an agent's refusal, 413, or 503 for
    /// an agent that could not answer on a fail-closed route.
    Refused(http::Response<ResponseBody>),
    /// The client's body broke off; the upstream's request was aborted with it.
    ClientGone,
}

/// What the inspection of one request needs.
pub(crate) struct Inspector {
    pub(crate) pool: AgentPool,
    pub(crate) agents: Vec<String>,
    pub(crate) id: String,
    pub(crate) limit: Option<u64>,
    pub(crate) declared: Option<u64>,
    pub(crate) failure_mode: FailureMode,
    pub(crate) route: String,
}

/// The 413 answer.
pub(crate) fn too_large() -> http::Response<ResponseBody> {
    plain(StatusCode::PAYLOAD_TOO_LARGE, "the request body is larger than an agent on this route accepts\n")
}

impl Inspector {
    /// Reads `body`, asks the agents about each chunk, and feeds what they allow to `upstream`.
    pub(crate) async fn run(
        self,
        mut body: RequestBody,
        mut upstream: Sender<Bytes, BoxError>,
    ) -> Inspection {
        let mut index = 0u32;
        let mut total = 0u64;
        let mut skipped = Vec::new();
        let mut ahead: Option<Bytes> = None;
        loop {
            let frame = match body.frame().await {
                None => None,
                Some(Ok(frame)) => Some(frame),
                Some(Err(e)) => {
                    upstream.abort(format!("the client's body broke off: {e}").into());
                    return Inspection::ClientGone;
                }
            };
            let (next, trailers) = match frame {
                None => (None, None),
                Some(frame) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => (Some(data), None),
                    Err(frame) => (None, frame.into_trailers().ok()),
                },
            };
            let at_end = next.is_none();
            if let Some(data) = &next {
                total += data.len() as u64;
                if self.limit.is_some_and(|limit| total > limit) {
                    upstream.abort("the request body is over the agents' limit".into());
                    return Inspection::Refused(too_large());
                }
            }
            // The chunk read before this one goes now: we know whether it was the last.
            if let Some(data) = ahead.take() {
                match self.ask(index, at_end, data, &mut skipped).await {
                    Ok(Some(data)) => {
                        if upstream.send_data(data).await.is_err() {
                            // The upstream stopped reading (it answered early): nothing more to send.
                            return Inspection::Passed(skipped);
                        }
                    }
                    Ok(None) => {}
                    Err(answer) => {
                        upstream.abort("an agent refused the request body".into());
                        return Inspection::Refused(answer);
                    }
                }
                index += 1;
            }
            if at_end {
                if let Some(trailers) = trailers {
                    let _ = upstream.send_trailers(trailers).await;
                }
                return Inspection::Passed(skipped);
            }
            ahead = next;
        }
    }

    /// Asks every agent about one chunk; the bytes to forward (`None`: dropped), or the answer
    /// that ends the request.
    async fn ask(
        &self,
        index: u32,
        last: bool,
        mut data: Bytes,
        skipped: &mut Vec<String>,
    ) -> Result<Option<Bytes>, http::Response<ResponseBody>> {
        for agent in &self.agents {
            let chunk = BodyChunk {
                correlation_id: self.id.as_str().into(),
                index,
                last,
                total_size: self.declared,
                data: data.clone(),
            };
            match self.pool.send(agent, &Event::RequestBody(chunk)).await {
                Ok(decision) if matches!(decision.action, Action::Allow) => match decision.body {
                    Some(BodyMutation::Replace { chunk_index, data: new }) if chunk_index == index => {
                        data = new
                    }
                    Some(BodyMutation::Drop { chunk_index }) if chunk_index == index => return Ok(None),
                    _ => {}
                },
                Ok(decision) => return Err(respond(decision)),
                Err(pool_core::PoolError::BodyTooLarge { .. }) => return Err(too_large()),
                Err(e) => {
                    metrics::counter!("gateway_agent_errors_total", "route" => self.route.clone(), "agent" => agent.clone())
                        .increment(1);
                    tracing::warn!(route = %self.route, agent = %agent, error = %e, "agent could not answer on the body");
                    match self.failure_mode {
                        FailureMode::Closed => {
                            let mut resp = plain(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "an agent this route needs is unavailable\n",
                            );
                            crate::reply::set_status_header(
                                resp.headers_mut(),
                                &[format!("{agent}: unavailable, failing closed")],
                            );
                            return Err(resp);
                        }
                        FailureMode::Open => skipped.push(format!("{agent}: unavailable, failing open")),
                    }
                }
            }
        }
        Ok(Some(data))
    }
}
