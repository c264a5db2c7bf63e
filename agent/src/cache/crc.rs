//! Part CRCs and their combination into whole-file CRCs. S3's CRC64NVME and CRC32C
//! full-object checksums can be combined from per-part values, so workers checksum the
//! parts they fetch in parallel and the file is verified without reading it again.

/// CRC-64/NVME of one buffer (PCLMULQDQ / VPCLMULQDQ at run time where available).
pub fn crc64nvme(data: &[u8]) -> u64 {
    let mut d = crc64fast_nvme::Digest::new();
    d.write(data);
    d.sum64()
}

/// CRC-64/NVME's polynomial, bit-reflected.
const POLY64_REFLECTED: u64 = 0x9a6c_9329_ac4b_c9b5;

fn gf2_times(mat: &[u64; 64], mut vec: u64) -> u64 {
    let mut sum = 0;
    let mut i = 0;
    while vec != 0 {
        if vec & 1 != 0 {
            sum ^= mat[i];
        }
        vec >>= 1;
        i += 1;
    }
    sum
}

fn gf2_square(square: &mut [u64; 64], mat: &[u64; 64]) {
    for n in 0..64 {
        square[n] = gf2_times(mat, mat[n]);
    }
}

/// The CRC-64/NVME of `A || B` from `crc(A)`, `crc(B)` and `len(B)` (zlib's method: apply
/// len(B) zero bytes to crc(A) by repeated squaring of the shift operator).
pub fn crc64nvme_combine(mut crc1: u64, crc2: u64, mut len2: u64) -> u64 {
    if len2 == 0 {
        return crc1;
    }
    let mut odd = [0u64; 64];
    let mut even = [0u64; 64];
    odd[0] = POLY64_REFLECTED;
    let mut row = 1u64;
    for slot in odd.iter_mut().skip(1) {
        *slot = row;
        row <<= 1;
    }
    gf2_square(&mut even, &odd);
    gf2_square(&mut odd, &even);
    loop {
        gf2_square(&mut even, &odd);
        if len2 & 1 != 0 {
            crc1 = gf2_times(&even, crc1);
        }
        len2 >>= 1;
        if len2 == 0 {
            break;
        }
        gf2_square(&mut odd, &even);
        if len2 & 1 != 0 {
            crc1 = gf2_times(&odd, crc1);
        }
        len2 >>= 1;
        if len2 == 0 {
            break;
        }
    }
    crc1 ^ crc2
}

/// Which CRC a file's parts carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartCrc {
    None,
    Crc64Nvme,
    Crc32c,
}

impl PartCrc {
    pub fn of(self, data: &[u8]) -> u64 {
        match self {
            PartCrc::None => 0,
            PartCrc::Crc64Nvme => crc64nvme(data),
            PartCrc::Crc32c => u64::from(crc32c::crc32c(data)),
        }
    }

    /// Folds per-part CRCs (in order, with each part's length) into the whole-file CRC.
    pub fn combine(self, parts: impl IntoIterator<Item = (u64, u64)>) -> u64 {
        let mut it = parts.into_iter();
        let Some((first, _)) = it.next() else {
            return self.of(&[]);
        };
        it.fold(first, |acc, (crc, len)| match self {
            PartCrc::None => 0,
            PartCrc::Crc64Nvme => crc64nvme_combine(acc, crc, len),
            PartCrc::Crc32c => u64::from(crc32c::crc32c_combine(acc as u32, crc as u32, len as usize)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(crc64nvme(b"123456789"), 0xae8b_1486_0a79_9888);
    }

    #[test]
    fn combined_parts_equal_the_whole() {
        let data: Vec<u8> = (0..100_003u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for kind in [PartCrc::Crc64Nvme, PartCrc::Crc32c] {
            for part in [1usize, 7, 4096, 33_333, 100_003] {
                let parts = data.chunks(part).map(|c| (kind.of(c), c.len() as u64));
                assert_eq!(kind.combine(parts), kind.of(&data), "{kind:?} part={part}");
            }
        }
        assert_eq!(PartCrc::Crc64Nvme.combine(std::iter::empty()), crc64nvme(&[]));
    }
}
