//! Test harness shared by the end-to-end tests: runs the real `trow` binary
//! on an ephemeral port and talks to it over real HTTP.

#![allow(dead_code)] // each test crate uses a different part of the harness

pub mod containerd;
pub mod cosign;
pub mod distribution;
pub mod fake_kube;
pub mod fake_upstream;
pub mod layout;
pub mod netns;
pub mod oci;
pub mod secure;
pub mod stored;
pub mod tools;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Whether a missing external tool must fail the test (CI sets this).
pub fn strict() -> bool {
    std::env::var_os("TROW_TEST_STRICT").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether `tool` is on PATH. When it is not, the test is skipped on a
/// developer machine but fails in CI (`TROW_TEST_STRICT`).
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !strict(),
            "{tool} is required (TROW_TEST_STRICT is set) but not installed"
        );
        eprintln!(
            "SKIPPED: {tool} is not installed (set TROW_TEST_STRICT=1 to make this a failure)"
        );
    }
    found
}

/// The `trow` binary under test: this build's, unless `TROW_TEST_BIN`
/// names another (to show that a new test fails on an older build).
pub fn trow_bin() -> std::ffi::OsString {
    std::env::var_os("TROW_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_trow").into())
}

/// Whether `python3` can import `module`, with the semantics of
/// [`have_tool`]: a skip on a developer machine, a failure in CI.
pub fn have_python_module(module: &str) -> bool {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("import {module}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let why = match out {
        Ok(out) if out.status.success() => return true,
        // The traceback's last line says why (ModuleNotFoundError: ...).
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string(),
        Err(e) => format!("cannot run python3: {e}"),
    };
    assert!(
        !strict(),
        "the python3 module {module} is required (TROW_TEST_STRICT is set) but cannot be imported: {why}"
    );
    eprintln!(
        "SKIPPED: python3 cannot import {module} (set TROW_TEST_STRICT=1 to make this a failure): {why}"
    );
    false
}

/// A port on loopback that was free a moment ago. Another test's listener
/// may take it before it is used: only for servers that cannot report the
/// port they bound (Trow binds port 0 and logs it, see [`Trow::start_in`]).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// The address in the `addr` field of the first line of a `trow` log that
/// holds `message`, in the text format (`addr=127.0.0.1:1234`) or the JSON
/// one (`"addr":"127.0.0.1:1234"`).
pub fn logged_addr(log: &str, message: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains(message))?;
    let (_, rest) = line
        .split_once("addr=")
        .or_else(|| line.split_once("\"addr\":\""))?;
    let end = rest.find([' ', '"']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Distinguishes the logs of the processes one test starts on one data
/// directory.
static STARTS: AtomicUsize = AtomicUsize::new(0);

/// What `trow` logs, with the address, once it accepts connections.
pub const SERVING: &str = "trow is serving the OCI Distribution API";

/// A running `trow` process with its own data directory.
pub struct Trow {
    child: Option<Child>,
    pub port: u16,
    /// `http://127.0.0.1:<port>`
    pub url: String,
    /// `127.0.0.1:<port>`, as image references want it.
    pub host: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Trow {
    /// Starts Trow on a fresh temporary data directory.
    pub fn start() -> Trow {
        Self::start_with(&[])
    }

    /// Starts Trow on a fresh data directory with extra flags.
    pub fn start_with(args: &[&str]) -> Trow {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data = tmp.path().join("data");
        let mut t = Self::start_in(&data, args);
        t._tmp = Some(tmp);
        t
    }

    /// Starts Trow on `data_dir` (kept after the process ends). It binds
    /// port 0 and the port is read from its log: a port picked here and
    /// passed in could be taken by another test's listener first, and the
    /// test would then talk to that listener.
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Trow {
        let start = STARTS.fetch_add(1, Ordering::Relaxed);
        let log_path = data_dir.with_extension(format!("log.{start}"));
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent).expect("log dir");
        }
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(trow_bin())
            .arg("--bind")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn trow");
        let mut t = Trow {
            child: Some(child),
            port: 0,
            url: String::new(),
            host: String::new(),
            data_dir: data_dir.to_path_buf(),
            log_path,
            _tmp: None,
        };
        let addr = t.wait_for_addr(SERVING);
        t.port = addr.port();
        t.host = addr.to_string();
        t.url = format!("http://{addr}");
        t
    }

    /// Waits (up to 30 s) for the log line holding `message` and returns
    /// its `addr`; panics with the log if the process exits first.
    fn wait_for_addr(&mut self, message: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(addr) = logged_addr(&self.log(), message) {
                return addr;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "trow exited during start-up ({status}); log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "trow did not log {message:?} within 30 s; log:\n{}",
            self.log()
        );
    }

    /// The address of the `--metrics-bind` listener (bind it to port 0).
    pub fn metrics_addr(&mut self) -> SocketAddr {
        self.wait_for_addr("serving /metrics")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (up to 10 s) for `needle` to appear in the log, for lines a
    /// background task writes just after the effect a test can observe (a
    /// file removed, a session forgotten); panics with the log if it does
    /// not.
    pub async fn expect_log(&self, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "{needle:?} was not logged; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, for signals and /proc sampling.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("trow is running")
    }

    /// SIGKILL: the process dies at once, mid-request if it was in one.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("trow is running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().expect("wait for trow")
    }

    /// SIGTERM, then waits at most `limit` for the exit status; `None` when
    /// the process is still running then (it is killed when dropped).
    pub fn terminate_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let pid = self.pid();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// An endpoint URL on this registry.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

impl Drop for Trow {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `registry_proxies.registries` entry (YAML, list item) for a plain-HTTP
/// upstream at `host`, reachable as `f/<alias>/…`.
pub fn insecure_upstream(host: &str, alias: &str) -> String {
    format!("    - host: \"{host}\"\n      alias: {alias}\n      insecure: true\n")
}

/// Writes a configuration file holding `yaml` into `dir`; returns its path.
pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("trow.yaml");
    std::fs::write(&path, yaml).expect("write the configuration file");
    path
}

/// Starts Trow with a configuration file holding `yaml` and extra flags;
/// the directory holding the file lives as long as the returned guard.
pub fn trow_with_config(yaml: &str, args: &[&str]) -> (Trow, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), yaml);
    let mut all = vec!["--config-file", path.to_str().expect("UTF-8 path")];
    all.extend_from_slice(args);
    (Trow::start_with(&all), dir)
}

/// An HTTP client that never follows redirects, so tests see our answers.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// A client that sends Basic credentials on every request.
pub fn basic_client(user: &str, password: &str) -> reqwest::Client {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Basic {token}").parse().expect("header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("http client")
}

/// Waits (up to 10 s) for a file to appear: a blob fetched through the cache
/// is handed to clients once verified and committed to disk just after.
pub fn wait_for_file(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Asserts an OCI error envelope with `status` and `code` (and the API
/// version header every response carries); returns the error's message.
pub async fn expect_error(r: reqwest::Response, status: reqwest::StatusCode, code: &str) -> String {
    assert_eq!(r.status(), status);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    let body: serde_json::Value = r.json().await.expect("error body is JSON");
    let err = &body["errors"][0];
    assert_eq!(err["code"], code, "{body}");
    let message = err["message"].as_str().expect("message").to_string();
    assert!(!message.is_empty());
    message
}

/// A response header as a string, if present.
pub fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header").to_string())
}

/// A response header that must be present.
pub fn required_header(r: &reqwest::Response, name: &str) -> String {
    header(r, name).unwrap_or_else(|| panic!("missing header {name}"))
}

/// Every file and directory under `root` (directories as `rel/`), with
/// file contents.
pub fn file_tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("dir entry").path();
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            if p.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).expect("read file"));
            }
        }
    }
    out
}

/// The value of one series of a Prometheus text exposition (`name{labels}`
/// exactly as written), if present.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a number"))
}
