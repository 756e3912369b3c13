//! Streaming a stored blob file to a client.
//!
//! Two ways to hand the bytes to the HTTP layer:
//!
//! - **Sent from the file** (plain HTTP/1.1 only, [`Delivery::PlainSocket`]):
//!   a window of the file is memory-mapped and the mapping is the body
//!   chunk, registered in the connection's [`FileRegions`]. hyper passes
//!   the chunk to the socket writer untouched (an `IoSlice` of `writev`);
//!   the writer (`listen/io.rs`) finds it registered and calls `sendfile`
//!   for it instead, so the kernel sends page-cache pages: no read into a
//!   user-space buffer (28 % of the CPU profile of a 100 MiB pull) and no
//!   copy out of one. The mapping is never touched, so it costs no page
//!   faults and no resident memory; it exists so that the chunk is real
//!   memory holding the right bytes should anything read it. Used only when
//!   the whole window is in the page cache (`cachestat`, else `mincore`),
//!   so `sendfile` never waits for the disk on an async thread; a window
//!   that is not is copied in full before the next one is looked at.
//! - **Copied** (TLS, HTTP/2, anything that reads the bytes in user space,
//!   and windows not in the page cache): the file is read into a buffer,
//!   from the page cache on the spot (`preadv2(RWF_NOWAIT)`) or on the
//!   blocking pool.
//!
//! Why mapped pages are safe here: blob files are immutable once committed
//! (written, fsynced and verified before their rename); deletion (GC,
//! eviction) unlinks them, which leaves a mapped or open file's pages valid
//! until the last reader is done. Nothing in user space reads a mapped
//! chunk on a plain HTTP/1.1 connection (Content-Length bodies are written
//! by the kernel from hyper's `IoSlice`s), so if a file were truncated
//! behind Trow's back the socket write would fail with `EFAULT` rather than
//! the process taking `SIGBUS`; TLS and HTTP/2, whose encoders read the
//! bytes, always get copies.
//!
//! Memory: each download has at most one chunk in flight (being written to
//! the socket), and copied chunks shrink as downloads multiply so that all
//! of them together hold about [`DOWNLOAD_BUDGET`] (between [`MIN_CHUNK`]
//! and [`MAX_COPY_CHUNK`] each): 64 copying pulls get 64 KiB, 1000 get
//! 16 KiB. Mapped windows are up to [`MAX_MAPPED_CHUNK`] of address space.

use std::fs::File;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::Stream;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use super::{ByteStream, Delivery};

/// What all copying downloads together may hold in buffers, before the
/// per-chunk minimum.
const DOWNLOAD_BUDGET: usize = 4 * 1024 * 1024;
/// The smallest chunk, however many downloads run.
const MIN_CHUNK: usize = 16 * 1024;
/// The largest copied chunk (measured: 32 KiB to 256 KiB cost the same CPU
/// per GiB within noise; 64 KiB the least memory for the fewest calls).
const MAX_COPY_CHUNK: usize = 64 * 1024;
/// The largest mapped window. A window is address space only (its pages are
/// never touched, see the module comment), so it costs no memory; each costs
/// an `mmap` and a `munmap`, which take the process's memory-map lock.
const MAX_MAPPED_CHUNK: usize = 8 * 1024 * 1024;
/// Alignment of windows after the first, so that each maps whole pages
/// (4 KiB pages; larger pages only make the first window unaligned).
const WINDOW_ALIGN: u64 = 4096;

/// Downloads streaming now (the budget's divisor).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// Bytes sent from files by the socket writers, and handed to the HTTP
/// layer as copies.
static SENT_FROM_FILE: AtomicU64 = AtomicU64::new(0);
static COPIED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes of blob bodies sent so far, by path; for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DownloadFigures {
    pub sendfile_bytes: u64,
    pub copied_bytes: u64,
}

pub fn figures() -> DownloadFigures {
    DownloadFigures {
        sendfile_bytes: SENT_FROM_FILE.load(Ordering::Relaxed),
        copied_bytes: COPIED_BYTES.load(Ordering::Relaxed),
    }
}

/// Counts bytes a socket writer sent from a file.
pub fn record_sent_from_file(n: usize) {
    SENT_FROM_FILE.fetch_add(n as u64, Ordering::Relaxed);
}

/// Counts blob bytes handed over from memory rather than a file (a small
/// blob kept in the metadata store): they were copied like a read.
pub fn record_copied(n: usize) {
    COPIED_BYTES.fetch_add(n as u64, Ordering::Relaxed);
}

/// The size of the next copied chunk: the budget shared by the downloads
/// running now.
fn copy_chunk_size() -> usize {
    let active = ACTIVE.load(Ordering::Relaxed).max(1);
    (DOWNLOAD_BUDGET / active).clamp(MIN_CHUNK, MAX_COPY_CHUNK)
}

/// Counts a download as active while it lives.
struct ActiveDownload;

impl ActiveDownload {
    fn new() -> Self {
        ACTIVE.fetch_add(1, Ordering::Relaxed);
        ActiveDownload
    }
}

impl Drop for ActiveDownload {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Streams `len` bytes of `file` from `start`.
pub(super) fn stream_file(file: File, start: u64, len: u64, delivery: Delivery) -> ByteStream {
    Box::pin(FileStream {
        file: Arc::new(file),
        pos: start,
        end: start + len,
        gate: Arc::new(Gate::default()),
        reading: None,
        nowait: cfg!(target_os = "linux"),
        regions: match delivery {
            Delivery::PlainSocket(regions) => Some(regions),
            Delivery::Buffered => None,
        },
        copy_until: start,
        failed: false,
        _active: ActiveDownload::new(),
    })
}

/// A chunk being read on the blocking pool: its buffer and how much of it
/// holds data.
type BlockingRead = JoinHandle<io::Result<(Vec<u8>, usize)>>;

/// A blob body produced on demand: a chunk is made when the HTTP layer asks
/// for one and the previous chunk has been written (or dropped).
struct FileStream {
    file: Arc<File>,
    pos: u64,
    end: u64,
    gate: Arc<Gate>,
    /// A read on the blocking pool, when the page cache could not serve one.
    reading: Option<BlockingRead>,
    /// Whether non-blocking reads are worth trying (Linux, and supported by
    /// the file system).
    nowait: bool,
    /// Where to register mapped windows: `Some` on plain HTTP/1.1 until
    /// mapping fails on this file.
    regions: Option<Arc<FileRegions>>,
    /// The end of the last window found not cached: it is copied up to
    /// there, without asking the page cache again for every chunk.
    copy_until: u64,
    failed: bool,
    _active: ActiveDownload,
}

impl FileStream {
    fn copied(&mut self, buf: Vec<u8>, len: usize) -> Bytes {
        self.pos += len as u64;
        COPIED_BYTES.fetch_add(len as u64, Ordering::Relaxed);
        Bytes::from_owner(Copied {
            buf,
            len,
            gate: self.gate.clone(),
        })
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<io::Result<Bytes>>> {
        self.failed = true;
        Poll::Ready(Some(Err(e)))
    }

    /// The next window, mapped and registered, when it is wholly in the
    /// page cache. `None` means: copy this chunk instead.
    fn mapped_window(&mut self, regions: Arc<FileRegions>) -> Option<Bytes> {
        let remaining = self.end - self.pos;
        // End windows on a page boundary, so that the next one starts on one.
        let want = MAX_MAPPED_CHUNK as u64;
        let window_end = ((self.pos + want) / WINDOW_ALIGN * WINDOW_ALIGN).max(self.pos + 1);
        let len = usize::try_from((window_end - self.pos).min(remaining)).ok()?;
        let cached = cached_by_cachestat(&self.file, self.pos, len);
        if cached == Some(false) {
            self.copy_until = self.pos + len as u64;
            return None;
        }
        // SAFETY: the file is a committed blob, never written again (see
        // the module comment); only the kernel reads the mapping.
        let map = match unsafe {
            memmap2::MmapOptions::new()
                .offset(self.pos)
                .len(len)
                .map(&*self.file)
        } {
            Ok(map) => map,
            Err(e) => {
                tracing::debug!(error = %e, "cannot map a blob file; copying it instead");
                self.regions = None;
                return None;
            }
        };
        if cached.is_none() && !resident(&map) {
            self.copy_until = self.pos + len as u64;
            return None;
        }
        regions.add(Region {
            start: map.as_ptr() as usize,
            len,
            file: self.file.clone(),
            offset: self.pos,
        });
        self.pos += len as u64;
        Some(Bytes::from_owner(Mapped {
            map: Some(map),
            regions,
            gate: self.gate.clone(),
        }))
    }
}

impl Stream for FileStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(reading) = this.reading.as_mut() {
            let Poll::Ready(result) = Pin::new(reading).poll(cx) else {
                return Poll::Pending;
            };
            this.reading = None;
            return match result.map_err(io::Error::other).and_then(|r| r) {
                Ok((buf, len)) => Poll::Ready(Some(Ok(this.copied(buf, len)))),
                Err(e) => this.fail(e),
            };
        }
        if this.failed || this.pos >= this.end {
            return Poll::Ready(None);
        }
        let Some(spare) = this.gate.enter(cx) else {
            return Poll::Pending;
        };
        let try_window = this.pos >= this.copy_until;
        if let Some(regions) = this.regions.clone().filter(|_| try_window) {
            if let Some(window) = this.mapped_window(regions) {
                this.gate.put_spare(spare);
                return Poll::Ready(Some(Ok(window)));
            }
        }
        let size = copy_chunk_size();
        let mut buf = match spare {
            Some(buf) if buf.len() == size => buf,
            _ => vec![0; size],
        };
        let want = size.min(usize::try_from(this.end - this.pos).unwrap_or(usize::MAX));
        if this.nowait {
            match read_cached(&this.file, &mut buf[..want], this.pos) {
                Ok(0) => {} // end of file: the blocking read reports it
                Ok(n) => return Poll::Ready(Some(Ok(this.copied(buf, n)))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if nowait_unsupported(&e) => this.nowait = false,
                Err(e) => {
                    this.gate.leave(Some(buf));
                    return this.fail(e);
                }
            }
        }
        let file = this.file.clone();
        let pos = this.pos;
        this.reading = Some(tokio::task::spawn_blocking(move || {
            read_exact_at(&file, &mut buf[..want], pos).map(|()| (buf, want))
        }));
        // Poll the read just started, so that its completion wakes us.
        self.poll_next(cx)
    }
}

/// Whether the page cache holds all of `len` bytes of `file` at `offset`,
/// by `cachestat(2)` (Linux 6.5+): one walk over the range's folios,
/// where `mincore` looks each page up on its own (measured: `mincore` on
/// 8 MiB windows was 18 % of the CPU of a pull). `None` when the kernel
/// lacks it (then `mincore` is used on the mapping).
#[cfg(target_os = "linux")]
fn cached_by_cachestat(file: &File, offset: u64, len: usize) -> Option<bool> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicBool;
    /// The syscall's number, the same on every architecture.
    const SYS_CACHESTAT: libc::c_long = 451;
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    if len == 0 || UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    let range = Range {
        off: offset,
        len: len as u64,
    };
    let mut stat = Stat::default();
    // SAFETY: the pointers are to live structs of the layout the kernel
    // expects (include/uapi/linux/mman.h); the file is open.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc != 0 {
        if matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)
        ) {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
        return None;
    }
    let page = page_size() as u64;
    let first_page = offset / page;
    let end_page = (offset + len as u64).div_ceil(page);
    Some(stat.nr_cache >= end_page - first_page)
}

#[cfg(not(target_os = "linux"))]
fn cached_by_cachestat(_file: &File, _offset: u64, _len: usize) -> Option<bool> {
    None
}

/// The kernel's page size.
#[cfg(target_os = "linux")]
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| {
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
    })
}

/// Whether every page of `map` is in the page cache.
#[cfg(target_os = "linux")]
fn resident(map: &memmap2::Mmap) -> bool {
    let page = page_size();
    let addr = map.as_ptr() as usize;
    let start = addr - addr % page;
    let len = addr + map.len() - start;
    let pages = len.div_ceil(page);
    let mut vec = [0u8; MAX_MAPPED_CHUNK / 4096 + 2];
    if pages > vec.len() {
        return false;
    }
    // SAFETY: [start, start + len) lies within the mapping `map` made
    // (mmap maps from the page holding its offset); `vec` has room for one
    // byte per page.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
    rc == 0 && vec[..pages].iter().all(|b| b & 1 == 1)
}

#[cfg(not(target_os = "linux"))]
fn resident(_map: &memmap2::Mmap) -> bool {
    false
}

/// Reads what the page cache holds of `buf.len()` bytes at `pos` without
/// blocking; `WouldBlock` when nothing is cached.
#[cfg(target_os = "linux")]
fn read_cached(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let offset =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which is valid for writes of its length
    // and outlives the call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(not(target_os = "linux"))]
fn read_cached(_file: &File, _buf: &mut [u8], _pos: u64) -> io::Result<usize> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Whether a failed non-blocking read means the kernel or file system does
/// not support them (then all reads go through the blocking pool).
fn nowait_unsupported(e: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    if matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    ) {
        return true;
    }
    e.kind() == io::ErrorKind::Unsupported
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], pos: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, pos)
}

#[cfg(not(unix))]
fn read_exact_at(mut file: &File, buf: &mut [u8], pos: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(pos))?;
    file.read_exact(buf)
}

/// One chunk of a download in flight at a time; keeps the copy buffer
/// between chunks.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    in_flight: bool,
    spare: Option<Vec<u8>>,
    /// The stream, waiting for the chunk in flight to be written.
    waiting: Option<Waker>,
}

impl Gate {
    /// Claims the turn for a new chunk: `Some(spare buffer)`, or `None`
    /// (and a wake-up later) while a chunk is in flight.
    fn enter(&self, cx: &mut Context<'_>) -> Option<Option<Vec<u8>>> {
        let mut state = self.state.lock();
        if state.in_flight {
            state.waiting = Some(cx.waker().clone());
            return None;
        }
        state.in_flight = true;
        Some(state.spare.take())
    }

    /// Keeps a buffer the turn did not use.
    fn put_spare(&self, spare: Option<Vec<u8>>) {
        if spare.is_some() {
            self.state.lock().spare = spare;
        }
    }

    /// The chunk in flight is done with; its buffer (if any) is kept.
    fn leave(&self, buf: Option<Vec<u8>>) {
        let waiting = {
            let mut state = self.state.lock();
            state.in_flight = false;
            if buf.is_some() {
                state.spare = buf;
            }
            state.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

/// A copied chunk handed to the HTTP layer; the buffer returns to the
/// download when the bytes have been sent (or dropped).
struct Copied {
    buf: Vec<u8>,
    len: usize,
    gate: Arc<Gate>,
}

impl AsRef<[u8]> for Copied {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Copied {
    fn drop(&mut self) {
        self.gate.leave(Some(std::mem::take(&mut self.buf)));
    }
}

/// A mapped window handed to the HTTP layer; unregistered and unmapped
/// when sent, before the next window may be mapped.
struct Mapped {
    map: Option<memmap2::Mmap>,
    regions: Arc<FileRegions>,
    gate: Arc<Gate>,
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            self.regions.remove(map.as_ptr() as usize);
        }
        self.gate.leave(None);
    }
}

/// The mapped windows of the downloads on one plain connection, by
/// address, so that its socket writer can send them from their files.
#[derive(Default)]
pub struct FileRegions {
    regions: Mutex<Vec<Region>>,
}

struct Region {
    start: usize,
    len: usize,
    file: Arc<File>,
    /// The file offset of `start`.
    offset: u64,
}

/// Bytes of a file to send instead of the memory that mirrors them.
pub struct FileSpan {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: usize,
}

impl FileRegions {
    fn add(&self, region: Region) {
        self.regions.lock().push(region);
    }

    fn remove(&self, start: usize) {
        self.regions.lock().retain(|r| r.start != start);
    }

    /// The file bytes that `len` bytes of memory at `ptr` mirror, when they
    /// start inside a registered window (cut at the window's end).
    pub fn find(&self, ptr: *const u8, len: usize) -> Option<FileSpan> {
        let at = ptr as usize;
        let regions = self.regions.lock();
        let r = regions
            .iter()
            .find(|r| at >= r.start && at < r.start + r.len)?;
        let skip = at - r.start;
        Some(FileSpan {
            file: r.file.clone(),
            offset: r.offset + skip as u64,
            len: len.min(r.len - skip),
        })
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.regions.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use futures_util::StreamExt;

    use super::*;

    fn blob(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(&data).expect("write");
        f.as_file().sync_all().expect("sync");
        (f, data)
    }

    async fn collect(f: &tempfile::NamedTempFile, start: u64, len: u64, d: Delivery) -> Vec<u8> {
        let file = File::open(f.path()).expect("open");
        let mut stream = stream_file(file, start, len, d);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.expect("chunk"));
        }
        out
    }

    #[tokio::test]
    async fn both_paths_stream_exact_ranges() {
        // Larger than one mapped window, so that ranges cross its end.
        let (f, data) = blob(MAX_MAPPED_CHUNK + 3 * 1024 * 1024 + 123);
        for d in [Delivery::Buffered, Delivery::PlainSocket(Arc::default())] {
            for (start, len) in [
                (0, data.len()),
                (1, 4095),
                (4095, 1024 * 1024 + 2),
                (4096 * 3 + 17, data.len() - (4096 * 3 + 17)),
                (data.len() - 1, 1),
                (MAX_MAPPED_CHUNK - 5, 10),
                (0, 0),
            ] {
                let got = collect(&f, start as u64, len as u64, d.clone()).await;
                assert!(got == data[start..start + len], "{d:?} {start}+{len}");
            }
        }
    }

    #[tokio::test]
    async fn mapped_windows_are_used_for_cached_files() {
        let (f, data) = blob(2 * 1024 * 1024);
        // Read once so that the pages are cached.
        let _ = std::fs::read(f.path()).expect("read");

        let regions = Arc::new(FileRegions::default());
        let file = File::open(f.path()).expect("open");
        let mut stream = stream_file(
            file,
            0,
            data.len() as u64,
            Delivery::PlainSocket(regions.clone()),
        );
        let first = stream.next().await.expect("a chunk").expect("chunk");
        // The chunk is registered as the file's bytes while it lives.
        let span = regions
            .find(first.as_ptr(), first.len())
            .expect("registered");
        assert_eq!((span.offset, span.len), (0, first.len()));
        let inner = regions.find(first[10..].as_ptr(), 5).expect("inside");
        assert_eq!((inner.offset, inner.len), (10, 5));
        let mut got = first.to_vec();
        drop(first);
        assert!(regions.is_empty(), "a sent window is unregistered");
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.expect("chunk"));
        }
        assert!(got == data);
    }

    #[tokio::test]
    async fn an_unlinked_file_streams_to_the_end() {
        let (f, data) = blob(1024 * 1024 + 5);
        let file = File::open(f.path()).expect("open");
        let mut stream = stream_file(
            file,
            0,
            data.len() as u64,
            Delivery::PlainSocket(Arc::default()),
        );
        let mut out = Vec::new();
        out.extend_from_slice(&stream.next().await.expect("first").expect("chunk"));
        std::fs::remove_file(f.path()).expect("unlink");
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.expect("chunk"));
        }
        assert!(out == data);
    }

    /// Both residency checks see pages dropped from the page cache, and
    /// pages read back.
    #[cfg(target_os = "linux")]
    #[test]
    fn residency_checks_follow_the_page_cache() {
        use std::os::fd::AsRawFd;
        let (f, data) = blob(4 * 1024 * 1024);
        let file = File::open(f.path()).expect("open");
        let map = |file: &File| {
            // SAFETY: a test file nobody writes meanwhile.
            unsafe { memmap2::MmapOptions::new().len(data.len()).map(file) }.expect("map")
        };
        // SAFETY: plain advice on an open descriptor.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        assert_ne!(cached_by_cachestat(&file, 0, data.len()), Some(true));
        assert!(!resident(&map(&file)));
        let _ = std::fs::read(f.path()).expect("read");
        assert_ne!(cached_by_cachestat(&file, 0, data.len()), Some(false));
        assert!(resident(&map(&file)));
    }

    #[test]
    fn chunks_shrink_as_downloads_multiply() {
        let solo = copy_chunk_size();
        let guards: Vec<_> = (0..1000).map(|_| ActiveDownload::new()).collect();
        assert_eq!(copy_chunk_size(), MIN_CHUNK);
        drop(guards);
        assert!(solo > MIN_CHUNK);
    }
}
