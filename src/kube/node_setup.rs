//! `trow node-setup`: what the `copy-certs` DaemonSet runs on every node,
//! with the node's root mounted at `--host-root`. It writes:
//!
//! - `/etc/containerd/certs.d/<registry>/ca.crt` and `hosts.toml`: pulls
//!   of `<registry>/…` go to `--endpoint` (the NodePort on the node itself,
//!   `https://localhost:31000`), verified with the CA;
//! - `/etc/docker/certs.d/<registry>/ca.crt` for dockerd;
//! - with `--mirror-all`, `/etc/containerd/certs.d/_default/hosts.toml`:
//!   every other pull is asked of Trow's cache first, the registry itself
//!   being containerd's fallback.
//!
//! `ca` paths in `hosts.toml` are relative to the file (containerd ≥ 1.5
//! resolves them against its directory), so they are right wherever the
//! node keeps `certs.d` (k3s and RKE2 keep it elsewhere) and whatever the
//! host root is mounted as.
//!
//! Every file is written atomically, and recorded with its SHA-256 in a
//! state file (`/var/lib/trow-node-setup/state.json`) together with the
//! directories created for it, before it is written. A file that exists
//! and is not recorded (someone else's), or was changed since it was
//! written, is never overwritten; `--remove` deletes exactly the recorded
//! files that still hold what was written, then the recorded directories
//! that are empty, then the state file: the host is as it was before.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::certs;
use super::files;
use super::Error;

/// Flags of `trow node-setup`.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeSetupArgs {
    /// Where the node's root file system is mounted in this container.
    #[arg(long, env = "TROW_NODE_HOST_ROOT")]
    pub host_root: PathBuf,

    /// The CA certificate file (PEM), e.g. the trow-ca ConfigMap mounted as
    /// a volume.
    #[arg(long, env = "TROW_NODE_CA", required_unless_present = "remove")]
    pub ca: Option<PathBuf>,

    /// The registry name images use, host:port.
    #[arg(
        long,
        env = "TROW_NODE_REGISTRY",
        default_value = "trow.kube-public:31000"
    )]
    pub registry: String,

    /// Where the node reaches Trow: https://host:port.
    #[arg(
        long,
        env = "TROW_NODE_ENDPOINT",
        default_value = "https://localhost:31000"
    )]
    pub endpoint: String,

    /// Also make Trow the mirror of every registry for containerd
    /// (/etc/containerd/certs.d/_default/hosts.toml).
    #[arg(long, env = "TROW_NODE_MIRROR_ALL")]
    pub mirror_all: bool,

    /// Keep running and rewrite the files when the CA file changes.
    #[arg(long, env = "TROW_NODE_WATCH", conflicts_with = "remove")]
    pub watch: bool,

    /// Remove what an earlier run wrote, and nothing else.
    #[arg(long)]
    pub remove: bool,

    /// With --watch, how often the CA file is read.
    #[arg(long, env = "TROW_NODE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// containerd's hosts directory on the node (config_path).
    #[arg(
        long,
        env = "TROW_NODE_CONTAINERD_DIR",
        default_value = "/etc/containerd/certs.d"
    )]
    pub containerd_dir: PathBuf,

    /// docker's certificate directory on the node.
    #[arg(
        long,
        env = "TROW_NODE_DOCKER_DIR",
        default_value = "/etc/docker/certs.d"
    )]
    pub docker_dir: PathBuf,

    /// Where the record of what was written is kept on the node.
    #[arg(
        long,
        env = "TROW_NODE_STATE_DIR",
        default_value = "/var/lib/trow-node-setup"
    )]
    pub state_dir: PathBuf,

    #[command(flatten)]
    pub log: super::LogArgs,
}

const STATE_FILE: &str = "state.json";

/// A file to have on the node, by its path relative to the host root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub path: PathBuf,
    pub content: Vec<u8>,
    /// What it is, for the log.
    pub what: &'static str,
}

/// The record of what was written: files with the SHA-256 of each content
/// they may hold (the old one and the new one while a rewrite is under
/// way), and the directories created. Paths are relative to the host root.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub files: BTreeMap<PathBuf, BTreeSet<String>>,
    pub dirs: BTreeSet<PathBuf>,
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A path on the node, made relative (for joining to the host root);
/// `..` is refused.
fn relative(path: &Path, flag: &str) -> Result<PathBuf, Error> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            _ => {
                return Err(Error::Usage(format!(
                    "{flag}: `{}` must be an absolute path without `..`",
                    path.display()
                )))
            }
        }
    }
    if !path.is_absolute() || out.as_os_str().is_empty() {
        return Err(Error::Usage(format!(
            "{flag}: `{}` must be an absolute path below /",
            path.display()
        )));
    }
    Ok(out)
}

/// `host[:port]` as a registry name: a directory name that containerd
/// and docker look up.
fn check_registry(r: &str) -> Result<(), Error> {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host != "_default"
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "--registry: `{r}` is not a registry host[:port] such as trow.kube-public:31000"
        )))
    }
}

/// `https://host[:port]` (or `http://`), with nothing after it.
fn check_endpoint(e: &str) -> Result<(), Error> {
    let bad = || {
        Error::Usage(format!(
            "--endpoint: `{e}` is not https://host[:port] such as https://localhost:31000"
        ))
    };
    let rest = e
        .strip_prefix("https://")
        .or_else(|| e.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty()
        || !rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    {
        return Err(bad());
    }
    Ok(())
}

impl NodeSetupArgs {
    fn validate(&self) -> Result<(), Error> {
        check_registry(&self.registry)?;
        check_endpoint(&self.endpoint)?;
        relative(&self.containerd_dir, "--containerd-dir")?;
        relative(&self.docker_dir, "--docker-dir")?;
        relative(&self.state_dir, "--state-dir")?;
        if self.interval < Duration::from_secs(1) {
            return Err(Error::Usage("--interval: at least 1s".into()));
        }
        Ok(())
    }

    fn endpoint(&self) -> &str {
        self.endpoint.strip_suffix('/').unwrap_or(&self.endpoint)
    }

    /// The files for a CA certificate `ca_pem`.
    pub fn wanted(&self, ca_pem: &[u8]) -> Result<Vec<Wanted>, Error> {
        let containerd = relative(&self.containerd_dir, "--containerd-dir")?;
        let docker = relative(&self.docker_dir, "--docker-dir")?;
        let reg = &self.registry;
        let endpoint = self.endpoint();
        let hosts = format!(
            "# Written by `trow node-setup` (the copy-certs DaemonSet); `trow node-setup --remove`\n\
             # deletes it. Edited by hand, it is left alone and no longer updated.\n\
             # Pulls and pushes of {reg}/... go to Trow on this node, checked against\n\
             # Trow's CA (ca.crt beside this file).\n\
             server = \"https://{reg}\"\n\
             \n\
             [host.\"{endpoint}\"]\n\
             \x20 capabilities = [\"pull\", \"resolve\", \"push\"]\n\
             \x20 ca = \"ca.crt\"\n"
        );
        let mut out = vec![
            Wanted {
                path: containerd.join(reg).join("ca.crt"),
                content: ca_pem.to_vec(),
                what: "containerd: Trow's CA",
            },
            Wanted {
                path: containerd.join(reg).join("hosts.toml"),
                content: hosts.into_bytes(),
                what: "containerd: Trow's host entry",
            },
            Wanted {
                path: docker.join(reg).join("ca.crt"),
                content: ca_pem.to_vec(),
                what: "docker: Trow's CA",
            },
        ];
        if self.mirror_all {
            let mirror = format!(
                "# Written by `trow node-setup --mirror-all` (the copy-certs DaemonSet);\n\
                 # `trow node-setup --remove` deletes it. Edited by hand, it is left alone.\n\
                 # Every registry without a directory of its own here is asked of Trow's\n\
                 # pull-through cache first (containerd adds ?ns=<registry>); when Trow\n\
                 # cannot serve a pull, containerd goes to the registry itself.\n\
                 [host.\"{endpoint}\"]\n\
                 \x20 capabilities = [\"pull\", \"resolve\"]\n\
                 \x20 ca = \"../{reg}/ca.crt\"\n"
            );
            out.push(Wanted {
                path: containerd.join("_default").join("hosts.toml"),
                content: mirror.into_bytes(),
                what: "containerd: Trow as the mirror of every registry",
            });
        }
        Ok(out)
    }
}

/// The files of one host root.
pub struct Node {
    root: PathBuf,
    state_dir: PathBuf,
}

impl Node {
    pub fn new(root: &Path, state_dir: &Path) -> Result<Node, Error> {
        Ok(Node {
            root: root.to_path_buf(),
            state_dir: relative(state_dir, "--state-dir")?,
        })
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// How the path is on the node, for log lines.
    fn show(rel: &Path) -> String {
        format!("/{}", rel.display())
    }

    fn state_path(&self) -> PathBuf {
        self.abs(&self.state_dir.join(STATE_FILE))
    }

    pub fn load_state(&self) -> Result<Option<State>, Error> {
        let path = self.state_path();
        match files::read_if_exists(&path).map_err(Error::io(&path))? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::NotOurs(format!(
                    "{}: not a state file of trow node-setup ({e}); move it away to start afresh",
                    path.display()
                ))
            }),
        }
    }

    fn save_state(&self, state: &State) -> Result<(), Error> {
        let path = self.state_path();
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::Usage(format!("cannot encode the state: {e}")))?;
        files::write_atomic(&path, &bytes, 0o644).map_err(Error::io(&path))
    }

    /// The directories from the host root down to `dir` that do not exist.
    fn missing_dirs(&self, dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut cur = PathBuf::new();
        for c in dir.components() {
            cur.push(c);
            if !self.abs(&cur).exists() {
                out.push(cur.clone());
            }
        }
        out
    }

    fn create_dirs(&self, state: &mut State, dir: &Path) -> Result<(), Error> {
        let missing = self.missing_dirs(dir);
        if missing.is_empty() {
            return Ok(());
        }
        state.dirs.extend(missing.iter().cloned());
        // Recorded before created, so that --remove knows them even if
        // this run stops half-way.
        if dir != self.state_dir {
            self.save_state(state)?;
        }
        for d in &missing {
            let p = self.abs(d);
            match std::fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(&p)(e)),
            }
        }
        Ok(())
    }

    /// Makes the node hold `wanted` (and no longer hold files an earlier
    /// run wrote that are not wanted now). A file that is not ours is left
    /// as it is and reported in the error returned after everything else
    /// was done.
    pub fn apply(&self, wanted: &[Wanted]) -> Result<(), Error> {
        let mut state = self.load_state()?.unwrap_or_default();
        // The state directory first, recorded in the state it holds.
        self.create_dirs(&mut state, &self.state_dir.clone())?;
        self.save_state(&state)?;

        let mut refused = Vec::new();
        let mut to_write = Vec::new();
        for w in wanted {
            let abs = self.abs(&w.path);
            let current = files::read_if_exists(&abs).map_err(Error::io(&abs))?;
            let new_hash = sha256(&w.content);
            match &current {
                Some(c) if c == &w.content && state.files.contains_key(&w.path) => {
                    tracing::info!("{} is up to date ({})", Self::show(&w.path), w.what);
                    state
                        .files
                        .insert(w.path.clone(), BTreeSet::from([new_hash]));
                }
                Some(c)
                    if !state
                        .files
                        .get(&w.path)
                        .is_some_and(|h| h.contains(&sha256(c))) =>
                {
                    refused.push(if state.files.contains_key(&w.path) {
                        format!(
                            "{} was changed since trow node-setup wrote it",
                            Self::show(&w.path)
                        )
                    } else {
                        format!(
                            "{} exists and was not written by trow node-setup",
                            Self::show(&w.path)
                        )
                    });
                }
                _ => {
                    // Both contents are ours while the write is under way.
                    state
                        .files
                        .entry(w.path.clone())
                        .or_default()
                        .insert(new_hash);
                    to_write.push(w);
                }
            }
        }
        for w in &to_write {
            if let Some(parent) = w.path.parent() {
                self.create_dirs(&mut state, parent)?;
            }
        }
        self.save_state(&state)?;
        for w in &to_write {
            let abs = self.abs(&w.path);
            let existed = abs.exists();
            files::write_atomic(&abs, &w.content, 0o644).map_err(Error::io(&abs))?;
            tracing::info!(
                "{} {} ({})",
                if existed { "rewrote" } else { "wrote" },
                Self::show(&w.path),
                w.what
            );
            state
                .files
                .insert(w.path.clone(), BTreeSet::from([sha256(&w.content)]));
        }
        // Files an earlier run wrote that are no longer wanted
        // (--mirror-all dropped, another --registry).
        let stale: Vec<PathBuf> = state
            .files
            .keys()
            .filter(|p| !wanted.iter().any(|w| &w.path == *p))
            .cloned()
            .collect();
        for p in stale {
            if let Some(hashes) = state.files.remove(&p) {
                self.remove_file(&p, &hashes);
            }
        }
        self.remove_empty_dirs(&mut state, false);
        self.save_state(&state)?;
        if refused.is_empty() {
            Ok(())
        } else {
            Err(Error::NotOurs(format!(
                "not overwritten: {}. trow node-setup only replaces files it wrote itself; merge Trow's entry into them by hand (see docs/USER_GUIDE.md), or move them away and run it again",
                refused.join("; ")
            )))
        }
    }

    /// Deletes `rel` if it still holds one of `hashes`.
    fn remove_file(&self, rel: &Path, hashes: &BTreeSet<String>) {
        let abs = self.abs(rel);
        match files::read_if_exists(&abs) {
            Ok(None) => tracing::info!("{} is already gone", Self::show(rel)),
            Ok(Some(c)) if hashes.contains(&sha256(&c)) => match std::fs::remove_file(&abs) {
                Ok(()) => tracing::info!("removed {}", Self::show(rel)),
                Err(e) => tracing::warn!("cannot remove {}: {e}", Self::show(rel)),
            },
            Ok(Some(_)) => tracing::warn!(
                "{} was changed since trow node-setup wrote it: left in place",
                Self::show(rel)
            ),
            Err(e) => tracing::warn!("cannot read {}: {e}; left in place", Self::show(rel)),
        }
    }

    /// Removes the recorded directories that are empty, deepest first
    /// (all of them with `all`, else those no wanted file is in).
    fn remove_empty_dirs(&self, state: &mut State, all: bool) {
        let mut dirs: Vec<PathBuf> = state.dirs.iter().cloned().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let needed = !all
                && (self.state_dir.starts_with(&d)
                    || state.files.keys().any(|f| f.starts_with(&d)));
            if needed {
                continue;
            }
            let abs = self.abs(&d);
            match std::fs::remove_dir(&abs) {
                Ok(()) => {
                    tracing::info!("removed the directory {}", Self::show(&d));
                    state.dirs.remove(&d);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    state.dirs.remove(&d);
                }
                Err(_) => {
                    tracing::info!(
                        "kept the directory {}: it holds files not written by trow node-setup",
                        Self::show(&d)
                    );
                    state.dirs.remove(&d);
                }
            }
        }
    }

    /// Undoes every run: removes the files it wrote (unless changed
    /// since), the directories it created (if empty), and the state file.
    pub fn remove(&self) -> Result<(), Error> {
        let Some(mut state) = self.load_state()? else {
            tracing::info!(
                "nothing to remove: no state file at {} (trow node-setup never ran here, or was removed already)",
                Self::show(&self.state_dir.join(STATE_FILE))
            );
            return Ok(());
        };
        for (p, hashes) in std::mem::take(&mut state.files) {
            self.remove_file(&p, &hashes);
        }
        let path = self.state_path();
        std::fs::remove_file(&path).map_err(Error::io(&path))?;
        self.remove_empty_dirs(&mut state, true);
        tracing::info!("trow node-setup --remove is done");
        Ok(())
    }
}

/// Reads and checks the CA file.
fn read_ca(path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    let text = String::from_utf8(bytes.clone())
        .map_err(|_| Error::Usage(format!("{}: not PEM text", path.display())))?;
    certs::parse_one(&text, &path.display().to_string())?;
    Ok(bytes)
}

/// Runs `trow node-setup` until done (or, with `--watch`, until SIGTERM).
pub async fn run(args: NodeSetupArgs) -> Result<(), Error> {
    args.validate()?;
    let node = Node::new(&args.host_root, &args.state_dir)?;
    if args.remove {
        return node.remove();
    }
    let Some(ca_path) = args.ca.clone() else {
        return Err(Error::Usage("--ca is required (unless --remove)".into()));
    };
    let setup = |ca: &[u8]| -> Result<(), Error> {
        let info = certs::parse_one(&String::from_utf8_lossy(ca), "the CA")?;
        tracing::info!(
            "read the CA from {}: \"{}\", sha256 {}, valid until {}",
            ca_path.display(),
            info.subject,
            info.sha256,
            certs::show_time(info.not_after)
        );
        node.apply(&args.wanted(ca)?)
    };
    let ca = read_ca(&ca_path)?;
    setup(&ca)?;
    tracing::info!(registry = %args.registry, endpoint = %args.endpoint(), mirror_all = args.mirror_all, "this node trusts Trow's CA");
    if !args.watch {
        return Ok(());
    }
    let mut last = sha256(&ca);
    let stop = super::stop_requested();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = &mut stop => {
                tracing::info!("trow node-setup --watch: stopping (the files stay; --remove deletes them)");
                return Ok(());
            }
        }
        // A ConfigMap volume is updated by a symlink swap: read the file
        // (following links) each time and compare contents.
        match read_ca(&ca_path) {
            Ok(ca) if sha256(&ca) != last => {
                tracing::info!("the CA file {} changed: rewriting", ca_path.display());
                match setup(&ca) {
                    Ok(()) => last = sha256(&ca),
                    Err(e @ Error::NotOurs(_)) => return Err(e),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot rewrite the node's files; retrying")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the CA file; keeping the files as they are")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        node: NodeSetupArgs,
    }

    fn args(extra: &[&str]) -> NodeSetupArgs {
        let mut argv = vec!["t", "--host-root", "/host", "--ca", "/ca/ca.crt"];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv).unwrap().node
    }

    fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                if p.is_dir() {
                    out.insert(format!("{rel}/"), Vec::new());
                    stack.push(p);
                } else {
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn files_for_containerd_and_docker() {
        let a = args(&[]);
        assert!(a.validate().is_ok());
        let w = a.wanted(b"CA").unwrap();
        let paths: Vec<_> = w.iter().map(|w| w.path.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                "etc/containerd/certs.d/trow.kube-public:31000/ca.crt",
                "etc/containerd/certs.d/trow.kube-public:31000/hosts.toml",
                "etc/docker/certs.d/trow.kube-public:31000/ca.crt"
            ]
        );
        let hosts = String::from_utf8(w[1].content.clone()).unwrap();
        assert!(hosts.contains("server = \"https://trow.kube-public:31000\"\n"));
        assert!(hosts.contains(
            "[host.\"https://localhost:31000\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n  ca = \"ca.crt\"\n"
        ));
        let w = args(&["--mirror-all"]).wanted(b"CA").unwrap();
        let mirror = String::from_utf8(w[3].content.clone()).unwrap();
        assert_eq!(
            w[3].path,
            Path::new("etc/containerd/certs.d/_default/hosts.toml")
        );
        assert!(!mirror.contains("server"));
        assert!(mirror.contains("capabilities = [\"pull\", \"resolve\"]\n"));
        assert!(mirror.contains("ca = \"../trow.kube-public:31000/ca.crt\""));
        for bad in [
            &["--registry", "_default"][..],
            &["--registry", "a/b"],
            &["--endpoint", "localhost:31000"],
            &["--endpoint", "https://x/\"evil"],
            &["--containerd-dir", "etc/x"],
            &["--docker-dir", "/etc/../x"],
        ] {
            assert!(args(bad).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn apply_then_remove_leaves_the_host_as_it_was() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // The node already has containerd's directory and another
        // registry's entry.
        std::fs::create_dir_all(r.join("etc/containerd/certs.d/docker.io")).unwrap();
        std::fs::write(r.join("etc/containerd/certs.d/docker.io/hosts.toml"), "x").unwrap();
        let before = tree(r);
        let a = args(&["--mirror-all"]);
        let node = Node::new(r, &a.state_dir).unwrap();
        node.apply(&a.wanted(b"CA one").unwrap()).unwrap();
        assert_eq!(
            std::fs::read(r.join("etc/docker/certs.d/trow.kube-public:31000/ca.crt")).unwrap(),
            b"CA one"
        );
        // Again with a new CA: rewritten, still ours.
        node.apply(&a.wanted(b"CA two").unwrap()).unwrap();
        assert_eq!(
            std::fs::read(r.join("etc/containerd/certs.d/trow.kube-public:31000/ca.crt")).unwrap(),
            b"CA two"
        );
        // Without --mirror-all, the mirror file goes.
        let b = args(&[]);
        node.apply(&b.wanted(b"CA two").unwrap()).unwrap();
        assert!(!r.join("etc/containerd/certs.d/_default").exists());
        node.apply(&a.wanted(b"CA two").unwrap()).unwrap();
        node.remove().unwrap();
        assert_eq!(tree(r), before);
        // Removing twice is fine.
        node.remove().unwrap();
    }

    #[test]
    fn files_of_others_are_never_overwritten_or_removed() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let mirror = r.join("etc/containerd/certs.d/_default/hosts.toml");
        std::fs::create_dir_all(mirror.parent().unwrap()).unwrap();
        std::fs::write(&mirror, "someone else's").unwrap();
        let a = args(&["--mirror-all"]);
        let node = Node::new(r, &a.state_dir).unwrap();
        let e = node.apply(&a.wanted(b"CA").unwrap()).unwrap_err();
        assert!(
            e.to_string()
                .contains("_default/hosts.toml exists and was not written by trow node-setup"),
            "{e}"
        );
        assert_eq!(std::fs::read(&mirror).unwrap(), b"someone else's");
        // The other files were written all the same.
        let ours = r.join("etc/containerd/certs.d/trow.kube-public:31000/hosts.toml");
        assert!(ours.exists());
        // A file of ours edited by hand is no longer ours.
        std::fs::write(&ours, "edited").unwrap();
        let e = node.apply(&args(&[]).wanted(b"CA").unwrap()).unwrap_err();
        assert!(e.to_string().contains("was changed since"), "{e}");
        node.remove().unwrap();
        assert_eq!(std::fs::read(&mirror).unwrap(), b"someone else's");
        assert_eq!(std::fs::read(&ours).unwrap(), b"edited");
        assert!(!r.join("etc/docker").exists());
        assert!(!r.join("var").exists());
    }
}
