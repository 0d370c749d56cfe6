//! The gateway's own answers: small text responses, the response a refusing decision stands
//! for, and the header that says how the route's agents answered. Used by the request path,
//! the body inspector and the admin listener alike.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use httpserver_pool::{ResponseBody, full};
use pool_api::{Action, Decision};

/// The header that says what happened with a route's agents when one could not answer.
pub(crate) const AGENT_STATUS: HeaderName = HeaderName::from_static("x-agentpool-agent-status");

/// Sets the agent-status header to `notes`, one per agent that did not simply allow.
pub(crate) fn set_status_header(headers: &mut HeaderMap, notes: &[String]) {
    if let Ok(value) = HeaderValue::from_str(&notes.join("; ")) {
        headers.insert(AGENT_STATUS, value);
    }
}

/// The response a decision that does not allow stands for: the agent's block (status, headers,
/// body), a redirect, or a challenge (403 naming its kind); its response-header changes applied.
pub(crate) fn respond(decision: Decision) -> Response<ResponseBody> {
    let mut resp = match decision.action {
        Action::Allow => plain(StatusCode::OK, ""),
        Action::Block { status, headers, body } => {
            let mut resp = Response::new(full(body));
            *resp.status_mut() = status;
            resp.headers_mut().extend(headers);
            resp
        }
        Action::Redirect { location, status } => {
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = status;
            if let Ok(value) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, value);
            }
            resp
        }
        Action::Challenge { kind, .. } => {
            let mut resp = plain(StatusCode::FORBIDDEN, "a challenge is required\n");
            if let Ok(value) = HeaderValue::from_str(&kind) {
                resp.headers_mut().insert(HeaderName::from_static("x-agentpool-challenge"), value);
            }
            resp
        }
    };
    for op in &decision.response_headers {
        op.apply(resp.headers_mut());
    }
    resp
}

/// A small text response.
pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
