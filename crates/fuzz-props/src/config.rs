//! Every configuration parser: pool-core's, httpserver-pool's, idlewatch's, the gateway's and
//! docker-agent's.

use std::fmt::Debug;

use httpserver_pool::ServerPoolConfig;
use httpserver_pool::addr::{Host, ListenAddr};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Parses `text` as `T`; when it parses, writes it back as TOML and checks that the text parses
/// to the same value (compared as `Debug` text: a NaN is not equal to itself). A value that
/// cannot be written as TOML (a map key TOML cannot hold) is not a failure: nothing writes
/// configurations back but this check. Returns the parsed value.
fn parses_back<T: Serialize + DeserializeOwned + Debug>(text: &str) -> Option<T> {
    let parsed: T = toml::from_str(text).ok()?;
    if let Ok(written) = toml::to_string(&parsed) {
        let again: Result<T, _> = toml::from_str(&written);
        let same = again.as_ref().is_ok_and(|again| format!("{again:?}") == format!("{parsed:?}"));
        assert!(same, "{parsed:?}\nwritten as\n{written}\nreads back as {again:?}");
    }
    Some(parsed)
}

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// A listen address whose check needs no resolver: one that does not parse, or names an IP
/// address, `localhost` or no host.
fn offline(listen: &str) -> bool {
    match listen.parse::<ListenAddr>() {
        Ok(addr) => !matches!(addr.host, Host::Name(name) if name != "localhost"),
        Err(_) => true,
    }
}

/// pool-core's `PoolConfig`: parses back, validates.
pub fn config_pool(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Some(config) = parses_back::<pool_core::PoolConfig>(text) {
        let _ = config.validate();
    }
}

/// httpserver-pool's `ServerPoolConfig`: parses back; validates when that needs no file and no
/// resolver (no TLS section, every listen address an IP address, `localhost` or none).
pub fn config_httpserver(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Some(config) = parses_back::<ServerPoolConfig>(text)
        && config.servers.iter().all(|s| s.tls.is_none() && offline(&s.listen))
    {
        let _ = config.validate();
    }
}

/// idlewatch's `IdleConfig`: parses back, validates.
pub fn config_idlewatch(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Some(config) = parses_back::<idlewatch::IdleConfig>(text) {
        let _ = config.validate();
        let _ = config.stop_deadline();
    }
}

/// The gateway's configuration file: parses back (see `gateway::fuzz::config`), validates when
/// that needs no file and no resolver.
pub fn config_gateway(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Err(problem) = gateway::fuzz::config(text) {
        panic!("{problem}");
    }
}

/// docker-agent's configuration file: parses back; its limits are checked and its ACL compiled
/// (reading the TLS files it names is left out).
pub fn config_docker_agent(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Some(file) = parses_back::<docker_agent::AgentConfigFile>(text) {
        assert_eq!(docker_agent::AgentConfigFile::parse(text).ok().as_ref(), Some(&file));
        let _ = file.limits.problems();
        let acl = docker_agent::Acl::new(&file.acl);
        let _ = acl.check(&http::Method::GET, "/containers/json");
    }
}
