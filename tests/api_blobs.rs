//! Blob and upload endpoints over real HTTP, including every error path.

mod common;

use common::oci::{data, push_blob, sha256, streamed_body};
use common::{client, expect_error, required_header as header, Trow};
use reqwest::StatusCode;

#[tokio::test]
async fn monolithic_push_then_get_head_and_ranges() {
    let t = Trow::start();
    let c = client();
    let bytes = data(1, 100_000);
    let digest = sha256(&bytes);
    let r = c
        .post(t.at(&format!("/v2/lib/app/blobs/uploads/?digest={digest}")))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "location"),
        format!("/v2/lib/app/blobs/{digest}")
    );
    assert_eq!(header(&r, "docker-content-digest"), digest);

    let r = c
        .get(t.at(&format!("/v2/lib/app/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(header(&r, "content-length"), "100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), bytes.as_slice());

    let r = c
        .head(t.at(&format!("/v2/lib/app/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), "100000");
    assert_eq!(header(&r, "docker-content-digest"), digest);

    let r = c
        .get(t.at(&format!("/v2/lib/app/blobs/{digest}")))
        .header("Range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&r, "content-range"), "bytes 10-19/100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[10..20]);

    let r = c
        .get(t.at(&format!("/v2/lib/app/blobs/{digest}")))
        .header("Range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[99_995..]);

    let r = c
        .get(t.at(&format!("/v2/lib/app/blobs/{digest}")))
        .header("Range", "bytes=100000-")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-range"), "bytes */100000");
    expect_error(r, StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn unknown_and_foreign_blobs_are_404() {
    let t = Trow::start();
    let c = client();
    let digest = push_blob(&c, &t.url, "team-a/secret", b"private bytes").await;
    let missing = sha256(b"never pushed");
    let r = c
        .get(t.at(&format!("/v2/team-a/secret/blobs/{missing}")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await;
    // Knowing a digest is not enough to read it through another repository.
    let r = c
        .get(t.at(&format!("/v2/team-b/guess/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await;
    let r = c
        .head(t.at(&format!("/v2/team-b/guess/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn chunked_upload_with_status_and_out_of_order_chunk() {
    let t = Trow::start();
    let c = client();
    let bytes = data(2, 300_000);
    let digest = sha256(&bytes);

    let r = c
        .post(t.at("/v2/chunky/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = header(&r, "location");
    let uuid = header(&r, "docker-upload-uuid");
    assert!(location.ends_with(&uuid), "{location}");
    assert_eq!(header(&r, "range"), "0-0");

    let r = c
        .patch(t.at(&location))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", "0-99999")
        .body(bytes[..100_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), "0-99999");
    let location = header(&r, "location");

    let r = c.get(t.at(&location)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), "0-99999");
    assert_eq!(header(&r, "docker-upload-uuid"), uuid);

    // A chunk that does not start where the upload ends is refused, and the
    // answer says where the upload really is.
    let r = c
        .patch(t.at(&location))
        .header("Content-Range", "200000-299999")
        .body(bytes[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "range"), "0-99999");
    expect_error(r, StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID").await;

    // Content-Range and Content-Length that disagree are refused.
    let r = c
        .patch(t.at(&location))
        .header("Content-Range", "100000-100009")
        .body(vec![0u8; 3])
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID").await;

    let r = c
        .patch(t.at(&location))
        .header("Content-Range", "100000-199999")
        .body(bytes[100_000..200_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), "0-199999");

    // The final PUT carries the last chunk.
    let r = c
        .put(t.at(&format!("{location}?digest={digest}")))
        .header("Content-Range", "200000-299999")
        .body(bytes[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(header(&r, "location"), format!("/v2/chunky/blobs/{digest}"));

    let got = c
        .get(t.at(&format!("/v2/chunky/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), bytes.as_slice());

    // The session is gone once finished.
    let r = c.get(t.at(&location)).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
}

#[tokio::test]
async fn streamed_patch_then_empty_put() {
    let t = Trow::start();
    let c = client();
    let bytes = data(3, 2_000_000);
    let digest = sha256(&bytes);
    let r = c
        .post(t.at("/v2/streamed/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = header(&r, "location");
    // No Content-Range: a streamed upload of the whole blob.
    let r = c
        .patch(t.at(&location))
        .body(streamed_body(&bytes, 65_536))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), "0-1999999");
    let r = c
        .put(t.at(&format!("{}?digest={digest}", header(&r, "location"))))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = c
        .get(t.at(&format!("/v2/streamed/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(sha256(&got.bytes().await.unwrap()), digest);
}

/// Two streamed PATCHes, each large enough to go through the writer and
/// hashing threads: the running hash must carry over from one request to
/// the next, and a wrong digest must still be caught.
#[tokio::test]
async fn streamed_patches_keep_the_running_hash_and_catch_a_wrong_digest() {
    let t = Trow::start();
    let c = client();
    let bytes = data(4, 3_000_000);
    let digest = sha256(&bytes);
    let mut flipped = bytes.clone();
    flipped[2_999_999] ^= 1;
    let wrong = sha256(&flipped);

    async fn two_patches(c: &reqwest::Client, t: &Trow, bytes: &[u8]) -> String {
        let r = c
            .post(t.at("/v2/streamed/two/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        let mut location = header(&r, "location");
        for (i, half) in bytes.chunks(1_500_000).enumerate() {
            let r = c
                .patch(t.at(&location))
                .body(streamed_body(half, 65_536))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::ACCEPTED);
            assert_eq!(
                header(&r, "range"),
                format!("0-{}", (i + 1) * 1_500_000 - 1)
            );
            location = header(&r, "location");
        }
        location
    }

    let location = two_patches(&c, &t, &bytes).await;
    let r = c
        .put(t.at(&format!("{location}?digest={wrong}")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    for d in [&wrong, &digest] {
        let r = c
            .head(t.at(&format!("/v2/streamed/two/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{d}");
    }

    let location = two_patches(&c, &t, &bytes).await;
    let r = c
        .put(t.at(&format!("{location}?digest={digest}")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = c
        .get(t.at(&format!("/v2/streamed/two/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), bytes.as_slice());
}

#[tokio::test]
async fn two_step_monolithic_upload() {
    let t = Trow::start();
    let c = client();
    let bytes = b"POST then PUT with the whole body".to_vec();
    let digest = sha256(&bytes);
    let r = c.post(t.at("/v2/two/blobs/uploads/")).send().await.unwrap();
    let location = header(&r, "location");
    let r = c
        .put(t.at(&format!("{location}?digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .get(t.at(&format!("/v2/two/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), bytes.as_slice());
}

#[tokio::test]
async fn wrong_or_missing_digest_is_refused_and_nothing_is_stored() {
    let t = Trow::start();
    let c = client();
    let wrong = sha256(b"something else");
    let r = c
        .post(t.at(&format!("/v2/bad/blobs/uploads/?digest={wrong}")))
        .body(b"actual bytes".to_vec())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    let r = c
        .get(t.at(&format!("/v2/bad/blobs/{wrong}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let actual = sha256(b"actual bytes");
    let r = c
        .get(t.at(&format!("/v2/bad/blobs/{actual}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let r = c.post(t.at("/v2/bad/blobs/uploads/")).send().await.unwrap();
    let location = header(&r, "location");
    let r = c
        .put(t.at(&location))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    let r = c
        .put(t.at(&format!("{location}?digest=sha256:1234")))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    let r = c
        .put(t.at(&format!("{location}?digest={wrong}")))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    // A failed verification discards the upload.
    let r = c.get(t.at(&location)).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    let leftovers = std::fs::read_dir(t.data_dir.join("uploads"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "no upload bytes are left behind");
}

#[tokio::test]
async fn cancel_upload_and_foreign_upload_ids() {
    let t = Trow::start();
    let c = client();
    let r = c
        .post(t.at("/v2/mine/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = header(&r, "location");
    let uuid = header(&r, "docker-upload-uuid");
    // The upload belongs to `mine`; another repository cannot use it.
    let r = c
        .get(t.at(&format!("/v2/other/blobs/uploads/{uuid}")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    // Nor write to it: the chunk is refused and none of it reaches the upload.
    let r = c
        .patch(t.at(&format!("/v2/other/blobs/uploads/{uuid}")))
        .header("content-type", "application/octet-stream")
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    let r = c.get(t.at(&location)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), "0-0");
    let r = c
        .get(t.at("/v2/mine/blobs/uploads/not-a-uuid"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    let r = c.delete(t.at(&location)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = c.get(t.at(&location)).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    let r = c.delete(t.at(&location)).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    assert_eq!(
        std::fs::read_dir(t.data_dir.join("uploads"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn invalid_names_and_digests_never_touch_storage() {
    let t = Trow::start();
    let c = client();
    for name in ["UPPER", "a//b", "-lead", "a/_x", &"x".repeat(300)] {
        let r = c
            .post(t.at(&format!("/v2/{name}/blobs/uploads/")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "name {name}");
        expect_error(r, StatusCode::BAD_REQUEST, "NAME_INVALID").await;
    }
    for digest in [
        "sha256:abc",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256:%2e%2e%2f%2e%2e%2fx",
        "nocolon",
    ] {
        let r = c
            .get(t.at(&format!("/v2/ok/blobs/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "digest {digest}");
        expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    }
    // Path traversal through an encoded name is refused as an invalid name.
    let r = c
        .get(t.at("/v2/..%2F..%2Fetc/blobs/uploads/x"))
        .send()
        .await
        .unwrap();
    assert!(r.status() == StatusCode::BAD_REQUEST || r.status() == StatusCode::NOT_FOUND);
    let r = c.get(t.at("/v2/nothing-here")).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    // An empty digest names the blob endpoint with a bad digest, not a
    // missing endpoint.
    for method in [
        reqwest::Method::GET,
        reqwest::Method::HEAD,
        reqwest::Method::DELETE,
    ] {
        let r = c
            .request(method.clone(), t.at("/v2/ok/blobs/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{method}");
        if method != reqwest::Method::HEAD {
            expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
        }
    }
    let r = c.post(t.at("/v2/ok/tags/list")).send().await.unwrap();
    expect_error(r, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED").await;
}

#[tokio::test]
async fn cross_repository_mounts() {
    let t = Trow::start();
    let c = client();
    let digest = push_blob(&c, &t.url, "source/repo", b"layer to share").await;

    let r = c
        .post(t.at(&format!(
            "/v2/target/repo/blobs/uploads/?mount={digest}&from=source/repo"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "location"),
        format!("/v2/target/repo/blobs/{digest}")
    );
    let r = c
        .get(t.at(&format!("/v2/target/repo/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"layer to share");

    // The source does not hold it: fall back to a normal upload.
    let missing = sha256(b"not anywhere");
    let r = c
        .post(t.at(&format!(
            "/v2/third/blobs/uploads/?mount={missing}&from=source/repo"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(header(&r, "location").starts_with("/v2/third/blobs/uploads/"));
    let r = c
        .post(t.at(&format!(
            "/v2/fourth/blobs/uploads/?mount={digest}&from=empty/repo"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // Without `from`, the registry finds a repository holding the blob.
    let r = c
        .post(t.at(&format!("/v2/fifth/blobs/uploads/?mount={digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .head(t.at(&format!("/v2/fifth/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let r = c
        .post(t.at(&format!("/v2/x/blobs/uploads/?mount={digest}&from=BAD")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "NAME_INVALID").await;
}

#[tokio::test]
async fn delete_blob_and_dedup() {
    let t = Trow::start();
    let c = client();
    // Larger than the blobs kept in the database, so it is a file.
    let shared = data(7, 100 << 10);
    let digest = push_blob(&c, &t.url, "d1", &shared).await;
    push_blob(&c, &t.url, "d2", &shared).await;
    push_blob(&c, &t.url, "d1", &shared).await;
    let hex = digest.trim_start_matches("sha256:");
    let dir = t.data_dir.join("blobs/sha256").join(&hex[..2]);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "one copy on disk"
    );

    let r = c
        .delete(t.at(&format!("/v2/d1/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c
        .get(t.at(&format!("/v2/d1/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await;
    let r = c
        .delete(t.at(&format!("/v2/d1/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await;
    // The other repository still serves it.
    let r = c
        .get(t.at(&format!("/v2/d2/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &shared[..]);
}

#[tokio::test]
async fn sha512_blobs() {
    use sha2::Digest as _;
    let t = Trow::start();
    let c = client();
    let bytes = data(5, 5000);
    let digest = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&bytes)));
    let r = c
        .post(t.at(&format!("/v2/s512/blobs/uploads/?digest={digest}")))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .get(t.at(&format!("/v2/s512/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(r.bytes().await.unwrap().as_ref(), bytes.as_slice());
}

#[tokio::test]
async fn abandoned_uploads_expire() {
    let t = Trow::start_with(&["--upload-expiry", "2s"]);
    let c = client();
    let r = c
        .post(t.at("/v2/slow/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = header(&r, "location");
    c.patch(t.at(&location))
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = c.get(t.at(&location)).send().await.unwrap();
        if r.status() == StatusCode::NOT_FOUND {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "upload did not expire"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    // The session answers 404 as soon as it is forgotten; the expiry pass
    // logs just after, so wait (bounded) for its line rather than race it.
    t.expect_log("expired abandoned upload").await;
    assert_eq!(
        std::fs::read_dir(t.data_dir.join("uploads"))
            .unwrap()
            .count(),
        0
    );
}
