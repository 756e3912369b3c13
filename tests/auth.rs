//! Logins, tokens and per-repository permissions, end to end: the Docker
//! token flow by hand (as docker and containerd send it), skopeo and podman
//! with htpasswd users, the permission rules of the configuration file,
//! hostile Authorization headers and tokens, and failed-login limiting.

mod common;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::containerd::Containerd;
use common::layout::{Image, OciLayout};
use common::oci::{self, sha256};
use common::secure::{self, basic, bearer, client_with, Pki};
use common::tools::{self, skopeo};
use common::*;
use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use serde_json::{json, Value};

const ADMIN: (&str, &str) = ("admin", "admin-secret-1");
const ALICE: (&str, &str) = ("alice", "alice-secret-2");
const BOB: (&str, &str) = ("bob", "bob-secret-3");
const CAROL: (&str, &str) = ("carol", "carol-secret-4");
/// An htpasswd user with an argon2id hash.
const DAVE: (&str, &str) = ("dave", "dave-secret-5");

/// `user:$argon2id$…` with cheap parameters (the server is a debug build).
fn argon2_entry((user, password): (&str, &str)) -> String {
    use argon2::password_hash::CustomizedPasswordHasher;
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    let hash = argon2::Argon2::default()
        .hash_password_customized(password.as_bytes(), b"saltsaltsaltsalt", None, None, params)
        .unwrap();
    format!("{user}:{hash}")
}

/// admin: everything; alice: team A's repositories and the catalog; bob:
/// pull everything; carol: nothing of her own; anonymous: pull `public/*`.
const PERMISSIONS: &str = r#"
permissions:
  admin:
    - repos: "*"
      actions: ["*"]
  alice:
    - repos: ["team-a/*"]
      actions: [pull, push, delete, catalog]
  bob:
    - repos: "*"
      actions: [pull]
  anonymous:
    - repos: "public/*"
      actions: [pull]
"#;

/// A Trow with htpasswd users (and a permissions file when given).
struct Secured {
    trow: Trow,
    base: String,
    service: String,
    dir: tempfile::TempDir,
}

impl Secured {
    fn start(permissions: Option<&str>, extra: &[&str]) -> Secured {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        secure::write_htpasswd(&htpasswd, &[ADMIN, ALICE, BOB, CAROL]);
        // As `htpasswd -B` writes them ($2y$), and an argon2id entry.
        let text = std::fs::read_to_string(&htpasswd)
            .unwrap()
            .replace("carol:$2b$", "carol:$2y$");
        std::fs::write(
            &htpasswd,
            format!("# users\n{text}\n{}\n", argon2_entry(DAVE)),
        )
        .unwrap();
        let mut args: Vec<String> = vec![format!("--htpasswd={}", htpasswd.display())];
        if let Some(p) = permissions {
            let cfg = dir.path().join("trow.yaml");
            std::fs::write(&cfg, p).unwrap();
            args.push(format!("--config-file={}", cfg.display()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let trow = Trow::start_with(&refs);
        let base = trow.url.clone();
        // Without --hostname the token service is fixed, whatever the
        // client addressed.
        let service = "trow".to_string();
        Secured {
            trow,
            base,
            service,
            dir,
        }
    }

    fn as_user(&self, (u, p): (&str, &str)) -> reqwest::Client {
        client_with(&basic(u, p))
    }

    async fn token(&self, who: Option<(&str, &str)>, scopes: &[&str]) -> String {
        secure::token(&self.base, who, scopes).await
    }

    fn key_path(&self) -> PathBuf {
        self.trow.data_dir.join("token.key")
    }
}

fn www_authenticate(f: &oci::Fetched) -> String {
    f.header("www-authenticate").to_string()
}

async fn get(c: &reqwest::Client, url: String) -> oci::Fetched {
    oci::fetch(c.get(url)).await
}

#[tokio::test]
async fn the_docker_token_flow_by_hand() {
    let s = Secured::start(Some(PERMISSIONS), &[]);
    let anon = client();

    // docker login starts with GET /v2/: 401 and where to get a token.
    let r = get(&anon, format!("{}/v2/", s.base)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error_code(), "UNAUTHORIZED");
    assert_eq!(
        www_authenticate(&r),
        format!(
            "Bearer realm=\"http://{}/login\",service=\"trow\"",
            s.trow.host
        )
    );

    // The token request docker sends.
    let r = oci::fetch(
        anon.get(format!("{}/login", s.base))
            .query(&[
                ("account", "alice"),
                ("service", s.service.as_str()),
                ("scope", "repository:team-a/app:pull,push"),
            ])
            .header(AUTHORIZATION, basic(ALICE.0, ALICE.1)),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let body = r.json();
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["access_token"], body["token"]);
    assert_eq!(body["expires_in"], 300);
    let issued = body["issued_at"].as_str().unwrap();
    assert!(
        issued.ends_with('Z') && issued.contains('T'),
        "issued_at is RFC 3339: {issued}"
    );
    let claims = secure::claims(&token);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], s.service.as_str());
    assert_eq!(
        claims["access"],
        json!([{ "type": "repository", "name": "team-a/app", "actions": ["pull", "push"] }])
    );

    // The token opens /v2/ and lets alice push and pull team-a/app.
    let with_token = client_with(&bearer(&token));
    let r = get(&with_token, format!("{}/v2/", s.base)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, b"{}");
    let (manifest, _) = oci::push_image(&with_token, &s.base, "team-a/app", "v1", 1).await;
    let got = oci::get_manifest(&with_token, &s.base, "team-a/app", "v1").await;
    assert!(got.body == manifest);

    // Without credentials, the challenge names the scope needed.
    let r = oci::get_manifest(&anon, &s.base, "team-a/app", "v1").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        www_authenticate(&r).ends_with(",scope=\"repository:team-a/app:pull\""),
        "{}",
        www_authenticate(&r)
    );
    let r = oci::fetch(anon.post(format!("{}/v2/team-a/app/blobs/uploads/", s.base))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(www_authenticate(&r).contains("scope=\"repository:team-a/app:pull,push\""));
    let r = oci::fetch(anon.delete(format!("{}/v2/team-a/app/manifests/v1", s.base))).await;
    assert!(www_authenticate(&r).contains("scope=\"repository:team-a/app:delete\""));

    // A wrong password gets no token.
    let r = oci::fetch(
        anon.get(format!("{}/login", s.base))
            .header(AUTHORIZATION, basic(ALICE.0, "wrong")),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = oci::fetch(
        anon.get(format!("{}/login", s.base))
            .header(AUTHORIZATION, basic("nobody", "wrong")),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // `$2y$` (htpasswd -B) and argon2 entries log in too.
    for who in [CAROL, DAVE] {
        let r = get(&s.as_user(who), format!("{}/v2/", s.base)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", who.0);
        let t = s.token(Some(who), &["repository:public/x:pull"]).await;
        assert_eq!(secure::claims(&t)["sub"], who.0);
        let r = get(&s.as_user((who.0, "nope")), format!("{}/v2/", s.base)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", who.0);
    }

    // Basic credentials work directly on API calls too.
    let r = get(&s.as_user(ALICE), format!("{}/v2/", s.base)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = oci::get_manifest(&s.as_user(ALICE), &s.base, "team-a/app", "v1").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(&s.as_user((ALICE.0, "wrong")), format!("{}/v2/", s.base)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // The endpoints Kubernetes probes stay open.
    for p in ["/healthz", "/readiness"] {
        assert_eq!(get(&anon, s.trow.at(p)).await.status, StatusCode::OK, "{p}");
    }

    // containerd's way: an OAuth2 password grant by POST.
    let r = oci::fetch(anon.post(format!("{}/login", s.base)).form(&[
        ("grant_type", "password"),
        ("username", ALICE.0),
        ("password", ALICE.1),
        ("service", s.service.as_str()),
        ("scope", "repository:team-a/app:pull"),
        ("client_id", "containerd-client"),
    ]))
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let t = r.json()["access_token"].as_str().unwrap().to_string();
    let r = oci::get_manifest(&client_with(&bearer(&t)), &s.base, "team-a/app", "v1").await;
    assert_eq!(r.status, StatusCode::OK);
    // A grant we do not support answers 400, on which containerd falls
    // back to GET.
    let r = oci::fetch(anon.post(format!("{}/login", s.base)).form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", "x"),
        ("service", s.service.as_str()),
    ]))
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = oci::fetch(anon.post(format!("{}/login", s.base)).form(&[
        ("grant_type", "password"),
        ("username", ALICE.0),
        ("password", "wrong"),
    ]))
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // A token request for another service is refused.
    let r = oci::fetch(
        anon.get(format!("{}/login?service=elsewhere.example", s.base))
            .header(AUTHORIZATION, basic(ALICE.0, ALICE.1)),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_pull_only_user_cannot_push_or_delete() {
    let s = Secured::start(Some(PERMISSIONS), &[]);
    oci::push_image(&s.as_user(ALICE), &s.base, "team-a/app", "v1", 2).await;

    // bob asks for pull and push; the token grants only pull.
    let t = s
        .token(Some(BOB), &["repository:team-a/app:pull,push"])
        .await;
    assert_eq!(
        secure::claims(&t)["access"],
        json!([{ "type": "repository", "name": "team-a/app", "actions": ["pull"] }])
    );
    let bob_token = client_with(&bearer(&t));
    let r = oci::get_manifest(&bob_token, &s.base, "team-a/app", "v1").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = oci::fetch(bob_token.post(format!("{}/v2/team-a/app/blobs/uploads/", s.base))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "DENIED");
    let r = oci::fetch(
        bob_token
            .put(format!("{}/v2/team-a/app/manifests/v2", s.base))
            .header("content-type", oci::OCI_MANIFEST)
            .body("{}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // The same with Basic credentials.
    let bob = s.as_user(BOB);
    let r = oci::fetch(bob.post(format!("{}/v2/team-a/app/blobs/uploads/", s.base))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "DENIED");
    let r = oci::fetch(bob.delete(format!("{}/v2/team-a/app/manifests/v1", s.base))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // alice may delete in team A.
    let r = oci::fetch(
        s.as_user(ALICE)
            .delete(format!("{}/v2/team-a/app/manifests/v1", s.base)),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // alice may not push outside team A.
    let r = oci::fetch(
        s.as_user(ALICE)
            .post(format!("{}/v2/team-b/app/blobs/uploads/", s.base)),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn anonymous_pull_is_allowed_and_push_refused_when_configured() {
    let s = Secured::start(Some(PERMISSIONS), &[]);
    let (manifest, _) = oci::push_image(&s.as_user(ADMIN), &s.base, "public/base", "v1", 3).await;
    oci::push_image(&s.as_user(ADMIN), &s.base, "team-a/app", "v1", 4).await;
    let anon = client();

    let r = oci::get_manifest(&anon, &s.base, "public/base", "v1").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body == manifest);
    let r = get(&anon, format!("{}/v2/public/base/tags/list", s.base)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = oci::get_manifest(&anon, &s.base, "team-a/app", "v1").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Push without credentials: a challenge, so the client can log in.
    let r = oci::fetch(anon.post(format!("{}/v2/public/base/blobs/uploads/", s.base))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // An anonymous token is granted pull only, and push with it is refused.
    let t = s.token(None, &["repository:public/base:pull,push"]).await;
    let c = secure::claims(&t);
    assert_eq!(c["sub"], "anonymous");
    assert_eq!(c["access"][0]["actions"], json!(["pull"]));
    let r = oci::fetch(
        client_with(&bearer(&t)).post(format!("{}/v2/public/base/blobs/uploads/", s.base)),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = oci::get_manifest(&client_with(&bearer(&t)), &s.base, "public/base", "v1").await;
    assert_eq!(r.status, StatusCode::OK);

    if !have_tool("skopeo") {
        return;
    }
    // skopeo without credentials: pulls from public/, cannot push.
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{}/public/base:v1", s.trow.host),
        &format!("oci:{}:v1", out.display()),
    ])
    .await;
    let pushed = tools::run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{}/public/base:v1", s.trow.host),
            &format!("docker://{}/public/copy:v1", s.trow.host),
        ],
    )
    .await;
    assert!(!pushed.status.success(), "anonymous push succeeded");
}

#[tokio::test]
async fn a_token_for_one_repository_is_refused_on_another() {
    let s = Secured::start(Some(PERMISSIONS), &[]);
    let admin = s.as_user(ADMIN);
    oci::push_image(&admin, &s.base, "team-a/one", "v1", 5).await;
    oci::push_image(&admin, &s.base, "team-a/two", "v1", 6).await;
    oci::push_image(&admin, &s.base, "team-b/x", "v1", 7).await;

    // alice may pull team-a/two, but this token is for team-a/one: 401
    // with a challenge for the scope needed, so her client asks again.
    let t = s.token(Some(ALICE), &["repository:team-a/one:pull"]).await;
    let c = client_with(&bearer(&t));
    assert_eq!(
        oci::get_manifest(&c, &s.base, "team-a/one", "v1")
            .await
            .status,
        StatusCode::OK
    );
    let r = oci::get_manifest(&c, &s.base, "team-a/two", "v1").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let w = www_authenticate(&r);
    assert!(
        w.contains("scope=\"repository:team-a/two:pull\"") && w.contains("insufficient_scope"),
        "{w}"
    );
    let blob = oci::get_blob(&c, &s.base, "team-a/two", &sha256(b"{\"seed\":6}")).await;
    assert_eq!(blob.status, StatusCode::UNAUTHORIZED);

    // team-b is not alice's at all: asking gives an empty grant, and the
    // request is denied.
    let t = s.token(Some(ALICE), &["repository:team-b/x:pull"]).await;
    assert_eq!(secure::claims(&t)["access"], json!([]));
    let r = oci::get_manifest(&client_with(&bearer(&t)), &s.base, "team-b/x", "v1").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "DENIED");

    // Several scopes in one token, as in a cross-repository mount.
    let t = s
        .token(
            Some(ADMIN),
            &[
                "repository:team-a/one:pull",
                "repository:team-b/x:pull,push",
            ],
        )
        .await;
    let c = client_with(&bearer(&t));
    assert_eq!(
        oci::get_manifest(&c, &s.base, "team-b/x", "v1")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        oci::get_manifest(&c, &s.base, "team-a/two", "v1")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn mounting_needs_pull_on_the_source() {
    let s = Secured::start(Some(PERMISSIONS), &[]);
    let blob = oci::data(77, 5000);
    let digest = oci::push_blob(&s.as_user(ADMIN), &s.base, "team-b/x", &blob).await;
    let mount = |c: reqwest::Client, from: &'static str| {
        let url = format!(
            "{}/v2/team-a/app/blobs/uploads/?mount={digest}&from={from}",
            s.base
        );
        async move { oci::fetch(c.post(url)).await }
    };
    // alice may push team-a but not read team-b: the mount becomes a
    // plain upload, and the blob stays out of team-a.
    let r = mount(s.as_user(ALICE), "team-b/x").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = oci::get_blob(&s.as_user(ALICE), &s.base, "team-a/app", &digest).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The same without `from`.
    let r = oci::fetch(s.as_user(ALICE).post(format!(
        "{}/v2/team-a/app/blobs/uploads/?mount={digest}",
        s.base
    )))
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // admin may read team-b: mounted.
    let r = mount(s.as_user(ADMIN), "team-b/x").await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn the_catalog_lists_only_what_the_caller_may_pull() {
    let s = Secured::start(Some(PERMISSIONS), &[]);
    let admin = s.as_user(ADMIN);
    for (i, repo) in [
        "public/base",
        "team-a/one",
        "team-a/two",
        "team-b/x",
        "team-c/y",
    ]
    .iter()
    .enumerate()
    {
        oci::push_image(&admin, &s.base, repo, "v1", 10 + i as u64).await;
    }
    let list = |c: reqwest::Client, q: &'static str| {
        let url = format!("{}/v2/_catalog{q}", s.base);
        async move { oci::fetch(c.get(url)).await }
    };
    let r = list(admin.clone(), "").await;
    assert_eq!(
        r.json()["repositories"],
        json!([
            "public/base",
            "team-a/one",
            "team-a/two",
            "team-b/x",
            "team-c/y"
        ])
    );
    let r = list(s.as_user(ALICE), "").await;
    assert_eq!(r.status, StatusCode::OK);
    // alice pulls team-a/* and, as everyone, what anonymous may pull.
    assert_eq!(
        r.json()["repositories"],
        json!(["public/base", "team-a/one", "team-a/two"])
    );

    // Pagination stays right under the filter.
    let r = list(s.as_user(ALICE), "?n=2").await;
    assert_eq!(
        r.json()["repositories"],
        json!(["public/base", "team-a/one"])
    );
    assert_eq!(
        r.header("link"),
        "</v2/_catalog?n=2&last=team-a/one>; rel=\"next\""
    );
    let r = list(s.as_user(ALICE), "?n=2&last=team-a/one").await;
    assert_eq!(r.json()["repositories"], json!(["team-a/two"]));
    assert_eq!(r.header("link"), "");
    let r = list(s.as_user(ALICE), "?n=3").await;
    assert_eq!(r.json()["repositories"].as_array().unwrap().len(), 3);
    assert_eq!(r.header("link"), "", "no Link when nothing visible follows");

    // By token, with the catalog scope.
    let t = s.token(Some(ALICE), &["registry:catalog:*"]).await;
    let r = list(client_with(&bearer(&t)), "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["repositories"].as_array().unwrap().len(), 3);
    // A token without it gets a challenge for it.
    let t = s.token(Some(ALICE), &["repository:team-a/one:pull"]).await;
    let r = list(client_with(&bearer(&t)), "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(www_authenticate(&r).contains("scope=\"registry:catalog:*\""));

    // bob may pull but not list; anonymous must log in.
    assert_eq!(list(s.as_user(BOB), "").await.status, StatusCode::FORBIDDEN);
    let r = list(client(), "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(www_authenticate(&r).contains("registry:catalog:*"));
}

/// Signs `claims` with HS256 and `key`.
fn forge(key: &[u8], alg: jsonwebtoken::Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn hostile_authorization_is_refused_with_401_never_5xx() {
    use base64::Engine as _;
    let s = Secured::start(Some(PERMISSIONS), &[]);
    oci::push_image(&s.as_user(ADMIN), &s.base, "team-a/app", "v1", 20).await;

    // The generated signing key is private to Trow's user.
    let key_path = s.key_path();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "token.key mode {mode:o}");
    }
    let key = std::fs::read_to_string(&key_path).unwrap();
    let key = key.trim_end().as_bytes().to_vec();
    assert!(key.len() >= 32);

    let good = |over: Value| {
        let mut c = json!({
            "iss": "trow", "sub": "admin", "aud": s.service, "iat": now(),
            "nbf": now() - 10, "exp": now() + 300, "jti": "x",
            "access": [{ "type": "repository", "name": "team-a/app", "actions": ["pull"] }],
        });
        for (k, v) in over.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    // The forging works: a correctly signed token is accepted.
    let ok = forge(&key, jsonwebtoken::Algorithm::HS256, &good(json!({})));
    let r = oci::get_manifest(&client_with(&bearer(&ok)), &s.base, "team-a/app", "v1").await;
    assert_eq!(r.status, StatusCode::OK);

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = b64.encode(good(json!({})).to_string());
    let sig = ok.rsplit('.').next().unwrap();
    let wrong_key = [0x42u8; 32];
    let mut tokens: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!("{}.{payload}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#)),
        ),
        (
            "alg none with a signature",
            format!("{}.{payload}.{sig}", b64.encode(r#"{"alg":"none"}"#)),
        ),
        (
            "wrong signature",
            forge(&wrong_key, jsonwebtoken::Algorithm::HS256, &good(json!({}))),
        ),
        (
            "another HMAC algorithm",
            forge(&key, jsonwebtoken::Algorithm::HS512, &good(json!({}))),
        ),
        (
            "RS256 header",
            format!("{}.{payload}.{sig}", b64.encode(r#"{"alg":"RS256"}"#)),
        ),
        (
            "expired",
            forge(
                &key,
                jsonwebtoken::Algorithm::HS256,
                &good(json!({ "exp": now() - 3600, "nbf": now() - 7200 })),
            ),
        ),
        (
            "not yet valid",
            forge(
                &key,
                jsonwebtoken::Algorithm::HS256,
                &good(json!({ "nbf": now() + 3600, "exp": now() + 7200 })),
            ),
        ),
        (
            "another service",
            forge(
                &key,
                jsonwebtoken::Algorithm::HS256,
                &good(json!({ "aud": "elsewhere.example:443" })),
            ),
        ),
        (
            "another issuer",
            forge(
                &key,
                jsonwebtoken::Algorithm::HS256,
                &good(json!({ "iss": "someone-else" })),
            ),
        ),
        ("tampered payload", {
            let parts: Vec<&str> = ok.split('.').collect();
            let evil = b64.encode(
                    good(json!({ "access": [{ "type": "repository", "name": "team-a/app", "actions": ["pull", "push", "delete"] }] }))
                        .to_string(),
                );
            format!("{}.{evil}.{}", parts[0], parts[2])
        }),
        ("garbage", "not-a-jwt".into()),
        ("empty parts", "..".into()),
        ("bad base64", "a!.b!.c!".into()),
        ("huge", "a".repeat(20_000)),
    ];
    // A token for another repository.
    tokens.push((
        "another repository",
        forge(
            &key,
            jsonwebtoken::Algorithm::HS256,
            &good(json!({ "access": [{ "type": "repository", "name": "team-b/x", "actions": ["pull"] }] })),
        ),
    ));
    for (what, t) in &tokens {
        let c = client_with(&bearer(t));
        let r = oci::get_manifest(&c, &s.base, "team-a/app", "v1").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
        assert!(
            www_authenticate(&r).starts_with("Bearer realm="),
            "{what}: {}",
            www_authenticate(&r)
        );
        let expected_error = if *what == "another repository" {
            "error=\"insufficient_scope\""
        } else {
            // What makes clients fetch a new token by themselves.
            "error=\"invalid_token\""
        };
        assert!(
            www_authenticate(&r).contains(expected_error)
                && www_authenticate(&r).contains("scope=\"repository:team-a/app:pull\""),
            "{what}: {}",
            www_authenticate(&r)
        );
        let r = oci::fetch(c.get(format!("{}/v2/", s.base))).await;
        if *what != "another repository" {
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what} on /v2/");
        }
    }

    // Malformed Authorization headers.
    let raw: Vec<reqwest::header::HeaderValue> = [
        "Bearer",
        "Bearer ",
        "Basic",
        "Basic !!!",
        "Basic bm9jb2xvbg==", // "nocolon"
        "Basic OnB3",         // ":pw" (no user)
        "Digest username=\"admin\"",
        "admin:admin-secret-1",
        "Token abc",
    ]
    .iter()
    .map(|v| reqwest::header::HeaderValue::from_str(v).unwrap())
    .chain([reqwest::header::HeaderValue::from_bytes(b"Basic \xff\xfe").unwrap()])
    .collect();
    for v in raw {
        for path in [
            "/v2/",
            "/v2/team-a/app/manifests/v1",
            "/v2/_catalog",
            "/login",
        ] {
            let r = oci::fetch(
                client()
                    .get(format!("{}{path}", s.base))
                    .header(AUTHORIZATION, v.clone()),
            )
            .await;
            assert!(
                r.status == StatusCode::UNAUTHORIZED,
                "{v:?} on {path}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    }
    // Nothing above was an internal error.
    assert!(!s.trow.log().contains("status=500"), "{}", s.trow.log());
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_address() {
    let s = Secured::start(Some(PERMISSIONS), &[]);
    // A token obtained before the attack keeps working through it.
    let t = s.token(Some(BOB), &["repository:public/base:pull"]).await;
    let anon = client();
    let wrong = |path: &'static str| {
        let url = format!("{}{path}", s.base);
        let anon = anon.clone();
        async move { oci::fetch(anon.get(url).header(AUTHORIZATION, basic(ALICE.0, "guess"))).await }
    };
    for i in 0..10 {
        let path = if i % 2 == 0 { "/login" } else { "/v2/" };
        assert_eq!(
            wrong(path).await.status,
            StatusCode::UNAUTHORIZED,
            "attempt {i}"
        );
    }
    for path in ["/login", "/v2/"] {
        let r = wrong(path).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{path}");
        assert_eq!(r.error_code(), "TOOMANYREQUESTS");
        let after: u64 = r
            .header("retry-after")
            .parse()
            .expect("Retry-After seconds");
        assert!((1..=61).contains(&after), "Retry-After {after}");
    }
    // While the address is blocked, passwords are not even checked.
    let r = oci::fetch(
        anon.get(format!("{}/login", s.base))
            .header(AUTHORIZATION, basic(ALICE.0, ALICE.1)),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // Tokens are not affected.
    let r = get(&client_with(&bearer(&t)), format!("{}/v2/", s.base)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(s.trow.log().contains("too many failed logins"));

    // Successful logins are neither counted nor slowed.
    let s2 = Secured::start(Some(PERMISSIONS), &[]);
    let start = std::time::Instant::now();
    for _ in 0..30 {
        s2.token(Some(ALICE), &[]).await;
    }
    let r = get(&s2.as_user(ALICE), format!("{}/v2/", s2.base)).await;
    assert_eq!(r.status, StatusCode::OK);
    eprintln!("30 successful logins took {:?}", start.elapsed());
}

#[tokio::test]
async fn user_and_password_flags_token_key_and_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "from-a-file\n").unwrap();
    let key = dir.path().join("shared.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef-shared\n").unwrap();
    let pw_flag = format!("--password=file://{}", pw.display());
    let key_flag = format!("--token-key={}", key.display());
    let common = [
        "--user",
        "ci",
        pw_flag.as_str(),
        key_flag.as_str(),
        "--hostname",
        "registry.test:5000",
        "--token-lifetime",
        "90s",
    ];
    let a = Trow::start_with(&common);
    let b = Trow::start_with(&common);

    // The password without its newline; the lifetime as configured.
    let body = secure::login(
        &a.url,
        Some(("ci", "from-a-file")),
        &["repository:x:pull,push"],
    )
    .await;
    assert_eq!(body["expires_in"], 90);
    let t = body["token"].as_str().unwrap().to_string();
    let r = oci::fetch(
        client()
            .get(a.at("/login"))
            .header(AUTHORIZATION, basic("ci", "from-a-file\n")),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // The realm and service are the public hostname.
    let r = get(&client(), a.at("/v2/")).await;
    assert_eq!(
        www_authenticate(&r),
        "Bearer realm=\"http://registry.test:5000/login\",service=\"registry.test:5000\""
    );

    // Replicas sharing the key accept each other's tokens; without
    // a permissions section, a logged-in user may do everything.
    let c = client_with(&bearer(&t));
    assert_eq!(get(&c, b.at("/v2/")).await.status, StatusCode::OK);
    let r = oci::fetch(c.post(b.at("/v2/x/blobs/uploads/"))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // (With --hostname, Location is absolute on the public name.)
    assert!(r
        .header("location")
        .starts_with("http://registry.test:5000/v2/x/blobs/uploads/"));
    assert!(!a.data_dir.join("token.key").exists());

    // A replica with its own key does not.
    let other = Trow::start_with(&[
        "--user",
        "ci",
        pw_flag.as_str(),
        "--hostname",
        "registry.test:5000",
    ]);
    let r = get(&c, other.at("/v2/")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(other.data_dir.join("token.key").exists());
    // Anonymous users may do nothing by default.
    let r = oci::get_manifest(&client(), &b.url, "x", "v1").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_request_log_names_the_user_and_no_secret() {
    let s = Secured::start(Some(PERMISSIONS), &[]);
    let t = s
        .token(Some(ALICE), &["repository:team-a/app:pull,push"])
        .await;
    oci::push_image(&client_with(&bearer(&t)), &s.base, "team-a/app", "v1", 40).await;
    oci::get_manifest(&s.as_user(BOB), &s.base, "team-a/app", "v1").await;
    let _ = get(
        &s.as_user((CAROL.0, "carols-wrong-password")),
        format!("{}/v2/", s.base),
    )
    .await;
    let log = s.trow.log();
    let line = |needle: &str| {
        log.lines()
            .any(|l| l.contains("trow::request") && l.contains(needle))
    };
    assert!(line("user=\"alice\"") || line("user=alice"), "{log}");
    assert!(line("user=\"bob\"") || line("user=bob"), "{log}");
    for secret in [
        ALICE.1,
        BOB.1,
        "carols-wrong-password",
        t.as_str(),
        &basic(BOB.0, BOB.1),
        "Bearer ",
    ] {
        assert!(!log.contains(secret), "the log holds a secret: {secret}");
    }
}

#[tokio::test]
async fn without_users_trow_stays_open_and_has_no_login() {
    let trow = Trow::start();
    let r = get(&client(), trow.at("/v2/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("www-authenticate"), "");
    assert_eq!(
        get(&client(), trow.at("/login")).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(!trow.data_dir.join("token.key").exists());
}

#[tokio::test]
async fn bad_auth_configuration_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str, text: &str| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let apr1 = p("apr1", "alice:$apr1$abc$defghijklmnopqrstuvw\n");
    let bad_cfg = p(
        "bad.yaml",
        "permissions:\n  alice:\n    - repos: '*'\n      actions: [pul]\n",
    );
    let typo = p("typo.yaml", "permission:\n  alice: []\n");
    let short = p("short.key", "too-short\n");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--user".into(), "u".into()], "--user needs --password"),
        (
            vec!["--password".into(), "p".into()],
            "--password needs --user",
        ),
        (vec![format!("--htpasswd={apr1}")], "line 1"),
        (
            vec![format!(
                "--htpasswd={}",
                dir.path().join("missing").display()
            )],
            "cannot read",
        ),
        (
            vec![
                format!("--config-file={bad_cfg}"),
                "--user=u".into(),
                "--password=p".into(),
            ],
            "unknown action `pul`",
        ),
        (vec![format!("--config-file={typo}")], "permission"),
        (
            vec![
                "--user=u".into(),
                "--password=p".into(),
                format!("--token-key={short}"),
            ],
            "at least 32",
        ),
        (
            vec![
                "--user=u".into(),
                "--password=p".into(),
                "--token-lifetime=1s".into(),
            ],
            "--token-lifetime",
        ),
        (
            vec!["--user=anonymous".into(), "--password=p".into()],
            "reserved",
        ),
    ];
    for (args, expect) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_trow"))
            .arg("--dry-run")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    // --dry-run prints the configuration without the password.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trow"))
        .args(["--dry-run", "--user=u", "--password=very-secret-value"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("redacted") && !printed.contains("very-secret-value"));
}

/// An OCI layout with one image tagged `v1`.
fn layout_with_image(dir: &Path, seed: u64) -> (OciLayout, Image) {
    let l = OciLayout::create(dir);
    let img = Image::build(seed, "amd64", 2);
    l.add_image(&img);
    l.tag(oci::OCI_MANIFEST, &img.manifest, "v1");
    (l, img)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn skopeo_logs_in_pushes_and_pulls_as_htpasswd_users() {
    if !have_tool("skopeo") {
        return;
    }
    let s = Secured::start(Some(PERMISSIONS), &[]);
    let work = tempfile::tempdir().unwrap();
    let (src, img) = layout_with_image(&work.path().join("src"), 50);
    let host = s.trow.host.clone();
    let authfile = work.path().join("auth.json").display().to_string();
    let remote = format!("docker://{host}/team-a/app:v1");

    // skopeo login: right and wrong passwords.
    let out = tools::run(
        "skopeo",
        &[
            "login",
            "--tls-verify=false",
            "--authfile",
            &authfile,
            "-u",
            ALICE.0,
            "-p",
            "wrong",
            &host,
        ],
    )
    .await;
    assert!(
        !out.status.success(),
        "login with a wrong password succeeded"
    );
    assert!(
        stderr(&out).contains("invalid username/password"),
        "{}",
        stderr(&out)
    );
    skopeo(&[
        "login",
        "--tls-verify=false",
        "--authfile",
        &authfile,
        "-u",
        ALICE.0,
        "-p",
        ALICE.1,
        &host,
    ])
    .await;

    // Push with the stored login, pull as bob with --creds.
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--authfile",
        &authfile,
        &src.reference("v1"),
        &remote,
    ])
    .await;
    let bob_creds = format!("{}:{}", BOB.0, BOB.1);
    let back = work.path().join("back");
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--src-creds",
        &bob_creds,
        &remote,
        &format!("oci:{}:v1", back.display()),
    ])
    .await;
    assert_eq!(OciLayout::open(&back).resolve("v1").unwrap().1, img.digest);

    // bob cannot push.
    let out = tools::run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            &bob_creds,
            &src.reference("v1"),
            &format!("docker://{host}/team-a/bobs:v1"),
        ],
    )
    .await;
    assert!(!out.status.success(), "bob pushed");
    assert!(
        stderr(&out).to_lowercase().contains("denied"),
        "{}",
        stderr(&out)
    );

    // Wrong password with --creds.
    let out = tools::run(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--creds",
            &format!("{}:nope", BOB.0),
            &remote,
        ],
    )
    .await;
    assert!(!out.status.success());

    // Cross-repository push by alice (skopeo mounts blobs within team A).
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--authfile",
        &authfile,
        &remote,
        &format!("docker://{host}/team-a/copy:v1"),
    ])
    .await;
    let got = oci::get_manifest(&s.as_user(ALICE), &s.base, "team-a/copy", "v1").await;
    assert!(got.body == img.manifest);
}

/// podman with private storage in a temporary directory.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    async fn run(&self, args: &[&str]) -> std::process::Output {
        let root = self.dir.join("root").display().to_string();
        let runroot = self.dir.join("runroot").display().to_string();
        let mut all = vec![
            "--root",
            root.as_str(),
            "--runroot",
            runroot.as_str(),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ];
        all.extend_from_slice(args);
        tools::run("podman", &all).await
    }

    async fn ok(&self, args: &[&str]) {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn podman_logs_in_pushes_and_pulls() {
    if !have_tool("podman") || !have_tool("skopeo") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let p = Podman {
        dir: work.path().join("podman"),
    };
    let info = p.run(&["info", "--format", "json"]).await;
    if !info.status.success() {
        assert!(!strict(), "podman cannot run here: {}", stderr(&info));
        eprintln!("SKIPPED: podman cannot run here: {}", stderr(&info));
        return;
    }
    let s = Secured::start(Some(PERMISSIONS), &[]);
    let host = s.trow.host.clone();
    let (src, img) = layout_with_image(&work.path().join("src"), 60);
    let admin = format!("{}:{}", ADMIN.0, ADMIN.1);
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-creds",
        &admin,
        &src.reference("v1"),
        &format!("docker://{host}/team-a/app:v1"),
    ])
    .await;

    let authfile = work.path().join("auth.json").display().to_string();
    let out = p
        .run(&[
            "login",
            "--tls-verify=false",
            "--authfile",
            &authfile,
            "-u",
            ALICE.0,
            "-p",
            "nope",
            &host,
        ])
        .await;
    assert!(!out.status.success(), "podman login with a wrong password");
    p.ok(&[
        "login",
        "--tls-verify=false",
        "--authfile",
        &authfile,
        "-u",
        ALICE.0,
        "-p",
        ALICE.1,
        &host,
    ])
    .await;
    let image = format!("{host}/team-a/app:v1");
    p.ok(&[
        "pull",
        "-q",
        "--tls-verify=false",
        "--authfile",
        &authfile,
        &image,
    ])
    .await;
    let copy = format!("{host}/team-a/from-podman:v1");
    p.ok(&["tag", &image, &copy]).await;
    p.ok(&[
        "push",
        "-q",
        "--tls-verify=false",
        "--authfile",
        &authfile,
        &copy,
    ])
    .await;
    let got = oci::get_manifest(&s.as_user(ALICE), &s.base, "team-a/from-podman", "v1").await;
    assert_eq!(got.status, StatusCode::OK);
    let m = got.json();
    assert_eq!(m["config"]["digest"], sha256(&img.config).as_str());

    // bob, pull-only, is refused.
    let bob_auth = work.path().join("bob.json").display().to_string();
    p.ok(&[
        "login",
        "--tls-verify=false",
        "--authfile",
        &bob_auth,
        "-u",
        BOB.0,
        "-p",
        BOB.1,
        &host,
    ])
    .await;
    let out = p
        .run(&[
            "push",
            "-q",
            "--tls-verify=false",
            "--authfile",
            &bob_auth,
            &image,
            &format!("docker://{host}/team-a/bobs:v1"),
        ])
        .await;
    assert!(!out.status.success(), "bob pushed with podman");
    p.ok(&["logout", "--authfile", &authfile, &host]).await;
}

#[tokio::test]
async fn tls_and_logins_together() {
    if !have_tool("skopeo") {
        return;
    }
    let pki = Pki::new();
    let (_, tls_flag) = pki.write_cert(1, &pki.dir.path().join("server"));
    let s = Secured::start(Some(PERMISSIONS), &[tls_flag.as_str()]);
    let base = format!("https://{}", s.trow.host);
    let r = oci::fetch(secure::https_client(&pki.ca_pem).get(format!("{base}/v2/"))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        www_authenticate(&r),
        format!(
            "Bearer realm=\"https://{}/login\",service=\"trow\"",
            s.trow.host
        )
    );
    let work = tempfile::tempdir().unwrap();
    let (src, img) = layout_with_image(&work.path().join("src"), 70);
    let cert_dir = pki.cert_dir().display().to_string();
    let creds = format!("{}:{}", ALICE.0, ALICE.1);
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-cert-dir",
        &cert_dir,
        "--dest-creds",
        &creds,
        &src.reference("v1"),
        &format!("docker://{}/team-a/tls:v1", s.trow.host),
    ])
    .await;
    let got = oci::get_manifest(
        &secure::https_builder(&pki.ca_pem)
            .default_headers(
                [(AUTHORIZATION, basic(ALICE.0, ALICE.1).parse().unwrap())]
                    .into_iter()
                    .collect(),
            )
            .build()
            .unwrap(),
        &base,
        "team-a/tls",
        "v1",
    )
    .await;
    assert!(got.body == img.manifest);
    let _ = &s.dir;
}

#[tokio::test]
async fn containerd_pulls_with_credentials_and_the_ca_in_hosts_toml() {
    let Some(ctd) = Containerd::start() else {
        return;
    };
    let pki = Pki::new();
    let (_, tls_flag) = pki.write_cert(1, &pki.dir.path().join("server"));
    let s = Secured::start(Some(PERMISSIONS), &[tls_flag.as_str()]);
    let base = format!("https://{}", s.trow.host);
    let admin = secure::https_builder(&pki.ca_pem)
        .default_headers(
            [(AUTHORIZATION, basic(ADMIN.0, ADMIN.1).parse().unwrap())]
                .into_iter()
                .collect(),
        )
        .build()
        .unwrap();
    let image = Image::build(81, "amd64", 2);
    for blob in image.blobs() {
        oci::push_blob(&admin, &base, "team-a/app", blob).await;
    }
    oci::put_manifest(
        &admin,
        &base,
        "team-a/app",
        "v1",
        oci::OCI_MANIFEST,
        &image.manifest,
    )
    .await;

    // The node's configuration: the registry's CA in hosts.toml.
    let hosts = pki.dir.path().join("hosts");
    let host_dir = hosts.join(&s.trow.host);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"https://{0}\"\n\n[host.\"https://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{1}\"\n",
            s.trow.host,
            pki.ca_path().display()
        ),
    )
    .unwrap();
    let reference = format!("{}/team-a/app:v1", s.trow.host);
    let hosts_dir = hosts.display().to_string();
    let pull = |user: Option<String>| {
        let mut args = vec![
            "images".to_string(),
            "pull".into(),
            "--hosts-dir".into(),
            hosts_dir.clone(),
            "--platform".into(),
            "linux/amd64".into(),
        ];
        if let Some(u) = user {
            args.push("--user".into());
            args.push(u);
        }
        args.push(reference.clone());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ctd.ctr(&refs)
    };

    // Anonymous may not pull team A; a wrong password does not help.
    let out = pull(None);
    assert!(!out.status.success(), "anonymous containerd pull succeeded");
    let out = pull(Some(format!("{}:wrong", ALICE.0)));
    assert!(
        !out.status.success(),
        "containerd pull with a wrong password"
    );
    let out = pull(Some(format!("{}:{}", ALICE.0, ALICE.1)));
    assert!(
        out.status.success(),
        "ctr pull failed: {}\n{}\ntrow log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.trow.log()
    );
    let listing = ctd.ctr(&["images", "ls"]);
    assert!(String::from_utf8_lossy(&listing.stdout).contains(&image.digest));
    // containerd used the token endpoint, and every blob was served to it.
    let log = s.trow.log();
    assert!(
        log.lines()
            .any(|l| l.contains("method=POST path=/login") && l.contains("status=200")),
        "containerd asks for tokens with an OAuth2 password grant: {log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("path=/login") && l.contains("status=200") && l.contains("alice")),
        "{log}"
    );
    for layer in &image.layers {
        let digest = sha256(layer);
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("/v2/team-a/app/blobs/{digest}"))
                    && l.contains("status=200")
                    && l.contains("alice")),
            "{log}"
        );
    }
}

/// Trow behind a reverse proxy. The test's connections come from 127.0.0.1,
/// which plays the trusted proxy (an Ingress); a client bound to 127.0.0.2
/// reaches Trow directly and is not trusted.
#[tokio::test]
async fn forwarded_headers_count_only_from_trusted_proxies() {
    let s = Secured::start(
        Some(PERMISSIONS),
        &["--trusted-proxies=127.0.0.1,10.9.0.0/16"],
    );
    let proxy = client();
    let direct = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = format!("{}/login", s.base);
    let attempt = |c: &reqwest::Client, xff: Option<&str>, password: &str| {
        let mut req = c
            .get(login.clone())
            .header(AUTHORIZATION, basic(ALICE.0, password));
        if let Some(xff) = xff {
            req = req.header("x-forwarded-for", xff);
        }
        oci::fetch(req)
    };

    // Client A behind the proxy uses up its failures…
    for i in 0..10 {
        let r = attempt(&proxy, Some("198.51.100.7"), "guess").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    assert_eq!(
        attempt(&proxy, Some("198.51.100.7"), "guess").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // …and cannot get out of it by writing addresses of its own to the
    // left, nor through another trusted hop: the right-most address that
    // is not a trusted proxy counts.
    for xff in ["203.0.113.1, 198.51.100.7", "198.51.100.7, 10.9.3.4"] {
        assert_eq!(
            attempt(&proxy, Some(xff), ALICE.1).await.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{xff}"
        );
    }
    // Client B behind the same proxy is limited separately.
    assert_eq!(
        attempt(&proxy, Some("198.51.100.8"), "guess").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        attempt(&proxy, Some("198.51.100.8"), ALICE.1).await.status,
        StatusCode::OK
    );
    // So is the proxy itself (a request without X-Forwarded-For).
    assert_eq!(attempt(&proxy, None, ALICE.1).await.status, StatusCode::OK);
    assert!(
        s.trow.log().contains("ip=198.51.100.7"),
        "the log names the real client: {}",
        s.trow.log()
    );

    // A client that is not a trusted proxy is counted by its own address,
    // whatever X-Forwarded-For it sends.
    for i in 0..10 {
        let xff = format!("192.0.2.{i}");
        let r = attempt(&direct, Some(&xff), "guess").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    assert_eq!(
        attempt(&direct, Some("192.0.2.200"), ALICE.1).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // X-Forwarded-Proto and X-Forwarded-Host from the proxy shape the
    // realm (TLS ends at the proxy); the service stays Trow's.
    let forwarded = |c: &reqwest::Client| {
        oci::fetch(
            c.get(format!("{}/v2/", s.base))
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "registry.example.com"),
        )
    };
    let r = forwarded(&proxy).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        www_authenticate(&r),
        "Bearer realm=\"https://registry.example.com/login\",service=\"trow\""
    );
    // From anyone else they are ignored.
    let r = forwarded(&direct).await;
    assert_eq!(
        www_authenticate(&r),
        format!(
            "Bearer realm=\"http://{}/login\",service=\"trow\"",
            s.trow.host
        )
    );

    // Without --trusted-proxies nobody is trusted, not even loopback.
    let open = Secured::start(Some(PERMISSIONS), &[]);
    let r = oci::fetch(
        client()
            .get(format!("{}/v2/", open.base))
            .header("x-forwarded-proto", "https"),
    )
    .await;
    assert!(
        www_authenticate(&r).starts_with("Bearer realm=\"http://"),
        "{}",
        www_authenticate(&r)
    );
    for i in 0..10 {
        let r = oci::fetch(
            client()
                .get(format!("{}/login", open.base))
                .header(AUTHORIZATION, basic(ALICE.0, "guess"))
                .header("x-forwarded-for", format!("192.0.2.{i}")),
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = oci::fetch(
        client()
            .get(format!("{}/login", open.base))
            .header(AUTHORIZATION, basic(ALICE.0, ALICE.1))
            .header("x-forwarded-for", "192.0.2.99"),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);

    // The environment variable, comma-separated, and a bad entry refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trow"))
        .arg("--dry-run")
        .env("TROW_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("10.0.0.0/8") && printed.contains("127.0.0.1/32"),
        "{printed}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trow"))
        .args(["--dry-run", "--trusted-proxies=10.0.0.0/33"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("prefix length"), "{}", stderr(&out));
}

#[tokio::test]
async fn the_token_audience_is_not_chosen_by_the_client() {
    let s = Secured::start(Some(PERMISSIONS), &[]);
    oci::push_image(&s.as_user(ADMIN), &s.base, "team-a/app", "v1", 80).await;
    let anon = client();

    // A client that addressed Trow as evil.example is sent to /login there
    // (the realm follows the host it used), but the service is Trow's.
    let r = oci::fetch(
        anon.get(format!("{}/v2/", s.base))
            .header("host", "evil.example"),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        www_authenticate(&r),
        "Bearer realm=\"http://evil.example/login\",service=\"trow\""
    );

    // The token it gets is for Trow, not for evil.example…
    let r = oci::fetch(
        anon.get(format!("{}/login", s.base))
            .query(&[("service", "trow"), ("scope", "repository:team-a/app:pull")])
            .header("host", "evil.example")
            .header(AUTHORIZATION, basic(ALICE.0, ALICE.1)),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let token = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(secure::claims(&token)["aud"], "trow");
    // …and a token for evil.example's service is not to be had.
    let r = oci::fetch(
        anon.get(format!("{}/login?service=evil.example", s.base))
            .header("host", "evil.example")
            .header(AUTHORIZATION, basic(ALICE.0, ALICE.1)),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // The token works whatever host the client addresses.
    let c = client_with(&bearer(&token));
    for host in [s.trow.host.as_str(), "localhost", "other.example:5000"] {
        let r = oci::fetch(
            c.get(format!("{}/v2/team-a/app/manifests/v1", s.base))
                .header("host", host)
                .header("accept", oci::OCI_MANIFEST),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{host}");
    }
    // A token for another audience, even correctly signed, is refused.
    let key = std::fs::read_to_string(s.key_path()).unwrap();
    let forged = forge(
        key.trim_end().as_bytes(),
        jsonwebtoken::Algorithm::HS256,
        &json!({
            "iss": "trow", "sub": "alice", "aud": s.trow.host, "iat": now(),
            "nbf": now() - 10, "exp": now() + 300, "jti": "x",
            "access": [{ "type": "repository", "name": "team-a/app", "actions": ["pull"] }],
        }),
    );
    let r = oci::get_manifest(&client_with(&bearer(&forged)), &s.base, "team-a/app", "v1").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// A client that sends Basic credentials on every request costs one hash
/// per minute, not one per request. The server logs each full check at
/// debug level: that is the counter read here.
#[tokio::test]
async fn basic_credentials_on_every_request_are_hashed_once() {
    const ERIN: (&str, &str) = ("erin", "erin-secret-6");
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    // Cost 10, as `htpasswd -B` writes by default (the server hashes in a
    // debug build, with its dependencies optimised).
    std::fs::write(
        &htpasswd,
        format!("{}:{}\n", ERIN.0, bcrypt::hash(ERIN.1, 10).unwrap()),
    )
    .unwrap();
    let t = Trow::start_with(&[
        &format!("--htpasswd={}", htpasswd.display()),
        "--log-level=info,trow::auth=debug",
    ]);
    let hashes = || {
        t.log()
            .lines()
            .filter(|l| l.contains("checking a password against its hash"))
            .count()
    };
    let erin = client_with(&basic(ERIN.0, ERIN.1));
    let first = std::time::Instant::now();
    oci::push_image(&erin, &t.url, "erin/app", "v1", 90).await;
    let first = first.elapsed();
    let rest = std::time::Instant::now();
    let mut requests = 0;
    for _ in 0..10 {
        let r = oci::get_manifest(&erin, &t.url, "erin/app", "v1").await;
        assert_eq!(r.status, StatusCode::OK);
        let r = get(&erin, t.at("/v2/")).await;
        assert_eq!(r.status, StatusCode::OK);
        requests += 2;
    }
    eprintln!(
        "push (one hash) took {first:?}; {requests} more requests took {:?}",
        rest.elapsed()
    );
    assert_eq!(hashes(), 1, "{}", t.log());

    // Wrong passwords are never remembered: each one is hashed, and each
    // counts toward the failed-login limit…
    let wrong = client_with(&basic(ERIN.0, "wrong"));
    for i in 0..10 {
        let r = get(&wrong, t.at("/v2/")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    assert_eq!(hashes(), 11);
    // …which then refuses even the remembered password.
    let r = get(&erin, t.at("/v2/")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(!t.log().contains(ERIN.1));
}

#[tokio::test]
async fn a_rule_on_the_cache_cannot_be_bypassed_with_ns() {
    use bytes::Bytes;
    let up = common::fake_upstream::FakeUpstream::start().await;
    let config = Bytes::from_static(b"{\"seed\":95}");
    let config_digest = up.add_blob(config.clone());
    let manifest = Bytes::from(oci::image_manifest(&config, &[]));
    let digest = up.add_manifest("team/app", Some("v1"), oci::OCI_MANIFEST, manifest);
    // Anonymous users may pull team/* but not the cache (f/*); bob may
    // pull everything.
    let yaml = format!(
        r#"
registry_proxies:
  registries:
    - host: "{}"
      alias: up
      insecure: true
permissions:
  anonymous:
    - repos: "team/*"
      actions: [pull]
  bob:
    - repos: "*"
      actions: [pull]
"#,
        up.host
    );
    let s = Secured::start(Some(&yaml), &[]);
    let mirror = |what: &str| format!("{}/v2/team/app/{what}?ns={}", s.base, up.host);
    let manifest_path = "/v2/team/app/manifests/v1";

    // Anonymous: the mirror form is the cache, and is refused like the
    // path form; logging in may help.
    let anon = client();
    for r in [
        oci::fetch(anon.get(mirror("manifests/v1"))).await,
        oci::fetch(anon.head(mirror("manifests/v1"))).await,
        oci::fetch(anon.get(mirror(&format!("blobs/{config_digest}")))).await,
        oci::get_manifest(&anon, &s.base, "f/up/team/app", "v1").await,
    ] {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(
            www_authenticate(&r).starts_with("Bearer realm="),
            "{}",
            www_authenticate(&r)
        );
    }
    // The rule on the path name still applies to what is stored here.
    let r = oci::get_manifest(&anon, &s.base, "team/app", "v1").await;
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    // An anonymous token for the path name (what containerd asks for) does
    // not open the cache either.
    let t = s.token(None, &["repository:team/app:pull"]).await;
    let r = oci::fetch(client_with(&bearer(&t)).get(mirror("manifests/v1"))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // carol may pull team/* (as anyone may) but not the cache: 403, naming
    // the cache repository.
    let r = oci::fetch(s.as_user(CAROL).get(mirror("manifests/v1"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        String::from_utf8_lossy(&r.body).contains("f/up/team/app"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // Nothing refused reached the upstream.
    assert_eq!(up.count("GET", manifest_path), 0);
    assert_eq!(up.count("HEAD", manifest_path), 0);

    // bob may pull the cache: by Basic credentials, and with a token for
    // the path name as containerd gets one.
    let r = oci::fetch(s.as_user(BOB).get(mirror("manifests/v1"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", s.trow.log());
    assert_eq!(r.header("docker-content-digest"), digest);
    let t = s.token(Some(BOB), &["repository:team/app:pull"]).await;
    let bob = client_with(&bearer(&t));
    let r = oci::fetch(bob.get(mirror(&format!("blobs/{config_digest}")))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, config.as_ref());
    let r = oci::get_manifest(&s.as_user(BOB), &s.base, "f/up/team/app", "v1").await;
    assert_eq!(r.status, StatusCode::OK);
}
