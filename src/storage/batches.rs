//! Carries a streamed upload's bytes from the network to its writer and
//! hasher threads in batches of reused buffers.
//!
//! Handing hyper's body frames on as they are cost more than copying them:
//! while a frame is held by the writer or the hasher, hyper cannot reuse its
//! read buffer and allocates a fresh one (a new mapping, page faults and
//! zeroing, then an unmap with a TLB flush on every core), and each frame
//! of a few dozen KiB woke both threads. Copying each frame at once into a
//! batch lets hyper read into the same buffer again, and a batch wakes each
//! thread once per [`BATCH`] bytes. The copy is the cheapest step of the
//! path (measured in docs/PERFORMANCE.md, "Monolithic pushes").

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::ByteStream;

/// Bytes per batch. Large enough that waking the threads is rare, small
/// enough that the batches in flight of one upload (see [`POOL`]) stay
/// near a MiB.
pub(super) const BATCH: usize = 256 * 1024;
/// Batches queued to each of the writer and the hasher.
pub(super) const QUEUE: usize = 2;
/// Batches an upload keeps for reuse: those queued to the writer and the
/// hasher, one in the hands of each, and the one being filled.
const POOL: usize = QUEUE + 3;

/// A full (or final) batch, shared by the writer and the hasher.
pub(super) type Batch = Arc<Vec<u8>>;

/// Buffers kept between requests: one upload's worth ([`POOL`] and the
/// one being filled), 1.5 MiB.
const SPARE_MAX: usize = POOL + 1;

/// Batch buffers that requests have finished with, for the next request to
/// fill. A buffer is larger than glibc's mmap threshold (`src/memory.rs`),
/// so a fresh one is a new mapping: 64 page faults and zeroing as it is
/// filled, and an unmap when freed. A chunked upload needed six fresh
/// ones for each 8 MiB PATCH (measured: 63 000 page faults in three
/// pushes of 512 MiB, against 1 200 monolithic; docs/PERFORMANCE.md).
pub(super) struct Spare {
    buffers: Mutex<Vec<Vec<u8>>>,
    /// Whether a buffer was taken since the last [`Spare::release_if_idle`].
    taken: AtomicBool,
}

/// The spare buffers of the process.
pub(super) static SPARE: Spare = Spare::new();

impl Spare {
    const fn new() -> Self {
        Spare {
            buffers: Mutex::new(Vec::new()),
            taken: AtomicBool::new(false),
        }
    }

    fn take(&self) -> Option<Vec<u8>> {
        let buffer = self.buffers.lock().pop();
        if buffer.is_some() {
            self.taken.store(true, Ordering::Relaxed);
        }
        buffer
    }

    /// Keeps `buffer` for a later request, unless enough are kept.
    fn give(&self, mut buffer: Vec<u8>) {
        let mut buffers = self.buffers.lock();
        if buffers.len() < SPARE_MAX && buffer.capacity() >= BATCH {
            buffer.clear();
            buffers.push(buffer);
        }
    }

    /// Frees the spare buffers if none was taken since the last call, so
    /// that an idle server does not keep them resident. Called by the
    /// periodic trim (`src/memory.rs`).
    pub(super) fn release_if_idle(&self) {
        if !self.taken.swap(false, Ordering::Relaxed) {
            self.buffers.lock().clear();
        }
    }
}

/// The batches one request handed out, oldest first; one that both
/// threads have dropped is filled again. Dropped once the threads are done
/// (see [`pump`]), it gives its buffers to the spares.
pub(super) struct Pool {
    sent: VecDeque<Batch>,
    spare: &'static Spare,
}

impl Pool {
    pub(super) fn new(spare: &'static Spare) -> Self {
        Pool {
            sent: VecDeque::new(),
            spare,
        }
    }

    /// An empty buffer: the oldest sent batch if both threads are done
    /// with it, else a spare one, else a new one.
    fn take(&mut self) -> Vec<u8> {
        if let Some(oldest) = self.sent.pop_front() {
            match Arc::try_unwrap(oldest) {
                Ok(mut buffer) => {
                    buffer.clear();
                    return buffer;
                }
                Err(still_used) => self.sent.push_front(still_used),
            }
        }
        self.spare
            .take()
            .unwrap_or_else(|| Vec::with_capacity(BATCH))
    }

    /// Remembers a batch handed out, forgetting the oldest beyond [`POOL`]
    /// (it is freed when the threads drop it).
    fn sent(&mut self, batch: &Batch) {
        self.sent.push_back(Arc::clone(batch));
        if self.sent.len() > POOL {
            self.sent.pop_front();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A batch a thread still holds is freed when that thread drops it.
        for batch in self.sent.drain(..) {
            if let Ok(buffer) = Arc::try_unwrap(batch) {
                self.spare.give(buffer);
            }
        }
    }
}

/// Feeds the body to the writer and the hasher until it ends, in buffers of
/// `pool` (drop it after the writer and the hasher are done, so that it can
/// keep their buffers for the next request); returns the body's error, if
/// it broke off. A batch is sent when full, or when no
/// more of the body has arrived and the writer has nothing queued, so
/// batching never keeps bytes from a writer that could take them. A
/// writer that failed stops the pump (its error is reported by its
/// handle).
pub(super) async fn pump(
    body: ByteStream,
    pool: &mut Pool,
    writer: &mpsc::Sender<Batch>,
    hasher: Option<&mpsc::Sender<Batch>>,
) -> Option<io::Error> {
    let mut batch = pool.take();
    let error = pump_batches(body, pool, &mut batch, writer, hasher).await;
    pool.spare.give(batch);
    error
}

async fn pump_batches(
    mut body: ByteStream,
    pool: &mut Pool,
    batch: &mut Vec<u8>,
    writer: &mpsc::Sender<Batch>,
    hasher: Option<&mpsc::Sender<Batch>>,
) -> Option<io::Error> {
    loop {
        // Wait only when the batch is empty; otherwise take what is there,
        // or send the batch once the writer has nothing else to do.
        let item = if batch.is_empty() {
            body.next().await
        } else {
            let Some(item) = more_or_writer_idle(&mut body, writer).await else {
                if !send(pool, batch, writer, hasher).await {
                    return None;
                }
                continue;
            };
            item
        };
        let chunk = match item {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                // What arrived before the break is kept, as a client may
                // resume after it.
                let _ = send(pool, batch, writer, hasher).await;
                return Some(e);
            }
            None => {
                let _ = send(pool, batch, writer, hasher).await;
                return None;
            }
        };
        let mut rest = chunk.as_ref();
        while !rest.is_empty() {
            let n = (BATCH - batch.len()).min(rest.len());
            batch.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if batch.len() == BATCH && !send(pool, batch, writer, hasher).await {
                return None;
            }
        }
    }
}

/// Waits, with a part-filled batch in hand, for whichever comes first: more
/// of the body (returned; what has already arrived is taken at once), or a
/// writer with no batch queued (None: the batch should go now). A writer
/// that still has batches queued would not get to this one sooner, so
/// sending it early only costs a hand-off: on a fast connection the socket
/// is often momentarily empty, and sending at each such moment made most
/// batches a single socket read (reads averaged 76 KiB) instead of 256 KiB,
/// with 2.5 times the context switches (docs/PERFORMANCE.md). A body that
/// stalls does not hold bytes back: the batch goes as soon as the writer
/// runs dry.
async fn more_or_writer_idle(
    body: &mut ByteStream,
    writer: &mpsc::Sender<Batch>,
) -> Option<Option<io::Result<bytes::Bytes>>> {
    tokio::select! {
        // The body first, so that bytes already there fill the batch.
        biased;
        item = body.next() => Some(item),
        // Every slot free means the queue is empty. A writer that is gone
        // ends the wait too (its error is reported by its handle).
        idle = writer.reserve_many(writer.max_capacity()) => {
            drop(idle); // the slots go back before `send` takes one
            None
        }
    }
}

/// Sends `batch` (unless empty) to the hasher and the writer and puts a
/// fresh buffer in its place. False if the writer is gone.
async fn send(
    pool: &mut Pool,
    batch: &mut Vec<u8>,
    writer: &mpsc::Sender<Batch>,
    hasher: Option<&mpsc::Sender<Batch>>,
) -> bool {
    if batch.is_empty() {
        return true;
    }
    let full: Batch = Arc::new(std::mem::replace(batch, pool.take()));
    pool.sent(&full);
    // The hasher sees exactly the batches the writer gets, so its state
    // stays in step with the file.
    if let Some(hash_tx) = hasher {
        if hash_tx.send(Arc::clone(&full)).await.is_err() {
            return false; // cannot happen while the task runs
        }
    }
    writer.send(full).await.is_ok()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// Runs `pump` over `chunks` (an error after them if `fail`) and
    /// returns what the writer and the hasher received.
    async fn pumped(chunks: Vec<Bytes>, fail: bool) -> (Vec<Batch>, Vec<Batch>, bool) {
        let mut items: Vec<io::Result<Bytes>> = chunks.into_iter().map(Ok).collect();
        if fail {
            items.push(Err(io::Error::other("cut")));
        }
        let body: ByteStream = Box::pin(futures_util::stream::iter(items));
        let (wtx, mut wrx) = mpsc::channel(64);
        let (htx, mut hrx) = mpsc::channel(64);
        let mut pool = Pool::new(own_spare());
        let error = pump(body, &mut pool, &wtx, Some(&htx)).await;
        drop((wtx, htx));
        let (mut written, mut hashed) = (Vec::new(), Vec::new());
        while let Some(b) = wrx.recv().await {
            written.push(b);
        }
        while let Some(b) = hrx.recv().await {
            hashed.push(b);
        }
        (written, hashed, error.is_some())
    }

    /// Spare buffers of one test alone (tests run in parallel).
    fn own_spare() -> &'static Spare {
        Box::leak(Box::new(Spare::new()))
    }

    fn joined(batches: &[Batch]) -> Vec<u8> {
        batches.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[tokio::test]
    async fn frames_arrive_whole_and_in_order_in_full_batches() {
        // Frames of awkward sizes, some larger than a batch.
        let sizes = [1, 4095, BATCH - 1, 3 * BATCH + 7, 17, BATCH, 65_536];
        let mut all = Vec::new();
        let chunks: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let part: Vec<u8> = (0..n).map(|j| (i * 31 + j * 7) as u8).collect();
                all.extend_from_slice(&part);
                Bytes::from(part)
            })
            .collect();
        let (written, hashed, failed) = pumped(chunks, false).await;
        assert!(!failed);
        assert_eq!(joined(&written), all);
        assert_eq!(joined(&hashed), all);
        // Everything was ready, so every batch but the last is full.
        let (last, full) = written.split_last().expect("batches");
        assert!(full.iter().all(|b| b.len() == BATCH));
        assert!(!last.is_empty() && last.len() <= BATCH);
    }

    /// A body fed by hand: frames sent on the returned channel, ended by
    /// dropping it.
    fn fed_body() -> (mpsc::UnboundedSender<Bytes>, ByteStream) {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok(b), rx))
        });
        (tx, Box::pin(body))
    }

    /// A pump to a writer (a queue of `capacity`) that has one batch, `[0]`,
    /// not yet taken, given a first frame of 1000 bytes of 1 and left to
    /// find nothing more. Returns the body's feed, the writer's end, and
    /// the pump.
    async fn pump_behind_a_queued_batch(
        capacity: usize,
    ) -> (
        mpsc::UnboundedSender<Bytes>,
        mpsc::Receiver<Batch>,
        tokio::task::JoinHandle<Option<io::Error>>,
    ) {
        let (wtx, wrx) = mpsc::channel::<Batch>(capacity);
        wtx.send(Arc::new(vec![0u8])).await.unwrap();
        let (feed, body) = fed_body();
        let pump =
            tokio::spawn(async move { pump(body, &mut Pool::new(own_spare()), &wtx, None).await });
        feed.send(Bytes::from(vec![1u8; 1000])).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        (feed, wrx, pump)
    }

    /// While the writer still has a batch queued, frames that arrive apart
    /// go into one batch instead of one batch each.
    #[tokio::test]
    async fn frames_arriving_apart_share_a_batch_while_the_writer_is_busy() {
        // Room for every batch, so that the pump never waits for a slot.
        let (feed, mut wrx, pump) = pump_behind_a_queued_batch(8).await;
        feed.send(Bytes::from(vec![2u8; 1000])).unwrap();
        drop(feed);
        assert!(pump.await.unwrap().is_none());
        let mut got = Vec::new();
        while let Some(b) = wrx.recv().await {
            got.push(b);
        }
        assert_eq!(
            got.len(),
            2,
            "the queued batch, then one batch of both frames"
        );
        let mut both = vec![1u8; 1000];
        both.extend_from_slice(&[2u8; 1000]);
        assert_eq!(got[1].as_slice(), both.as_slice());
    }

    /// A body that stalls does not hold its bytes back: the part-filled
    /// batch goes to the writer as soon as the writer has nothing queued.
    #[tokio::test]
    async fn a_stalled_body_hands_its_bytes_on_once_the_writer_is_idle() {
        let (feed, mut wrx, pump) = pump_behind_a_queued_batch(QUEUE).await;
        // The writer takes its queued batch; the body sends nothing more.
        assert_eq!(wrx.recv().await.unwrap().as_slice(), &[0u8]);
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), wrx.recv())
            .await
            .expect("the stalled body's bytes reach the writer")
            .unwrap();
        assert_eq!(next.as_slice(), &[1u8; 1000][..]);
        drop(feed);
        assert!(pump.await.unwrap().is_none());
    }

    #[tokio::test]
    async fn bytes_before_a_break_are_delivered_and_the_error_returned() {
        let (written, hashed, failed) = pumped(vec![Bytes::from(vec![9u8; 1000])], true).await;
        assert!(failed);
        assert_eq!(joined(&written), vec![9u8; 1000]);
        assert_eq!(joined(&hashed), vec![9u8; 1000]);
    }

    #[tokio::test]
    async fn an_empty_body_sends_nothing() {
        let (written, hashed, failed) = pumped(Vec::new(), false).await;
        assert!(!failed && written.is_empty() && hashed.is_empty());
    }

    #[test]
    fn a_batch_both_threads_dropped_is_reused() {
        let mut pool = Pool::new(own_spare());
        let first = Arc::new(pool.take());
        let ptr = first.as_ptr();
        pool.sent(&first);
        let held = Arc::clone(&first);
        drop(first);
        // Still held by a thread: a new buffer.
        let fresh = pool.take();
        assert_ne!(fresh.as_ptr(), ptr);
        drop(held);
        let reused = pool.take();
        assert_eq!(reused.as_ptr(), ptr);
        assert!(reused.is_empty() && reused.capacity() >= BATCH);
    }

    /// A request's buffers outlive it as spares, up to [`SPARE_MAX`], for
    /// the next request to fill; they are freed after an interval in which
    /// no request took one.
    #[test]
    fn buffers_pass_to_the_next_request_and_are_freed_when_idle() {
        let spare = own_spare();
        let mut first = Pool::new(spare);
        let mut pointers = Vec::new();
        for _ in 0..SPARE_MAX + 2 {
            let batch = Arc::new(first.take());
            pointers.push(batch.as_ptr());
            first.sent(&batch);
        }
        drop(first);
        let kept = spare.buffers.lock().len();
        assert!(kept > 0 && kept <= SPARE_MAX, "kept {kept}");
        let mut next = Pool::new(spare);
        let reused = next.take();
        assert!(
            pointers.contains(&reused.as_ptr()),
            "a spare buffer is reused"
        );
        assert!(reused.is_empty() && reused.capacity() >= BATCH);
        // Taken since the last look: kept.
        spare.release_if_idle();
        assert_eq!(spare.buffers.lock().len(), kept - 1);
        // Nothing taken since: freed.
        spare.release_if_idle();
        assert!(spare.buffers.lock().is_empty());
    }
}
