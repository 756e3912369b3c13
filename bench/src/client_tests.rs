//! The token flow against an in-process mock registry on loopback: a 401
//! with a Bearer challenge must lead to one token request per scope (with the
//! Basic credentials), after which requests carry the token; pagination
//! follows `Link` headers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// Base64 of "user:pass".
const BASIC: &str = "Basic dXNlcjpwYXNz";

async fn serve_one(mut sock: tokio::net::TcpStream, port: u16, tokens: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    let req = String::from_utf8_lossy(&buf).to_string();
    let target = req.split_whitespace().nth(1).unwrap_or("").to_string();
    let auth = req
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let (status, headers, body) = if let Some(q) = target.strip_prefix("/token?") {
        tokens.fetch_add(1, Ordering::SeqCst);
        if auth != BASIC || !q.contains("service=svc") {
            ("401 Unauthorized", String::new(), "{}".to_string())
        } else {
            let scope = q.split("scope=").nth(1).unwrap_or("none").to_string();
            let body = format!("{{\"access_token\":\"tok-{}\"}}", scope.replace('%', "_"));
            ("200 OK", String::new(), body)
        }
    } else if !auth.starts_with("Bearer tok-") {
        let scope = if target.starts_with("/v2/a/") {
            ",scope=\"repository:a:pull\""
        } else {
            ""
        };
        let h = format!(
            "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"svc\"{scope}\r\n"
        );
        ("401 Unauthorized", h, "{}".to_string())
    } else if target == "/v2/" {
        ("200 OK", String::new(), "{}".to_string())
    } else if target == "/v2/a/tags/list?n=2" {
        let h = "Link: </v2/a/tags/list?n=2&last=y>; rel=\"next\"\r\n".to_string();
        ("200 OK", h, r#"{"name":"a","tags":["x","y"]}"#.to_string())
    } else if target == "/v2/a/tags/list?n=2&last=y" {
        (
            "200 OK",
            String::new(),
            r#"{"name":"a","tags":["z"]}"#.to_string(),
        )
    } else {
        ("404 Not Found", String::new(), "{}".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

#[tokio::test]
async fn token_flow_and_pagination() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tokens = Arc::new(AtomicUsize::new(0));
    let t2 = tokens.clone();
    let server = tokio::spawn(async move {
        // Bounded: the test makes fewer than 100 connections.
        for _ in 0..100 {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_one(sock, port, t2.clone()));
        }
    });

    let reg = Registry::new(
        &format!("http://127.0.0.1:{port}"),
        Some(("user".into(), "pass".into())),
        Duration::from_secs(10),
    )
    .unwrap();
    reg.ping().await.unwrap();
    assert_eq!(tokens.load(Ordering::SeqCst), 1);

    let scope = repo_scope("a", Access::Pull);
    let mut url = Some(reg.tags_url("a", 2).unwrap());
    let (mut items, mut pages) = (0, 0);
    while let Some(u) = url.take() {
        let p = reg.list_page(&u, &scope).await.unwrap();
        items += p.items;
        pages += 1;
        url = p.next;
        assert!(pages < 5);
    }
    assert_eq!((items, pages), (3, 2));
    // One more token for the repository scope, reused for the second page.
    assert_eq!(tokens.load(Ordering::SeqCst), 2);

    // A token can be fetched ahead of time with the realm learnt from /v2/.
    let reg = Arc::new(
        Registry::new(
            &format!("http://127.0.0.1:{port}"),
            Some(("user".into(), "pass".into())),
            Duration::from_secs(10),
        )
        .unwrap(),
    );
    reg.ping().await.unwrap();
    reg.prefetch(&scope).await.unwrap();
    assert_eq!(tokens.load(Ordering::SeqCst), 4);
    reg.list_page(&reg.tags_url("a", 2).unwrap(), &scope)
        .await
        .unwrap();
    assert_eq!(tokens.load(Ordering::SeqCst), 4);

    // Many workers hitting a 401 together cause a single token request.
    let other = "repository:a:pull,push";
    let mut joins = Vec::new();
    for _ in 0..16 {
        let reg = reg.clone();
        joins.push(tokio::spawn(async move {
            let url = reg.tags_url("a", 2).unwrap();
            reg.list_page(&url, other).await.map(|p| p.items)
        }));
    }
    for j in joins {
        assert_eq!(j.await.unwrap().unwrap(), 2);
    }
    assert_eq!(tokens.load(Ordering::SeqCst), 5);
    server.abort();
}

#[tokio::test]
async fn failed_status_is_an_error_with_context() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tokens = Arc::new(AtomicUsize::new(0));
    let t2 = tokens.clone();
    let server = tokio::spawn(async move {
        for _ in 0..10 {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_one(sock, port, t2.clone()));
        }
    });
    // Wrong password: the token endpoint refuses, which must surface as an
    // error rather than a panic or a retry loop.
    let reg = Registry::new(
        &format!("http://127.0.0.1:{port}"),
        Some(("user".into(), "wrong".into())),
        Duration::from_secs(10),
    )
    .unwrap();
    let err = reg.ping().await.unwrap_err();
    assert!(format!("{err:#}").contains("token request"), "{err:#}");
    server.abort();
}
