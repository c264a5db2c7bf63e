//! Crash-safe record of which parts of a download are durable. A part is appended only
//! after its bytes were written and fdatasync'ed, so after `kill -9` or power loss the next
//! run trusts exactly the journaled parts and refetches the rest (at most the parts that
//! were in flight or waiting for their sync).
//!
//! Records are fixed 24 bytes (file, part, the part's CRC for whole-file verification by
//! combination) with their own CRC32C; a torn record at the tail (the crash
//! happened mid-append) is dropped and truncated away.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: u16 = 0x4854; // "HT"
const VERSION: u8 = 1;
const KIND_PART: u8 = 1;
/// Forget every earlier part of `file` (it failed verification and is fetched again).
const KIND_RESET: u8 = 2;
const RECORD: usize = 24;

#[derive(Debug, thiserror::Error)]
#[error("journal {path}: {source}")]
pub struct JournalError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

/// One durable part: which file, which part, and the part's CRC (0 when unused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRecord {
    pub file: u32,
    pub part: u32,
    pub crc: u64,
}

fn encode(p: PartRecord) -> [u8; RECORD] {
    encode_kind(KIND_PART, p)
}

fn encode_kind(kind: u8, p: PartRecord) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    r[2] = VERSION;
    r[3] = kind;
    r[4..8].copy_from_slice(&p.file.to_le_bytes());
    r[8..12].copy_from_slice(&p.part.to_le_bytes());
    r[12..20].copy_from_slice(&p.crc.to_le_bytes());
    let crc = crc32c::crc32c(&r[0..20]);
    r[20..24].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode(r: &[u8]) -> Option<(u8, PartRecord)> {
    if r.len() != RECORD {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
    let ok = u16::from_le_bytes([r[0], r[1]]) == MAGIC
        && r[2] == VERSION
        && (r[3] == KIND_PART || r[3] == KIND_RESET)
        && crc32c::crc32c(&r[0..20]) == word(20);
    let mut c = [0u8; 8];
    c.copy_from_slice(&r[12..20]);
    ok.then(|| (r[3], PartRecord { file: word(4), part: word(8), crc: u64::from_le_bytes(c) }))
}

impl Journal {
    /// Opens (creating if needed) and returns the durable (file, part) records in order.
    pub fn open(path: &Path) -> Result<(Self, Vec<PartRecord>), JournalError> {
        let err = |source| JournalError { path: path.to_owned(), source };
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let mut records = Vec::with_capacity(bytes.len() / RECORD);
        let mut good = 0usize;
        for chunk in bytes.chunks(RECORD) {
            match decode(chunk) {
                Some((KIND_RESET, r)) => {
                    records.retain(|p: &PartRecord| p.file != r.file);
                    good += RECORD;
                }
                Some((_, r)) => {
                    records.push(r);
                    good += RECORD;
                }
                // Everything after the first bad record was written after it: not durable.
                None => break,
            }
        }
        if good < bytes.len() {
            file.set_len(good as u64).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        Ok((Self { path: path.to_owned(), file }, records))
    }

    /// Durably forgets every part of `file` recorded so far.
    pub fn reset_file(&mut self, file: u32) -> Result<(), JournalError> {
        let err = |source| JournalError { path: self.path.clone(), source };
        self.file.write_all(&encode_kind(KIND_RESET, PartRecord { file, part: 0, crc: 0 })).map_err(err)?;
        self.file.sync_data().map_err(err)
    }

    /// Appends records and makes them durable before returning.
    pub fn append(&mut self, parts: &[PartRecord]) -> Result<(), JournalError> {
        if parts.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(parts.len() * RECORD);
        for &p in parts {
            buf.extend_from_slice(&encode(p));
        }
        let err = |source| JournalError { path: self.path.clone(), source };
        self.file.write_all(&buf).map_err(err)?;
        self.file.sync_data().map_err(err)
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(file: u32, part: u32) -> PartRecord {
        PartRecord { file, part, crc: u64::from(file) << 32 | u64::from(part) }
    }

    #[test]
    fn records_survive_reopen_and_torn_tails_are_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("journal");
        let (mut j, recs) = Journal::open(&p).unwrap();
        assert!(recs.is_empty());
        j.append(&[rec(0, 0), rec(0, 1), rec(3, 7)]).unwrap();
        drop(j);
        // A crash mid-append leaves half a record.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&encode(rec(9, 9))[..7]).unwrap();
        drop(f);
        let (mut j, recs) = Journal::open(&p).unwrap();
        assert_eq!(recs, vec![rec(0, 0), rec(0, 1), rec(3, 7)]);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 72, "torn tail truncated");
        j.append(&[rec(1, 2)]).unwrap();
        let (_, recs) = Journal::open(&p).unwrap();
        assert_eq!(recs.last(), Some(&rec(1, 2)));
    }

    #[test]
    fn reset_forgets_a_files_parts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("journal");
        let (mut j, _) = Journal::open(&p).unwrap();
        j.append(&[rec(0, 0), rec(1, 0), rec(0, 1)]).unwrap();
        j.reset_file(0).unwrap();
        j.append(&[rec(0, 3)]).unwrap();
        let (_, recs) = Journal::open(&p).unwrap();
        assert_eq!(recs, vec![rec(1, 0), rec(0, 3)]);
    }

    #[test]
    fn a_corrupt_record_ends_the_trusted_prefix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("journal");
        let (mut j, _) = Journal::open(&p).unwrap();
        j.append(&[rec(0, 0), rec(0, 1), rec(0, 2)]).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[RECORD + 5] ^= 0xff;
        std::fs::write(&p, bytes).unwrap();
        let (_, recs) = Journal::open(&p).unwrap();
        assert_eq!(recs, vec![rec(0, 0)]);
    }
}
