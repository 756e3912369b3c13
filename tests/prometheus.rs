//! Trow's `/metrics` against the real Prometheus from Debian (the
//! `prometheus` package): `promtool check metrics` on what Trow writes,
//! `promtool check rules` on the sample alert rules of docs/USER_GUIDE.md,
//! and a real `prometheus` process on loopback that scrapes Trow every
//! second and, queried through its HTTP API, sees a counter a push moved.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::oci::push_image;
use common::{client, free_port, have_tool, insecure_upstream, trow_with_config, Trow};
use serde_json::Value;

/// The yaml block that follows this marker in docs/USER_GUIDE.md.
const RULES_MARKER: &str = "<!-- alert rules: tests/prometheus.rs reads the next yaml block -->";

fn sample_alert_rules() -> String {
    let guide =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/USER_GUIDE.md"))
            .expect("docs/USER_GUIDE.md");
    let after = guide
        .split_once(RULES_MARKER)
        .expect("the alert rules marker in docs/USER_GUIDE.md")
        .1;
    let block = after
        .split_once("```yaml\n")
        .expect("a yaml block after the marker")
        .1;
    block
        .split_once("```")
        .expect("the end of the yaml block")
        .0
        .to_string()
}

/// Runs a tool with `input` on stdin; returns (success, stdout + stderr).
fn run_with_input(program: &str, args: &[&str], input: &[u8]) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A Trow whose every family has samples: logins on, an upstream
/// configured, a push, a 404.
async fn busy_trow() -> (Trow, tempfile::TempDir, String) {
    let yaml = format!(
        "registry_proxies:\n  registries:\n{}",
        insecure_upstream("127.0.0.1:9", "nowhere")
    );
    let (mut t, cfg) = trow_with_config(
        &yaml,
        &[
            "--metrics-bind",
            "127.0.0.1:0",
            "--user",
            "admin",
            "--password",
            "right",
        ],
    );
    let c = common::basic_client("admin", "right");
    push_image(&c, &t.url, "a/b", "v1", 1).await;
    let r = c.get(t.at("/v2/a/b/manifests/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let ops = t.metrics_addr().to_string();
    (t, cfg, ops)
}

#[tokio::test]
async fn promtool_accepts_the_metrics_and_the_sample_alert_rules() {
    if !have_tool("promtool") {
        return;
    }
    let (_t, _cfg, ops) = busy_trow().await;
    let text = client()
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in [
        "trow_http_requests_total",
        "trow_http_request_duration_seconds",
        "trow_storage_bytes",
        "trow_cache_requests_total",
        "trow_login_failures_total",
        "trow_gc_runs_total",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
    }
    // promtool parses the text format and lints it (names, units, HELP);
    // it exits non-zero on any problem.
    let (ok, out) = run_with_input("promtool", &["check", "metrics"], text.as_bytes());
    assert!(
        ok,
        "promtool check metrics:\n{out}\n--- metrics ---\n{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yml");
    std::fs::write(&rules, sample_alert_rules()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A prometheus process, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl Prometheus {
    /// Starts Prometheus on `config` with its data in `dir` and waits until
    /// it is ready. Prometheus cannot report a port it chose, so one is
    /// picked here; another test's listener may take it first, and then
    /// Prometheus exits and another port is tried.
    async fn start(dir: &Path, config: &Path) -> Prometheus {
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(dir.join("prometheus.log")).unwrap())
                .stderr(std::fs::File::create(dir.join("prometheus.err")).unwrap())
                .spawn()
                .expect("start prometheus");
            let mut prom = Prometheus {
                child,
                url: format!("http://127.0.0.1:{port}"),
                log: dir.join("prometheus.err"),
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let ready = client()
                    .get(format!("{}/-/ready", prom.url))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    return prom;
                }
                if let Ok(Some(status)) = prom.child.try_wait() {
                    let log = prom.log();
                    if log.contains("address already in use") {
                        break;
                    }
                    panic!("prometheus exited ({status}):\n{log}");
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready within 60 s:\n{}",
                    prom.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        panic!("prometheus found no free port in five tries");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of the single series a PromQL query returns, if one.
    async fn query(&self, promql: &str) -> Option<f64> {
        let r = client()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .ok()?;
        let body: Value = r.json().await.ok()?;
        assert_eq!(body["status"], "success", "{promql}: {body}");
        let result = body["data"]["result"].as_array()?;
        let value = result.first()?["value"][1].as_str()?;
        value.parse().ok()
    }

    /// Waits (at most `limit`) until `promql` returns at least `min`.
    async fn wait_for(&self, promql: &str, min: f64, limit: Duration) -> Option<f64> {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(promql).await;
            if last.is_some_and(|v| v >= min) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        last
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn prometheus_scrapes_trow_and_sees_a_push() {
    if !have_tool("prometheus") {
        return;
    }
    let (t, _cfg, ops) = busy_trow().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yml"), sample_alert_rules()).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files: [rules.yml]\n\
         scrape_configs:\n  - job_name: trow\n    static_configs:\n      - targets: ['{ops}']\n"
    );
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let prom = Prometheus::start(dir.path(), &config_path).await;
    let up = prom
        .wait_for(r#"up{job="trow"}"#, 1.0, Duration::from_secs(30))
        .await;
    assert_eq!(
        up,
        Some(1.0),
        "prometheus cannot scrape trow:\n{}",
        prom.log()
    );

    // The counter of manifest pushes, as Prometheus sees it: one so far.
    let pushes = r#"sum(trow_http_requests_total{route="manifest",method="PUT",status="201"})"#;
    assert_eq!(
        prom.wait_for(pushes, 1.0, Duration::from_secs(30)).await,
        Some(1.0)
    );
    // A push moves it, and Prometheus sees the new value.
    let c = common::basic_client("admin", "right");
    push_image(&c, &t.url, "a/c", "v1", 2).await;
    assert_eq!(
        prom.wait_for(pushes, 2.0, Duration::from_secs(30)).await,
        Some(2.0),
        "{}",
        prom.log()
    );
    // The sample alert rules loaded and are evaluated.
    let r: Value = client()
        .get(format!("{}/api/v1/rules", prom.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rules = r["data"]["groups"][0]["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 3, "{r}");
    assert!(rules.iter().all(|rule| rule["health"] != "err"), "{r}");
}
