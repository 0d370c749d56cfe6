//! Listen addresses: parsing (pure) and resolution to the canonical socket address.
//!
//! Accepted forms: `host:port`, `[ipv6]:port`, `:port` (all IPv4 interfaces, like `0.0.0.0:port`),
//! `ipv4:port`. Port 0 is refused: a random port cannot key a server in a pool. The canonical
//! form of an address is the [`SocketAddr`] it resolves to, so `:80`, `0.0.0.0:80` and
//! `localhost:80` / `127.0.0.1:80` collide as they would at the socket level.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use crate::Error;

/// The host part of a listen address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// No host given (`:8080`): every IPv4 interface.
    Any,
    /// A literal IP address.
    Ip(IpAddr),
    /// A host name, resolved when the address is resolved. `localhost` resolves to `127.0.0.1`
    /// without asking the system resolver.
    Name(String),
}

/// A parsed listen address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr {
    /// The host part.
    pub host: Host,
    /// The port, never 0.
    pub port: u16,
}

fn err(input: &str, reason: impl Into<String>) -> Error {
    Error::Address { input: input.to_owned(), reason: reason.into() }
}

fn valid_hostname(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl FromStr for ListenAddr {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let s = input.trim();
        if s.is_empty() {
            return Err(err(input, "empty"));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, after) = rest.split_once(']').ok_or_else(|| err(input, "missing `]`"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| err(input, "missing `:port` after the IPv6 address"))?;
            let ip =
                Ipv6Addr::from_str(ip).map_err(|_| err(input, format!("{ip:?} is not an IPv6 address")))?;
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(|| err(input, "missing `:port`"))?;
            let host = if host.is_empty() {
                Host::Any
            } else if host.contains(':') {
                return Err(err(input, "an IPv6 address must be written in brackets, e.g. `[::1]:8080`"));
            } else if let Ok(ip) = Ipv4Addr::from_str(host) {
                Host::Ip(IpAddr::V4(ip))
            } else if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                return Err(err(input, format!("{host:?} is not an IPv4 address")));
            } else if valid_hostname(host) {
                Host::Name(host.to_ascii_lowercase())
            } else {
                return Err(err(input, format!("{host:?} is not a valid host name")));
            };
            (host, port)
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(input, format!("port {port:?} is not a number")));
        }
        let port: u16 = port.parse().map_err(|_| err(input, format!("port {port} is above 65535")))?;
        if port == 0 {
            return Err(err(input, "port 0 (a random port) cannot identify a server"));
        }
        Ok(ListenAddr { host, port })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Any => write!(f, ":{}", self.port),
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl ListenAddr {
    /// The socket address to bind: the canonical identity of a server.
    ///
    /// `Any` becomes `0.0.0.0`, `localhost` becomes `127.0.0.1`, other names go through the
    /// system resolver and the first IPv4 answer wins (the first answer if there is no IPv4).
    pub fn resolve(&self) -> Result<SocketAddr, Error> {
        let ip = match &self.host {
            Host::Any => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Host::Ip(ip) => *ip,
            Host::Name(name) if name == "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Host::Name(name) => {
                let addrs: Vec<SocketAddr> = (name.as_str(), self.port)
                    .to_socket_addrs()
                    .map_err(|e| err(&self.to_string(), format!("cannot resolve {name:?}: {e}")))?
                    .collect();
                let pick = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first());
                pick.ok_or_else(|| err(&self.to_string(), format!("{name:?} resolves to nothing")))?.ip()
            }
        };
        Ok(SocketAddr::new(ip, self.port))
    }
}

/// Parses and resolves a listen address in one step.
pub fn canonical(input: &str) -> Result<SocketAddr, Error> {
    input.parse::<ListenAddr>()?.resolve()
}

/// Anything that names a server's bind address: a listen string or a socket address.
pub trait ToBind {
    /// The canonical socket address, or `None` if this does not parse or resolve.
    fn to_bind(&self) -> Option<SocketAddr>;
}

impl ToBind for SocketAddr {
    fn to_bind(&self) -> Option<SocketAddr> {
        Some(*self)
    }
}

impl ToBind for &str {
    fn to_bind(&self) -> Option<SocketAddr> {
        canonical(self).ok()
    }
}

impl ToBind for String {
    fn to_bind(&self) -> Option<SocketAddr> {
        canonical(self).ok()
    }
}

impl<T: ToBind + ?Sized> ToBind for &T {
    fn to_bind(&self) -> Option<SocketAddr> {
        (**self).to_bind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_usual_forms_parse_to_their_canonical_address() {
        assert_eq!(canonical("localhost:8080").unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(canonical("[::]:8080").unwrap(), "[::]:8080".parse().unwrap());
        assert_eq!(canonical(":8080").unwrap(), "0.0.0.0:8080".parse().unwrap());
        assert_eq!(canonical("0.0.0.0:80").unwrap(), "0.0.0.0:80".parse().unwrap());
        assert_eq!(canonical("LocalHost:1").unwrap(), "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        for (input, needle) in [
            ("", "empty"),
            ("8080", "missing `:port`"),
            ("::1:80", "brackets"),
            ("[::1]80", "missing `:port`"),
            ("[zz]:80", "IPv6"),
            ("1.2.3:80", "IPv4"),
            ("bad_host:80", "host name"),
            ("host:", "not a number"),
            ("host:-1", "not a number"),
            ("host:70000", "above 65535"),
            ("host:0", "port 0"),
        ] {
            let e = canonical(input).unwrap_err().to_string();
            assert!(e.contains(needle), "{input:?} gave {e:?}, expected it to mention {needle:?}");
        }
    }

    proptest! {
        #[test]
        fn any_socket_address_round_trips(ip in any::<IpAddr>(), port in 1u16..) {
            let addr = SocketAddr::new(ip, port);
            prop_assert_eq!(canonical(&addr.to_string()).unwrap(), addr);
        }

        #[test]
        fn an_empty_host_means_every_ipv4_interface(port in 1u16..) {
            prop_assert_eq!(canonical(&format!(":{port}")).unwrap(), canonical(&format!("0.0.0.0:{port}")).unwrap());
        }

        #[test]
        fn display_of_a_parsed_address_parses_back_to_itself(ip in any::<IpAddr>(), port in 1u16..) {
            let parsed: ListenAddr = SocketAddr::new(ip, port).to_string().parse().unwrap();
            prop_assert_eq!(parsed.to_string().parse::<ListenAddr>().unwrap(), parsed);
        }

        #[test]
        fn valid_host_names_parse_and_keep_their_port(name in "[a-z][a-z0-9-]{0,20}[a-z0-9](\\.[a-z][a-z0-9]{0,10}){0,3}", port in 1u16..) {
            let parsed: ListenAddr = format!("{name}:{port}").parse().unwrap();
            prop_assert_eq!(parsed.port, port);
            prop_assert_eq!(parsed.host, Host::Name(name));
        }

        #[test]
        fn arbitrary_input_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<ListenAddr>();
        }
    }
}
