//! CNCF Distribution (Debian's `docker-registry`) as a real upstream
//! registry, on loopback with htpasswd basic auth.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Distribution {
    child: Option<Child>,
    pub host: String,
    pub url: String,
    pub user: String,
    pub password: String,
    config: PathBuf,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Distribution {
    /// Starts Distribution with one htpasswd user, or `None` when the tool
    /// is missing on a developer machine (see `have_tool`).
    pub fn start() -> Option<Distribution> {
        if !super::have_tool("docker-registry") {
            return None;
        }
        // Distribution cannot report a port it chose, so one is picked
        // here; another test's listener may take it first, and then
        // Distribution exits and another port is tried.
        for _ in 0..5 {
            let mut d = Self::configured(super::free_port());
            match d.launch() {
                Ok(()) => return Some(d),
                Err(e) if e.contains("address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("docker-registry found no free port in five tries");
    }

    /// A stopped Distribution configured to listen on `port`.
    fn configured(port: u16) -> Distribution {
        let dir = tempfile::tempdir().expect("temp dir");
        let (user, password) = ("upstream-user".to_string(), "upstream-pass".to_string());
        let hash = bcrypt::hash(&password, 4).expect("bcrypt");
        std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n\
                 auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n",
                root = dir.path().join("data").display(),
                htpasswd = dir.path().join("htpasswd").display(),
            ),
        )
        .unwrap();
        Distribution {
            child: None,
            host: format!("127.0.0.1:{port}"),
            url: format!("http://127.0.0.1:{port}"),
            user,
            password,
            config,
            log_path: dir.path().join("registry.log"),
            _dir: dir,
        }
    }

    /// (Re)starts the process on the same storage and port.
    pub fn restart(&mut self) {
        if let Err(e) = self.launch() {
            panic!("{e}");
        }
    }

    /// Starts the process and waits until it logs that it listens on its
    /// port (a connection alone could reach another test's listener).
    fn launch(&mut self) -> Result<(), String> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        // The log is appended to across restarts: look only at this run's.
        let from = log.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let listening = format!("listening on {}", self.host);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let this_run = log.get(from..).unwrap_or_default();
            if this_run.contains(&listening) {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                // Read again: it may have written its last lines since.
                let log = self.log();
                return Err(format!(
                    "docker-registry exited ({status}) at start-up:\n{}",
                    log.get(from..).unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("docker-registry did not start:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A client that sends this registry's credentials on every request.
    pub fn client(&self) -> reqwest::Client {
        super::basic_client(&self.user, &self.password)
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}
