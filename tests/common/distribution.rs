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
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
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
        let mut d = Distribution {
            child: None,
            host: format!("127.0.0.1:{port}"),
            url: format!("http://127.0.0.1:{port}"),
            user,
            password,
            config,
            log_path: dir.path().join("registry.log"),
            _dir: dir,
        };
        d.restart();
        Some(d)
    }

    /// (Re)starts the process on the same storage.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start:\n{}",
                self.log()
            );
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
