//! Hostile and slow clients at the connection level (issue 9): connections
//! that send nothing, half a request head or half a body, clients that stop
//! reading, more connections than the cap, and a shutdown with a stalled
//! upload. The hostile clients are raw TCP sockets; the server runs with
//! timeouts of a few seconds so that the tests are quick. Every wait is
//! bounded, and only generous upper bounds are asserted.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::fake_upstream::FakeUpstream;
use common::oci::*;
use common::{client, required_header, Trow};
use futures_util::StreamExt as _;
use reqwest::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

/// Generous bound for anything the server should do within its timeouts of
/// a few seconds, on a busy machine.
const WITHIN: Duration = Duration::from_secs(30);

async fn connect(t: &Trow) -> TcpStream {
    timeout(WITHIN, TcpStream::connect(("127.0.0.1", t.port)))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Reads until the server closes the connection (EOF or reset) or
/// `deadline` passes. Returns what was read, or `None` if it is still open.
async fn read_until_closed(
    mut stream: impl AsyncRead + Unpin,
    deadline: Instant,
) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// Opens an upload on `repo` and returns its path (`/v2/<repo>/blobs/uploads/<id>`).
async fn start_upload(c: &reqwest::Client, t: &Trow, repo: &str) -> String {
    let r = c
        .post(t.at(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    required_header(&r, "location")
}

/// A PATCH whose head announces `announced` bytes, followed by only `sent`.
fn stalled_patch(path: &str, announced: usize, sent: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "PATCH {path} HTTP/1.1\r\nHost: trow\r\nContent-Type: application/octet-stream\r\nContent-Length: {announced}\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(sent);
    request
}

/// The `0-<last>` of an upload status, as the offset to continue from.
async fn upload_offset(c: &reqwest::Client, t: &Trow, path: &str) -> usize {
    let r = c.get(t.at(path)).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NO_CONTENT,
        "upload status of {path}"
    );
    let range = required_header(&r, "range");
    let last: usize = range
        .strip_prefix("0-")
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("bad Range {range}"));
    last + 1
}

/// Sends `content[offset..]` and completes the upload; expects 201.
async fn finish_upload(c: &reqwest::Client, t: &Trow, path: &str, content: &[u8], offset: usize) {
    let r = c
        .patch(t.at(path))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", format!("{offset}-{}", content.len() - 1))
        .body(content[offset..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED, "resume {path}");
    let r = c
        .put(t.at(&format!("{path}?digest={}", sha256(content))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "finish {path}");
}

/// 300 hostile connections (100 idle, 100 with half a request head of which
/// half trickle a byte now and then, 100 PATCHes that stop after 4 KiB) do
/// not keep a normal client from pushing and pulling; the server then
/// closes them all, the stalled PATCHes with `BLOB_UPLOAD_INVALID`, and the
/// stalled uploads can be resumed and finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_are_closed_and_do_not_starve_others() {
    let t = Trow::start_with(&[
        "--idle-timeout",
        "4s",
        "--header-read-timeout",
        "3s",
        "--body-idle-timeout",
        "4s",
    ]);
    let c = client();
    const UPLOAD: usize = 64 * 1024;
    const SENT: usize = 4 * 1024;
    let mut uploads = Vec::new();
    for i in 0..100u64 {
        let path = start_upload(&c, &t, "slow/uploads").await;
        uploads.push((path, data(1000 + i, UPLOAD)));
    }

    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(connect(&t).await);
    }
    let mut half_heads = Vec::new();
    let mut tricklers = Vec::new();
    for i in 0..100 {
        let mut s = connect(&t).await;
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: trow\r\nX-Slow: ")
            .await
            .unwrap();
        let (read, mut write) = s.into_split();
        if i % 2 == 0 {
            // A byte now and then, so that bytes keep moving.
            tricklers.push(tokio::spawn(async move {
                for _ in 0..120 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if write.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            }));
        } else {
            tricklers.push(tokio::spawn(async move {
                let _hold = write;
                tokio::time::sleep(WITHIN * 2).await;
            }));
        }
        half_heads.push(read);
    }
    let mut stalled = Vec::new();
    for (path, content) in &uploads {
        let mut s = connect(&t).await;
        s.write_all(&stalled_patch(path, UPLOAD, &content[..SENT]))
            .await
            .unwrap();
        stalled.push(s);
    }

    // Meanwhile a normal client pushes an image and pulls it back.
    let normal = async {
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let layer = data(7, 1 << 20);
        push_blob(&c, &t.url, "normal/app", &config).await;
        let layer_digest = push_blob(&c, &t.url, "normal/app", &layer).await;
        let manifest = image_manifest(&config, &[&layer]);
        put_manifest(&c, &t.url, "normal/app", "v1", OCI_MANIFEST, &manifest).await;
        let pulled = get_manifest(&c, &t.url, "normal/app", "v1").await;
        assert_eq!(pulled.status, StatusCode::OK);
        assert_eq!(pulled.body, manifest);
        let pulled = get_blob(&c, &t.url, "normal/app", &layer_digest).await;
        assert_eq!(pulled.status, StatusCode::OK);
        assert!(pulled.body == layer, "the layer comes back byte for byte");
    };
    timeout(WITHIN, normal)
        .await
        .expect("a normal push and pull is not starved by hostile connections");

    // Then the server closes every hostile connection.
    let deadline = Instant::now() + WITHIN;
    let idle_closed =
        futures_util::future::join_all(idle.into_iter().map(|s| read_until_closed(s, deadline)));
    let heads_closed = futures_util::future::join_all(
        half_heads
            .into_iter()
            .map(|s| read_until_closed(s, deadline)),
    );
    let stalled_closed =
        futures_util::future::join_all(stalled.into_iter().map(|s| read_until_closed(s, deadline)));
    let (idle_closed, heads_closed, stalled_closed) =
        tokio::join!(idle_closed, heads_closed, stalled_closed);
    let open = |closed: &[Option<Vec<u8>>]| closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(open(&idle_closed), 0, "idle connections left open");
    assert_eq!(open(&heads_closed), 0, "half-sent request heads left open");
    assert_eq!(open(&stalled_closed), 0, "stalled uploads left open");
    for answer in stalled_closed.iter().flatten() {
        let answer = String::from_utf8_lossy(answer);
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("BLOB_UPLOAD_INVALID"),
            "a stalled PATCH is answered BLOB_UPLOAD_INVALID: {answer}"
        );
    }
    for trickler in tricklers {
        trickler.abort();
    }

    // The stalled uploads resume from where they stopped.
    let resume = async {
        for (path, content) in &uploads {
            let offset = upload_offset(&c, &t, path).await;
            assert!(offset > 0 && offset <= SENT, "offset {offset} of {path}");
            finish_upload(&c, &t, path, content, offset).await;
            let pulled = get_blob(&c, &t.url, "slow/uploads", &sha256(content)).await;
            assert_eq!(pulled.status, StatusCode::OK);
            assert!(&pulled.body == content);
        }
    };
    timeout(WITHIN * 2, resume)
        .await
        .expect("resuming the stalled uploads");
}

/// Slow clients that keep going, and server-side work that takes longer
/// than the timeouts, are left alone while a stalled upload beside them is
/// cut: an upload sending a little every half second, a download read a
/// little every half second, and a pull through the cache whose upstream
/// pauses for three idle timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_clients_and_slow_server_work_are_not_cut() {
    let up = FakeUpstream::start().await;
    let cached = Bytes::from(data(77, 1 << 20));
    let cached_digest = up.add_blob(cached.clone());
    up.behaviour.lock().hold_after = Some(64 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        &format!(
            "registry_proxies:\n  registries:\n{}",
            common::insecure_upstream(&up.host, "fake")
        ),
    );
    let t = Trow::start_with(&[
        "--config-file",
        config.to_str().unwrap(),
        "--idle-timeout",
        "2s",
        "--header-read-timeout",
        "2s",
        "--body-idle-timeout",
        "2s",
    ]);
    let c = client();
    let download = data(79, 32 << 20);
    let download_digest = push_blob(&c, &t.url, "steady/download", &download).await;
    let upload_path = start_upload(&c, &t, "steady/upload").await;
    let stalled_path = start_upload(&c, &t, "steady/stalled").await;

    let mut stalled = connect(&t).await;
    stalled
        .write_all(&stalled_patch(&stalled_path, 1 << 20, &data(80, 4096)))
        .await
        .unwrap();
    let stalled = read_until_closed(stalled, Instant::now() + WITHIN);

    let content = data(78, 12 * 8192);
    let upload = async {
        let chunks: Vec<Bytes> = content.chunks(8192).map(Bytes::copy_from_slice).collect();
        let body = futures_util::stream::iter(chunks).then(|chunk| async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, std::io::Error>(chunk)
        });
        let r = c
            .patch(t.at(&upload_path))
            .header("Content-Type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "a steady upload is cut");
        let r = c
            .put(t.at(&format!("{upload_path}?digest={}", sha256(&content))))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    };

    let slow_reader = async {
        let mut s = connect(&t).await;
        s.write_all(
            format!(
                "GET /v2/steady/download/blobs/{download_digest} HTTP/1.1\r\nHost: trow\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        for _ in 0..12 {
            let n = timeout(WITHIN, s.read(&mut buf))
                .await
                .expect("a slow reader gets data")
                .unwrap();
            assert!(n > 0, "a download read slowly but steadily is cut");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };

    let through_cache = async {
        let r = c
            .get(t.at(&format!("/v2/f/fake/steady/cached/blobs/{cached_digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes()
            .await
            .expect("a pull waiting for its upstream is cut")
    };
    let release = async {
        tokio::time::sleep(Duration::from_secs(6)).await;
        up.release();
    };

    let ((), (), pulled, (), stalled) = timeout(WITHIN * 2, async {
        tokio::join!(upload, slow_reader, through_cache, release, stalled)
    })
    .await
    .expect("steady clients finish");
    assert!(pulled == cached, "the cached blob comes back byte for byte");
    let stalled = stalled.expect("the stalled upload beside them is left open");
    let stalled = String::from_utf8_lossy(&stalled);
    assert!(stalled.contains("BLOB_UPLOAD_INVALID"), "{stalled}");
}

/// A manifest PUT whose body stops is ended by the body idle timeout too
/// (manifests are read whole, apart from blob uploads).
#[tokio::test]
async fn stalled_manifest_put_is_ended() {
    let t = Trow::start_with(&["--body-idle-timeout", "2s"]);
    let mut s = connect(&t).await;
    s.write_all(
        format!(
            "PUT /v2/stalled/manifest/manifests/v1 HTTP/1.1\r\nHost: trow\r\nContent-Type: {OCI_MANIFEST}\r\nContent-Length: 1000\r\n\r\n{{\"schemaVersion\":2,"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_until_closed(s, Instant::now() + WITHIN)
        .await
        .expect("a stalled manifest body keeps its connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("MANIFEST_INVALID"),
        "{answer}"
    );
    assert!(answer.contains("no data for 2s"), "{answer}");
}

/// A request head trickling in a byte at a time is cut by the header-read
/// timeout (counted from its first byte), although bytes keep moving and the
/// idle timeout is far away; a kept-alive connection idle between requests
/// is not, since that is the idle timeout's business.
#[tokio::test]
async fn slow_request_heads_are_cut_by_the_header_timeout() {
    let t = Trow::start_with(&["--header-read-timeout", "2s", "--idle-timeout", "5m"]);
    let slow = connect(&t).await;
    let (read, mut write) = slow.into_split();
    let trickler = tokio::spawn(async move {
        let head = b"GET /v2/ HTTP/1.1\r\nHost: trow\r\nX-Slow: ";
        let mut pending = head.iter().copied().chain(std::iter::repeat(b'a'));
        for _ in 0..120 {
            let byte = pending.next().unwrap_or(b'a');
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });

    let mut kept = connect(&t).await;
    let request = b"GET /v2/ HTTP/1.1\r\nHost: trow\r\n\r\n";
    let mut answer = vec![0u8; 4096];
    kept.write_all(request).await.unwrap();
    let n = timeout(WITHIN, kept.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));

    let closed = read_until_closed(read, Instant::now() + WITHIN).await;
    trickler.abort();
    assert!(
        closed.is_some(),
        "a request head trickling in for 30 s is still being read"
    );

    // Idle between requests for longer than the header-read timeout, the
    // kept-alive connection still serves its next request.
    tokio::time::sleep(Duration::from_secs(3)).await;
    kept.write_all(request).await.unwrap();
    let n = timeout(WITHIN, kept.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
}

/// HTTP/2 connections (cleartext, prior knowledge) that send nothing after
/// the preface, or only pings, are closed by the idle timeout.
#[tokio::test]
async fn idle_http2_connections_are_closed() {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    const PING: [u8; 17] = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let t = Trow::start_with(&["--idle-timeout", "2s", "--header-read-timeout", "2s"]);
    let mut quiet = connect(&t).await;
    quiet.write_all(PREFACE).await.unwrap();
    quiet.write_all(&SETTINGS).await.unwrap();
    let mut pinging = connect(&t).await;
    pinging.write_all(PREFACE).await.unwrap();
    pinging.write_all(&SETTINGS).await.unwrap();
    let (read, mut write) = pinging.into_split();
    let pinger = tokio::spawn(async move {
        for _ in 0..120 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if write.write_all(&PING).await.is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + WITHIN;
    let (quiet, pinging) = tokio::join!(
        read_until_closed(quiet, deadline),
        read_until_closed(read, deadline)
    );
    pinger.abort();
    assert!(quiet.is_some(), "a silent HTTP/2 connection stays open");
    assert!(
        pinging.is_some(),
        "an HTTP/2 connection kept busy by pings only stays open"
    );
    let r = client().get(t.at("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// Over TLS too: a connection that sends nothing, one that stops in the
/// middle of its handshake, and an HTTP/2 connection (ALPN) that completes
/// its handshake and then sends nothing are all closed; HTTPS still works.
#[tokio::test]
async fn idle_tls_connections_are_closed() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let pki = common::secure::Pki::new();
    let (_, tls_flag) = pki.write_cert(1, &pki.dir.path().join("server"));
    let t = Trow::start_with(&[
        tls_flag.as_str(),
        "--idle-timeout",
        "2s",
        "--header-read-timeout",
        "2s",
    ]);
    let ca_pem = std::fs::read_to_string(pki.ca_path()).unwrap();

    let silent = connect(&t).await;
    let mut half_handshake = connect(&t).await;
    // The start of a TLS record carrying a ClientHello, and no more.
    half_handshake
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let h2 = timeout(
        WITHIN,
        connector.connect(
            ServerName::try_from("127.0.0.1").unwrap(),
            connect(&t).await,
        ),
    )
    .await
    .expect("TLS handshake")
    .expect("TLS handshake");
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    let deadline = Instant::now() + WITHIN;
    let (silent, half_handshake, h2) = tokio::join!(
        read_until_closed(silent, deadline),
        read_until_closed(half_handshake, deadline),
        read_until_closed(h2, deadline)
    );
    assert!(
        silent.is_some(),
        "a silent connection to the TLS port stays open"
    );
    assert!(
        half_handshake.is_some(),
        "a half-done TLS handshake stays open"
    );
    assert!(
        h2.is_some(),
        "an idle HTTP/2 connection over TLS stays open"
    );
    let r = common::secure::https_client(&ca_pem)
        .get(format!("https://127.0.0.1:{}/v2/", t.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// A client that stops reading a large download is disconnected (after the
/// idle timeout, the server's writes make no progress), and the server
/// stays healthy.
#[tokio::test]
async fn client_that_stops_reading_is_disconnected() {
    let t = Trow::start_with(&["--idle-timeout", "2s", "--header-read-timeout", "2s"]);
    let c = client();
    // Larger than what the kernel buffers on loopback (a few MiB each way).
    let blob = data(42, 64 << 20);
    let digest = push_blob(&c, &t.url, "big/blob", &blob).await;

    let mut s = connect(&t).await;
    s.write_all(
        format!("GET /v2/big/blob/blobs/{digest} HTTP/1.1\r\nHost: trow\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0;
    while received < 256 * 1024 {
        let n = timeout(WITHIN, s.read(&mut buf))
            .await
            .expect("download starts")
            .unwrap();
        assert!(n > 0, "the download ended early");
        received += n;
    }
    // Stop reading for several idle timeouts, then read what is left.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let rest = read_until_closed(s, Instant::now() + WITHIN)
        .await
        .expect("the server keeps the connection of a client that stopped reading");
    received += rest.len();
    assert!(
        received < blob.len(),
        "the whole blob ({received} bytes with headers) was sent to a client that stopped reading"
    );

    let r = c.get(t.at("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let pulled = timeout(WITHIN, get_blob(&c, &t.url, "big/blob", &digest))
        .await
        .expect("download after the stalled one");
    assert_eq!(pulled.status, StatusCode::OK);
    assert!(pulled.body == blob);
}

/// Over HTTP/2 a client that stops reading one download holds no socket
/// write (flow control stops the server first) and can keep bytes moving
/// with pings; the stalled stream still gets its connection closed.
#[tokio::test]
async fn an_http2_download_left_unread_is_cut_despite_pings() {
    let t = Trow::start_with(&["--idle-timeout", "2s", "--header-read-timeout", "2s"]);
    let blob = data(43, 64 << 20);
    let digest = push_blob(&client(), &t.url, "big/h2", &blob).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .http2_keep_alive_interval(Duration::from_millis(500))
        .http2_keep_alive_while_idle(true)
        .build()
        .unwrap();
    let r = timeout(
        WITHIN,
        h2.get(t.at(&format!("/v2/big/h2/blobs/{digest}"))).send(),
    )
    .await
    .expect("download starts")
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    // Read nothing for several idle timeouts while pings go back and forth.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let rest = timeout(WITHIN, r.bytes())
        .await
        .expect("the rest of the download or an error");
    assert!(
        rest.is_err(),
        "the whole blob was kept for an HTTP/2 client that stopped reading"
    );
}

/// With `--max-connections 50` and 50 idle connections held, a 51st client
/// waits in the listen queue (the log says the limit was reached) and is
/// served once the idle timeout has closed the idle ones; it is not refused.
#[tokio::test]
async fn connections_beyond_the_cap_wait_instead_of_being_refused() {
    let t = Trow::start_with(&[
        "--max-connections",
        "50",
        "--idle-timeout",
        "2s",
        "--header-read-timeout",
        "2s",
    ]);
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(connect(&t).await);
    }
    let r = timeout(WITHIN, client().get(t.at("/v2/")).send())
        .await
        .expect("the 51st request is served once an idle connection closes")
        .expect("the 51st request is not refused");
    assert_eq!(r.status(), StatusCode::OK);
    let deadline = Instant::now() + WITHIN;
    let closed =
        futures_util::future::join_all(held.into_iter().map(|s| read_until_closed(s, deadline)))
            .await;
    assert!(
        closed.iter().all(Option::is_some),
        "idle connections left open"
    );
    assert!(
        t.log().contains("connection limit reached"),
        "the 51st connection did not wait for a place: {}",
        t.log()
    );
}

/// On SIGTERM with an upload stalled mid-body, the process waits for it only
/// until `--shutdown-timeout`, then cuts it, logs so and exits 0.
#[tokio::test]
async fn shutdown_deadline_cuts_stalled_connections() {
    let mut t = Trow::start_with(&["--shutdown-timeout", "2s"]);
    let c = client();
    let path = start_upload(&c, &t, "stalled/shutdown").await;
    let mut s = connect(&t).await;
    s.write_all(&stalled_patch(&path, 1 << 20, &data(3, 4096)))
        .await
        .unwrap();
    // Let the request reach its handler.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = std::time::Instant::now();
    let status = t
        .terminate_within(Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!(
                "trow still runs 15 s after SIGTERM with a stalled upload; log:\n{}",
                t.log()
            )
        });
    assert!(status.success(), "exit status {status}; log:\n{}", t.log());
    let log = t.log();
    assert!(
        log.contains("cutting the connections still open") && log.contains("connections=1"),
        "the log says how many connections were cut:\n{log}"
    );
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    drop(s);
}
