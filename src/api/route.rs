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
    let name = |k: usize| -> Option<String> {
        (n > k)
            .then(|| segs[..n - k].join("/"))
            .filter(|s| !s.is_empty())
    };
    let tail = |i: usize| -> &str { segs.get(n.wrapping_sub(i)).copied().unwrap_or("") };

    match (tail(3), tail(2), tail(1)) {
        (_, "tags", "list") => Some(Route::Tags { name: name(2)? }),
        ("blobs", "uploads", "") => Some(Route::UploadStart { name: name(3)? }),
        ("blobs", "uploads", id) => Some(Route::Upload {
            name: name(3)?,
            id: id.to_string(),
        }),
        (_, "blobs", "uploads") => Some(Route::UploadStart { name: name(2)? }),
        // An empty digest (`…/blobs/`) is still the blob endpoint: the
        // handler answers DIGEST_INVALID, which says more than "no such
        // endpoint".
        (_, "blobs", digest) => Some(Route::Blob {
            name: name(2)?,
            digest: digest.to_string(),
        }),
        (_, "manifests", reference) if !reference.is_empty() => Some(Route::Manifest {
            name: name(2)?,
            reference: reference.to_string(),
        }),
        (_, "referrers", digest) if !digest.is_empty() => Some(Route::Referrers {
            name: name(2)?,
            digest: digest.to_string(),
        }),
        _ => None,
    }
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
