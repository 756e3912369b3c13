//! Tag listing and the catalog, with pagination.

mod common;

use common::oci::*;
use common::{client, Trow};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Follows `Link: <…>; rel="next"` headers from `first`, collecting `field`.
async fn follow(t: &Trow, first: &str, field: &str) -> (Vec<String>, usize) {
    let c = client();
    let mut url = first.to_string();
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let r = c.get(t.at(&url)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let link = r
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = r.json().await.unwrap();
        all.extend(
            body[field]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
        pages += 1;
        match link {
            Some(link) => {
                assert!(link.ends_with("; rel=\"next\""), "{link}");
                url = link[1..link.find('>').unwrap()].to_string();
            }
            None => return (all, pages),
        }
    }
}

#[tokio::test]
async fn tags_are_listed_in_lexical_pages() {
    let t = Trow::start();
    let c = client();
    let (manifest, _) = push_image(&c, &t.url, "tagged/repo", "v0", 1).await;
    let mut expected: Vec<String> = vec!["v0".into()];
    for tag in ["b", "a", "Z", "latest", "1.0", "1.10", "1.9", "_x", "c-d"] {
        put_manifest(&c, &t.url, "tagged/repo", tag, OCI_MANIFEST, &manifest).await;
        expected.push(tag.to_string());
    }
    expected.sort(); // byte order, as the spec asks

    let body: Value = c
        .get(t.at("/v2/tagged/repo/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["name"], "tagged/repo");
    assert_eq!(body["tags"], json!(expected));

    let r = c
        .get(t.at("/v2/tagged/repo/tags/list?n=3"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["link"].to_str().unwrap(),
        format!(
            "</v2/tagged/repo/tags/list?n=3&last={}>; rel=\"next\"",
            expected[2]
        )
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["tags"], json!(expected[..3]));

    let r = c
        .get(t.at(&format!(
            "/v2/tagged/repo/tags/list?n=3&last={}",
            expected[2]
        )))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["tags"], json!(expected[3..6]));

    let (all, pages) = follow(&t, "/v2/tagged/repo/tags/list?n=4", "tags").await;
    assert_eq!(all, expected);
    assert_eq!(pages, 3);

    // The last page has no Link.
    let r = c
        .get(t.at("/v2/tagged/repo/tags/list?n=10"))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("link").is_none());

    let r = c
        .get(t.at("/v2/tagged/repo/tags/list?n=0"))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("link").is_none());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["tags"], json!([]));

    let r = c
        .get(t.at("/v2/tagged/repo/tags/list?n=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "PAGINATION_NUMBER_INVALID");

    let r = c
        .get(t.at("/v2/no/such/repo/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN");
}

#[tokio::test]
async fn catalog_pages_through_every_repository() {
    let t = Trow::start();
    let c = client();
    let mut expected = Vec::new();
    for i in 0..25 {
        let repo = format!("org{}/app-{i:02}", i % 3);
        push_image(&c, &t.url, &repo, "v1", i).await;
        expected.push(repo);
    }
    // A repository with only blobs and no manifest is not listed.
    push_blob(&c, &t.url, "blobs-only", b"x").await;
    expected.sort();

    let body: Value = c
        .get(t.at("/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["repositories"], json!(expected));

    let (all, pages) = follow(&t, "/v2/_catalog?n=10", "repositories").await;
    assert_eq!(all, expected);
    assert_eq!(pages, 3);

    let r = c
        .get(t.at(&format!("/v2/_catalog?n=5&last={}", expected[19])))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["repositories"], json!(expected[20..25]));

    let r = c.get(t.at("/v2/_catalog?n=-1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn hostname_makes_urls_absolute() {
    let t = Trow::start_with(&["--hostname", "registry.example.com:5000"]);
    let c = client();
    let r = c.post(t.at("/v2/abs/blobs/uploads/")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with("http://registry.example.com:5000/v2/abs/blobs/uploads/"),
        "{location}"
    );
    push_image(&c, &t.url, "abs", "a", 1).await;
    let (m, _) = push_image(&c, &t.url, "abs", "b", 1).await;
    put_manifest(&c, &t.url, "abs", "c", OCI_MANIFEST, &m).await;
    let r = c.get(t.at("/v2/abs/tags/list?n=1")).send().await.unwrap();
    assert_eq!(
        r.headers()["link"].to_str().unwrap(),
        "<http://registry.example.com:5000/v2/abs/tags/list?n=1&last=a>; rel=\"next\""
    );
}

/// A query string that cannot be read answers with the listing's own
/// error, not an upload's.
#[tokio::test]
async fn bad_query_strings_get_their_own_codes() {
    let t = Trow::start();
    let c = client();
    push_image(&c, &t.url, "q/repo", "v1", 3).await;
    let digest = sha256(b"anything");
    let cases = [
        ("/v2/_catalog?n=abc", "PAGINATION_NUMBER_INVALID"),
        ("/v2/_catalog?n=1&n=2", "PAGINATION_NUMBER_INVALID"),
        ("/v2/_catalog?last=a&last=b", "QUERY_INVALID"),
        ("/v2/q/repo/tags/list?n=-3", "PAGINATION_NUMBER_INVALID"),
        ("/v2/q/repo/tags/list?n=2&n=2", "PAGINATION_NUMBER_INVALID"),
        ("/v2/q/repo/tags/list?last=a&last=a", "QUERY_INVALID"),
    ];
    let referrers = format!("/v2/q/repo/referrers/{digest}?artifactType=a&artifactType=b");
    for (path, code) in cases
        .iter()
        .map(|(p, c)| (p.to_string(), *c))
        .chain([(referrers, "QUERY_INVALID")])
    {
        let r = c.get(t.at(&path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], code, "{path}: {body}");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(!message.is_empty(), "{path}");
    }
    // Unknown parameters are ignored, as before; an empty n is the default.
    let r = c
        .get(t.at("/v2/q/repo/tags/list?n=&x=1&x=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["tags"], json!(["v1"]));
}
