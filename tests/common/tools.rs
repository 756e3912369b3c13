//! Running external clients (skopeo, podman, buildah, python3, gzip) from tests, bounded in
//! time, with their output in every failure message.

use std::process::{Output, Stdio};
use std::time::Duration;

/// How long one client command may take before the test fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command to completion (killing it after [`TOOL_TIMEOUT`]).
pub async fn run(program: &str, args: &[&str]) -> Output {
    run_env(program, args, &[]).await
}

/// [`run`] with extra environment variables.
pub async fn run_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(TOOL_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run `{}`: {e}", command_line(program, args)),
        Err(_) => panic!(
            "`{}` did not finish within {TOOL_TIMEOUT:?}",
            command_line(program, args)
        ),
    }
}

/// Runs a command that must succeed; returns its stdout.
pub async fn run_ok(program: &str, args: &[&str]) -> Vec<u8> {
    run_ok_env(program, args, &[]).await
}

/// [`run_ok`] with extra environment variables.
pub async fn run_ok_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Vec<u8> {
    let out = run_env(program, args, env).await;
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstdout:\n{}\nstderr:\n{}",
        command_line(program, args),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    out.stdout
}

/// `skopeo <args>`, which must succeed; returns stdout.
pub async fn skopeo(args: &[&str]) -> Vec<u8> {
    run_ok("skopeo", args).await
}

/// Runs `program` with `input` on stdin; it must succeed. Returns stdout.
pub async fn pipe(program: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", command_line(program, args)));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // Feed stdin while stdout is read, so neither pipe can fill up and stall.
    let writer = tokio::spawn(async move {
        let written = stdin.write_all(&input).await;
        drop(stdin);
        written
    });
    let out = match tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("`{}`: {e}", command_line(program, args)),
        Err(_) => panic!(
            "`{}` did not finish within {TOOL_TIMEOUT:?}",
            command_line(program, args)
        ),
    };
    let written = writer.await.expect("stdin writer");
    assert!(
        out.status.success(),
        "`{}` failed ({}): {}",
        command_line(program, args),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    written.unwrap_or_else(|e| panic!("writing to `{}`: {e}", command_line(program, args)));
    out.stdout
}

/// Decompresses gzip data with the system's `gzip -dc`.
pub async fn gunzip(bytes: &[u8]) -> Vec<u8> {
    pipe("gzip", &["-dc"], bytes).await
}

/// `sha256:<hex>` of `bytes`, computed by the system's `sha256sum`: test
/// crates build without optimisation, where hashing megabytes in-process is
/// slow enough to distort timing-sensitive tests.
pub async fn sha256_native(bytes: &[u8]) -> String {
    let out = pipe("sha256sum", &[], bytes).await;
    let out = String::from_utf8_lossy(&out);
    let hex = out.split_whitespace().next().unwrap_or_default();
    assert!(hex.len() == 64, "sha256sum output: {out}");
    format!("sha256:{hex}")
}
