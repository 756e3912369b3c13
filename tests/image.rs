//! The container image (install/Containerfile), built by
//! install/build-image.sh from this build's own binary and run with podman
//! (as root, with private vfs storage): its metadata, the user it runs as,
//! a read-only root filesystem, and a real round trip: the running image
//! receives a push of itself, gives it back by digest, and fetches it
//! through its own pull-through cache (which resolves a host name inside
//! the empty image).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::oci::sha256;
use common::tools;
use common::{free_port, have_tool, strict, trow_bin};

/// The image's user and group (install/Containerfile).
const UID: u32 = 65532;
const IMAGE: &str = "localhost/trow:image-test";
const CONTAINER: &str = "trow-image-test";
const REVISION: &str = "image-test-revision";

/// podman (and skopeo, and build-image.sh) on a private vfs storage in a
/// temporary directory, so that the test neither sees nor touches the
/// machine's images. Removes its containers when dropped.
struct Podman {
    dir: tempfile::TempDir,
    /// Global flags: the runtime, and what works without systemd.
    global: Vec<String>,
}

impl Podman {
    fn new() -> Podman {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path();
        std::fs::write(
            p.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                p.join("root").display(),
                p.join("runroot").display()
            ),
        )
        .expect("storage.conf");
        let mut global: Vec<String> = ["--cgroup-manager", "cgroupfs", "--events-backend", "file"]
            .map(String::from)
            .into();
        // runc runs containers with cgroups v1, hybrid or v2; crun (podman's
        // default on Debian) refuses a hybrid hierarchy.
        if which("runc") {
            global.extend(["--runtime".to_string(), "runc".to_string()]);
        }
        Podman { dir, global }
    }

    fn storage_conf(&self) -> String {
        self.dir.path().join("storage.conf").display().to_string()
    }

    /// The environment that points podman, skopeo and build-image.sh at
    /// this storage.
    fn env(&self) -> [(&'static str, String); 1] {
        [("CONTAINERS_STORAGE_CONF", self.storage_conf())]
    }

    async fn run(&self, args: &[&str]) -> std::process::Output {
        let mut all: Vec<&str> = self.global.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        tools::run_env("podman", &all, &env).await
    }

    /// Runs podman; it must succeed. Returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "`podman {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("podman prints UTF-8")
    }

    async fn inspect(&self, what: &str, name: &str) -> Value {
        let out = self.ok(&[what, "inspect", "--format", "json", name]).await;
        let v: Value = serde_json::from_str(&out).expect("inspect JSON");
        v[0].clone()
    }

    /// The container's log, for failure messages.
    async fn logs(&self) -> String {
        let out = self.run(&["logs", CONTAINER]).await;
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers hold mounts (their /dev/shm) under the storage
        // directory: remove them before the directory goes. Bounded: a
        // podman that hangs must not hang the test run.
        let mut args = self.global.clone();
        args.extend(["rm", "--all", "--force", "--volumes", "--time", "0"].map(String::from));
        let child = std::process::Command::new("podman")
            .args(&args)
            .env("CONTAINERS_STORAGE_CONF", self.storage_conf())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(mut child) = child {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn which(tool: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether podman can work here at all; a skip on a developer machine, a
/// failure in CI.
async fn podman_usable(p: &Podman) -> bool {
    let out = p.run(&["info", "--format", "json"]).await;
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        !strict(),
        "podman is installed but cannot run here (TROW_TEST_STRICT is set): {why}"
    );
    eprintln!("SKIPPED: podman is installed but cannot run here: {why}");
    false
}

/// `--ulimit` flags for the container. podman as root asks for limits
/// above this process's own by default, which a sandboxed machine may
/// refuse: ask for this process's open-file limit and for at most 4096
/// processes of Trow's user (what a pod has is the node's business).
fn ulimits() -> Vec<String> {
    let get = |resource| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass and nothing else.
        (unsafe { libc::getrlimit(resource, &mut limit) } == 0).then_some(limit)
    };
    let mut flags = Vec::new();
    if let Some(l) = get(libc::RLIMIT_NOFILE) {
        flags.push(format!("--ulimit=nofile={}:{}", l.rlim_cur, l.rlim_max));
    }
    let nproc = get(libc::RLIMIT_NPROC).map_or(4096, |l| l.rlim_cur.min(4096));
    flags.push(format!("--ulimit=nproc={nproc}:{nproc}"));
    flags
}

/// `/proc/<pid>/status`'s `Uid:` or `Gid:` line: real, effective, saved and
/// filesystem ids.
fn ids(status: &str, key: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .split_whitespace()
        .map(|n| n.parse().expect("numeric id"))
        .collect()
}

fn label<'a>(config: &'a Value, name: &str) -> &'a str {
    config["Labels"][name]
        .as_str()
        .unwrap_or_else(|| panic!("image label {name} missing: {config:#}"))
}

async fn wait_for_v2(podman: &Podman, url: &str) {
    let client = common::client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(url).send().await {
            assert_eq!(r.status(), 200, "GET {url}");
            assert_eq!(r.text().await.expect("body"), "{}", "GET {url}");
            return;
        }
        let state = podman
            .run(&["inspect", "--format", "{{.State.Status}}", CONTAINER])
            .await;
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        assert!(
            Instant::now() < deadline && (state == "running" || state == "created"),
            "the container does not answer {url} (state `{state}`); its log:\n{}",
            podman.logs().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_image_runs_read_only_as_non_root_and_serves_itself() {
    if !have_tool("podman") || !have_tool("skopeo") {
        return;
    }
    let podman = Podman::new();
    if !podman_usable(&podman).await {
        return;
    }
    let version = env!("CARGO_PKG_VERSION");

    // Build with the script users run, from the binary under test.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("install/build-image.sh");
    let bin = trow_bin();
    let env = podman.env();
    let mut build_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    build_env.push(("TROW_IMAGE_BUILDER", "podman"));
    let started = Instant::now();
    tools::run_ok_env(
        "bash",
        &[
            script.to_str().expect("UTF-8 path"),
            "--binary",
            bin.to_str().expect("UTF-8 path"),
            "--revision",
            REVISION,
            IMAGE,
        ],
        &build_env,
    )
    .await;
    eprintln!("image built in {:.1?}", started.elapsed());

    // What the image says about itself.
    let image = podman.inspect("image", IMAGE).await;
    let config = &image["Config"];
    assert_eq!(config["User"], format!("{UID}:{UID}"), "{config:#}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/trow"]),
        "{config:#}"
    );
    assert!(
        config["Cmd"].is_null() || config["Cmd"] == serde_json::json!([]),
        "no default arguments: {config:#}"
    );
    assert!(
        config["Env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v == "TROW_DATA_DIR=/data")),
        "{config:#}"
    );
    assert!(config["Volumes"]["/data"].is_object(), "{config:#}");
    assert!(config["ExposedPorts"]["8000/tcp"].is_object(), "{config:#}");
    assert_eq!(label(config, "org.opencontainers.image.version"), version);
    assert_eq!(label(config, "org.opencontainers.image.revision"), REVISION);
    assert_eq!(label(config, "org.opencontainers.image.title"), "trow");
    assert_eq!(
        label(config, "org.opencontainers.image.licenses"),
        "Apache-2.0"
    );
    assert!(label(config, "org.opencontainers.image.source").starts_with("https://"));
    // Nothing but the binary and /data: one layer.
    assert_eq!(
        image["RootFS"]["Layers"].as_array().map(Vec::len),
        Some(1),
        "{:#}",
        image["RootFS"]
    );
    let image_id = image["Id"].as_str().expect("image id").to_string();
    eprintln!("image size: {} bytes", image["Size"]);

    // The entrypoint takes Trow's flags.
    let ulimits = ulimits();
    let mut run: Vec<&str> = vec!["run", "--rm", "--network", "none"];
    run.extend(ulimits.iter().map(String::as_str));
    run.extend([IMAGE, "--version"]);
    assert_eq!(podman.ok(&run).await.trim(), format!("trow {version}"));

    // Serve: a read-only root filesystem as Kubernetes makes it
    // (readOnlyRootFilesystem: no tmpfs on /tmp either), data on the
    // image's /data volume, and a configuration whose only upstream is
    // this same Trow, by name.
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let cfg_dir = tempfile::tempdir().expect("temp dir");
    let cfg = common::write_config(
        cfg_dir.path(),
        &format!(
            "registry_proxies:\n  registries:\n{}",
            common::insecure_upstream(&format!("localhost:{port}"), "self")
        ),
    );
    let bind = format!("--bind={host}");
    let mount = format!("{}:/config/trow.yaml:ro", cfg.display());
    let mut run: Vec<&str> = vec![
        "run",
        "--detach",
        "--name",
        CONTAINER,
        "--network",
        "host",
        "--read-only",
        "--read-only-tmpfs=false",
        "--volume",
        &mount,
    ];
    run.extend(ulimits.iter().map(String::as_str));
    run.extend([IMAGE, &bind, "--config-file", "/config/trow.yaml"]);
    podman.ok(&run).await;
    wait_for_v2(&podman, &format!("http://{host}/v2/")).await;

    // Seen from the host: the process runs as the image's user, with a
    // read-only root, and keeps its data in the volume.
    let container = podman.inspect("container", CONTAINER).await;
    let pid = container["State"]["Pid"].as_u64().expect("pid");
    assert!(pid > 0, "{:#}", container["State"]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    assert_eq!(ids(&status, "Uid:"), [UID; 4], "{status}");
    assert_eq!(ids(&status, "Gid:"), [UID; 4], "{status}");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        cmdline.starts_with(b"/trow\0"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no root mount in\n{mountinfo}"));
    let options = root.split_whitespace().nth(5).expect("mount options");
    assert!(
        options.split(',').any(|o| o == "ro"),
        "the root filesystem is mounted `{options}`: {root}"
    );
    let data = container["Mounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["Destination"] == "/data"))
        .and_then(|m| m["Source"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no volume at /data: {:#}", container["Mounts"]));
    {
        use std::os::unix::fs::MetadataExt;
        let db = std::fs::metadata(data.join("trow.db")).expect("trow.db in the /data volume");
        assert_eq!((db.uid(), db.gid()), (UID, UID), "owner of trow.db");
    }

    // Push the image into itself, then pull it back by digest into fresh
    // storage: the same image (same config, so the same layers).
    let digest_file = cfg_dir.path().join("digest");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let reference = format!("docker://{host}/trow:test");
    tools::run_ok_env(
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            "--digestfile",
            digest_file.to_str().expect("UTF-8 path"),
            &format!("containers-storage:{IMAGE}"),
            &reference,
        ],
        &env,
    )
    .await;
    let digest = std::fs::read_to_string(&digest_file).expect("digest file");
    let digest = digest.trim();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let fresh = Podman::new();
    let by_digest = format!("{host}/trow@{digest}");
    fresh.ok(&["pull", "--tls-verify=false", &by_digest]).await;
    let pulled = fresh.inspect("image", &by_digest).await;
    assert_eq!(
        pulled["Id"],
        image_id.as_str(),
        "the image pulled back by digest"
    );
    drop(fresh);

    // Through its own cache, by name: the empty image resolves `localhost`
    // (glibc's NSS, linked in) and fetches from itself.
    let raw = tools::run_ok(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{host}/f/self/trow:test"),
        ],
    )
    .await;
    assert_eq!(
        sha256(&raw),
        digest,
        "the manifest fetched through the cache"
    );
    let log = podman.logs().await;
    assert!(log.contains("cache=\"miss\""), "{log}");

    // SIGTERM to PID 1 of the container: Trow drains and exits 0.
    podman.ok(&["stop", "--time", "20", CONTAINER]).await;
    let state = podman.inspect("container", CONTAINER).await;
    let log = podman.logs().await;
    assert_eq!(state["State"]["ExitCode"], 0, "{log}");
    assert!(log.contains("shut down cleanly"), "{log}");
}
