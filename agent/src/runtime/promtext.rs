//! A reader for the Prometheus text exposition format (and OpenMetrics text, which engines
//! may serve instead), enough to take samples out of a model server's `/metrics`: metric
//! name, labels, value. Comments, `# HELP`/`# TYPE`, exemplars and timestamps are skipped.
//!
//! Our own code rather than a crate: the one maintained-looking parser on crates.io is
//! LGPL, the other has had no release since 2022 and brings chrono and a regex per line;
//! this is the subset we need, and a property test holds it to never panicking on input
//! an engine (or anything listening on its port) sends.

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Every sample of `text`; lines that do not parse are skipped (and counted).
pub fn parse(text: &str) -> (Vec<Sample>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some(s) => out.push(s),
            None => bad += 1,
        }
    }
    (out, bad)
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let (l, after) = parse_labels(r)?;
        labels = l;
        rest = after;
    }
    // Value, then an optional timestamp, then an optional OpenMetrics exemplar.
    let rest = rest.split(" # ").next().unwrap_or("");
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.to_owned(), labels, value })
}

/// Labels up to the closing brace; returns them and the text after the brace.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        rest = rest[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        }
    }
}

/// The samples of one metric family, by exact name, whose labels include `with`.
pub fn find<'a>(samples: &'a [Sample], name: &'a str, with: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| s.name == name && with.iter().all(|(k, v)| s.label(k) == Some(*v)))
}

/// The sum of a family's samples matching `with`; None when there are none.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let mut it = find(samples, name, with).map(|s| s.value).filter(|v| v.is_finite()).peekable();
    it.peek()?;
    Some(it.sum())
}

/// Cumulative histogram buckets `(le, count)` of `<base>_bucket` matching `with`, summed
/// over any other labels, sorted by `le`.
pub fn buckets(samples: &[Sample], base: &str, with: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let name = format!("{base}_bucket");
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for s in find(samples, &name, with) {
        let Some(le) = s.label("le").and_then(|l| if l == "+Inf" { Some(f64::INFINITY) } else { l.parse().ok() }) else { continue };
        match by_le.iter_mut().find(|(l, _)| *l == le) {
            Some(e) => e.1 += s.value,
            None => by_le.push((le, s.value)),
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_le
}

/// The q-quantile of cumulative buckets, interpolated linearly within the bucket it falls
/// in (as PromQL's `histogram_quantile`); None without observations. A quantile in the
/// `+Inf` bucket is the highest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    // NaN totals fail `> 0.0` too.
    let observed = total > 0.0;
    if !observed || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_count) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let in_bucket = count - prev_count;
            let frac = if in_bucket > 0.0 { (rank - prev_count) / in_bucket } else { 1.0 };
            return Some(prev_le + (le - prev_le) * frac);
        }
        (prev_le, prev_count) = (le, count);
    }
    Some(prev_le)
}

/// Buckets observed since `before` (a counter reset, as after an engine restart, starts
/// over from `now`).
pub fn delta(now: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let reset = now.iter().any(|(le, c)| before.iter().any(|(l, b)| l == le && b > c));
    now.iter()
        .map(|&(le, c)| {
            let b = if reset { 0.0 } else { before.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, b)| *b) };
            (le, c - b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_labels_escapes_and_special_values() {
        let text = "# HELP x y\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m \\\"q\\\"\",engine=\"0\"} 3.0\n\
                    up 1 1712345678000\nh_bucket{le=\"+Inf\"} 7\nbad line here\nnan_metric NaN\nom_total 5 # {trace_id=\"a\"} 1.0\n";
        let (s, bad) = parse(text);
        assert_eq!(bad, 1, "{s:?}");
        assert_eq!(s[0].name, "vllm:num_requests_running");
        assert_eq!(s[0].label("model_name"), Some("m \"q\""));
        assert_eq!(s[0].value, 3.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("up", 1.0));
        assert_eq!(s[2].label("le"), Some("+Inf"));
        assert!(s[3].value.is_nan());
        assert_eq!((s[4].name.as_str(), s[4].value), ("om_total", 5.0));
    }

    #[test]
    fn quantiles_interpolate_like_promql() {
        let b = [(0.1, 2.0), (0.5, 6.0), (1.0, 10.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.5, &b), Some(0.4));
        assert_eq!(quantile(0.1, &b), Some(0.05));
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.99, &[(1.0, 1.0), (f64::INFINITY, 10.0)]), Some(1.0));
        // Only what was observed since the last read counts; a reset starts over.
        assert_eq!(delta(&[(1.0, 5.0), (f64::INFINITY, 9.0)], &[(1.0, 4.0), (f64::INFINITY, 6.0)]), vec![(1.0, 1.0), (f64::INFINITY, 3.0)]);
        assert_eq!(delta(&[(1.0, 1.0), (f64::INFINITY, 2.0)], &[(1.0, 4.0), (f64::INFINITY, 6.0)]), vec![(1.0, 1.0), (f64::INFINITY, 2.0)]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Whatever answers on an engine's port, reading it never panics.
        #[test]
        fn never_panics(text in "[a-z_:{}=\"\\\\, .0-9#+\\-\nIfNa]{0,200}") {
            let (samples, _) = parse(&text);
            let b = buckets(&samples, "h", &[]);
            let _ = quantile(0.5, &b);
        }
    }
}
