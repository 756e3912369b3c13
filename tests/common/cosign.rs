//! The independent cosign signer (tests/cosign_sign.py: Python
//! `cryptography`, never Trow's code), for the tests of signature
//! verification and of the admission webhooks that use it.

use std::path::{Path, PathBuf};

use super::tools::run_ok_env;
use super::{have_python_module, have_tool};

fn signer() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cosign_sign.py").to_string()
}

/// Whether the signer can run here (a skip on a developer machine, a
/// failure under `TROW_TEST_STRICT`).
pub fn can_sign() -> bool {
    have_tool("python3") && have_python_module("cryptography")
}

/// A new key pair in `dir`: (public key PEM path, private key PEM path).
pub async fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("key dir");
    run_ok_env(
        "python3",
        &[&signer(), "keygen", dir.to_str().expect("UTF-8 path")],
        &[],
    )
    .await;
    (dir.join("cosign.pub"), dir.join("plain.key"))
}

/// Signs `digest` with `key` and pushes the signature into `repo` at
/// `base`, as a `.sig` tag (`mode` = "tag") or a referrer ("referrer"),
/// with Basic credentials `login` when given; `ca` is the CA file to trust
/// for an `https://` base.
pub async fn sign(
    base: &str,
    repo: &str,
    digest: &str,
    key: &Path,
    mode: &str,
    login: Option<(&str, &str)>,
    ca: Option<&Path>,
) {
    let signer = signer();
    let key = key.to_str().expect("UTF-8 path");
    let mut args = vec![signer.as_str(), "attach", base, repo, digest, key, mode];
    let auth = login.map(|(u, p)| format!("{u}:{p}"));
    if let Some(auth) = &auth {
        args.push(auth);
    }
    let ca = ca.map(|p| p.to_str().expect("UTF-8 path").to_string());
    let env: Vec<(&str, &str)> = ca.iter().map(|c| ("SSL_CERT_FILE", c.as_str())).collect();
    run_ok_env("python3", &args, &env).await;
}
