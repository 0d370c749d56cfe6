//! The gateway's handling of request heads and WebSocket frames.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BytesMut;
use http::{HeaderName, Request, header};

/// The hop-by-hop headers RFC 9110 names (besides those a `Connection` header names).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// The gateway's routing and upstream headers. The input is lines: the first picks the client
/// address (its first byte) and lists the routes (`host prefix` pairs after it, separated by
/// `;`, `*` for any host); the second is the request target; every further line a header
/// (`name: value`).
///
/// Checks: the path routed on is normalized (no empty, `.` or `..` segment, no escaped
/// unreserved character, the same when normalized again) or the request is refused; the route
/// taken is the first whose host is the request's (the URI's, else the `Host` header's, in
/// lower case) and whose prefix is a run of whole leading segments of that path;
/// upstream, no hop-by-hop header and none the `Connection` header names (but `Host`) is left but
/// an upgrade's own `Connection: upgrade` and `Upgrade`; `Host` is the target's authority
/// (without user information) when the target has one, so the upstream sees the host that
/// chose the route; every other header is kept as it came; `X-Forwarded-For` ends with the
/// client's address.
pub fn gateway_head(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let (Some(first), Some(target)) = (lines.next(), lines.next()) else { return };
    let client = match first.first().map(|b| b % 3) {
        Some(0) => None,
        Some(1) => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, first[0])), 40000)),
        _ => Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 40000)),
    };
    let routes: Vec<(Option<String>, String)> = String::from_utf8_lossy(first.get(1..).unwrap_or_default())
        .split(';')
        .filter_map(|r| {
            let (host, prefix) = r.trim().split_once(' ')?;
            Some(((host != "*").then(|| host.to_ascii_lowercase()), prefix.to_owned()))
        })
        .collect();
    let mut req = Request::builder();
    match http::Uri::try_from(target) {
        Ok(uri) => req = req.uri(uri),
        Err(_) => return,
    }
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), http::HeaderValue::from_bytes(value)) {
            req = req.header(name, value);
        }
    }
    let Ok(req) = req.body(()) else { return };
    let head = gateway::fuzz::request_head(&routes, &req, client);

    // The path routed on: normalized (no empty, `.` or `..` segment, no escaped unreserved
    // character or slash, a fixed point), or the request refused.
    let Some(path) = head.path.as_deref() else {
        assert_eq!(head.route, None, "a refused path takes no route");
        return;
    };
    if req.uri().path().starts_with('/') {
        assert!(path.starts_with('/'), "{path:?}");
        let inner = path.strip_suffix('/').unwrap_or(path);
        for segment in inner.split('/').skip(1) {
            assert!(!["", ".", ".."].contains(&segment), "{segment:?} left in {path:?}");
        }
        let upper = path.to_ascii_uppercase();
        for escaped in ["%2F", "%5C", "%2E", "%41", "%7E", "%5F", "%2D", "%30"] {
            assert!(!upper.contains(escaped), "{escaped} left in {path:?}");
        }
        assert_eq!(gateway::fuzz::normalize_path(path).as_deref(), Some(path), "normalized twice");
    } else {
        assert_eq!(path, req.uri().path(), "not a path of segments: left alone");
    }
    let takes = |(host, prefix): &(Option<String>, String)| {
        host.as_ref().is_none_or(|h| head.host.as_ref() == Some(h))
            && gateway::fuzz::path_has_prefix(path, prefix)
    };
    assert_eq!(head.route, routes.iter().position(takes));
    if let Some(host) = &head.host {
        assert_eq!(*host, host.to_ascii_lowercase());
        assert!(!host.ends_with('.') || host == ".", "{host:?}: routed with its trailing dot");
    }
    for (_, prefix) in &routes {
        if gateway::fuzz::path_has_prefix(path, prefix) && prefix != "/" {
            let want: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
            let have: Vec<&str> = path.split('/').collect();
            assert!(have.starts_with(&want), "{prefix:?} taken as a prefix of {path:?}");
        }
    }

    let named: Vec<HeaderName> = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| *n != header::HOST)
        .collect();
    let target_host = req.uri().authority().map(|a| a.as_str().rsplit('@').next().unwrap_or_default());
    if let Some(target) = target_host
        && http::HeaderValue::from_str(target).is_ok()
    {
        assert_eq!(
            head.upstream.get_all(header::HOST).iter().map(|v| v.as_bytes()).collect::<Vec<_>>(),
            [target.as_bytes()]
        );
        if let (Some(route_host), Some(h)) = (&head.host, req.uri().host()) {
            assert_eq!(*route_host, h.to_ascii_lowercase(), "routed on the target's host");
        }
    }
    let forwarded_for = HeaderName::from_static("x-forwarded-for");
    let upgrading =
        |name: &HeaderName| head.upgrade.is_some() && (name == header::CONNECTION || name == header::UPGRADE);
    for name in head.upstream.keys() {
        let hop = HOP_BY_HOP.contains(&name.as_str()) || named.contains(name);
        assert!(!hop || upgrading(name) || (*name == forwarded_for && client.is_some()), "{name} forwarded");
    }
    if let Some(protocol) = &head.upgrade {
        assert_eq!(head.upstream.get(header::CONNECTION).map(|v| v.as_bytes()), Some(&b"upgrade"[..]));
        assert_eq!(head.upstream.get(header::UPGRADE), Some(protocol));
    }
    for name in req.headers().keys() {
        let dropped = HOP_BY_HOP.contains(&name.as_str()) || named.contains(name);
        if !dropped && *name != forwarded_for && !(target_host.is_some() && *name == header::HOST) {
            let sent: Vec<_> = req.headers().get_all(name).iter().collect();
            let kept: Vec<_> = head.upstream.get_all(name).iter().collect();
            assert_eq!(sent, kept, "{name} changed on its way upstream");
        }
    }
    if let Some(client) = client {
        let value = head.upstream.get(&forwarded_for).expect("X-Forwarded-For set");
        let last = value.to_str().expect("visible ASCII").rsplit(',').next().expect("one entry").trim();
        assert_eq!(last, client.ip().to_string());
    }
}

/// The gateway's WebSocket frame parser. The first byte picks the frame limit (among the
/// smallest, a control frame's 125 bytes, the default 1 MiB and the largest a route may
/// configure), the second the size of the pieces the stream arrives in; the rest is the stream.
///
/// Checks: the buffer never grows past what the frame limit allows (a frame still arriving gets
/// room for at most itself, and for no more than 64 KiB beyond the bytes already read; the
/// buffer's allocation may double, as any buffer grows); a parsed frame takes exactly its bytes off the
/// buffer and encodes back to a frame that parses to itself.
pub fn gateway_ws(data: &[u8]) {
    let [limit, piece, stream @ ..] = data else { return };
    let max = [1, 125, 126, 65_536, 1 << 20, u64::MAX >> 1][usize::from(limit % 6)];
    let piece = usize::from(*piece).max(1);
    let mut buf = BytesMut::new();
    // Bytes taken off the buffer's front so far: its allocation still holds them.
    let mut taken_total = 0;
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let (len_before, cap_before) = (buf.len(), buf.capacity());
            let parsed = gateway::fuzz::websocket_frame(&mut buf, max);
            // At most double the whole allocation, plus 64 KiB beyond the bytes read.
            let bound = 2 * (cap_before + taken_total) + len_before + 64 * 1024;
            assert!(buf.capacity() <= bound, "grew from {cap_before} to {} (limit {max})", buf.capacity());
            match parsed {
                Ok(Some(frame)) => {
                    let header = 2 + if frame.payload.len() > 125 {
                        if frame.payload.len() > 65_535 { 8 } else { 2 }
                    } else {
                        0
                    };
                    let taken = len_before - buf.len();
                    taken_total += taken;
                    assert!(taken >= header + frame.payload.len() + if frame.mask.is_some() { 4 } else { 0 });
                    assert!(frame.payload.len() as u64 <= max);
                    let encoded =
                        gateway::fuzz::websocket_encode(frame.fin, frame.opcode, &frame.payload, frame.mask);
                    let again = gateway::fuzz::websocket_frame(&mut BytesMut::from(&encoded[..]), max);
                    assert_eq!(again, Ok(Some(frame)));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}
