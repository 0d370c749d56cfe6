//! The gateway's own answers: small text responses, the response a refusing decision stands
//! for, and the header that says how the route's agents answered. Used by the request path,
//! the body inspector and the admin listener alike. Each carries [`Own`], so that the answer
//! to a gRPC request can be given the way a gRPC client reads it ([`as_grpc`]).

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

/// Marks a response the gateway made itself (not the upstream's), with its text.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Own(pub &'static str);

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
    resp.extensions_mut().get_or_insert(Own(""));
    resp
}

/// A small text response.
pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp.extensions_mut().insert(Own(text));
    resp
}

/// True for a gRPC call (`content-type: application/grpc`, `application/grpc+proto`…; not
/// gRPC-Web).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.strip_prefix(b"application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
    })
}

/// The gRPC status code for an HTTP status, as gRPC's HTTP-to-gRPC table maps the ones it
/// names (400 INTERNAL, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED, 429,
/// 502, 503, 504 UNAVAILABLE), plus 413 RESOURCE_EXHAUSTED and 501 UNIMPLEMENTED; UNKNOWN
/// otherwise.
pub(crate) fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 | 501 => 12,
        413 => 8,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// `grpc-message`'s escaping: bytes outside printable ASCII, and `%`, percent-encoded.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// A gRPC client reads a call's outcome from `grpc-status`, not from the HTTP status: the
/// gateway's own answer ([`Own`]) to a gRPC call becomes a "trailers-only" gRPC response —
/// HTTP 200, `content-type: application/grpc`, `grpc-status` ([`grpc_code`]) and
/// `grpc-message` (the answer's text, or the status's reason) in the head, no body; its other
/// headers (the agents' status header, `Retry-After`…) are kept. The upstream's responses pass
/// as they are.
pub(crate) fn as_grpc(resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let Some(Own(text)) = resp.extensions().get::<Own>().copied() else { return resp };
    let (mut parts, _) = resp.into_parts();
    let text = text.trim();
    let message = if text.is_empty() { parts.status.canonical_reason().unwrap_or("") } else { text };
    let code = grpc_code(parts.status);
    parts.status = StatusCode::OK;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    parts.headers.insert(HeaderName::from_static("grpc-status"), HeaderValue::from(u16::from(code)));
    let encoded = percent_encoding::utf8_percent_encode(message, GRPC_MESSAGE).to_string();
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        parts.headers.insert(HeaderName::from_static("grpc-message"), value);
    }
    Response::from_parts(parts, full(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_calls_are_told_by_their_content_type() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grpc-web+proto"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn the_gateways_own_answers_become_trailers_only_grpc_responses() {
        let mut busy = plain(StatusCode::SERVICE_UNAVAILABLE, "every connection is busy; try again\n");
        busy.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        let resp = as_grpc(busy);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()["grpc-message"], "every connection is busy; try again");
        assert_eq!(resp.headers()["retry-after"], "1");
        assert!(hyper::body::Body::is_end_stream(resp.body()));

        // An agent's block: its status's reason as the message; `%` and non-ASCII escaped.
        let blocked = as_grpc(respond(Decision::block(StatusCode::FORBIDDEN)));
        assert_eq!(
            (blocked.headers()["grpc-status"].as_bytes(), blocked.headers()["grpc-message"].as_bytes()),
            (&b"7"[..], &b"Forbidden"[..])
        );
        let odd = as_grpc(plain(StatusCode::from_u16(418).unwrap(), "100% caf\u{e9}"));
        assert_eq!(
            (odd.headers()["grpc-status"].as_bytes(), odd.headers()["grpc-message"].as_bytes()),
            (&b"2"[..], &b"100%25 caf%C3%A9"[..])
        );

        // Not the gateway's own: untouched.
        let upstream = Response::new(full(Bytes::from_static(b"x")));
        assert_eq!(as_grpc(upstream).headers().get("grpc-status"), None);
    }
}
