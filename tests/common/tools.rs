//! Running external clients (skopeo, podman, gzip) from tests, bounded in
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
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
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
    let out = run(program, args).await;
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

/// Decompresses gzip data with the system's `gzip -dc`.
pub async fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gzip -dc");
    let mut stdin = child.stdin.take().expect("gzip stdin");
    let input = bytes.to_vec();
    let writer = tokio::spawn(async move {
        stdin.write_all(&input).await.expect("write to gzip");
        drop(stdin);
    });
    let out = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .expect("gzip -dc timed out")
        .expect("gzip -dc");
    writer.await.expect("gzip writer");
    assert!(
        out.status.success(),
        "gzip -dc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
