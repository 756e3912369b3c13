//! Exclusive ownership of the data directory.
//!
//! Trow's embedded stores (blob files with an in-process lock per digest,
//! one SQLite writer) are correct only while one process uses the
//! directory. A second `trow` pointed at the same directory (a mistyped
//! flag, a Deployment rolled with `RollingUpdate` over a ReadWriteOnce
//! volume) would break that silently, so start-up takes an advisory lock on
//! `<data-dir>/trow.lock` and refuses to run without it. The kernel drops
//! the lock when the process dies, `kill -9` included.

use std::fs::File;
use std::io;
use std::path::Path;

/// Held for as long as the process uses the directory.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Takes the data directory's lock without waiting; an error names what to
/// do when another process holds it.
pub fn lock(dir: &Path) -> io::Result<DataDirLock> {
    let path = dir.join("trow.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    try_lock_exclusive(&file).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "another trow process is using {} (it holds {}); stop it, or give this one its own --data-dir",
                    dir.display(),
                    path.display()
                ),
            )
        } else {
            e
        }
    })?;
    Ok(DataDirLock { _file: file })
}

#[cfg(unix)]
fn try_lock_exclusive(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(unix))]
fn try_lock_exclusive(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let tmp = tempfile::tempdir().unwrap();
        let first = lock(tmp.path()).unwrap();
        let e = lock(tmp.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains("--data-dir"), "{e}");
        drop(first);
        lock(tmp.path()).unwrap();
    }
}
