//! A private containerd (its own config, root, state and socket, native
//! snapshotter), as on a cluster node, for pulls through Trow with `ctr`.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Containerd {
    child: Child,
    socket: String,
    _dir: tempfile::TempDir,
}

impl Containerd {
    /// Starts containerd, or returns `None` (skipping) when the tools are
    /// missing or we are not root on a developer machine. With
    /// `TROW_TEST_STRICT` set, either is a failure.
    pub fn start() -> Option<Containerd> {
        if !super::have_tool("containerd") || !super::have_tool("ctr") {
            return None;
        }
        let uid = Command::new("id").arg("-u").output().expect("run id");
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            assert!(
                !super::strict(),
                "containerd needs root (TROW_TEST_STRICT is set)"
            );
            eprintln!("SKIPPED: containerd needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path();
        let socket = p.join("containerd.sock").display().to_string();
        let config = p.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{socket}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n",
                p.join("root").display(),
                p.join("state").display(),
            ),
        )
        .expect("write containerd config");
        let log = std::fs::File::create(p.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Path::new(&socket).exists() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Containerd {
            child,
            socket,
            _dir: dir,
        })
    }

    /// Runs `ctr` against this containerd, in a namespace of its own.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg("trow-test")
            .args(args)
            .env("CONTAINERD_SNAPSHOTTER", "native")
            .output()
            .expect("run ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
