//! SHA-256 of a file whose parts arrive out of order, without reading the file back.
//!
//! A digest must see the bytes in file order, but parts land in whatever order their reads
//! finish. The part that is next in order is hashed from the buffer it arrived in. A part
//! that is ahead stays in its buffer, hashed when its turn comes, while the reader goes on with
//! a spare buffer: the window (shared by the whole download) is a fixed number of spare part
//! buffers, allocated once and reused, so memory stays bounded and nothing is copied. Only
//! when the window is used up does a part go unhashed: it is written through the page cache
//! and read back from there when its turn comes, so even then the bytes usually come from
//! memory, not the disk. Parts made durable by an earlier run are read back too: they were
//! never in this process.
//!
//! Whoever finds the next part available hashes it and goes on with the ones after it, so
//! hashing needs no thread of its own and one slow part never blocks the others' reads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::buf::AlignedBuf;
use super::verify::{Digester, Expected, VerifyError};

/// Part buffers that may wait for their file's digest, across one download.
#[derive(Debug)]
pub struct Window {
    /// Bytes of part buffers that may still be held.
    free: AtomicU64,
    /// Buffers given back after their part was hashed, for the next reader that hands one over.
    spares: Mutex<Vec<AlignedBuf>>,
    /// Bytes hashed from the data file rather than from memory (window full, or resumed).
    pub reread: AtomicU64,
}

impl Window {
    pub fn new(bytes: u64) -> Arc<Self> {
        Arc::new(Self { free: AtomicU64::new(bytes), spares: Mutex::default(), reread: AtomicU64::new(0) })
    }

    fn try_take(&self, n: u64) -> bool {
        self.free.fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| f.checked_sub(n)).is_ok()
    }

    fn give(&self, n: u64) {
        self.free.fetch_add(n, Ordering::AcqRel);
    }

    /// A buffer of `capacity` bytes for a reader that handed its own over.
    fn spare(&self, capacity: usize) -> AlignedBuf {
        let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        match spares.iter().position(|b| b.capacity() == capacity) {
            Some(i) => spares.swap_remove(i),
            None => AlignedBuf::new(capacity),
        }
    }

    /// A held buffer whose part is hashed: its bytes of the window are free again.
    fn release(&self, buf: AlignedBuf, bytes: u64) {
        self.spares.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
        self.give(bytes);
    }
}

#[derive(Debug)]
enum Part {
    /// Not written yet.
    Missing,
    /// Written, and its buffer is held in the window.
    Held(AlignedBuf),
    /// Written; its bytes must be read back from the data file.
    OnDisk,
    Hashed,
}

struct Inner {
    /// Taken out by whoever is hashing; `None` means someone is.
    digester: Option<Digester>,
    next: u32,
    parts: Vec<Part>,
    /// A read-back failed: the digest can no longer be completed in this run.
    failed: Option<String>,
}

/// What a worker does with a part it has just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The part is next: hash it from the buffer, then go on with what follows.
    Hash,
    /// Ahead of the digest, and the window had room: the buffer waits, the reader takes a spare.
    Hold,
    /// Ahead, and the window is full: write it through the page cache, read it back later.
    Spill,
}

pub struct OrderedDigest {
    expected: Expected,
    size: u64,
    part_size: u64,
    window: Arc<Window>,
    inner: Mutex<Inner>,
    idle: Condvar,
}

impl std::fmt::Debug for OrderedDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("OrderedDigest").field("size", &self.size).field("next", &g.next).field("failed", &g.failed).finish()
    }
}

impl OrderedDigest {
    pub fn new(expected: Expected, size: u64, part_size: u64, window: Arc<Window>) -> Self {
        let n = size.div_ceil(part_size).max(1) as usize;
        let inner =
            Inner { digester: Some(Digester::new(&expected, size)), next: 0, parts: (0..n).map(|_| Part::Missing).collect(), failed: None };
        Self { expected, size, part_size, window, inner: Mutex::new(inner), idle: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn part_len(&self, part: u32) -> u64 {
        super::fetch::part_len(self.size, self.part_size, part)
    }

    /// Bytes the whole download hashed by reading them back.
    pub fn reread(&self) -> u64 {
        self.window.reread.load(Ordering::Relaxed)
    }

    /// Parts already durable from an earlier run: hashed from the file when their turn comes.
    pub fn mark_on_disk(&self, part: u32) {
        let mut g = self.lock();
        if let Some(p @ Part::Missing) = g.parts.get_mut(part as usize) {
            *p = Part::OnDisk;
        }
    }

    /// Decides, before `part` is written, how its bytes will reach the digest. `capacity` is
    /// the reader's buffer size: only a buffer that holds a whole part is swapped for a spare.
    ///
    /// With the window used up, the reader waits up to `patience` for its part to come next
    /// or for room, rather than have the part read back: parts ahead of the digest are
    /// usually only a part time or so ahead, and a reader waiting with its buffer costs no
    /// memory, while a read-back costs a copy and often a disk read.
    /// `give_up` ends the wait early (the download is cancelled or over).
    pub fn claim(&self, part: u32, capacity: usize, patience: Duration, give_up: impl Fn() -> bool) -> Claim {
        let deadline = Instant::now() + patience;
        let mut g = self.lock();
        loop {
            if g.next == part && g.digester.is_some() {
                return Claim::Hash;
            }
            if capacity as u64 >= self.part_size && self.window.try_take(self.part_size) {
                return Claim::Hold;
            }
            let now = Instant::now();
            if now >= deadline || g.failed.is_some() || give_up() {
                return Claim::Spill;
            }
            // Room in the window may come from another file's digest, which does not wake
            // this one: look again every few milliseconds too.
            let wait = (deadline - now).min(Duration::from_millis(5));
            g = self.idle.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// After the part claimed as `claim` is written from `buf`: hashes it if it is next (and
    /// every available part after it), else records where its bytes are. Returns the buffer
    /// the reader goes on with: its own, or a spare when its own is held. `file` is the data
    /// file, for parts not in memory.
    pub fn written(&self, part: u32, claim: Claim, buf: AlignedBuf, file: &File) -> AlignedBuf {
        let mut g = self.lock();
        let keep = if g.next == part && g.digester.is_some() {
            // Whatever the claim said: the part is next now, and its bytes are at hand.
            let mut d = g.digester.take().expect("checked above");
            drop(g);
            d.update(buf.as_slice());
            g = self.lock();
            g.parts[part as usize] = Part::Hashed;
            g.next += 1;
            g.digester = Some(d);
            self.idle.notify_all();
            self.abandon(claim);
            buf
        } else {
            match g.parts.get_mut(part as usize) {
                // A part hashed already (delivered twice) stays hashed.
                Some(p) if !matches!(p, Part::Hashed) => {
                    if claim == Claim::Hold {
                        let capacity = buf.capacity();
                        *p = Part::Held(buf);
                        drop(g);
                        self.drive(file);
                        return self.window.spare(capacity);
                    }
                    *p = Part::OnDisk;
                }
                _ => self.abandon(claim),
            }
            buf
        };
        drop(g);
        self.drive(file);
        keep
    }

    /// The write after a claim failed, or the buffer was not held after all: gives back what
    /// the claim took.
    pub fn abandon(&self, claim: Claim) {
        if claim == Claim::Hold {
            self.window.give(self.part_size);
        }
    }

    /// Hashes available parts in order, unless someone else is at it (they will see what
    /// was recorded: states change and the hasher stops only under the lock).
    fn drive(&self, file: &File) {
        let g = self.lock();
        if g.digester.is_some() {
            drop(self.run(g, file, false));
        }
    }

    /// Takes the digester and hashes parts in order until one is not available. With `all`,
    /// parts not recorded yet are read from the file too (every part is known durable).
    /// Returns with the digester put back and the lock held.
    fn run<'a>(&'a self, mut g: MutexGuard<'a, Inner>, file: &File, all: bool) -> MutexGuard<'a, Inner> {
        let Some(mut d) = g.digester.take() else { return g };
        let mut buf = Vec::new();
        while (g.next as usize) < g.parts.len() && g.failed.is_none() {
            let k = g.next;
            match std::mem::replace(&mut g.parts[k as usize], Part::Hashed) {
                Part::Held(b) => {
                    drop(g);
                    d.update(b.as_slice());
                    self.window.release(b, self.part_size);
                    g = self.lock();
                }
                Part::OnDisk => g = self.read_back(g, &mut d, &mut buf, k, file),
                Part::Missing if all => g = self.read_back(g, &mut d, &mut buf, k, file),
                other => {
                    g.parts[k as usize] = other;
                    break;
                }
            }
            if g.failed.is_none() {
                g.next += 1;
                // A reader waiting for this part's turn may go on.
                self.idle.notify_all();
            }
        }
        g.digester = Some(d);
        self.idle.notify_all();
        g
    }

    /// Reads part `k` back from the file into the digest; the lock is released meanwhile.
    fn read_back<'a>(
        &'a self,
        g: MutexGuard<'a, Inner>,
        d: &mut Digester,
        buf: &mut Vec<u8>,
        k: u32,
        file: &File,
    ) -> MutexGuard<'a, Inner> {
        let len = self.part_len(k) as usize;
        buf.resize(len, 0);
        drop(g);
        let r = file.read_exact_at(buf, u64::from(k) * self.part_size);
        let mut g = self.lock();
        match r {
            Ok(()) => {
                d.update(buf);
                self.window.reread.fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(e) => {
                g.parts[k as usize] = Part::OnDisk;
                g.failed = Some(format!("reading part {k} back: {e}"));
            }
        }
        g
    }

    fn wait_idle<'a>(&'a self, mut g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        while g.digester.is_none() {
            g = self.idle.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g
    }

    /// Once every part is durable: hashes whatever is left (after any hasher at work is done)
    /// and checks the digest against what was expected. Either way the state starts over, so
    /// a file fetched again is hashed afresh.
    pub fn finish(&self, file: &File) -> Result<(), VerifyError> {
        let g = self.wait_idle(self.lock());
        let mut g = self.run(g, file, true);
        let failed = g.failed.take();
        let d = g.digester.take().expect("run puts the digester back");
        self.clear(&mut g);
        drop(g);
        if let Some(reason) = failed {
            return Err(VerifyError::Io { path: "data file".into(), source: std::io::Error::other(reason) });
        }
        d.finish()
    }

    /// Starts over (the file is fetched again): drops held copies, back to part 0.
    pub fn reset(&self) {
        let mut g = self.wait_idle(self.lock());
        self.clear(&mut g);
    }

    fn clear(&self, g: &mut Inner) {
        for p in &mut g.parts {
            if let Part::Held(b) = std::mem::replace(p, Part::Missing) {
                self.window.release(b, self.part_size);
            }
        }
        g.next = 0;
        g.failed = None;
        g.digester = Some(Digester::new(&self.expected, self.size));
    }
}

impl Drop for OrderedDigest {
    fn drop(&mut self) {
        // A cancelled download hands its held copies back to the window it shares.
        let g = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        for p in g.parts.drain(..) {
            if let Part::Held(b) = p {
                self.window.release(b, self.part_size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use sha2::Digest;

    use super::*;

    const PART: u64 = 1000;

    struct Fx {
        _d: tempfile::TempDir,
        file: File,
        data: Vec<u8>,
        expected: Expected,
    }

    /// A data file of `size` bytes (all zero: nothing written yet) and the bytes it should get.
    fn fixture(size: usize) -> Fx {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("data");
        let mut rng = fastrand::Rng::with_seed(size as u64);
        let data: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
        std::fs::File::create(&path).unwrap().write_all(&vec![0; size]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let expected = Expected::Sha256(sha2::Sha256::digest(&data).into());
        Fx { _d: d, file, data, expected }
    }

    impl Fx {
        fn parts(&self) -> u32 {
            (self.data.len() as u64).div_ceil(PART) as u32
        }
        fn bytes(&self, p: u32) -> &[u8] {
            let start = (u64::from(p) * PART) as usize;
            &self.data[start..(start + PART as usize).min(self.data.len())]
        }
        /// What a worker does: claim, write the part to the file, report it.
        fn deliver(&self, d: &OrderedDigest, p: u32) -> Claim {
            let mut buf = AlignedBuf::new(PART as usize);
            let capacity = buf.capacity();
            buf.set_len(self.bytes(p).len());
            buf.as_mut_slice().copy_from_slice(self.bytes(p));
            let claim = d.claim(p, buf.capacity(), Duration::ZERO, || false);
            self.file.write_all_at(self.bytes(p), u64::from(p) * PART).unwrap();
            let back = d.written(p, claim, buf, &self.file);
            assert_eq!(back.capacity(), capacity, "the reader always gets a part buffer back");
            claim
        }
    }

    fn shuffled(n: u32, seed: u64) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n).collect();
        fastrand::Rng::with_seed(seed).shuffle(&mut v);
        v
    }

    #[test]
    fn parts_in_any_order_hash_from_memory_when_the_window_holds_them() {
        let fx = fixture(25_500);
        let window = Window::new(1 << 20);
        let d = OrderedDigest::new(fx.expected, fx.data.len() as u64, PART, window.clone());
        for p in shuffled(fx.parts(), 1) {
            fx.deliver(&d, p);
        }
        d.finish(&fx.file).unwrap();
        assert_eq!(d.reread(), 0, "every part was hashed from memory");
        assert_eq!(window.free.load(Ordering::Relaxed), 1 << 20, "the window is whole again");
    }

    #[test]
    fn with_no_window_parts_ahead_are_read_back_and_the_digest_is_the_same() {
        let fx = fixture(25_500);
        let d = OrderedDigest::new(fx.expected, fx.data.len() as u64, PART, Window::new(0));
        let order = shuffled(fx.parts(), 2);
        let claims: Vec<Claim> = order.iter().map(|&p| fx.deliver(&d, p)).collect();
        assert!(claims.contains(&Claim::Spill) && !claims.contains(&Claim::Hold));
        d.finish(&fx.file).unwrap();
        assert!(d.reread() > 0 && d.reread() < fx.data.len() as u64, "read back {} bytes", d.reread());
    }

    #[test]
    fn a_byte_that_differs_fails_and_the_digest_starts_over() {
        let mut fx = fixture(10_000);
        let good = fx.data.clone();
        fx.data[4321] ^= 1;
        let d = OrderedDigest::new(fx.expected, good.len() as u64, PART, Window::new(1 << 20));
        for p in shuffled(fx.parts(), 3) {
            fx.deliver(&d, p);
        }
        let e = d.finish(&fx.file).unwrap_err();
        assert!(e.to_string().contains("sha256"), "{e}");
        // Fetched again, right this time: the state was reset by the failed finish.
        fx.data = good;
        for p in shuffled(fx.parts(), 4) {
            fx.deliver(&d, p);
        }
        d.finish(&fx.file).unwrap();
    }

    #[test]
    fn with_the_window_full_a_reader_waits_for_its_turn_rather_than_have_its_part_read_back() {
        let fx = fixture(3_000);
        let d = OrderedDigest::new(fx.expected, fx.data.len() as u64, PART, Window::new(0));
        std::thread::scope(|s| {
            let waiting = s.spawn(|| d.claim(1, 4096, Duration::from_secs(20), || false));
            std::thread::sleep(Duration::from_millis(50));
            fx.deliver(&d, 0);
            assert_eq!(waiting.join().unwrap(), Claim::Hash, "part 1 came next while it waited");
        });
        assert_eq!(d.claim(2, 4096, Duration::from_millis(20), || false), Claim::Spill, "part 1 never arrived: it gives up");
        let t = Instant::now();
        assert_eq!(d.claim(2, 4096, Duration::from_secs(20), || true), Claim::Spill);
        assert!(t.elapsed() < Duration::from_secs(5), "a cancelled download does not wait");
    }

    #[test]
    fn parts_from_an_earlier_run_are_read_back_and_the_rest_streamed() {
        let fx = fixture(20_000);
        for p in [0u32, 1, 5, 6, 19] {
            fx.file.write_all_at(fx.bytes(p), u64::from(p) * PART).unwrap();
        }
        let d = OrderedDigest::new(fx.expected, fx.data.len() as u64, PART, Window::new(1 << 20));
        for p in [0u32, 1, 5, 6, 19] {
            d.mark_on_disk(p);
        }
        for p in shuffled(fx.parts(), 5).into_iter().filter(|p| ![0, 1, 5, 6, 19].contains(p)) {
            fx.deliver(&d, p);
        }
        d.finish(&fx.file).unwrap();
        assert_eq!(d.reread(), 5 * PART);
    }

    #[test]
    fn a_reset_mid_download_gives_the_window_back() {
        let fx = fixture(30_000);
        let window = Window::new(5 * PART);
        let d = OrderedDigest::new(fx.expected, fx.data.len() as u64, PART, window.clone());
        for p in [3u32, 4, 5, 9] {
            assert_eq!(fx.deliver(&d, p), Claim::Hold);
        }
        assert_eq!(window.free.load(Ordering::Relaxed), PART);
        d.reset();
        assert_eq!(window.free.load(Ordering::Relaxed), 5 * PART);
        for p in [7u32, 8] {
            fx.deliver(&d, p);
        }
        drop(d);
        assert_eq!(window.free.load(Ordering::Relaxed), 5 * PART, "a dropped digest gives back what it held");
    }

    #[test]
    fn many_threads_delivering_at_once_agree_with_one_pass() {
        for seed in 0..20 {
            let fx = fixture(64_321);
            let window = Window::new(6 * PART);
            let d = OrderedDigest::new(fx.expected, fx.data.len() as u64, PART, window.clone());
            let order = shuffled(fx.parts(), seed);
            let next = AtomicU64::new(0);
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                            let Some(&p) = order.get(i) else { return };
                            fx.deliver(&d, p);
                        }
                    });
                }
            });
            d.finish(&fx.file).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(window.free.load(Ordering::Relaxed), 6 * PART, "seed {seed}");
            let spares = window.spares.lock().unwrap().len();
            assert!(spares <= 6, "seed {seed}: {spares} spare buffers for a window of 6 parts");
        }
    }
}
