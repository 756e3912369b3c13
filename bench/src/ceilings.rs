//! The machine's ceilings: how fast this machine can do the work under a push
//! or a pull without any registry in the way, so that every figure of a run
//! can be read against what the machine allows.
//!
//! * `sha256-1core`: SHA-256 of one core (a registry verifies each upload's
//!   digest on one core per stream);
//! * `loopback-tcp`: one TCP stream over 127.0.0.1 (what one client
//!   connection can carry here at best);
//! * `synced-disk-write`: sequential 1 MiB writes into a fresh file, then
//!   fdatasync, timed end to end (a large blob's commit);
//! * `synced-small-write`: create, write 4 KiB, fdatasync, rename (a small
//!   blob's commit), in operations per second;
//! * `push-ceiling`: the smaller of `sha256-1core` and `synced-disk-write`.
//!
//! Each is measured for a bounded time, at least one unit of work, on one
//! thread (`loopback-tcp` adds a reader thread).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::report::{self, WorkloadResult, MIB};
use crate::stats::Lat;
use crate::units::format_size;

/// `workload` of every ceiling record.
pub const WORKLOAD: &str = "ceiling";
/// Buffer hashed over and over by `sha256-1core`.
const HASH_BUFFER: usize = 8 << 20;
/// Size of each write of `loopback-tcp`.
const TCP_WRITE: usize = 1 << 20;
/// Read buffer of the `loopback-tcp` reader, which discards what it reads.
const TCP_READ: usize = 64 << 10;
/// A socket call blocked this long means the measurement is broken.
const TCP_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of each write of `synced-disk-write`.
const DISK_BLOCK: usize = 1 << 20;
/// Largest file of `synced-disk-write` before its fdatasync.
const DISK_FILE_MAX: u64 = 256 << 20;
/// File size of `synced-small-write`.
const SMALL_FILE: usize = 4 << 10;

/// The tally of one measurement: timed work only, not set-up or clean-up.
pub struct Measured {
    pub ops: u64,
    pub bytes: u64,
    pub busy: Duration,
    pub lat: Lat,
}

impl Measured {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.busy.as_secs_f64().max(1e-9)
    }

    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

/// Seeded pseudo-random bytes, so that nothing along the way (a compressing
/// or deduplicating disk) gets an easy time.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    ChaCha8Rng::seed_from_u64(0xCE11).fill_bytes(&mut v);
    v
}

/// Runs `op` until `budget` has passed since the start, at least once. `op`
/// gets the deadline and returns the bytes it handled and the time it spent
/// on the work being measured.
fn repeat(
    budget: Duration,
    mut op: impl FnMut(Instant) -> Result<(u64, Duration)>,
) -> Result<Measured> {
    let deadline = Instant::now() + budget;
    let mut m = Measured {
        ops: 0,
        bytes: 0,
        busy: Duration::ZERO,
        lat: Lat::new(),
    };
    loop {
        let (bytes, took) = op(deadline)?;
        m.ops += 1;
        m.bytes += bytes;
        m.busy += took;
        m.lat.record(took);
        if Instant::now() >= deadline {
            return Ok(m);
        }
    }
}

/// SHA-256 of an 8 MiB buffer, over and over, on this thread.
pub fn sha256_1core(budget: Duration) -> Result<Measured> {
    let buf = random_bytes(HASH_BUFFER);
    repeat(budget, |_| {
        let t = Instant::now();
        std::hint::black_box(Sha256::digest(std::hint::black_box(&buf)));
        Ok((buf.len() as u64, t.elapsed()))
    })
}

/// One TCP stream over 127.0.0.1: this thread writes 1 MiB at a time, a
/// reader thread reads into 64 KiB and discards. Timed from the first write
/// until the reader has seen the last byte.
pub fn loopback_tcp(budget: Duration) -> Result<Measured> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding a loopback listener")?;
    let addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    // The connection completes in the listen backlog; accepting afterwards
    // on this thread means no thread can be left waiting for a peer.
    let mut tx = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let (mut rx, _) = listener
        .accept()
        .context("accepting the loopback connection")?;
    rx.set_read_timeout(Some(TCP_TIMEOUT))
        .context("setting the reader's timeout")?;
    tx.set_write_timeout(Some(TCP_TIMEOUT))
        .context("setting the writer's timeout")?;
    let reader = thread::Builder::new()
        .name("ceiling-tcp-reader".into())
        .spawn(move || -> std::io::Result<u64> {
            let mut buf = vec![0u8; TCP_READ];
            let mut n = 0u64;
            loop {
                match rx.read(&mut buf) {
                    Ok(0) => return Ok(n),
                    Ok(k) => n += k as u64,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .context("starting the loopback reader thread")?;
    let buf = random_bytes(TCP_WRITE);
    let t0 = Instant::now();
    // Dropping `tx` on an error ends the reader with end-of-stream.
    let mut m = repeat(budget, |_| {
        let t = Instant::now();
        tx.write_all(&buf)
            .context("writing to the loopback connection")?;
        Ok((buf.len() as u64, t.elapsed()))
    })?;
    tx.shutdown(Shutdown::Write)
        .context("closing the loopback connection")?;
    let received = reader
        .join()
        .map_err(|_| anyhow!("the loopback reader thread panicked"))?
        .context("reading from the loopback connection")?;
    m.busy = t0.elapsed();
    ensure!(
        received == m.bytes,
        "loopback reader got {received} bytes of {} sent",
        m.bytes
    );
    Ok(m)
}

/// Fails unless `dir` is an existing directory.
fn check_dir(dir: &Path) -> Result<()> {
    let meta =
        fs::metadata(dir).with_context(|| format!("ceilings directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("ceilings directory {} is not a directory", dir.display());
    }
    Ok(())
}

/// Temporary files of one measurement inside the measured directory; the
/// ones still there are removed by [`Scratch::finish`] or, on an error, by
/// `drop`.
struct Scratch {
    dir: PathBuf,
    next: u64,
    live: Vec<PathBuf>,
}

impl Scratch {
    fn new(dir: &Path) -> Result<Self> {
        check_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            next: 0,
            live: Vec::new(),
        })
    }

    /// A fresh name, `.trow-bench-ceiling-<pid>-<n>.<ext>`, not yet created.
    fn name(&mut self, ext: &str) -> PathBuf {
        self.next += 1;
        let pid = std::process::id();
        self.dir
            .join(format!(".trow-bench-ceiling-{pid}-{}.{ext}", self.next))
    }

    /// Creates a file that must not exist yet.
    fn create(&mut self, path: &Path) -> Result<File> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        self.live.push(path.to_path_buf());
        Ok(f)
    }

    fn rename(&mut self, from: &Path, to: &Path) -> Result<()> {
        fs::rename(from, to)
            .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
        for p in self.live.iter_mut().filter(|p| p.as_path() == from) {
            *p = to.to_path_buf();
        }
        Ok(())
    }

    fn remove(&mut self, path: &Path) -> Result<()> {
        fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        self.live.retain(|p| p != path);
        Ok(())
    }

    /// Removes every file still there; the first failure is the error.
    fn finish(mut self) -> Result<()> {
        let mut first = Ok(());
        for p in std::mem::take(&mut self.live) {
            let r = fs::remove_file(&p).with_context(|| format!("removing {}", p.display()));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.live {
            let _ = fs::remove_file(p);
        }
    }
}

/// Sequential 1 MiB writes into a fresh file in `dir` up to 256 MiB (or
/// until the budget is used), then fdatasync; timed from the create to the
/// end of the fdatasync, file after file. Each file is removed (untimed)
/// before the next.
pub fn synced_disk_write(dir: &Path, budget: Duration) -> Result<Measured> {
    let block = random_bytes(DISK_BLOCK);
    let mut scratch = Scratch::new(dir)?;
    let m = repeat(budget, |deadline| {
        let path = scratch.name("tmp");
        let t = Instant::now();
        let mut f = scratch.create(&path)?;
        let mut written = 0u64;
        while written < DISK_FILE_MAX {
            f.write_all(&block)
                .with_context(|| format!("writing {}", path.display()))?;
            written += block.len() as u64;
            if Instant::now() >= deadline {
                break;
            }
        }
        f.sync_data()
            .with_context(|| format!("fdatasync of {}", path.display()))?;
        let took = t.elapsed();
        drop(f);
        scratch.remove(&path)?;
        Ok((written, took))
    })?;
    scratch.finish()?;
    Ok(m)
}

/// Create a file in `dir`, write 4 KiB, fdatasync, close, rename: one small
/// blob's commit, over and over. The files are removed at the end.
pub fn synced_small_write(dir: &Path, budget: Duration) -> Result<Measured> {
    let data = random_bytes(SMALL_FILE);
    let mut scratch = Scratch::new(dir)?;
    let m = repeat(budget, |_| {
        let tmp = scratch.name("tmp");
        let dest = scratch.name("blob");
        let t = Instant::now();
        let mut f = scratch.create(&tmp)?;
        f.write_all(&data)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_data()
            .with_context(|| format!("fdatasync of {}", tmp.display()))?;
        drop(f);
        scratch.rename(&tmp, &dest)?;
        Ok((data.len() as u64, t.elapsed()))
    })?;
    scratch.finish()?;
    Ok(m)
}

/// The record of one measured ceiling.
fn record(
    case: &str,
    headline: &str,
    m: &Measured,
    params: std::collections::BTreeMap<String, Value>,
) -> WorkloadResult {
    WorkloadResult {
        workload: WORKLOAD.into(),
        case: case.into(),
        target: "machine".into(),
        params,
        ops: m.ops,
        bytes: m.bytes,
        seconds: m.busy.as_secs_f64(),
        mib_per_s: m.mib_per_s(),
        ops_per_s: m.ops_per_s(),
        p50_ms: m.lat.ms(0.50),
        p90_ms: m.lat.ms(0.90),
        p99_ms: m.lat.ms(0.99),
        max_ms: m.lat.max_ms(),
        headline: headline.into(),
        ..Default::default()
    }
}

/// Measures every ceiling, `seconds` each, the disk ones in `dir`, and
/// derives `push-ceiling`. Progress goes to stderr.
pub fn measure_all(dir: &Path, seconds: f64) -> Result<Vec<WorkloadResult>> {
    if !(seconds > 0.0 && seconds.is_finite()) {
        bail!("--ceiling-seconds must be positive");
    }
    // Before minutes of other measurements, not after.
    check_dir(dir)?;
    let budget = Duration::from_secs_f64(seconds);
    let shown = dir.display().to_string();
    let note = |name: &str| eprintln!("trow-bench: measuring ceiling {name} ({seconds} s)");
    note("sha256-1core");
    let sha = sha256_1core(budget).context("measuring sha256-1core")?;
    note("loopback-tcp");
    let tcp = loopback_tcp(budget).context("measuring loopback-tcp")?;
    note("synced-disk-write");
    let disk = synced_disk_write(dir, budget).context("measuring synced-disk-write")?;
    note("synced-small-write");
    let small = synced_small_write(dir, budget).context("measuring synced-small-write")?;

    let mut out = vec![
        record(
            "sha256-1core",
            "mib_per_s",
            &sha,
            crate::params! {"buffer" => format_size(HASH_BUFFER as u64)},
        ),
        record(
            "loopback-tcp",
            "mib_per_s",
            &tcp,
            crate::params! {
                "write" => format_size(TCP_WRITE as u64),
                "read_buffer" => format_size(TCP_READ as u64),
            },
        ),
        record(
            "synced-disk-write",
            "mib_per_s",
            &disk,
            crate::params! {
                "dir" => shown,
                "block" => format_size(DISK_BLOCK as u64),
                "file_max" => format_size(DISK_FILE_MAX),
            },
        ),
        record(
            "synced-small-write",
            "ops_per_s",
            &small,
            crate::params! {"dir" => shown, "size" => format_size(SMALL_FILE as u64)},
        ),
    ];
    out.push(push_ceiling(&out[0], &out[2]));
    Ok(out)
}

/// `push-ceiling`: a push is hashed on one core and written and synced to
/// disk, so it cannot beat the slower of the two.
fn push_ceiling(sha: &WorkloadResult, disk: &WorkloadResult) -> WorkloadResult {
    let by = if sha.mib_per_s <= disk.mib_per_s {
        sha
    } else {
        disk
    };
    let mut r = WorkloadResult {
        workload: WORKLOAD.into(),
        case: "push-ceiling".into(),
        target: "machine".into(),
        mib_per_s: by.mib_per_s,
        headline: "mib_per_s".into(),
        ..Default::default()
    };
    r.extra
        .insert("limited_by".into(), Value::from(by.case.clone()));
    r
}

/// Measures and prints the ceilings: JSON lines, or a table.
pub fn measure_and_print(dir: &Path, seconds: f64, json: bool) -> Result<()> {
    let rows = measure_all(dir, seconds)?;
    if json {
        for r in &rows {
            println!(
                "{}",
                serde_json::to_string(r).context("encoding a ceiling")?
            );
        }
    } else {
        print!("{}", report::ceiling_table(&rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: Duration = Duration::from_millis(30);

    /// A fresh empty directory under the system's temp dir.
    fn fresh_dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("trow-bench-ceilings-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn entries(d: &Path) -> Vec<PathBuf> {
        fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    fn assert_sane(m: &Measured, unit_bytes: u64) {
        assert!(m.ops >= 1);
        assert!(m.bytes >= unit_bytes, "{} bytes", m.bytes);
        assert!(m.busy > Duration::ZERO);
        for v in [m.mib_per_s(), m.ops_per_s()] {
            assert!(v.is_finite() && v > 0.0, "{v}");
        }
        assert_eq!(m.lat.count(), m.ops);
    }

    #[test]
    fn sha256_is_positive_and_whole_buffers() {
        let m = sha256_1core(TINY).unwrap();
        assert_sane(&m, HASH_BUFFER as u64);
        assert_eq!(m.bytes, m.ops * HASH_BUFFER as u64);
    }

    #[test]
    fn loopback_delivers_every_byte() {
        // `loopback_tcp` itself fails if the reader got fewer bytes.
        let m = loopback_tcp(TINY).unwrap();
        assert_sane(&m, TCP_WRITE as u64);
        assert_eq!(m.bytes, m.ops * TCP_WRITE as u64);
    }

    #[test]
    fn disk_write_syncs_and_leaves_nothing() {
        let d = fresh_dir("disk");
        let m = synced_disk_write(&d, TINY).unwrap();
        assert_sane(&m, DISK_BLOCK as u64);
        assert_eq!(m.bytes % DISK_BLOCK as u64, 0);
        assert!(entries(&d).is_empty(), "{:?}", entries(&d));
        fs::remove_dir(&d).unwrap();
    }

    #[test]
    fn small_write_counts_ops_and_leaves_nothing() {
        let d = fresh_dir("small");
        let m = synced_small_write(&d, TINY).unwrap();
        assert_sane(&m, SMALL_FILE as u64);
        assert_eq!(m.bytes, m.ops * SMALL_FILE as u64);
        assert!(entries(&d).is_empty(), "{:?}", entries(&d));
        fs::remove_dir(&d).unwrap();
    }

    #[test]
    fn scratch_drop_removes_files_left_by_an_error() {
        let d = fresh_dir("drop");
        {
            let mut s = Scratch::new(&d).unwrap();
            let a = s.name("tmp");
            let b = s.name("blob");
            s.create(&a).unwrap();
            s.rename(&a, &b).unwrap();
            let c = s.name("tmp");
            s.create(&c).unwrap();
            assert_eq!(entries(&d).len(), 2);
        }
        assert!(entries(&d).is_empty(), "{:?}", entries(&d));
        fs::remove_dir(&d).unwrap();
    }

    #[test]
    fn missing_directory_is_an_error() {
        let d = fresh_dir("missing").join("nope");
        let Err(e) = synced_disk_write(&d, TINY) else {
            panic!("a missing directory must fail");
        };
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
        assert!(synced_small_write(&d, TINY).is_err());
        // measure_all checks the directory before measuring anything.
        let t = Instant::now();
        assert!(measure_all(&d, 60.0).is_err());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(!d.exists());
        fs::remove_dir(d.parent().unwrap()).unwrap();
    }

    #[test]
    fn all_ceilings_and_the_push_ceiling() {
        let d = fresh_dir("all");
        let rows = measure_all(&d, 0.03).unwrap();
        let cases: Vec<&str> = rows.iter().map(|r| r.case.as_str()).collect();
        assert_eq!(
            cases,
            [
                "sha256-1core",
                "loopback-tcp",
                "synced-disk-write",
                "synced-small-write",
                "push-ceiling"
            ]
        );
        for r in &rows {
            assert_eq!(r.workload, WORKLOAD);
            let v = r.headline_value();
            assert!(v.is_finite() && v > 0.0, "{}: {v}", r.case);
        }
        assert_eq!(rows[3].headline_unit(), "ops/s");
        let push = &rows[4];
        assert_eq!(
            push.mib_per_s,
            rows[0].mib_per_s.min(rows[2].mib_per_s),
            "push-ceiling is the smaller of hashing and synced writing"
        );
        let by = push.extra["limited_by"].as_str().unwrap();
        assert!(by == "sha256-1core" || by == "synced-disk-write", "{by}");
        assert!(entries(&d).is_empty(), "{:?}", entries(&d));
        assert!(measure_all(&d, 0.0).is_err());
        assert!(measure_all(&d, f64::NAN).is_err());
        fs::remove_dir(&d).unwrap();
    }
}
