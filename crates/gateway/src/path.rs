//! The one path a request is about: normalized before it is routed, so that the route, the
//! agents and the upstream all see the same path.
//!
//! A prefix route decides which agents look at a request. If the gateway matched the path as
//! sent while the upstream resolved it (`/public/../admin`, `//admin`, `/%61dmin` are all
//! `/admin` to many servers), a request could take an unguarded route and still reach the
//! guarded resource. So the path is normalized as RFC 3986 (section 6.2.2) allows, plus the
//! merge of repeated slashes (as nginx does by default, and as Envoy's edge guidance
//! recommends): percent-encoded unreserved characters are decoded (`%61` → `a`), other escapes
//! get upper-case hex, runs of `/` become one, and `.` and `..` segments are resolved (never
//! above the root). The normalized path is what goes on.
//!
//! An escaped `/` or `\` (`%2F`, `%5C`) is refused: a server that decodes it would see segments
//! the gateway did not route on, and one that does not would see another path than a server
//! that does — there is no one path to give it. So is a `%` not followed by two hex digits.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    /// `%2F` or `%5C`: an escaped slash or backslash.
    #[error("an escaped slash or backslash (%2F, %5C) in the path")]
    EscapedSlash,
    /// A `%` without two hex digits after it.
    #[error("a malformed percent-escape in the path")]
    BadEscape,
}

impl PathError {
    /// The text of the 400 answer.
    pub(crate) fn answer(self) -> &'static str {
        match self {
            PathError::EscapedSlash => "an escaped slash or backslash (%2F, %5C) in the path is refused\n",
            PathError::BadEscape => "a malformed percent-escape in the path\n",
        }
    }
}

/// The normalized form of `path` (the path alone, without the query, as a parsed URI gives it:
/// visible ASCII), borrowed when it is already normal (most paths: no `%`, no `//`, no segment
/// starting with a dot) or is no path of segments (`*`).
pub(crate) fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    // Not a path of segments (`*` of `OPTIONS *`): left as it is.
    let segments = bytes.first() == Some(&b'/');
    let plain = !bytes.contains(&b'%') && !bytes.windows(2).any(|w| w == b"//" || w == b"/.");
    if !segments || plain {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = unescape_unreserved(bytes)?;
    Ok(Cow::Owned(resolve(&decoded)))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes escapes of unreserved characters, upper-cases the hex of the others.
fn unescape_unreserved(bytes: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // The path came from a parsed URI: visible ASCII only.
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) =
            (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        else {
            return Err(PathError::BadEscape);
        };
        let value = hi << 4 | lo;
        if value == b'/' || value == b'\\' {
            return Err(PathError::EscapedSlash);
        }
        if is_unreserved(value) {
            out.push(char::from(value));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
        }
        i += 3;
    }
    Ok(out)
}

/// Merges repeated slashes and resolves `.` and `..` segments (RFC 3986's
/// `remove_dot_segments`, never above the root). A path that ended in a directory (`/`, `/.`,
/// `/..`) still does.
fn resolve(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut directory = false;
    for segment in path.split('/') {
        directory = false;
        match segment {
            "" | "." => directory = true,
            ".." => {
                segments.pop();
                directory = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if directory || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str) -> String {
        normalize(path).unwrap().into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed_as_they_are() {
        for path in ["/", "/a", "/a/b/", "/a.b/c", "/a-b_c~d", "/a/b.", "/x;y=z", "*"] {
            assert!(matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path), "{path}");
        }
    }

    #[test]
    fn dot_segments_resolve_and_never_climb_above_the_root() {
        assert_eq!(n("/public/../admin/x"), "/admin/x");
        assert_eq!(n("/./admin"), "/admin");
        assert_eq!(n("/a/b/../../../../admin"), "/admin");
        assert_eq!(n("/a/."), "/a/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/.well-known/x"), "/.well-known/x");
        assert_eq!(n("/a/..b/c"), "/a/..b/c");
    }

    #[test]
    fn slashes_merge() {
        assert_eq!(n("//admin"), "/admin");
        assert_eq!(n("/a///b//"), "/a/b/");
    }

    #[test]
    fn unreserved_escapes_decode_and_others_are_upper_cased() {
        assert_eq!(n("/%61dmin"), "/admin");
        assert_eq!(n("/%7euser/%2e%2e/admin"), "/admin");
        assert_eq!(n("/a%20b/%3f%c3%a9"), "/a%20b/%3F%C3%A9");
        // Decoding makes no new escapes: %25 stays an escaped percent.
        assert_eq!(n("/%2561"), "/%2561");
    }

    #[test]
    fn escaped_slashes_and_bad_escapes_are_refused() {
        for path in ["/admin%2Fx", "/admin%2fx", "/a%5C..%5Cadmin", "/a/%2F/b"] {
            assert_eq!(normalize(path), Err(PathError::EscapedSlash), "{path}");
        }
        for path in ["/a%", "/a%4", "/a%zz", "/%%41"] {
            assert_eq!(normalize(path), Err(PathError::BadEscape), "{path}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for path in ["/public/../admin/x", "//a/./b/", "/%7e/%41%42", "/a%20b/..", "/x/%2e%2E/y"] {
            let once = n(path);
            assert_eq!(n(&once), once, "{path}");
        }
    }
}
