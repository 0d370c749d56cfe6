//! Entry points for the fuzz targets in `fuzz/` and the replay of their corpora
//! (`crates/fuzz-props`): thin wrappers over the gateway's private configuration parser and its
//! handling of request heads. Not an API: hidden from the docs, and free to change with them.

use std::net::SocketAddr;

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, Request};
use httpserver_pool::addr::{Host, ListenAddr};

use crate::config::GatewayConfig;
use crate::{proxy, ws};

/// What [`config`] made of a text.
#[derive(Debug)]
pub enum ConfigOutcome {
    /// Not a gateway configuration: the parser's message.
    Unparsed(String),
    /// Parsed; validation skipped because it would read files or ask the system resolver (a
    /// TLS section, a Docker host, or a bind address with a host name other than `localhost`).
    ParsedNotValidated,
    /// Parsed and validated: the problems found (empty when valid).
    Validated(Vec<String>),
}

/// Parses `text` as the gateway's configuration file does and, when that is done in memory
/// alone, validates it; a parsed configuration is also written back to TOML and parsed again,
/// and the result is `Err` when that does not give the same configuration.
pub fn config(text: &str) -> Result<ConfigOutcome, String> {
    let parsed = match GatewayConfig::from_toml(text) {
        Ok(parsed) => parsed,
        Err(e) => return Ok(ConfigOutcome::Unparsed(e.problems.join("\n"))),
    };
    if let Ok(again) = toml::to_string(&parsed) {
        match GatewayConfig::from_toml(&again) {
            Ok(back) if back == parsed => {}
            Ok(back) => return Err(format!("{parsed:?}\nwritten as\n{again}\nreads back as {back:?}")),
            Err(e) => return Err(format!("{parsed:?}\nwritten as\n{again}\ndoes not parse: {e}")),
        }
    }
    let offline = parsed.listeners.iter().all(|l| l.tls.is_none() && offline_bind(&l.bind))
        && offline_bind(&parsed.admin.bind)
        && parsed.agents.iter().all(|a| a.tls.is_none())
        && parsed.upstreams.iter().all(|u| u.tls.is_none())
        && parsed.docker_hosts.is_empty();
    if !offline {
        return Ok(ConfigOutcome::ParsedNotValidated);
    }
    Ok(ConfigOutcome::Validated(parsed.validate().err().map(|e| e.problems).unwrap_or_default()))
}

/// A bind address whose check needs no resolver: one that does not parse, or names an IP
/// address, `localhost` or no host.
fn offline_bind(bind: &str) -> bool {
    match bind.parse::<ListenAddr>() {
        Ok(addr) => !matches!(addr.host, Host::Name(name) if name != "localhost"),
        Err(_) => true,
    }
}

/// What the gateway makes of one request's head.
#[derive(Debug)]
pub struct Head {
    /// The host routes are matched against (the URI's, else the `Host` header's; lower case).
    pub host: Option<String>,
    /// The path it is routed on and sent on with (normalized), or `None` if it is refused
    /// (400: an escaped slash, a malformed escape, a missing, doubled or malformed `Host`).
    pub path: Option<String>,
    /// The index of the first route (`(host, path prefix)`) that takes the request (none for
    /// a refused one).
    pub route: Option<usize>,
    /// The protocol the request asks to upgrade to.
    pub upgrade: Option<HeaderValue>,
    /// The headers as they would go upstream.
    pub upstream: HeaderMap,
}

/// Routes `req` among `routes` (each a lower-case host or any, and a path prefix) as the proxy
/// does, and prepares its headers for the upstream as the proxy does for a client at `client`
/// (`Host` made the target's authority when the target has one, then hop-by-hop headers out).
pub fn request_head<B>(
    routes: &[(Option<String>, String)],
    req: &Request<B>,
    client: Option<SocketAddr>,
) -> Head {
    let host = proxy::request_host(req);
    let path = match proxy::check_host(req) {
        Ok(()) => crate::path::normalize(req.uri().path()).ok().map(|p| p.into_owned()),
        Err(_) => None,
    };
    let route = path.as_deref().and_then(|path| {
        routes
            .iter()
            .position(|(h, prefix)| proxy::route_matches(h.as_deref(), prefix, host.as_deref(), path))
    });
    let upgrade = proxy::upgrade_protocol(req.headers());
    let mut target = Request::new(());
    *target.uri_mut() = req.uri().clone();
    *target.headers_mut() = req.headers().clone();
    proxy::host_from_target(&mut target);
    let mut upstream = std::mem::take(target.headers_mut());
    proxy::upstream_headers(&mut upstream, upgrade.as_ref(), client);
    Head { host, path, route, upgrade, upstream }
}

/// The normalized form of a path (the gateway routes on it and sends it on), or `None` if the
/// gateway refuses it.
pub fn normalize_path(path: &str) -> Option<String> {
    crate::path::normalize(path).ok().map(|p| p.into_owned())
}

/// Whether a path is taken by a route with this prefix (whole segments only).
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    proxy::path_has_prefix(path, prefix)
}

/// One WebSocket frame as the relay parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    /// Ends a message.
    pub fin: bool,
    /// The opcode.
    pub opcode: u8,
    /// The masking key, when masked.
    pub mask: Option<[u8; 4]>,
    /// The payload, unmasked.
    pub payload: bytes::Bytes,
}

/// Parses one frame off the front of `buf` with the relay's limit `max`: `Ok(None)` until it is
/// all there, `Err` with the close code the relay would send.
pub fn websocket_frame(buf: &mut BytesMut, max: u64) -> Result<Option<WsFrame>, u16> {
    match ws::parse(buf, max) {
        Ok(frame) => {
            Ok(frame.map(|f| WsFrame { fin: f.fin, opcode: f.opcode, mask: f.mask, payload: f.payload }))
        }
        Err(e) => Err(e.code()),
    }
}

/// A frame encoded as the relay writes it.
pub fn websocket_encode(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    ws::encode(fin, opcode, payload, mask)
}
