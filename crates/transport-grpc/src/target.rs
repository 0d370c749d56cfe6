//! The endpoints this transport dials, parsed without any I/O.

use std::path::PathBuf;

use pool_api::{Endpoint, TransportError};

/// The longest socket path a Unix socket address holds (`sun_path` is 108 bytes, one of them
/// the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where a gRPC endpoint points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrpcTarget {
    /// `grpc://host:port`: HTTP/2 in clear text over TCP (h2c, prior knowledge).
    Plain {
        /// `host:port`, as written (`[v6]:port` for IPv6).
        authority: http::uri::Authority,
    },
    /// `grpcs://host:port`: HTTP/2 over TLS (ALPN `h2`).
    Tls {
        /// `host:port`, as written.
        authority: http::uri::Authority,
    },
    /// `grpc+unix:/absolute/path` (or `grpc+unix:///absolute/path`): HTTP/2 in clear text
    /// over a Unix socket.
    Unix {
        /// The socket file.
        path: PathBuf,
    },
}

impl GrpcTarget {
    /// Parses `endpoint`. Anything but the three forms of [`GrpcTarget`] is a
    /// [`TransportError::InvalidEndpoint`] naming the endpoint and saying what is wrong: another
    /// scheme or none, a missing host or port, a port of 0 or over 65535, a path, query or
    /// user info after the authority, a relative, empty or over-long socket path.
    pub fn parse(endpoint: &Endpoint) -> Result<Self, TransportError> {
        let s = endpoint.as_str();
        let invalid = |message: String| TransportError::InvalidEndpoint { endpoint: s.to_owned(), message };
        if let Some(rest) = s.strip_prefix("grpc+unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(invalid("a grpc+unix endpoint needs an absolute socket path".into()));
            }
            if path.ends_with('/') {
                return Err(invalid("the socket path names a directory".into()));
            }
            if path.contains('\0') {
                return Err(invalid("the socket path contains a NUL byte".into()));
            }
            if path.len() > MAX_SOCKET_PATH {
                return Err(invalid(format!(
                    "the socket path is {} bytes long; a Unix socket address holds {MAX_SOCKET_PATH}",
                    path.len()
                )));
            }
            return Ok(Self::Unix { path: PathBuf::from(path) });
        }
        let (tls, rest) = if let Some(rest) = s.strip_prefix("grpc://") {
            (false, rest)
        } else if let Some(rest) = s.strip_prefix("grpcs://") {
            (true, rest)
        } else {
            return Err(invalid(match s.split_once(':') {
                Some((scheme, _)) if !scheme.is_empty() => format!(
                    "unknown scheme {scheme:?}: this transport serves grpc://host:port, \
                     grpcs://host:port and grpc+unix:/absolute/path"
                ),
                _ => "no scheme: this transport serves grpc://host:port, grpcs://host:port and \
                      grpc+unix:/absolute/path"
                    .into(),
            }));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(invalid("only host:port may follow the scheme (no path, query or user)".into()));
        }
        let authority: http::uri::Authority =
            rest.parse().map_err(|e| invalid(format!("not a host:port: {e}")))?;
        if authority.host().is_empty() {
            return Err(invalid("the host is missing".into()));
        }
        match authority.port_u16() {
            None if authority
                .as_str()
                .rsplit_once(':')
                .is_some_and(|(_, p)| !p.is_empty() && !p.contains(']')) =>
            {
                return Err(invalid("the port is not a number from 1 to 65535".into()));
            }
            None => return Err(invalid("the port is missing".into())),
            Some(0) => return Err(invalid("port 0 cannot be dialled".into())),
            Some(_) => {}
        }
        Ok(if tls { Self::Tls { authority } } else { Self::Plain { authority } })
    }

    /// The host to dial and to name in TLS, without IPv6 brackets.
    pub(crate) fn host(&self) -> Option<&str> {
        match self {
            Self::Plain { authority } | Self::Tls { authority } => {
                let host = authority.host();
                Some(host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host))
            }
            Self::Unix { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<GrpcTarget, String> {
        GrpcTarget::parse(&Endpoint::from(s)).map_err(|e| match e {
            TransportError::InvalidEndpoint { endpoint, message } => {
                assert_eq!(endpoint, s, "the error names the endpoint");
                message
            }
            other => panic!("{s}: {other:?}"),
        })
    }

    #[test]
    fn the_three_forms_parse() {
        assert!(matches!(parse("grpc://127.0.0.1:50051"), Ok(GrpcTarget::Plain { .. })));
        assert!(matches!(parse("grpc://agent.internal:7/"), Ok(GrpcTarget::Plain { .. })));
        assert!(matches!(parse("grpcs://[::1]:443"), Ok(GrpcTarget::Tls { .. })));
        assert_eq!(parse("grpc+unix:/run/waf.sock"), Ok(GrpcTarget::Unix { path: "/run/waf.sock".into() }));
        assert_eq!(parse("grpc+unix:///run/waf.sock"), Ok(GrpcTarget::Unix { path: "/run/waf.sock".into() }));
        assert_eq!(GrpcTarget::parse(&"grpcs://[::1]:443".into()).unwrap().host(), Some("::1"));
    }

    #[test]
    fn bare_host_port_and_other_schemes_are_refused_with_the_reason() {
        for (bad, why) in [
            ("127.0.0.1:50051", "unknown scheme"),
            ("agent:50051", "unknown scheme"),
            ("", "no scheme"),
            ("http://agent:80", "unknown scheme"),
            ("unix:/run/waf.sock", "unknown scheme"),
            ("grpc://agent", "port is missing"),
            ("grpc://agent:0", "port 0"),
            ("grpc://agent:70000", "1 to 65535"),
            ("grpc://:50051", "host is missing"),
            ("grpc://agent:1/path", "only host:port"),
            ("grpc://user@agent:1", "only host:port"),
            ("grpc+unix:run/waf.sock", "absolute"),
            ("grpc+unix:/run/", "directory"),
        ] {
            let message = parse(bad).expect_err(bad);
            assert!(message.contains(why), "{bad}: {message}");
        }
        let long = format!("grpc+unix:/{}", "a".repeat(MAX_SOCKET_PATH));
        assert!(parse(&long).expect_err("long").contains("bytes long"));
    }
}
