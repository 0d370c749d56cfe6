//! Where a Docker engine is: a typed Docker host, parsed once.
//!
//! | Written as | Meaning |
//! |---|---|
//! | `unix:///var/run/docker.sock` | the engine's local socket (absolute path) |
//! | `tcp://host:port` (or `http://host:port`) | plain HTTP; the port defaults to 2375 |
//! | `https://host:port` | TLS to the engine (certificate paths are given separately); the port defaults to 2376 |
//! | `agent://host:port` | a docker-agent, reached over mutual TLS; the port is required |
//!
//! Hosts are DNS names, IPv4 addresses or bracketed IPv6 addresses (`tcp://[::1]:2375`).
//! Anything else is refused with a [`DockerHostError`] that quotes the input and says what is
//! wrong: `ssh://` (run an agent on that machine instead), an unknown scheme, a missing or empty
//! host, a missing (for `agent://`), zero or out-of-range port, user info, a path, query or
//! fragment after the address, a relative socket path. [`Display`](fmt::Display) writes the
//! canonical form (scheme in lower case, port always present), which parses back to the same
//! value.
//!
//! ```
//! use docker_agent::host::DockerHost;
//!
//! let host: DockerHost = "agent://10.0.0.7:8890".parse()?;
//! assert_eq!(host.address().as_deref(), Some("10.0.0.7:8890"));
//! assert_eq!(host.to_string(), "agent://10.0.0.7:8890");
//! assert_eq!("tcp://docker".parse::<DockerHost>()?.to_string(), "tcp://docker:2375");
//!
//! let err = "ssh://me@box".parse::<DockerHost>().unwrap_err();
//! assert!(err.to_string().contains("\"ssh://me@box\""));
//! # Ok::<(), docker_agent::host::DockerHostError>(())
//! ```

use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The default port of `tcp://` (and `http://`) hosts.
pub const DEFAULT_TCP_PORT: u16 = 2375;
/// The default port of `https://` hosts.
pub const DEFAULT_TLS_PORT: u16 = 2376;

/// A Docker engine's address; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DockerHost {
    /// The engine's local Unix socket.
    Unix(PathBuf),
    /// Plain HTTP over TCP.
    Tcp(HostPort),
    /// HTTPS to the engine itself (certificate paths are configured separately).
    Https(HostPort),
    /// A docker-agent, over mutual TLS.
    Agent(HostPort),
}

/// A host (DNS name, IPv4 or IPv6 address) and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    host: String,
    port: u16,
}

impl HostPort {
    /// The host, without brackets for IPv6.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl DockerHost {
    /// The scheme as written in the canonical form: `unix`, `tcp`, `https` or `agent`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Unix(_) => "unix",
            Self::Tcp(_) => "tcp",
            Self::Https(_) => "https",
            Self::Agent(_) => "agent",
        }
    }

    /// `host:port` for network hosts (IPv6 in brackets); `None` for a Unix socket.
    pub fn address(&self) -> Option<String> {
        self.host_port().map(HostPort::to_string)
    }

    /// The host and port of a network host.
    pub fn host_port(&self) -> Option<&HostPort> {
        match self {
            Self::Unix(_) => None,
            Self::Tcp(hp) | Self::Https(hp) | Self::Agent(hp) => Some(hp),
        }
    }

    /// The socket path of a Unix host.
    pub fn socket_path(&self) -> Option<&Path> {
        match self {
            Self::Unix(path) => Some(path),
            _ => None,
        }
    }

    /// True for `agent://` hosts.
    pub fn is_agent(&self) -> bool {
        matches!(self, Self::Agent(_))
    }
}

impl fmt::Display for DockerHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(hp) | Self::Https(hp) | Self::Agent(hp) => write!(f, "{}://{hp}", self.scheme()),
        }
    }
}

/// A Docker host that could not be parsed: the input, quoted, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid Docker host {input:?}: {kind}")]
pub struct DockerHostError {
    /// The text given.
    pub input: String,
    /// What is wrong.
    pub kind: DockerHostErrorKind,
}

/// What is wrong with a Docker host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DockerHostErrorKind {
    /// Nothing (or only white space) was given.
    #[error("it is empty")]
    Empty,
    /// No `scheme://`.
    #[error("no scheme: write unix:///path, tcp://host:port, https://host:port or agent://host:port")]
    MissingScheme,
    /// `ssh://` hosts are not supported.
    #[error("ssh:// is not supported: run a docker-agent on that machine and use agent://host:port")]
    Ssh,
    /// A scheme other than the supported ones.
    #[error("unsupported scheme {0:?}: use unix, tcp, http, https or agent")]
    UnsupportedScheme(String),
    /// `unix://` with a relative or empty path.
    #[error("the socket path must be absolute, as in unix:///var/run/docker.sock")]
    RelativeSocketPath,
    /// A NUL byte in the socket path.
    #[error("the socket path contains a NUL byte")]
    NulInSocketPath,
    /// No host before the port.
    #[error("the host is empty")]
    EmptyHost,
    /// A host that is not a DNS name, an IPv4 address or a bracketed IPv6 address.
    #[error("{0:?} is not a valid host name or address")]
    InvalidHost(String),
    /// The scheme requires a port and none was given.
    #[error("a port is required, as in {scheme}://host:port")]
    MissingPort {
        /// The scheme.
        scheme: &'static str,
    },
    /// The port is not a number from 1 to 65535.
    #[error("port {0:?} is not a number from 1 to 65535")]
    InvalidPort(String),
    /// `user@` before the host.
    #[error("user information (\"...@\") is not supported")]
    UserInfo,
    /// Something after `host:port`.
    #[error("unexpected {0:?} after host:port (no path, query or fragment is allowed)")]
    TrailingPath(String),
}

impl FromStr for DockerHost {
    type Err = DockerHostError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse(input).map_err(|kind| DockerHostError { input: input.to_owned(), kind })
    }
}

impl TryFrom<&str> for DockerHost {
    type Error = DockerHostError;

    fn try_from(input: &str) -> Result<Self, Self::Error> {
        input.parse()
    }
}

fn parse(input: &str) -> Result<DockerHost, DockerHostErrorKind> {
    use DockerHostErrorKind as E;
    if input.trim().is_empty() {
        return Err(E::Empty);
    }
    let (scheme, rest) = input.split_once("://").ok_or(E::MissingScheme)?;
    match scheme.to_ascii_lowercase().as_str() {
        "unix" => {
            if !rest.starts_with('/') {
                return Err(E::RelativeSocketPath);
            }
            if rest.contains('\0') {
                return Err(E::NulInSocketPath);
            }
            Ok(DockerHost::Unix(PathBuf::from(rest)))
        }
        "tcp" | "http" => Ok(DockerHost::Tcp(host_port(rest, Some(DEFAULT_TCP_PORT), "tcp")?)),
        "https" => Ok(DockerHost::Https(host_port(rest, Some(DEFAULT_TLS_PORT), "https")?)),
        "agent" => Ok(DockerHost::Agent(host_port(rest, None, "agent")?)),
        "ssh" => Err(E::Ssh),
        _ => Err(E::UnsupportedScheme(scheme.to_owned())),
    }
}

fn host_port(
    rest: &str,
    default_port: Option<u16>,
    scheme: &'static str,
) -> Result<HostPort, DockerHostErrorKind> {
    use DockerHostErrorKind as E;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, trailing) = rest.split_at(end);
    if authority.contains('@') {
        return Err(E::UserInfo);
    }
    if !trailing.is_empty() {
        return Err(E::TrailingPath(trailing.to_owned()));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (v6, after) = bracketed.split_once(']').ok_or_else(|| E::InvalidHost(authority.to_owned()))?;
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(E::InvalidHost(v6.to_owned()));
        }
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| E::InvalidHost(authority.to_owned()))?),
        };
        (v6, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(E::EmptyHost);
    }
    if !authority.starts_with('[') && !valid_dns_or_ipv4(host) {
        return Err(E::InvalidHost(host.to_owned()));
    }
    let port = match port {
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => port,
            _ => return Err(E::InvalidPort(text.to_owned())),
        },
        None => default_port.ok_or(E::MissingPort { scheme })?,
    };
    Ok(HostPort { host: host.to_owned(), port })
}

/// A DNS name (labels of letters, digits, `-` and `_`, not starting or ending with `-`, at most
/// 63 bytes each, 253 in all) or a dotted IPv4 address (which is such a name too).
fn valid_dns_or_ipv4(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn kind(input: &str) -> DockerHostErrorKind {
        let err = input.parse::<DockerHost>().unwrap_err();
        assert_eq!(err.input, input);
        assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        err.kind
    }

    #[test]
    fn parses_every_supported_form() {
        assert_eq!(
            "unix:///var/run/docker.sock".parse::<DockerHost>().unwrap(),
            DockerHost::Unix(PathBuf::from("/var/run/docker.sock"))
        );
        let tcp: DockerHost = "tcp://127.0.0.1:2375".parse().unwrap();
        assert_eq!(tcp.address().as_deref(), Some("127.0.0.1:2375"));
        assert_eq!(tcp.scheme(), "tcp");
        let http: DockerHost = "HTTP://docker.example:80".parse().unwrap();
        assert_eq!(http.to_string(), "tcp://docker.example:80");
        let https: DockerHost = "https://docker.example".parse().unwrap();
        assert_eq!(https, DockerHost::Https(HostPort { host: "docker.example".into(), port: 2376 }));
        let agent: DockerHost = "agent://[::1]:8890".parse().unwrap();
        assert!(agent.is_agent());
        assert_eq!(agent.host_port().unwrap().host(), "::1");
        assert_eq!(agent.host_port().unwrap().port(), 8890);
        assert_eq!(agent.to_string(), "agent://[::1]:8890");
        assert_eq!(agent.socket_path(), None);
        assert_eq!(
            DockerHost::try_from("agent://node_1.lan:1").unwrap().address().as_deref(),
            Some("node_1.lan:1")
        );
    }

    #[test]
    fn refuses_what_it_cannot_use_and_says_why() {
        use DockerHostErrorKind as E;
        assert_eq!(kind(""), E::Empty);
        assert_eq!(kind("  "), E::Empty);
        assert_eq!(kind("localhost:2375"), E::MissingScheme);
        assert_eq!(kind("/var/run/docker.sock"), E::MissingScheme);
        assert_eq!(kind("ssh://me@box"), E::Ssh);
        assert_eq!(kind("npipe:////./pipe/docker_engine"), E::UnsupportedScheme("npipe".into()));
        assert_eq!(kind("unix://var/run/docker.sock"), E::RelativeSocketPath);
        assert_eq!(kind("unix://"), E::RelativeSocketPath);
        assert_eq!(kind("unix:///a\0b"), E::NulInSocketPath);
        assert_eq!(kind("agent://:8890"), E::EmptyHost);
        assert_eq!(kind("tcp://"), E::EmptyHost);
        assert_eq!(kind("agent://host"), E::MissingPort { scheme: "agent" });
        assert_eq!(kind("agent://host:0"), E::InvalidPort("0".into()));
        assert_eq!(kind("agent://host:65536"), E::InvalidPort("65536".into()));
        assert_eq!(kind("agent://host:+80"), E::InvalidPort("+80".into()));
        assert_eq!(kind("agent://host:"), E::InvalidPort("".into()));
        assert_eq!(kind("tcp://host:2375/v1.41"), E::TrailingPath("/v1.41".into()));
        assert_eq!(kind("tcp://host:2375/"), E::TrailingPath("/".into()));
        assert_eq!(kind("https://host?x=1"), E::TrailingPath("?x=1".into()));
        assert_eq!(kind("agent://u:p@host:1"), E::UserInfo);
        assert_eq!(kind("agent://ho st:1"), E::InvalidHost("ho st".into()));
        assert_eq!(kind("agent://::1:8890"), E::InvalidHost("::1".into()));
        assert_eq!(kind("agent://[::g]:1"), E::InvalidHost("::g".into()));
        assert_eq!(kind("agent://[::1]8890"), E::InvalidHost("[::1]8890".into()));
        assert_eq!(kind("agent://-bad.host:1"), E::InvalidHost("-bad.host".into()));
        assert_eq!(kind("agent://a..b:1"), E::InvalidHost("a..b".into()));
    }

    #[test]
    fn messages_name_the_fix() {
        let err = "ssh://box".parse::<DockerHost>().unwrap_err().to_string();
        assert!(err.contains("agent://host:port"), "{err}");
        let err = "agent://box".parse::<DockerHost>().unwrap_err().to_string();
        assert_eq!(err, "invalid Docker host \"agent://box\": a port is required, as in agent://host:port");
    }

    fn host_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]([a-z0-9_-]{0,10}[a-z0-9])?(\\.[a-z0-9]{1,8}){0,3}",
            any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
            any::<Ipv6Addr>().prop_map(|ip| format!("[{ip}]")),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(input in ".{0,80}") {
            let _ = input.parse::<DockerHost>();
        }

        #[test]
        fn parse_never_panics_near_valid_input(
            scheme in "(unix|tcp|http|https|agent|ssh|AGENT|x)",
            rest in "[a-z0-9:\\[\\]/@?#.%_-]{0,40}",
        ) {
            let _ = format!("{scheme}://{rest}").parse::<DockerHost>();
        }

        #[test]
        fn display_round_trips(
            scheme in "(tcp|https|agent)",
            host in host_strategy(),
            port in 1u16..,
            path in "/[a-z0-9._/-]{0,30}",
        ) {
            let net: DockerHost = format!("{scheme}://{host}:{port}").parse().unwrap();
            prop_assert_eq!(net.to_string().parse::<DockerHost>().unwrap(), net.clone());
            prop_assert_eq!(net.to_string(), format!("{scheme}://{host}:{port}"));
            let unix: DockerHost = format!("unix://{path}").parse().unwrap();
            prop_assert_eq!(unix.to_string().parse::<DockerHost>().unwrap(), unix);
        }
    }
}
