//! Reverse connections: agents that dial the proxy.
//!
//! The transport's listener accepts an agent's connection, runs the handshake, and hands the
//! established connection to [`AgentPool::add_reverse_connection`](crate::AgentPool) with the
//! agent id, a replica id and the token it presented. The pool checks the token against the
//! configured ones in constant time and the agent id against the allow-list, then adds the
//! connection to that agent — creating the agent if it is not registered — as one more
//! connection slot. Several replicas of an agent each get their own slot (and circuit
//! breaker). A replica that registers again replaces its previous connection in the same
//! slot; a replica whose connection closes is removed. Reverse connections are refused
//! unless at least one token is configured.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Who may connect in reverse.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReverseConfig {
    /// Tokens an agent may present; empty refuses every reverse connection.
    pub tokens: Vec<String>,
    /// Agent ids allowed to connect; empty allows any.
    pub allowed_agents: Vec<String>,
}

impl ReverseConfig {
    /// Why `agent` presenting `token` is refused, if it is.
    pub(crate) fn refuse(&self, agent: &str, token: Option<&str>) -> Option<&'static str> {
        if self.tokens.is_empty() {
            return Some("reverse connections are disabled (no token is configured)");
        }
        let Some(token) = token else { return Some("no token presented") };
        // Every configured token is compared, each in constant time, so the time taken says
        // nothing about which one (or how much of one) matched.
        let matched = self
            .tokens
            .iter()
            .fold(subtle::Choice::from(0), |any, t| any | t.as_bytes().ct_eq(token.as_bytes()));
        if !bool::from(matched) {
            return Some("invalid token");
        }
        if !self.allowed_agents.is_empty() && !self.allowed_agents.iter().any(|a| a == agent) {
            return Some("agent id is not on the allow-list");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_the_allow_list_decide() {
        let open = ReverseConfig::default();
        assert!(open.refuse("waf", Some("x")).unwrap().contains("disabled"));
        let cfg = ReverseConfig {
            tokens: vec!["s3cret".into(), "other".into()],
            allowed_agents: vec!["waf".into()],
        };
        assert_eq!(cfg.refuse("waf", Some("s3cret")), None);
        assert_eq!(cfg.refuse("waf", Some("other")), None);
        assert_eq!(cfg.refuse("waf", Some("s3cre")), Some("invalid token"));
        assert_eq!(cfg.refuse("waf", None), Some("no token presented"));
        assert_eq!(cfg.refuse("bot", Some("s3cret")), Some("agent id is not on the allow-list"));
        let any = ReverseConfig { allowed_agents: vec![], ..cfg };
        assert_eq!(any.refuse("bot", Some("s3cret")), None);
    }
}
