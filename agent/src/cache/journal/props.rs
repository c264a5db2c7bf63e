//! Property tests of journal recovery: any bytes as a journal file open without a panic to
//! a record-aligned prefix of themselves that reopens unchanged and takes appends; a journal
//! of random records with a torn or corrupted tail recovers exactly the intact prefix.

use proptest::prelude::*;
use proptest::sample::Index;

use super::*;

#[derive(Debug, Clone, Copy)]
enum Op {
    Part(PartRecord),
    Reset(u32),
}

fn op() -> impl Strategy<Value = Op> {
    // Few files, so resets hit files that have parts.
    let part = (0u32..4, any::<u32>(), any::<u64>()).prop_map(|(file, part, crc)| Op::Part(PartRecord { file, part, crc }));
    prop_oneof![6 => part, 1 => (0u32..4).prop_map(Op::Reset)]
}

fn bytes_of(ops: &[Op]) -> Vec<u8> {
    ops.iter()
        .flat_map(|op| match *op {
            Op::Part(p) => encode(p),
            Op::Reset(file) => encode_kind(KIND_RESET, PartRecord { file, part: 0, crc: 0 }),
        })
        .collect()
}

/// The parts a journal of `ops` vouches for.
fn replay(ops: &[Op]) -> Vec<PartRecord> {
    let mut out: Vec<PartRecord> = Vec::new();
    for op in ops {
        match *op {
            Op::Part(p) => out.push(p),
            Op::Reset(file) => out.retain(|p| p.file != file),
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Damage {
    /// A crash mid-append: the first `n` bytes of one more record.
    Torn(usize),
    /// A byte of some record changed.
    Corrupt(Index, Index, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (1usize..RECORD).prop_map(Damage::Torn),
        (any::<Index>(), any::<Index>(), 1u8..=255).prop_map(|(r, b, x)| Damage::Corrupt(r, b, x)),
    ]
}

fn open_bytes(bytes: &[u8]) -> Result<(tempfile::TempDir, PathBuf, Journal, Vec<PartRecord>), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let path = dir.path().join("journal");
    std::fs::write(&path, bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (j, recs) = Journal::open(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok((dir, path, j, recs))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn any_bytes_recover_to_a_prefix_that_stays_put(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..100),
            // Valid records then garbage, so recovery has something to keep.
            (prop::collection::vec(op(), 0..5), prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(ops, junk)| [bytes_of(&ops), junk].concat()),
        ],
        more in prop::collection::vec((0u32..4, any::<u32>()), 0..3),
    ) {
        let (_dir, path, j, recs) = open_bytes(&bytes)?;
        drop(j);
        let kept = read(&path);
        prop_assert_eq!(kept.len() % RECORD, 0);
        prop_assert!(bytes.starts_with(&kept), "recovery rewrote bytes it kept");
        let (mut j, again) = Journal::open(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&again, &recs);
        prop_assert_eq!(read(&path), kept);
        // The recovered journal takes appends, and they come back after it.
        let parts: Vec<PartRecord> = more.iter().map(|&(file, part)| PartRecord { file, part, crc: 7 }).collect();
        j.append(&parts).map_err(|e| TestCaseError::fail(e.to_string()))?;
        drop(j);
        let (_, after) = Journal::open(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(after, [recs, parts].concat());
    }

    #[test]
    fn a_damaged_tail_recovers_exactly_the_intact_prefix(ops in prop::collection::vec(op(), 1..20), damage in damage()) {
        let mut bytes = bytes_of(&ops);
        let intact = match damage {
            Damage::Torn(n) => {
                bytes.extend_from_slice(&encode(PartRecord { file: 9, part: 9, crc: 9 })[..n]);
                ops.len()
            }
            Damage::Corrupt(r, b, x) => {
                let r = r.index(ops.len());
                bytes[r * RECORD + b.index(RECORD)] ^= x;
                r
            }
        };
        let (_dir, path, _j, recs) = open_bytes(&bytes)?;
        prop_assert_eq!(recs, replay(&ops[..intact]));
        prop_assert_eq!(read(&path).len(), intact * RECORD, "the damaged tail is truncated away");
    }
}
