//! Property tests of what `verify` reads from outside: safetensors headers (any bytes are
//! checked or refused without a panic; a header laid out from random tensors is accepted;
//! moving one offset is refused naming that tensor), `hearth-manifest.json` and S3 checksum
//! headers. Only the module's public entry points are used, so its tables can change freely.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::prelude::*;
use serde_json::json;

use super::verify::{Expected, Manifest, SafetensorsHeader, VerifyError, check_safetensors_header, parse_s3_checksum};

/// Dtypes every safetensors reader knows, with their element sizes.
const DTYPES: &[(&str, u64)] = &[("U8", 1), ("I8", 1), ("F16", 2), ("BF16", 2), ("F32", 4), ("I32", 4), ("F64", 8), ("I64", 8)];

#[derive(Debug, Clone)]
struct Tensor {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    begin: u64,
    end: u64,
}

/// Tensors laid out one after another in the data section, filling it exactly (what the
/// safetensors reference loader requires: no gaps, nothing after the last tensor), and the
/// data section's length.
fn tensors() -> impl Strategy<Value = (Vec<Tensor>, u64)> {
    let one = (prop::sample::select(DTYPES), prop::collection::vec(0u64..6, 0..4));
    (prop::collection::btree_set("[a-z._0-9]{1,12}", 0..6), prop::collection::vec(one, 6)).prop_map(|(names, specs)| {
        let mut at = 0;
        let mut out = Vec::new();
        for (name, ((dtype, size), shape)) in names.into_iter().zip(specs) {
            let begin = at;
            let end = begin + size * shape.iter().product::<u64>();
            at = end;
            out.push(Tensor { name, dtype, shape, begin, end });
        }
        (out, at)
    })
}

fn header_json(ts: &[Tensor], metadata: &BTreeMap<String, String>) -> String {
    let mut m = serde_json::Map::new();
    if !metadata.is_empty() {
        m.insert("__metadata__".into(), json!(metadata));
    }
    for t in ts {
        m.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [t.begin, t.end]}));
    }
    serde_json::Value::Object(m).to_string()
}

/// The file's first bytes (length, header) and the whole file's size.
fn file(header: &str, data_len: u64) -> (Vec<u8>, u64) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let size = bytes.len() as u64 + data_len;
    (bytes, size)
}

fn metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("[a-z]{1,6}", "\\PC{0,8}", 0..3)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_prefix_is_checked_or_refused_consistently(
        prefix in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            // A plausible length followed by anything, so the JSON parser gets to run.
            (0u64..48, prop::collection::vec(any::<u8>(), 0..48)).prop_map(|(n, rest)| [n.to_le_bytes().to_vec(), rest].concat()),
            (0u64..48, "\\{\\PC{0,40}").prop_map(|(n, j)| [n.to_le_bytes().to_vec(), j.into_bytes()].concat()),
        ],
        file_size in prop_oneof![0u64..200, Just(u64::MAX), any::<u64>()],
    ) {
        let declared = prefix.first_chunk::<8>().map(|b| u64::from_le_bytes(*b));
        match check_safetensors_header(&prefix, file_size) {
            Ok(h) => {
                prop_assert_eq!(Some(h.header_len), declared);
                prop_assert_eq!(h.data_len.checked_add(8 + h.header_len), Some(file_size));
            }
            Err(VerifyError::NeedMore { needed }) => {
                prop_assert!(needed > prefix.len() as u64, "asked for {} bytes with {} in hand", needed, prefix.len());
                prop_assert_eq!(needed, declared.map_or(8, |n| 8 + n));
            }
            Err(e @ (VerifyError::Header(_) | VerifyError::Tensor { .. })) => prop_assert!(!e.to_string().is_empty()),
            Err(e) => prop_assert!(false, "unexpected error kind: {}", e),
        }
    }

    #[test]
    fn headers_of_random_tensors_are_accepted((ts, data_len) in tensors(), meta in metadata(), extra in 0usize..16) {
        let header = header_json(&ts, &meta);
        let (mut prefix, size) = file(&header, data_len);
        let want = SafetensorsHeader { header_len: header.len() as u64, tensors: ts.len(), data_len, unknown_dtypes: Default::default() };
        // Bytes past the header (the caller read more than needed) change nothing.
        prefix.extend(std::iter::repeat_n(0xAB, extra));
        prop_assert_eq!(check_safetensors_header(&prefix, size).ok(), Some(want));
        // Too short a prefix asks for exactly the header.
        let cut = &prefix[..8 + header.len() - 1];
        let got = check_safetensors_header(cut, size);
        prop_assert!(matches!(got, Err(VerifyError::NeedMore { needed }) if needed == 8 + header.len() as u64), "{:?}", got);
    }

    #[test]
    fn a_moved_offset_is_refused_naming_its_tensor(
        (ts, data_len) in tensors().prop_filter("a tensor to move", |(ts, _)| !ts.is_empty()),
        which in any::<prop::sample::Index>(),
        move_end in any::<bool>(),
        delta in prop_oneof![1u64..8, Just(1 << 40)],
        up in any::<bool>(),
    ) {
        let mut ts = ts;
        let i = which.index(ts.len());
        let t = &mut ts[i];
        let at = if move_end { &mut t.end } else { &mut t.begin };
        *at = if up || *at < delta { *at + delta } else { *at - delta };
        let name = t.name.clone();
        let header = header_json(&ts, &BTreeMap::new());
        let (prefix, size) = file(&header, data_len);
        match check_safetensors_header(&prefix, size) {
            Err(VerifyError::Tensor { name: n, problem }) => prop_assert_eq!(n, name, "{}", problem),
            other => prop_assert!(false, "moving {}'s offset was not refused: {:?}", name, other),
        }
    }

    #[test]
    fn any_manifest_parses_or_says_why(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (any::<u64>(), prop::collection::btree_map("[a-z./]{0,8}", (any::<u64>(), "[0-9a-fA-F]{62,66}"), 0..3)).prop_map(|(version, files)| {
            let files: BTreeMap<_, _> = files.into_iter().map(|(k, (size, sha))| (k, json!({"size": size, "sha256": sha}))).collect();
            json!({"version": version % 3, "files": files}).to_string().into_bytes()
        }),
    ]) {
        match Manifest::parse(&bytes) {
            Ok(m) => {
                prop_assert!(m.files.keys().all(|k| !k.split('/').any(|p| p.is_empty() || p == "." || p == "..")), "{:?}", m);
                prop_assert_eq!(Manifest::parse(m.to_json().as_bytes()).ok(), Some(m));
            }
            Err(e) => prop_assert!(e.to_string().starts_with("manifest: "), "{}", e),
        }
    }

    #[test]
    fn s3_checksums_decode_exactly_or_say_why(
        algorithm in prop_oneof![prop::sample::select(vec!["CRC64NVME", "crc32c", "Sha256", "CRC32", "MD5", ""]).prop_map(str::to_owned), "\\PC{0,8}"],
        raw in prop::collection::vec(any::<u8>(), 0..40),
        mangle in prop_oneof![4 => Just(None), 1 => "[-=A-Za-z0-9+/ ]{0,4}".prop_map(Some)],
    ) {
        let mut value = BASE64.encode(&raw);
        if let Some(m) = &mangle {
            value.push_str(m);
        }
        // What the value decodes to, mangled or not.
        let decoded = BASE64.decode(&value).ok();
        match parse_s3_checksum(&algorithm, &value) {
            Ok(Expected::Crc64Nvme(v)) => prop_assert_eq!(Some(v.to_be_bytes().to_vec()), decoded),
            Ok(Expected::Crc32c(v)) => prop_assert_eq!(Some(v.to_be_bytes().to_vec()), decoded),
            Ok(Expected::Sha256(v)) => prop_assert_eq!(Some(v.to_vec()), decoded),
            Ok(Expected::SizeOnly) => prop_assert!(false, "a checksum header never means size only"),
            Err(e) => prop_assert!(e.to_string().starts_with("S3 "), "{}", e),
        }
    }
}
