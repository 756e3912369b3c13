//! Atomic file writes: a reader (Trow's certificate reloader, containerd,
//! docker) sees the old content or the new, never a part of it.

use std::fs;
use std::io::{self, Write as _};
use std::path::Path;

/// Reads a file, `None` when it does not exist.
pub fn read_if_exists(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `content` to `path` through a temporary file in the same
/// directory (created with `mode`, written, fsynced, renamed over `path`),
/// then fsyncs the directory. The file never exists with another mode or
/// partial content.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(io::Error::other)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(mode);
        }
        let mut f = options.open(&tmp)?;
        // The umask may have taken bits away: set exactly `mode`.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            f.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] unless the file already holds exactly `content` (and,
/// on Unix, has `mode`). Returns whether it wrote.
pub fn write_if_changed(path: &Path, content: &[u8], mode: u32) -> io::Result<bool> {
    if read_if_exists(path)?.as_deref() == Some(content) && has_mode(path, mode) {
        return Ok(false);
    }
    write_atomic(path, content, mode)?;
    Ok(true)
}

fn has_mode(path: &Path, mode: u32) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode)
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_set_the_mode_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tls.key");
        assert!(write_if_changed(&p, b"one", 0o600).unwrap());
        assert!(!write_if_changed(&p, b"one", 0o600).unwrap());
        assert!(write_if_changed(&p, b"two", 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
            // A wrong mode is corrected even when the content is right.
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(write_if_changed(&p, b"two", 0o600).unwrap());
        }
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tls.key"]);
        assert_eq!(read_if_exists(&dir.path().join("none")).unwrap(), None);
    }
}
