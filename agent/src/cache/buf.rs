//! Part buffers aligned for O_DIRECT, without unsafe: over-allocate by one alignment unit
//! and use the aligned window inside.

/// Direct I/O wants the buffer address, file offset and length aligned to the logical block
/// size; 4 KiB covers NVMe and every common filesystem.
pub const ALIGN: usize = 4096;

#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `capacity` bytes (rounded up to ALIGN), of length `capacity`.
    pub fn new(capacity: usize) -> Self {
        let cap = capacity.div_ceil(ALIGN) * ALIGN;
        let raw = vec![0u8; cap + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Self { raw, start, len: capacity }
    }

    pub fn capacity(&self) -> usize {
        self.raw.len() - ALIGN
    }

    /// Sets the used length (at most the capacity).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    /// The used bytes rounded up to ALIGN, for an O_DIRECT write of the aligned prefix.
    pub fn aligned_prefix_len(&self) -> usize {
        self.len / ALIGN * ALIGN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        for cap in [1, 4096, 8 << 20, 5000] {
            let mut b = AlignedBuf::new(cap);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), cap);
            assert!(b.capacity() >= cap);
            b.set_len(10);
            assert_eq!(b.as_mut_slice().len(), 10);
        }
        let mut b = AlignedBuf::new(10_000);
        assert_eq!(b.aligned_prefix_len(), 8192);
        b.set_len(1 << 30);
        assert_eq!(b.len(), b.capacity());
    }
}
