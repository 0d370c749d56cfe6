//! docker-agent's path normaliser and rule matcher, against a model of how the engine routes.

use docker_agent::acl::{self, RequestHead};
use docker_agent::{Acl, AclConfig, AclDecision, Profile, Rule};
use http::{HeaderMap, HeaderValue, Method, header};
use percent_encoding::percent_decode_str;

/// Endpoints no built-in profile allows: creating, configuring, executing, building, attaching,
/// removing, and anything of swarm, secrets, plugins and auth. Written as rules are.
const LEFT_OUT: &[&str] = &[
    "POST /containers/create",
    "POST /containers/{id}/exec",
    "POST /exec/{id}/start",
    "POST /exec/{id}/resize",
    "POST /containers/{id}/attach",
    "GET /containers/{id}/attach/ws",
    "POST /containers/{id}/update",
    "POST /containers/{id}/rename",
    "PUT /containers/{id}/archive",
    "GET /containers/{id}/archive",
    "GET /containers/{id}/export",
    "DELETE /containers/{id}",
    "POST /containers/prune",
    "POST /build",
    "POST /images/create",
    "POST /images/load",
    "DELETE /images/{name}",
    "POST /commit",
    "POST /volumes/create",
    "DELETE /volumes/{name}",
    "POST /networks/create",
    "POST /networks/{id}/connect",
    "POST /services/create",
    "DELETE /services/{id}",
    "POST /secrets/create",
    "GET /secrets",
    "POST /configs/create",
    "POST /swarm/init",
    "POST /swarm/join",
    "POST /swarm/update",
    "GET /swarm/unlockkey",
    "POST /plugins/pull",
    "POST /auth",
    "POST /session",
    "POST /grpc",
];

/// A pattern (`/a/{id}/b`) matches segments, `{…}` taking any one non-empty segment.
fn pattern_matches(pattern: &str, segments: &[&str]) -> bool {
    let parts: Vec<&str> =
        pattern.strip_prefix('/').unwrap_or(pattern).split('/').filter(|p| !p.is_empty()).collect();
    parts.len() == segments.len()
        && parts.iter().zip(segments).all(|(p, s)| if p.starts_with('{') { !s.is_empty() } else { p == s })
}

/// The engine's view of a path: decoded once as a whole (as Go's `net/url` does), cleaned of
/// empty, `.` and `..` segments (as its router does), and a leading `v` + digits and dots
/// segment taken as the API version. `None` when the decoded path is not UTF-8.
fn engine_view(path: &str) -> Option<(Option<String>, Vec<String>)> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let decoded = percent_decode_str(path).decode_utf8().ok()?;
    let mut segments: Vec<String> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s.to_owned()),
        }
    }
    let versioned = segments.first().is_some_and(|s| {
        s.strip_prefix('v')
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
    });
    let version = versioned.then(|| segments.remove(0)[1..].to_owned());
    Some((version, segments))
}

/// Splits fuzz bytes into lines of text (lossy).
fn lines(data: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(data).split('\n').map(str::to_owned).collect()
}

/// docker-agent's ACL. The first byte picks the profile (and, in its upper bits, the request's
/// method and which headers it carries); the first line after it is the path (with an optional
/// query), every further line a custom rule.
///
/// Checks, beyond not panicking:
/// * a path the normaliser accepts is the engine's view of it: decoded once as a whole and
///   cleaned as the engine's router does, it gives the same version and segments, so the agent
///   and the engine cannot disagree about the endpoint;
/// * an allowed request matches its rule on the engine's view, so it reaches the rule's endpoint
///   and no other; with no custom rule, never one of the endpoints listed in this module's `LEFT_OUT`
///   (exec, create, build, attach, update, archive, swarm, secrets, plugins, auth…);
/// * an accepted version is canonical and no older than
///   [`docker_agent::acl::MIN_API_VERSION`];
/// * `check_request` allows only what `check` allows, with the same rule, and never an upgrade
///   the rule does not allow or a declared body a rule for empty bodies refuses;
/// * every rule that parses is shown as text that parses back to the same rule.
pub fn acl(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let lines = lines(rest);
    let Some((target, rules)) = lines.split_first() else { return };
    let profile = [Profile::ReadOnly, Profile::Lifecycle, Profile::None][usize::from(flags % 3)];
    let method = [Method::GET, Method::POST, Method::HEAD, Method::DELETE, Method::PUT]
        [usize::from((flags / 3) % 5)]
    .clone();
    let custom: Vec<Rule> = rules.iter().filter_map(|r| r.parse::<Rule>().ok()).collect();
    for rule in &custom {
        let text = rule.to_string();
        if let Ok(again) = text.parse::<Rule>() {
            assert_eq!(&again, rule, "{text:?} reads back differently");
        }
    }
    let acl = Acl::new(&AclConfig { profile, rules: custom.clone(), redact_env: true });
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.as_str(), None),
    };

    let normalised = acl::normalise(path);
    if let Ok(n) = &normalised {
        let engine = engine_view(path).expect("an accepted path decodes as UTF-8");
        assert_eq!(
            engine,
            (n.version.clone(), n.segments.clone()),
            "the agent and the engine disagree on {path:?}"
        );
        if let Some(v) = &n.version {
            let (major, minor) = v.split_once('.').expect("MAJOR.MINOR");
            let (major, minor): (u32, u32) = (major.parse().expect("digits"), minor.parse().expect("digits"));
            assert!((major, minor) >= (1, 24), "version {v} is older than {}", acl::MIN_API_VERSION);
            assert_eq!(format!("{major}.{minor}"), *v, "version {v} is not canonical");
        }
    }

    let checked = acl.check(&method, path);
    if let AclDecision::Allow { rule } = &checked {
        let n = normalised.as_ref().expect("an allowed path was accepted");
        let segments: Vec<&str> = n.segments.iter().map(String::as_str).collect();
        assert_eq!(rule.method(), &method);
        // `pattern()` is the rule as written, `METHOD /pattern`.
        let (_, pattern) = rule.pattern().split_once(' ').expect("METHOD /pattern");
        assert!(pattern_matches(pattern, &segments), "{rule} allowed {method} {path}");
        assert!(acl.rules().contains(rule), "{rule} is not in force");
        if custom.is_empty() {
            for left_out in LEFT_OUT {
                let (m, p) = left_out.split_once(' ').expect("METHOD /pattern");
                assert!(
                    !(m == method.as_str() && pattern_matches(p, &segments)),
                    "{profile} allowed {method} {path}, which reaches {left_out}"
                );
            }
        }
    }

    let mut headers = HeaderMap::new();
    if flags & 0x40 != 0 {
        headers.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
    if flags & 0x80 != 0 {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1"));
    }
    let head = RequestHead { method: &method, path, query, headers: &headers };
    if let AclDecision::Allow { rule } = acl.check_request(head) {
        assert_eq!(
            checked,
            AclDecision::Allow { rule: rule.clone() },
            "check_request allowed what check did not"
        );
        if flags & 0x40 != 0 {
            assert!(rule.upgrade(), "{rule} allowed an upgrade");
        }
        if flags & 0x80 != 0 {
            assert_ne!(rule.body(), docker_agent::BodyPolicy::Empty, "{rule} allowed a body");
        }
    }
    let _ = acl.redacts(&method, path);
}
