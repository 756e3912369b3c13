//! Turns the path after `/v2/` into an endpoint and its raw parameters.
//!
//! Repository names contain slashes, so the endpoint is recognised from the
//! end of the path (`…/manifests/<ref>`, `…/blobs/uploads/<id>`, …) and what
//! precedes it is the name. Names, references and digests are validated
//! later, by the handlers, against the spec's grammars.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Tags { name: String },
    Manifest { name: String, reference: String },
    Blob { name: String, digest: String },
    UploadStart { name: String },
    Upload { name: String, id: String },
    Referrers { name: String, digest: String },
}

/// Which endpoint a [`Route`] is, without its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Tags,
    Manifest,
    Blob,
    UploadStart,
    Upload,
    Referrers,
}

impl Route {
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Route::Tags { .. } => Endpoint::Tags,
            Route::Manifest { .. } => Endpoint::Manifest,
            Route::Blob { .. } => Endpoint::Blob,
            Route::UploadStart { .. } => Endpoint::UploadStart,
            Route::Upload { .. } => Endpoint::Upload,
            Route::Referrers { .. } => Endpoint::Referrers,
        }
    }
}

/// The endpoint named by the last three (decoded) segments of a path, and
/// how many segments it takes: the name is what precedes them. The one
/// matching rule for [`parse`] and [`endpoint`].
fn recognise(t3: &str, t2: &str, t1: &str) -> Option<(Endpoint, usize)> {
    match (t3, t2, t1) {
        (_, "tags", "list") => Some((Endpoint::Tags, 2)),
        ("blobs", "uploads", "") => Some((Endpoint::UploadStart, 3)),
        ("blobs", "uploads", _) => Some((Endpoint::Upload, 3)),
        (_, "blobs", "uploads") => Some((Endpoint::UploadStart, 2)),
        // An empty digest (`…/blobs/`) is still the blob endpoint: the
        // handler answers DIGEST_INVALID, which says more than "no such
        // endpoint".
        (_, "blobs", _) => Some((Endpoint::Blob, 2)),
        (_, "manifests", reference) if !reference.is_empty() => Some((Endpoint::Manifest, 2)),
        (_, "referrers", digest) if !digest.is_empty() => Some((Endpoint::Referrers, 2)),
        _ => None,
    }
}

/// Parses `rest`, the path after `/v2/`. Returns `None` for paths that name
/// no endpoint.
pub fn parse(rest: &str) -> Option<Route> {
    // Split before decoding, so an encoded `/` (%2F) stays inside its
    // segment and is then rejected by name or digest validation.
    let decoded: Vec<Cow<str>> = rest
        .split('/')
        .map(|seg| percent_decode_str(seg).decode_utf8())
        .collect::<Result<_, _>>()
        .ok()?;
    let segs: Vec<&str> = decoded.iter().map(|s| s.as_ref()).collect();
    let n = segs.len();
    let tail = |i: usize| -> &str { segs.get(n.wrapping_sub(i)).copied().unwrap_or("") };
    let (endpoint, k) = recognise(tail(3), tail(2), tail(1))?;
    let name = (n > k)
        .then(|| segs[..n - k].join("/"))
        .filter(|s| !s.is_empty())?;
    let param = tail(1).to_string();
    Some(match endpoint {
        Endpoint::Tags => Route::Tags { name },
        Endpoint::Manifest => Route::Manifest {
            name,
            reference: param,
        },
        Endpoint::Blob => Route::Blob {
            name,
            digest: param,
        },
        Endpoint::UploadStart => Route::UploadStart { name },
        Endpoint::Upload => Route::Upload { name, id: param },
        Endpoint::Referrers => Route::Referrers {
            name,
            digest: param,
        },
    })
}

/// The endpoint [`parse`] would find in `rest`, without allocating (unless
/// the path has percent-escapes): for the metrics of every request.
pub fn endpoint(rest: &str) -> Option<Endpoint> {
    if !rest.contains('%') {
        // Nothing to decode (the usual case): the segments are slices of
        // the path.
        let n = rest.bytes().filter(|&b| b == b'/').count() + 1;
        let mut tail = rest.rsplit('/');
        let t1 = tail.next().unwrap_or("");
        let t2 = tail.next().unwrap_or("");
        let t3 = tail.next().unwrap_or("");
        let (endpoint, k) = recognise(t3, t2, t1)?;
        let first_empty = rest.is_empty() || rest.starts_with('/');
        return (n > k && !(n - k == 1 && first_empty)).then_some(endpoint);
    }
    // Like `parse`, a path with a segment that does not decode to UTF-8
    // names no endpoint.
    let mut n = 0;
    let mut first_empty = false;
    let mut last: [Cow<str>; 3] = [Cow::Borrowed(""), Cow::Borrowed(""), Cow::Borrowed("")];
    for seg in rest.split('/') {
        let decoded = percent_decode_str(seg).decode_utf8().ok()?;
        if n == 0 {
            first_empty = decoded.is_empty();
        }
        n += 1;
        last.rotate_left(1);
        last[2] = decoded;
    }
    // `last` holds the final min(n, 3) segments at its end; missing ones
    // are "" as in `parse`.
    let (endpoint, k) = recognise(&last[0], &last[1], &last[2])?;
    // The name is segments[..n-k] joined by `/`: empty only when it is one
    // empty segment.
    let name_empty = n - k == 1 && first_empty;
    (n > k && !name_empty).then_some(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> String {
        x.to_string()
    }

    #[test]
    fn recognises_every_endpoint() {
        assert_eq!(parse("a/b/tags/list"), Some(Route::Tags { name: s("a/b") }));
        assert_eq!(
            parse("a/manifests/latest"),
            Some(Route::Manifest {
                name: s("a"),
                reference: s("latest")
            })
        );
        assert_eq!(
            parse("a/b/c/blobs/sha256:00"),
            Some(Route::Blob {
                name: s("a/b/c"),
                digest: s("sha256:00")
            })
        );
        assert_eq!(
            parse("a/blobs/uploads/"),
            Some(Route::UploadStart { name: s("a") })
        );
        assert_eq!(
            parse("a/blobs/uploads"),
            Some(Route::UploadStart { name: s("a") })
        );
        assert_eq!(
            parse("a/blobs/uploads/1234-ab"),
            Some(Route::Upload {
                name: s("a"),
                id: s("1234-ab")
            })
        );
        assert_eq!(
            parse("x/referrers/sha256:00"),
            Some(Route::Referrers {
                name: s("x"),
                digest: s("sha256:00")
            })
        );
        // Names may contain endpoint words as components.
        assert_eq!(
            parse("blobs/manifests/manifests/v1"),
            Some(Route::Manifest {
                name: s("blobs/manifests"),
                reference: s("v1")
            })
        );
        assert_eq!(
            parse("a/blobs/sha256%3A00"),
            Some(Route::Blob {
                name: s("a"),
                digest: s("sha256:00")
            })
        );
        assert_eq!(
            parse("a/b/blobs/"),
            Some(Route::Blob {
                name: s("a/b"),
                digest: s("")
            })
        );
        assert_eq!(
            parse("a/blobs/sha256:%2e%2e%2fx"),
            Some(Route::Blob {
                name: s("a"),
                digest: s("sha256:../x")
            })
        );
    }

    /// `endpoint` agrees with `parse` on every path made of these segments.
    #[test]
    fn endpoint_is_what_parse_finds() {
        let words = [
            "",
            "a",
            "tags",
            "list",
            "blobs",
            "uploads",
            "manifests",
            "referrers",
            "sha256:00",
            "%74ags",
            "%ff",
            "b%2Fc",
        ];
        // Every sequence of one to four of them.
        let mut level: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let mut paths = level.clone();
        for _ in 1..4 {
            level = level
                .iter()
                .flat_map(|p| words.iter().map(move |w| format!("{p}/{w}")))
                .collect();
            paths.extend(level.iter().cloned());
        }
        assert!(paths.len() > 10_000);
        for p in &paths {
            assert_eq!(endpoint(p), parse(p).map(|r| r.endpoint()), "{p:?}");
        }
    }

    #[test]
    fn rejects_non_endpoints() {
        for p in [
            "",
            "a",
            "a/b",
            "tags/list",
            "manifests/x",
            "a/manifests/",
            "blobs/",
            "blobs/uploads/",
        ] {
            assert_eq!(parse(p), None, "{p}");
        }
    }
}
