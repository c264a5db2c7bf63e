//! Writes a model-shaped directory: config and tokenizer JSON, and safetensors shards with
//! valid headers and pseudo-random tensor data. Local mode serves one as its FSx-style
//! source; tests and benchmarks build their fixtures with it.

use std::io::Write;
use std::path::Path;

/// Deterministic filler, fast enough to write hundreds of MiB in well under a second.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A safetensors file of `size` bytes (header included) holding one U8 tensor.
pub fn write_safetensors(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    // Pad the header with spaces so data starts 8-byte aligned, as writers do.
    let mut header = String::new();
    let mut data_len = size.saturating_sub(128);
    for _ in 0..4 {
        header = format!(
            "{{\"__metadata__\":{{\"format\":\"pt\"}},\"weight\":{{\"dtype\":\"U8\",\"shape\":[{data_len}],\"data_offsets\":[0,{data_len}]}}}}"
        );
        while !(8 + header.len()).is_multiple_of(8) {
            header.push(' ');
        }
        data_len = size.saturating_sub(8 + header.len() as u64);
    }
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    f.write_all(&(header.len() as u64).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    let mut chunk = vec![0u8; 4 << 20];
    let mut left = data_len;
    let mut n = 0u64;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        fill(&mut chunk[..take], seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n);
        f.write_all(&chunk[..take])?;
        left -= take as u64;
        n += 1;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// A model directory: `shards` safetensors files of `shard_bytes` each, plus the small JSON
/// files a loader reads first.
pub fn write_sample_model(dir: &Path, shards: u32, shard_bytes: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), br#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"num_hidden_layers":32}"#)?;
    std::fs::write(dir.join("generation_config.json"), br#"{"temperature":0.6,"top_p":0.9}"#)?;
    let mut tok = vec![0u8; 200_000];
    fill(&mut tok, 42);
    let tok: String = tok.iter().map(|b| char::from(b'a' + b % 26)).collect();
    std::fs::write(dir.join("tokenizer.json"), format!("{{\"model\":{{\"vocab\":\"{tok}\"}}}}"))?;
    let mut weight_map = Vec::new();
    for i in 1..=shards {
        let name = format!("model-{i:05}-of-{shards:05}.safetensors");
        write_safetensors(&dir.join(&name), shard_bytes, u64::from(i))?;
        weight_map.push(format!("\"layer.{i}\":\"{name}\""));
    }
    std::fs::write(dir.join("model.safetensors.index.json"), format!("{{\"weight_map\":{{{}}}}}", weight_map.join(",")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_have_valid_headers_and_exact_sizes() {
        let d = tempfile::tempdir().unwrap();
        write_sample_model(d.path(), 2, 1_000_003).unwrap();
        let p = d.path().join("model-00002-of-00002.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len(), 1_000_003);
        let h = crate::cache::verify::check_safetensors_header(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(h.tensors, 1);
        assert_ne!(std::fs::read(d.path().join("model-00001-of-00002.safetensors")).unwrap()[1000..1100], bytes[1000..1100]);
    }
}
