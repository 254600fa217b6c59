//! Turning a request that arrived into the one sent upstream, and the upstream's response into
//! the one sent back, as an HTTP intermediary must (RFC 9110 §7.6.1): the headers that describe
//! one connection rather than the message stay behind, except what an upgrade (WebSockets) needs.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{request, Version};

/// Whether a request asks to switch protocols (`Connection: upgrade` with an `Upgrade` header,
/// HTTP/1.1 only; HTTP/2 has no such mechanism). The `Connection` header is a list of tokens,
/// possibly spread over several fields.
pub fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The tokens of every `Connection` field.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): those the `Connection` header names, then
/// `Connection`, `Proxy-Connection`, `Keep-Alive`, `Transfer-Encoding`, `TE` and `Upgrade`.
/// `TE: trailers` stays, as `TE: trailers` alone (gRPC needs it, and it is the one `TE` HTTP/2
/// allows). For an `upgrade` (the request, or its 101 answer) `Upgrade` stays and `Connection`
/// becomes `upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    // Read before a `Connection: te` removes it.
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let coding = t.split(';').next().unwrap_or_default();
            coding.trim().eq_ignore_ascii_case("trailers")
        });
    for name in named {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::TRANSFER_ENCODING,
        header::TE,
    ] {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// `http://{authority}{path and query}`: where the request goes, in the absolute form a client
/// connection pool needs. The `Host` header is left as the client sent it.
pub fn upstream_uri(uri: &Uri, authority: Authority) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).expect("scheme, authority and path make a URI")
}

/// Readies a request's head for `authority`: its [`upstream_uri`], HTTP/1.0 and 1.1 sent as
/// HTTP/1.1 (HTTP/2 stays HTTP/2), hop-by-hop headers removed ([`strip_hop_by_hop`]; pass
/// `upgrade` from [`is_upgrade`], asked before).
pub fn to_upstream(parts: &mut request::Parts, authority: Authority, upgrade: bool) {
    parts.uri = upstream_uri(&parts.uri, authority);
    if parts.version != Version::HTTP_2 {
        parts.version = Version::HTTP_11;
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        h.keys().map(HeaderName::as_str).collect()
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Private"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("x-other", "2"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["x-kept"]);
    }

    #[test]
    fn te_trailers_stays_alone() {
        let mut h = headers(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get("te").unwrap(), "trailers");

        let mut h = headers(&[("te", "gzip;q=0.5, Trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get_all("te").iter().collect::<Vec<_>>(), ["trailers"]);

        let mut h = headers(&[("te", "deflate")]);
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("te"));
    }

    #[test]
    fn upgrades_keep_upgrade_and_connection_upgrade() {
        let mut h = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("keep-alive", "timeout=5"),
        ]);
        assert!(is_upgrade(Version::HTTP_11, &h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(
            h.get_all("connection").iter().collect::<Vec<_>>(),
            ["upgrade"]
        );
        assert_eq!(
            h.get("sec-websocket-key").unwrap(),
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
        assert!(!h.contains_key("keep-alive"));
    }

    #[test]
    fn what_is_an_upgrade() {
        let ws = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(Version::HTTP_11, &ws));
        assert!(!is_upgrade(Version::HTTP_2, &ws), "HTTP/2 has no Upgrade");
        assert!(!is_upgrade(Version::HTTP_10, &ws));
        let split = headers(&[
            ("connection", "keep-alive"),
            ("connection", " upgrade "),
            ("upgrade", "websocket"),
        ]);
        assert!(
            is_upgrade(Version::HTTP_11, &split),
            "tokens over two fields"
        );
        let no_connection = headers(&[("upgrade", "h2c")]);
        assert!(!is_upgrade(Version::HTTP_11, &no_connection));
        let no_upgrade = headers(&[("connection", "upgrade")]);
        assert!(!is_upgrade(Version::HTTP_11, &no_upgrade));
        // A token that merely contains the word is not the `upgrade` option.
        let lookalike = headers(&[("connection", "x-upgrade-hint"), ("upgrade", "websocket")]);
        assert!(!is_upgrade(Version::HTTP_11, &lookalike));
    }

    #[test]
    fn requests_are_readied_for_the_upstream() {
        let (mut parts, ()) = http::Request::get("http://example.com/a/b?c=d")
            .version(Version::HTTP_10)
            .header("host", "example.com")
            .header("connection", "close")
            .body(())
            .unwrap()
            .into_parts();
        to_upstream(&mut parts, "127.0.0.1:8080".parse().unwrap(), false);
        assert_eq!(parts.uri, "http://127.0.0.1:8080/a/b?c=d");
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers.get("host").unwrap(), "example.com");
        assert!(!parts.headers.contains_key("connection"));

        let (mut parts, ()) = http::Request::get("/x")
            .version(Version::HTTP_2)
            .body(())
            .unwrap()
            .into_parts();
        to_upstream(&mut parts, "10.0.0.1:8012".parse().unwrap(), false);
        assert_eq!(parts.uri, "http://10.0.0.1:8012/x");
        assert_eq!(parts.version, Version::HTTP_2);

        // `OPTIONS *` stays `*`; an authority alone gets the path `/`.
        let asterisk: Uri = "*".parse().unwrap();
        let to = upstream_uri(&asterisk, "127.0.0.1:1".parse().unwrap());
        assert_eq!(to.path_and_query().unwrap(), "*");
        let authority_form: Uri = "example.com:443".parse().unwrap();
        assert_eq!(
            upstream_uri(&authority_form, "127.0.0.1:1".parse().unwrap()),
            "http://127.0.0.1:1/"
        );
    }
}
